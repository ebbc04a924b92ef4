/**
 * `--src-index FILE|auto` on a push: an index of the local SRC, kept here and trusted under the
 * policy a local copy uses (engine/source-index.ts: SRC's identity, mtime and ctime, a clean
 * index of the right size and blocks, a sample of SRC's blocks). Its block size is that of
 * DST's index (kept by the agent, or here), known once the agent is READY.
 *
 *   DST's index used by the agent (block digests)      DST's index kept here, used
 *   SRC's index used:                                   SRC's index used:
 *     chunk digest from SRC's stored hashes               the two tables are compared first;
 *       ═ agent's TOP_HASHES digest? ─► SRC not read      only the differing blocks are read
 *       ≠ HASH_REQ in index blocks, vs SRC's hashes       (the plan, as a local copy's)
 *         ─► read only the differing blocks, each checked against SRC's index (EINDEX_STALE)
 *
 * Absent, stale, or of other blocks: SRC is read whole as the push goes (never hashed ahead,
 * since a used index would make that read needless), each block's SHA-256 is collected, and
 * the index is written after a complete copy, unless SRC changed while it was read.
 */

import { BlksyncError } from '../../errors.js';
import type { ResolvedCopyOptions } from '../../engine/copy-options.js';
import type { CopySource } from '../../engine/copy-source.js';
import { hashBlocksSync } from '../../engine/hash-pool.js';
import type { SourceIndex } from '../../engine/source-index.js';
import { sourceIndexFor } from '../../engine/source-index-choice.js';
import { blockCountFor } from '../../formats/index-file.js';
import { HASH_BYTES, sha256 } from '../../hash.js';
import type { FileSource } from '../../io/file-source.js';
import type { Source } from '../../types.js';
import type { AgentLink } from '../link.js';
import { blockDigest, WIRE_HASH_BYTES } from '../protocol.js';
import type { SpanBook } from '../roles.js';
import { isRemote } from '../spec.js';

/**
 * The --src-index a push was asked for, checked as a local copy checks it (needs --index, a
 * plain file read as it is, no bmap); undefined when not asked. Unlike a local copy's, --index
 * auto does not imply one: a push hashes SRC with GMAC ahead of the copy, which an index
 * being made would replace by a full SHA-256 read.
 */
export function pushSourceIndex(
  options: ResolvedCopyOptions,
  source: CopySource,
): ReturnType<typeof sourceIndexFor> {
  if (typeof options.srcIndex !== 'string') return undefined;
  if (options.srcIndex !== 'auto' && isRemote(options.srcIndex)) {
    throw new BlksyncError(
      'EUSAGE',
      `--src-index ${options.srcIndex}: a push's SRC is on this machine, and so is its index; name a local FILE or auto`,
    );
  }
  if (options.srcIndex === options.index && options.srcIndex !== 'auto') {
    throw new BlksyncError(
      'EUSAGE',
      `--src-index and --index name the same file ${options.srcIndex}; give each its own`,
    );
  }
  return sourceIndexFor(options, source);
}

/**
 * Collects SRC's block hashes while the push reads all of it (SRC's index absent or stale),
 * for the index written after the copy.
 */
export class SourceHashes {
  readonly table: Buffer;
  readonly #blockSize: number;

  constructor(size: number, blockSize: number) {
    this.#blockSize = blockSize;
    this.table = Buffer.alloc(blockCountFor(size, blockSize) * HASH_BYTES);
  }

  /** The pipeline's onChunk: every chunk of SRC, block-aligned. */
  readonly onChunk = (offset: number, data: Buffer, length: number): void => {
    const at = (offset / this.#blockSize) * HASH_BYTES;
    hashBlocksSync(data, 0, length, this.#blockSize, this.table, at);
  };
}

/**
 * A push whose SRC's index and DST's index (kept by the agent) are both used: each chunk is
 * compared by the hashes the two indexes hold, and SRC is read only in the blocks that differ,
 * each checked against SRC's index before it is sent.
 */
export class IndexedPushSource implements Source {
  readonly size: number;
  /** Bytes of SRC read (the differing blocks). */
  bytesRead = 0;
  readonly #file: FileSource;
  readonly #index: SourceIndex;
  readonly #hashes: Buffer;
  readonly #link: AgentLink;
  readonly #book: SpanBook;
  readonly #blockSize: number;
  readonly #digests: boolean;

  /** `digests`: the agent's TOP_HASHES are block digests in `blockSize` blocks. */
  constructor(
    file: FileSource,
    index: SourceIndex,
    link: AgentLink,
    book: SpanBook,
    blockSize: number,
    digests: boolean,
  ) {
    this.size = file.size;
    this.#file = file;
    this.#index = index;
    this.#hashes = index.hashes!;
    this.#link = link;
    this.#book = book;
    this.#blockSize = blockSize;
    this.#digests = digests;
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const bs = this.#blockSize;
    const first = offset / bs;
    const n = Math.ceil(length / bs);
    // the wire hash is SHA-256's prefix: SRC's wire hashes come from its stored hashes
    const mine = Buffer.allocUnsafe(n * WIRE_HASH_BYTES);
    for (let k = 0; k < n; k++) {
      const h = (first + k) * HASH_BYTES;
      this.#hashes.copy(mine, k * WIRE_HASH_BYTES, h, h + WIRE_HASH_BYTES);
    }
    const spans: number[] = [];
    const same = this.#digests && blockDigest(mine).equals(await this.#link.topHash(offset));
    if (!same) {
      const theirs = await this.#link.hashes(offset, length, bs);
      for (let s = 0, k = 0; s < length; s += bs, k++) {
        const h = k * WIRE_HASH_BYTES;
        if (mine.compare(theirs, h, h + WIRE_HASH_BYTES, h, h + WIRE_HASH_BYTES) === 0) continue;
        const e = Math.min(s + bs, length);
        if (spans.length > 0 && spans[spans.length - 1] === s) spans[spans.length - 1] = e;
        else spans.push(s, e);
      }
    }
    for (let i = 0; i < spans.length; i += 2) {
      const s = spans[i]!;
      const e = spans[i + 1]!;
      const got = await this.#file.read(buf.subarray(s, e), offset + s, e - s);
      this.bytesRead += got;
      if (got < e - s) return s + got; // the pipeline reports SRC ending early
      for (let b = s; b < e; b += bs) {
        const h = ((offset + b) / bs) * HASH_BYTES;
        const digest = sha256(buf, b, Math.min(b + bs, e));
        if (digest.compare(this.#hashes, h, h + HASH_BYTES) !== 0) {
          throw this.#index.mismatch(offset + b);
        }
      }
    }
    this.#book.set(offset, spans);
    return length;
  }

  /** The CopySource SRC came from closes it. */
  async close(): Promise<void> {}
}
