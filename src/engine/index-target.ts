/**
 * An index of DST as the pipeline's knowledge of it: the stored hashes stand in for DST's
 * content, so DST is not read.
 *
 * IndexTarget hashes each source chunk (on worker threads) and reports the blocks whose hashes
 * differ from the stored ones. Where the index cannot be trusted — the range an interrupted
 * copy may have left dirty, or blocks past what the index covers — it reads DST and compares
 * bytes instead. Whether an index is trusted at all is decided by engine/index-policy.ts, and
 * the session around a copy (use, create, checkpoints, commit) is engine/index-session.ts.
 */

import { BlksyncError } from '../errors.js';
import { blockCountFor, readIndexFile, type IndexFile } from '../formats/index-file.js';
import { HASH_BYTES, sha256 } from '../hash.js';
import type { Opened } from '../io/open.js';
import type { Range } from '../ranges.js';
import { diffBuffers, ReadTarget } from './knowledge.js';
import { HashPool } from './hash-pool.js';
import { sampleMismatch } from './index-sample.js';
import { checkIndexable } from './make-index.js';
import type { SourceIndexReport } from './source-index.js';
import type { ChunkKnowledge, Source, TargetKnowledge } from '../types.js';

/** Blocks of DST read and checked against the index before trusting it. */
export const DEFAULT_VERIFY_SAMPLE = 16;

export function alignDown(n: number, to: number): number {
  return Math.floor(n / to) * to;
}

export function alignUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/**
 * What DST holds, from an index of it. `untrusted` are the byte ranges (block-aligned,
 * ascending) whose stored hashes may not describe DST; they are read and compared.
 */
export class IndexTarget implements TargetKnowledge {
  readonly blockSize: number;
  readonly imageSize: number;
  /** The new image's hashes: stored ones at first, SRC's as chunks are diffed. */
  readonly table: Buffer;
  readonly untrusted: readonly Range[];
  readonly #pool: HashPool;
  /** Reads DST where the index is not trusted; absent when there is no DST (diff INDEX NEW). */
  readonly #reader: ReadTarget | undefined;
  readonly #scratch: Buffer;
  /** Hashes of chunks started as soon as they were read (HashingSource), by offset. */
  readonly #prefetched = new Map<number, { hashes: Buffer; done: Promise<void> }>();
  /** The stored hashes of the chunk last diffed, before the new ones replaced them. */
  readonly #held: Buffer;
  #sampleBytes = 0;
  /** SRC's hashes from its index: every chunk hashed must match them (see source-index.ts). */
  #expected: { hashes: Buffer; mismatch: (offset: number) => Error } | undefined;
  /** Blocks of DST read and checked by verifySample. */
  sampledBlocks = 0;
  /** Bytes read back from DST where the index was not trusted. */
  get bytesReread(): number {
    return this.#reader?.bytesRead ?? 0;
  }

  get bytesRead(): number {
    return this.bytesReread + this.#sampleBytes;
  }

  constructor(
    index: IndexFile,
    imageSize: number,
    dst: Opened | undefined,
    chunkSize: number,
    pool: HashPool,
  ) {
    const bs = index.blockSize;
    this.blockSize = bs;
    this.imageSize = imageSize;
    this.#pool = pool;
    this.#reader = dst === undefined ? undefined : new ReadTarget(dst.fh, dst.path, chunkSize);
    this.#scratch = Buffer.alloc((chunkSize / bs) * HASH_BYTES);
    this.#held = Buffer.alloc(this.#scratch.length);
    checkIndexable(imageSize, bs);
    this.table = Buffer.alloc(blockCountFor(imageSize, bs) * HASH_BYTES);
    index.hashes.copy(this.table, 0, 0, Math.min(index.hashes.length, this.table.length));
    const untrusted: Range[] = [];
    if (index.state.kind === 'in-progress') {
      const { start, end } = index.state.dirty;
      const s = alignDown(start, bs);
      const e = Math.min(imageSize, alignUp(end, bs));
      if (s < e) untrusted.push({ start: s, end: e });
    }
    // a block is trusted only if it had the same extent when it was hashed
    const covered =
      index.imageSize === imageSize
        ? imageSize
        : alignDown(Math.min(index.imageSize, imageSize), bs);
    if (covered < imageSize) {
      const last = untrusted[untrusted.length - 1];
      if (last !== undefined && last.end >= covered) {
        last.start = Math.min(last.start, covered);
        last.end = imageSize;
      } else {
        untrusted.push({ start: covered, end: imageSize });
      }
    }
    this.untrusted = untrusted;
  }

  /** Checks every chunk hashed against SRC's index; `mismatch` makes the error to throw. */
  expectSourceHashes(hashes: Buffer, mismatch: (offset: number) => Error): void {
    this.#expected = { hashes, mismatch };
  }

