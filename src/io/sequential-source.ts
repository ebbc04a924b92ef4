/**
 * A Source over a byte stream that can only be read forward: stdin, a decompressor's output,
 * an HTTP response body.
 *
 * The pipeline keeps several reads in flight; they are queued and served one after another,
 * in the ascending order they were asked for. The bytes between one read's end and the next
 * read's offset (the gaps between a bmap's ranges) are read and dropped. A read before the
 * current position is a programming error, since the bytes are gone.
 */

import type { Source } from '../types.js';
import { BlksyncError, fromSystemError } from '../errors.js';

/**
 * The error for a stream that does not end at the size it was taken to have: `ended` is where
 * it ended when shorter, undefined when it holds more.
 */
export type WrongEnd = (ended: number | undefined) => BlksyncError;

/** A size given with --size that the stream does not end at. */
function givenSizeWrong(name: string, size: number): WrongEnd {
  return (ended) =>
    ended !== undefined
      ? new BlksyncError(
          'ESRC_SHORT',
          `${name} ended after ${ended} bytes, but --size gave ${size} bytes; ` +
            'give its real size, or check that the stream was not cut short',
          { path: name },
        )
      : new BlksyncError(
          'EUSAGE',
          `${name} is larger than the ${size} bytes given with --size; give its real size`,
        );
}

export class SequentialSource implements Source {
  readonly size: number;
  readonly #it: AsyncIterator<Buffer | string>;
  readonly #name: string;
  readonly #onClose: (() => void | Promise<void>) | undefined;
  readonly #wrongEnd: WrongEnd | undefined;
  readonly #onGap: ((data: Buffer, offset: number) => void) | undefined;
  #queue: Promise<unknown> = Promise.resolve();
  #pending: Buffer | undefined;
  #ended = false;
  /** Bytes of the stream consumed so far (handed out or skipped). */
  position = 0;

  /**
   * `stream`: the bytes; errors it raises reach the read that hits them (BlksyncErrors as
   * they are). `size`: the image size. `onClose`: releases what produced the stream.
   * `checkEnd`: the read that reaches `size` fails unless the stream ends there too (for a
   * size given by the user, or a bmap's, rather than known), and so does a skip of a gap
   * that meets the stream's end; true: with --size's errors, or the errors to give.
   * `onGap`: sees each piece of the stream skipped between reads, at its offset (a bmap's
   * unmapped areas must read as zeros); what it throws fails the read.
   */
  constructor(
    stream: AsyncIterable<Buffer | string>,
    size: number,
    name: string,
    onClose?: () => void | Promise<void>,
    checkEnd: boolean | WrongEnd = false,
    onGap?: (data: Buffer, offset: number) => void,
  ) {
    this.#onGap = onGap;
    this.#it = stream[Symbol.asyncIterator]();
    this.size = size;
    this.#name = name;
    this.#onClose = onClose;
    this.#wrongEnd = checkEnd === true ? givenSizeWrong(name, size) : checkEnd || undefined;
  }

  read(buf: Buffer, offset: number, length: number): Promise<number> {
    const result = this.#queue.then(() => this.#readAt(buf, offset, length));
    this.#queue = result.catch(() => {});
    return result;
  }

  async #next(): Promise<Buffer | undefined> {
    if (this.#pending !== undefined) {
      const p = this.#pending;
      this.#pending = undefined;
      return p;
    }
    while (!this.#ended) {
      let r: IteratorResult<Buffer | string>;
      try {
        r = await this.#it.next();
      } catch (err) {
        throw fromSystemError('EREAD', 'cannot read', this.#name, err);
      }
      if (r.done === true) {
        this.#ended = true;
        break;
      }
      const chunk = typeof r.value === 'string' ? Buffer.from(r.value) : r.value;
      if (chunk.length > 0) return chunk;
    }
    return undefined;
  }

  async #readAt(buf: Buffer, offset: number, length: number): Promise<number> {
    if (offset < this.position) {
      throw new BlksyncError(
        'EREAD',
        `${this.#name}: read at ${offset} after position ${this.position}; a stream cannot go back`,
      );
    }
    // skip the gap
    while (this.position < offset) {
      const chunk = await this.#next();
      if (chunk === undefined) {
        if (this.#wrongEnd !== undefined) throw this.#wrongEnd(this.position);
        return 0;
      }
      const skip = Math.min(chunk.length, offset - this.position);
      this.#onGap?.(chunk.subarray(0, skip), this.position);
      if (skip < chunk.length) this.#pending = chunk.subarray(skip);
      this.position += skip;
    }
    let got = 0;
    while (got < length) {
      const chunk = await this.#next();
      if (chunk === undefined) break;
      const n = Math.min(chunk.length, length - got);
      chunk.copy(buf, got, 0, n);
      if (n < chunk.length) this.#pending = chunk.subarray(n);
      got += n;
      this.position += n;
    }
    if (this.#wrongEnd !== undefined && got < length) throw this.#wrongEnd(this.position);
    if (this.#wrongEnd !== undefined && this.position === this.size) {
      const more = await this.#next();
      if (more !== undefined) throw this.#wrongEnd(undefined);
    }
    return got;
  }

  async close(): Promise<void> {
    await this.#queue;
    try {
      await this.#it.return?.();
    } catch {
      // the stream failed already; that error was reported by a read
    }
    await this.#onClose?.();
  }
}
