/**
 * A remote SRC with a bmap (`copy --bmap FILE host:IMG DST`): the pipeline walks the bmap's
 * mapped ranges, and this Source fetches what differs in each piece. Pulled, it hands the
 * pipeline each piece as DST will hold it, so the bmap's range checksums can be verified
 * here (a VerifyingSource around it, as for a local bmap copy):
 *
 *   piece of a mapped range ─► DST's bytes (zeros for a new or empty DST)
 *        │ one HASH_REQ for the piece (unit = its length): equal? done
 *        │ differs: finer hashes (HashDiffer), DATA_REQ for the differing spans
 *        └► the spans patched into the piece; recorded in the SpanBook for RefinedTarget
 *
 * Relayed (DST on another host), DST's agent answers the same HASH_REQs for its side, and
 * only the fetched spans of the piece are meaningful (they are all the pipeline writes).
 *
 * The agent reads only the mapped ranges of SRC (no TOP_HASHES stream), and DST is read only
 * there. Reads may cover several chunks (a VerifyingSource reads a range of up to 32 MiB at
 * once); they are cut at the pipeline's chunk boundaries, and the pieces are compared at once.
 */

import type { Source } from '../types.js';
import { FileSource } from '../io/file-source.js';
import { HashDiffer, zeroHash } from './hash-differ.js';
import type { AgentLink } from './link.js';
import { MIN_HASH_UNIT, wireHash } from './protocol.js';
import { fetchSpans, patchSpans, readChunk, type SpanBook } from './roles.js';

export interface MappedSourceOptions {
  size: number;
  chunkSize: number;
  blockSize: number;
  /**
   * DST as it is: a local file read by offset, or (relayed) the agent on DST's host;
   * undefined: a new or empty DST, which reads as zeros.
   */
  local: FileSource | AgentLink | undefined;
  dst: string;
  /** Fetch every mapped byte (--full), without comparing. */
  full: boolean;
  /** Compare only (nothing is fetched: the pieces keep DST's bytes). */
  dryRun: boolean;
}

export class MappedSource implements Source {
  readonly size: number;
  /** Bytes of DST read to compare. */
  bytesRead = 0;
  readonly #link: AgentLink;
  readonly #book: SpanBook;
  readonly #differ: HashDiffer;
  readonly #o: MappedSourceOptions;
  readonly #inFlight = new Set<Promise<void>>();
  #stopped = false;

  /** `link`: the agent on SRC's host. */
  constructor(link: AgentLink, book: SpanBook, options: MappedSourceOptions) {
    this.size = options.size;
    this.#link = link;
    this.#book = book;
    this.#o = options;
    this.#differ = new HashDiffer(link, options.chunkSize, options.blockSize);
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const { chunkSize } = this.#o;
    if (this.#stopped) throw new Error('mapped source stopped');
    const pieces: Promise<void>[] = [];
    for (let at = offset; at < offset + length;) {
      // the pipeline's chunks: boundaries on multiples of the chunk size
      const next = Math.min(offset + length, (Math.floor(at / chunkSize) + 1) * chunkSize);
      const p = this.#piece(buf.subarray(at - offset, next - offset), at, next - at);
      this.#inFlight.add(p);
      p.then(
        () => this.#inFlight.delete(p),
        () => this.#inFlight.delete(p),
      );
      pieces.push(p);
      at = next;
    }
    await Promise.all(pieces);
    return length;
  }

  /**
   * Starts no more reads and waits for those under way (a VerifyingSource reads ranges ahead
   * of the pipeline), so that no request follows the session's DONE.
   */
  async stop(): Promise<void> {
    this.#stopped = true;
    await Promise.allSettled([...this.#inFlight]);
  }

  async #piece(buf: Buffer, offset: number, length: number): Promise<void> {
    const { local, dst, full, dryRun } = this.#o;
    const link = this.#link;
    let spans: number[];
    if (full) {
      spans = [0, length];
      if (!dryRun) await link.fetch(offset, length, buf, 0);
    } else if (local !== undefined && !(local instanceof FileSource)) {
      // both ends remote: DST's agent hashes its side
      const unit = Math.max(length, MIN_HASH_UNIT);
      const [theirs, mine] = await Promise.all([
        link.hashes(offset, length, unit),
        local.hashes(offset, length, unit),
      ]);
      spans = [];
      if (!mine.equals(theirs)) await this.#differ.refineBetween(offset, length, local, spans);
      if (!dryRun && spans.length > 0) {
        patchSpans(buf, spans, await fetchSpans(link, offset, spans));
      }
    } else {
      if (local !== undefined) {
        await readChunk(local, dst, buf, offset, length);
        this.bytesRead += length;
      } else buf.fill(0, 0, length);
      const theirs = await link.hashes(offset, length, Math.max(length, MIN_HASH_UNIT));
      const mine = local !== undefined ? wireHash(buf.subarray(0, length)) : zeroHash(length);
      spans = [];
      if (!mine.equals(theirs)) {
        await this.#differ.refine(offset, buf, length, local === undefined, spans);
      }
      if (!dryRun && spans.length > 0) {
        patchSpans(buf, spans, await fetchSpans(link, offset, spans));
      }
    }
    this.#book.set(offset, spans);
  }

  async close(): Promise<void> {}
}