  /** Throws when the hashes of the chunk at `offset` are not what SRC's index says. */
  #checkExpected(offset: number, hashes: Buffer, blocks: number): void {
    const e = this.#expected;
    if (e === undefined) return;
    const first = (offset / this.blockSize) * HASH_BYTES;
    const bytes = blocks * HASH_BYTES;
    if (hashes.compare(e.hashes, first, first + bytes, 0, bytes) === 0) return;
    for (let b = 0; b < blocks; b++) {
      const h = b * HASH_BYTES;
      if (hashes.compare(e.hashes, first + h, first + h + HASH_BYTES, h, h + HASH_BYTES) !== 0) {
        throw e.mismatch(offset + b * this.blockSize);
      }
    }
  }

  /** Whether the index vouches for DST's bytes [start, end). */
  trusts(start: number, end: number): boolean {
    return this.#isTrusted(start, end);
  }

  #isTrusted(start: number, end: number): boolean {
    return this.untrusted.every((r) => end <= r.start || start >= r.end);
  }

  /** Where the untrusted ranges that reach past `offset` end (or `offset` if none do). */
  untrustedEndAfter(offset: number): number {
    let end = offset;
    for (const r of this.untrusted) if (r.end > offset) end = Math.max(end, r.end);
    return end;
  }

  /**
   * Reads `count` random trusted blocks of DST and checks them against the index; returns
   * the offset of the first block that does not match, or undefined.
   */
  async verifySample(count: number, dst: Opened): Promise<number | undefined> {
    const r = await sampleMismatch(dst, this.table, this.blockSize, this.imageSize, count, (s, e) =>
      this.#isTrusted(s, e),
    );
    this.#sampleBytes += r.bytes;
    this.sampledBlocks += r.blocks;
    return r.mismatchAt;
  }

  async load(offset: number, length: number): Promise<ChunkKnowledge> {
    if (this.#isTrusted(offset, offset + length)) {
      const first = (offset / this.blockSize) * HASH_BYTES;
      let diffed = false;
      return {
        diff: async (data, len, bs, out) => {
          await this.#diffByHash(offset, data, len, bs, out);
          diffed = true;
        },
        // DST's hashes, which diff has replaced in the table by then
        heldHashes: (start, end) => {
          const s = (start / this.blockSize) * HASH_BYTES;
          const e = Math.ceil(end / this.blockSize) * HASH_BYTES;
          // a copy: callers may keep it past the next chunk, which reuses #held and the table
          return Buffer.from(
            diffed ? this.#held.subarray(s, e) : this.table.subarray(first + s, first + e),
          );
        },
        release: () => {},
      };
    }
    if (this.#reader === undefined) {
      throw new BlksyncError(
        'EINDEX_STALE',
        `the index does not vouch for bytes ${offset}-${offset + length} and there is no target to read them from`,
      );
    }
    const read = await this.#reader.load(offset, length);
    const held = read.held!;
    return {
      diff: async (data, len, bs, out) => {
        const hashes = await this.#hashesOf(offset, data, len, bs);
        this.#checkExpected(offset, hashes, Math.ceil(len / bs));
        hashes.copy(this.table, (offset / bs) * HASH_BYTES, 0, Math.ceil(len / bs) * HASH_BYTES);
        diffBuffers(data, held, len, bs, out);
      },
      held,
      heldHashes: (start, end) => {
        const parts: Buffer[] = [];
        for (let s = start; s < end; s += this.blockSize) {
          parts.push(sha256(held, s, Math.min(s + this.blockSize, end)));
        }
        return Buffer.concat(parts);
      },
      release: () => read.release(),
    };
  }

  /**
   * Starts hashing a chunk the moment the source has read it, so the workers run ahead of
   * the diff instead of waiting for the chunk's turn.
   */
  prefetch(offset: number, data: Buffer, length: number): void {
    const hashes = Buffer.allocUnsafe(Math.ceil(length / this.blockSize) * HASH_BYTES);
    const done = this.#pool.hashBlocks(data, 0, length, this.blockSize, hashes, 0);
    done.catch(() => {}); // awaited by the chunk's diff; until then it must not be "unhandled"
    this.#prefetched.set(offset, { hashes, done });
  }

  /** The hashes of the chunk at `offset`: prefetched, or computed now into the scratch buffer. */
  async #hashesOf(offset: number, data: Buffer, length: number, bs: number): Promise<Buffer> {
    const pre = this.#prefetched.get(offset);
    if (pre !== undefined) {
      this.#prefetched.delete(offset);
      await pre.done;
      return pre.hashes;
    }
    await this.#pool.hashBlocks(data, 0, length, bs, this.#scratch, 0);
    return this.#scratch;
  }

  async #diffByHash(
    offset: number,
    data: Buffer,
    length: number,
    bs: number,
    out: number[],
  ): Promise<void> {
    const scratch = await this.#hashesOf(offset, data, length, bs);
    const first = (offset / bs) * HASH_BYTES;
    const n = Math.ceil(length / bs);
    this.#checkExpected(offset, scratch, n);
    let runStart = -1;
    for (let b = 0; b < n; b++) {
      const h = b * HASH_BYTES;
      const differs =
        scratch.compare(this.table, first + h, first + h + HASH_BYTES, h, h + HASH_BYTES) !== 0;
      if (differs && runStart < 0) runStart = b * bs;
      else if (!differs && runStart >= 0) {
        out.push(runStart, b * bs);
        runStart = -1;
      }
    }
    if (runStart >= 0) out.push(runStart, length);
    this.table.copy(this.#held, 0, first, first + n * HASH_BYTES);
    scratch.copy(this.table, first, 0, n * HASH_BYTES);
  }

  async close(): Promise<void> {
    await this.#reader?.close();
  }
}

