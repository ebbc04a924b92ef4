import type { Source } from '../../types.js';
import type { SpanBook } from '../roles.js';

/**
 * Push from a source read once, in order (a decoder, stdin, a URL, a bmap plan): each chunk
 * is compared by hashes as soon as it has been read, before it is handed to the pipeline.
 * Several chunks are in flight, so their refinement round trips overlap.
 */
export class CheckedSource implements Source {
  readonly size: number;
  readonly #inner: Source;
  readonly #book: SpanBook;
  readonly #spansOf: (offset: number, data: Buffer, length: number) => Promise<number[]>;

  constructor(
    inner: Source,
    book: SpanBook,
    spansOf: (offset: number, data: Buffer, length: number) => Promise<number[]>,
  ) {
    this.size = inner.size;
    this.#inner = inner;
    this.#book = book;
    this.#spansOf = spansOf;
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const got = await this.#inner.read(buf, offset, length);
    // a short source: the pipeline reports ESRC_SHORT
    this.#book.set(offset, got < length ? [] : await this.#spansOf(offset, buf, length));
    return got;
  }

  /** The CopySource the inner source came from closes it. */
  async close(): Promise<void> {}
}