/** An index standing in for a BASE image that is not at hand (`blksync diff INDEX NEW`). */
export interface IndexBase {
  name: string;
  size: number;
  blockSize: number;
  /** Hashes NEW's chunks and compares them with the stored hashes; provides heldHashes. */
  knowledge: TargetKnowledge;
}

/**
 * Opens an index as the knowledge of a BASE image, for making a patch without BASE's bytes.
 * Only a clean index will do: there is no BASE to read an interrupted copy's range from.
 * `chunkSize` must be the pipeline's; closing the knowledge stops its hashing workers.
 */
export async function indexAsBase(
  path: string,
  chunkSize: number,
  options: { hashThreads?: number } = {},
): Promise<IndexBase> {
  const index = await readIndexFile(path);
  if (index.state.kind !== 'clean') {
    throw new BlksyncError(
      'EINDEX_STALE',
      `index ${path} is marked in progress (a copy was interrupted); it cannot stand for its image until a copy with it finishes`,
      { path },
    );
  }
  if (chunkSize % index.blockSize !== 0) {
    throw new BlksyncError(
      'EUSAGE',
      `index ${path}: its ${index.blockSize}-byte blocks do not divide the ${chunkSize}-byte chunks`,
    );
  }
  const pool = new HashPool(options.hashThreads);
  const target = new IndexTarget(index, index.imageSize, undefined, chunkSize, pool);
  return {
    name: path,
    size: index.imageSize,
    blockSize: index.blockSize,
    knowledge: {
      load: (offset, length) => target.load(offset, length),
      get bytesRead() {
        return 0;
      },
      close: async () => {
        await target.close();
        await pool.close();
      },
    },
  };
}

/** What the copy did with the index, for its summary. */
export interface IndexReport {
  path: string;
  /** used: DST was not read; created: FILE was new; rebuilt: FILE was replaced. */
  mode: 'used' | 'created' | 'rebuilt';
  blockSize: number;
  bytesHashed: number;
  /** DST blocks read to check the index before trusting it. */
  sampleBlocks: number;
  /** Bytes of DST read because the index did not vouch for them (an interrupted copy's range). */
  bytesReread: number;
  /** Times the index was marked in progress while writing. */
  checkpoints: number;
  /** Why the index was rebuilt, when it was. */
  reason?: string;
  /**
   * Used although nothing vouched that DST is unchanged since it was written: the user said
   * so (--trust-index). The summary says the index was trusted on the user's word.
   */
  trustedOnWord?: boolean;
  /**
   * Sectors of DST written by something other than this copy while it ran (the kernel's
   * write counter moved more than its own writes account for): the index written then
   * vouches for no block, and the next copy compares all of DST.
   */
  sectorsWrittenMeanwhile?: number;
  /**
   * A regular file DST was changed by another writer during the copy (its ctime moved between
   * this copy's writes), or a loop device's backing file while the copy wrote nothing.
   */
  changedMeanwhile?: boolean;
  /** What was done with the index of SRC (--src-index, or implied by --index auto). */
  source?: SourceIndexReport;
}

/**
 * A session's report before it runs: whether the index is used, created or rebuilt (and why),
 * the counts at zero. One for the local/pull session and the push's index kept here.
 */
export function startingReport(
  path: string,
  blockSize: number,
  use: { sampled: number; onWord: boolean } | undefined,
  create: { reason: string | undefined; oldExists: boolean } | undefined,
): IndexReport {
  return {
    path,
    mode: use !== undefined ? 'used' : create?.oldExists === true ? 'rebuilt' : 'created',
    blockSize,
    bytesHashed: 0,
    sampleBlocks: use?.sampled ?? 0,
    bytesReread: 0,
    checkpoints: 0,
    ...(create?.reason !== undefined ? { reason: create.reason } : {}),
    ...(use?.onWord === true ? { trustedOnWord: true } : {}),
  };
}

/** Passes reads through and hands each whole chunk to the IndexTarget to start hashing. */
export class HashingSource implements Source {
  readonly #inner: Source;
  readonly #target: IndexTarget;

  constructor(inner: Source, target: IndexTarget) {
    this.#inner = inner;
    this.#target = target;
  }

  get size(): number {
    return this.#inner.size;
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const got = await this.#inner.read(buf, offset, length);
    // a short read fails the chunk in the pipeline; nothing to hash then
    if (got === length) this.#target.prefetch(offset, buf, got);
    return got;
  }

  close(): Promise<void> {
    return this.#inner.close();
  }
}
