/**
 * Copying with an index: the stored hashes stand in for DST's content, so DST is not read.
 *
 * IndexTarget is the TargetKnowledge: it hashes each source chunk (on worker threads) and
 * reports the blocks whose hashes differ from the stored ones. Where the index cannot be
 * trusted — the range an interrupted copy may have left dirty, or blocks past what the index
 * covers — it reads DST and compares bytes instead.
 *
 * IndexSession is what copy() talks to. It decides whether the index is used, created or
 * rebuilt, defends against a stale index (identity, mtime, a random sample of DST's blocks),
 * keeps the on-disk index honest while DST is written, and writes the new index at the end:
 *
 *   open ─► identity ok? ─► sample of DST ok? ─► use ──► first write past the marked range:
 *     │         │ no              │ no                     fsync DST, write the index
 *     │         ▼                 ▼                        "in progress, [x, x+W) dirty"
 *     │   EINDEX_MISMATCH    EINDEX_STALE                        │
 *     │   (--rebuild-index: create instead)                      ▼
 *     └─ no index file ─► create: compare DST as usual,     end: write the clean index
 *                         hash every source chunk            (temp file, fsync, rename)
 */

import { rm, stat } from 'node:fs/promises';
import { BlksyncError, isSystemError } from '../errors.js';
import {
  blockCountFor,
  readIndexFile,
  type IndexFile,
  type IndexState,
  writeNewIndex,
} from '../formats/index-file.js';
import { HASH_BYTES, sha256 } from '../hash.js';
import { cachedIndexPath, ensureCacheDir } from '../io/cache-dir.js';
import {
  describeIdentity,
  identityMismatch,
  identityOf,
  type TargetIdentity,
} from '../io/identity.js';
import type { Opened } from '../io/open.js';
import type { Range } from '../ranges.js';
import { diffBuffers, ReadTarget } from './knowledge.js';
import { HashPool, hashBlocksSync, SharedBufferPool } from './hash-pool.js';
import { readFully } from '../io/read-fully.js';
import { sampleMismatch } from './index-sample.js';
import { BlockHashes, checkIndexable, DEFAULT_INDEX_BLOCK_SIZE } from './make-index.js';
import { SourceIndex, type SourceIndexOptions, type SourceIndexReport } from './source-index.js';
import type { ChunkKnowledge, Plan, Sink, Source, TargetKnowledge } from '../types.js';

/** Blocks of DST read and checked against the index before trusting it. */
export const DEFAULT_VERIFY_SAMPLE = 16;
/**
 * Smallest range marked possibly dirty at a time while writing (see IndexGuardSink). Each
 * mark costs an fsync of DST and an index rewrite (~15-25 ms here); after a crash the rerun
 * reads the marked range back, which costs at most what a copy without an index reads.
 */
export const MIN_CHECKPOINT_BYTES = 1024 * 1024 * 1024;
/** Bytes of DST read at a time when hashing what a bmap copy did not pass through. */
const HASH_READ_BYTES = 4 * 1024 * 1024;
/** Planned bytes below which hashing stays on the main thread (worker start-up costs more). */
export const INLINE_HASH_MAX_BYTES = 32 * 1024 * 1024;
/** At most this many index rewrites per copy: the marked range grows with the image. */
export const MAX_CHECKPOINTS = 8;

function alignDown(n: number, to: number): number {
  return Math.floor(n / to) * to;
}

function alignUp(n: number, to: number): number {
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

export interface IndexSessionOptions {
  /** Index file path, or "auto" for the cache directory keyed by DST's identity. */
  index: string;
  dst: Opened | undefined;
  dstPath: string;
  /** DST was just created or was empty: whatever index exists cannot describe it. */
  fresh: boolean;
  imageSize: number;
  /** Block size asked for with -b, if any. */
  blockSize: number | undefined;
  chunkSize: number;
  rebuild: boolean;
  verifySample: number;
  /** --full: write everything; the index is only written. */
  full: boolean;
  dryRun: boolean;
  hashThreads?: number | undefined;
  /** Tuning for tests: bytes marked possibly dirty at a time. */
  checkpointBytes?: number | undefined;
  /** An index of SRC to read only the blocks that differ, and to write after the copy. */
  source?: SourceIndexOptions | undefined;
  /** Why blockSize is required, for messages (default: "-b asks for"). */
  blockSizeReason?: string | undefined;
  /**
   * A bmap copy: only these ranges (block-aligned) pass through the pipeline. Outside them
   * DST keeps what it holds, or, when `zeroedOutside()` says so after the copy (a new file,
   * or holes punched there), reads as zeros; commit() gives those blocks their hashes.
   */
  partial?:
    | {
        ranges: readonly Range[];
        zeroedOutside: () => boolean;
        /** Holes are punched outside the ranges when the copy ends (an existing file). */
        punches: boolean;
      }
    | undefined;
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
  /** What was done with the index of SRC (--src-index, or implied by --index auto). */
  source?: SourceIndexReport;
}

function mismatch(path: string, why: string): BlksyncError {
  return new BlksyncError(
    'EINDEX_MISMATCH',
    `index ${path} does not describe this destination: ${why}; pass --rebuild-index to replace it (DST is then read once)`,
    { path },
  );
}

function stale(path: string, why: string): BlksyncError {
  return new BlksyncError(
    'EINDEX_STALE',
    `index ${path} is stale: ${why}; DST was changed behind blksync's back. Pass --rebuild-index to read DST and rebuild it`,
    { path },
  );
}

export class IndexSession {
  readonly path: string;
  /** Block size of the hashes (the pipeline's, when the index is used). */
  readonly blockSize: number;
  readonly buffers: SharedBufferPool;
  /** Set when the index is used: the pipeline's knowledge of DST. */
  readonly target: IndexTarget | undefined;
  /** Set when the index is created: hashes every chunk of the new content. */
  readonly onChunk: ((offset: number, data: Buffer, length: number) => Promise<void>) | undefined;
  /**
   * Set when SRC's index is trusted too: only the blocks whose hashes differ (and what DST's
   * index does not vouch for) are copied, so the rest of SRC is never read.
   */
  plan: Plan | undefined;
  #source: SourceIndex | undefined;
  readonly #o: IndexSessionOptions;
  readonly #pool: HashPool;
  readonly #collected: BlockHashes | undefined;
  readonly #report: IndexReport;
  /** An old index at path that must go before DST changes (create mode). */
  #removeBeforeWrite: boolean;

  private constructor(
    o: IndexSessionOptions,
    path: string,
    pool: HashPool,
    use: { index: IndexFile; target: IndexTarget; sampled: number } | undefined,
    create: { reason: string | undefined; oldExists: boolean } | undefined,
  ) {
    this.#o = o;
    this.path = path;
    this.#pool = pool;
    this.buffers = new SharedBufferPool(o.chunkSize);
    this.#removeBeforeWrite = create?.oldExists === true;
    if (use !== undefined) {
      this.blockSize = use.index.blockSize;
      this.target = use.target;
      this.#collected = undefined;
      this.onChunk = undefined;
    } else {
      this.blockSize = o.blockSize ?? DEFAULT_INDEX_BLOCK_SIZE;
      this.target = undefined;
      const collected = o.dryRun ? undefined : new BlockHashes(o.imageSize, this.blockSize, pool);
      this.#collected = collected;
      this.onChunk =
        collected === undefined ? undefined : (off, data, len) => collected.add(off, data, len);
    }
    this.#report = {
      path,
      mode: use !== undefined ? 'used' : create?.oldExists === true ? 'rebuilt' : 'created',
      blockSize: this.blockSize,
      bytesHashed: 0,
      sampleBlocks: use?.sampled ?? 0,
      bytesReread: 0,
      checkpoints: 0,
      ...(create?.reason !== undefined ? { reason: create.reason } : {}),
    };
  }

  /** Opens the index for a copy onto `o.dst`: decides to use, create or rebuild it. */
  static async open(o: IndexSessionOptions): Promise<IndexSession> {
    const pool = new HashPool(o.hashThreads);
    // with an index of SRC there may be little to hash: decided once it is read
    if (o.source === undefined) pool.prestart();
    try {
      const session = await IndexSession.#open(o, pool);
      if (o.source !== undefined) await session.#openSource(o.source);
      const planned = session.plan?.ranges.reduce((n, r) => n + r.end - r.start, 0);
      if (planned !== undefined && planned < INLINE_HASH_MAX_BYTES) pool.inline();
      else pool.prestart();
      return session;
    } catch (err) {
      await pool.close();
      throw err;
    }
  }

  static async #open(o: IndexSessionOptions, pool: HashPool): Promise<IndexSession> {
    const id =
      o.dst === undefined ? undefined : await identityOf(o.dstPath, o.dst.stats, o.dst.size);
    let path = o.index;
    if (path === 'auto') {
      if (id === undefined) {
        // dry run onto a file that does not exist yet: nothing to key the cache by
        return new IndexSession(o, path, pool, undefined, { reason: undefined, oldExists: false });
      }
      path = cachedIndexPath(id, await ensureCacheDir());
    }
    let index: IndexFile | undefined;
    try {
      index = await readIndexFile(path);
    } catch (err) {
      const missing =
        err instanceof BlksyncError && isSystemError(err.cause) && err.cause.code === 'ENOENT';
      if (missing)
        return new IndexSession(o, path, pool, undefined, { reason: undefined, oldExists: false });
      if (!o.rebuild || !(err instanceof BlksyncError) || err.code !== 'EINDEX_FORMAT') throw err;
      return new IndexSession(o, path, pool, undefined, { reason: err.message, oldExists: true });
    }
    const rebuild = (reason: string): IndexSession =>
      new IndexSession(o, path, pool, undefined, { reason, oldExists: true });
    if (o.fresh || id === undefined || o.full) {
      return rebuild(o.full ? '--full writes everything' : 'the destination is new');
    }
    const why = identityMismatch(index.identity, id);
    if (why !== undefined) {
      if (o.rebuild) return rebuild(why);
      throw mismatch(path, `${why} (${describeIdentity(id)})`);
    }
    if (o.chunkSize % index.blockSize !== 0) {
      throw new BlksyncError(
        'EUSAGE',
        `index ${path} has ${index.blockSize}-byte blocks, more than the ${o.chunkSize}-byte chunks read; rebuild it with smaller blocks`,
      );
    }
    if (o.blockSize !== undefined && o.blockSize !== index.blockSize) {
      const reason = o.blockSizeReason ?? '-b asks for';
      if (o.rebuild) return rebuild(`${reason} ${o.blockSize}-byte blocks`);
      throw new BlksyncError(
        'EUSAGE',
        `index ${path} has ${index.blockSize}-byte blocks but ${reason} ${o.blockSize}; ${o.blockSizeReason === undefined ? 'omit -b, or ' : ''}pass --rebuild-index`,
      );
    }
    if (
      index.state.kind === 'clean' &&
      id.mtimeNs !== undefined &&
      index.identity.mtimeNs !== undefined &&
      id.mtimeNs !== index.identity.mtimeNs
    ) {
      const why2 = `${o.dstPath} was modified after the index was written`;
      if (o.rebuild) return rebuild(why2);
      throw stale(path, why2);
    }
    const dst = o.dst!; // there is an identity, so there is a DST
    const target = new IndexTarget(index, o.imageSize, dst, o.chunkSize, pool);
    const bad = await target.verifySample(o.verifySample, dst);
    if (bad !== undefined) {
      const why2 = `the block at byte ${bad} of ${o.dstPath} does not match its hash`;
      if (o.rebuild) return rebuild(why2);
      throw stale(path, why2);
    }
    const sampled = target.sampledBlocks;
    return new IndexSession(o, path, pool, { index, target, sampled }, undefined);
  }

  async #openSource(so: SourceIndexOptions): Promise<void> {
    const target = this.target;
    const size = this.#o.imageSize;
    const usable = target !== undefined;
    const src = await SourceIndex.open(so, this.blockSize, size, usable, this.#o.verifySample);
    this.#source = src;
    if (src.hashes === undefined || target === undefined) return;
    this.plan = { imageSize: size, ranges: src.plan(target.table, target.untrusted, size) };
    target.expectSourceHashes(src.hashes, (offset) => src.mismatch(offset));
  }

  /** Wraps SRC so that, when the index is used, chunks are hashed as soon as they are read. */
  wrapSource(source: Source): Source {
    return this.target === undefined ? source : new HashingSource(source, this.target);
  }

  /** Wraps DST's sink so the on-disk index never vouches for a range being written. */
  wrapSink(sink: Sink): Sink {
    return new IndexGuardSink(sink, this);
  }

  /** Called by the guard before DST's first byte changes (create mode). */
  async beforeFirstWrite(): Promise<void> {
    if (!this.#removeBeforeWrite) return;
    this.#removeBeforeWrite = false;
    await rm(this.path, { force: true });
  }

  /** Bytes marked possibly dirty at a time. */
  get checkpointBytes(): number {
    const chunk = this.#o.chunkSize;
    const want =
      this.#o.checkpointBytes ??
      Math.max(MIN_CHECKPOINT_BYTES, Math.ceil(this.#o.imageSize / MAX_CHECKPOINTS));
    return alignUp(Math.max(want, chunk), chunk);
  }

  /**
   * Makes DST's writes so far durable, then records in the index that [offset, end) may
   * change; returns `end`. Blocks before `offset` hold the new content (all of it written
   * and synced), so their new hashes are recorded as trusted.
   */
  async checkpoint(offset: number): Promise<number> {
    const target = this.target!;
    const dst = this.#o.dst!;
    // a bmap copy onto a file punches holes outside the mapped ranges when it ends, anywhere
    // in the image: until the clean index is written, none of it is vouched for
    const whole = this.#o.partial?.punches === true;
    const start = whole ? 0 : alignDown(offset, this.blockSize);
    const end = whole
      ? this.#o.imageSize
      : Math.min(
          this.#o.imageSize,
          Math.max(start + this.checkpointBytes, target.untrustedEndAfter(start)),
        );
    // also before the first mark: a killed earlier run's writes may still be only in the
    // page cache, and this mark is about to vouch for them
    await dst.fh.sync();
    await this.#write({ kind: 'in-progress', dirty: { start, end } }, target.table);
    this.#report.checkpoints++;
    return end;
  }

  async #write(state: IndexState, hashes: Buffer): Promise<void> {
    const dst = this.#o.dst!;
    const st = dst.stats.isBlockDevice() ? dst.stats : await stat(dst.path);
    const size = dst.stats.isBlockDevice() ? dst.size : st.size;
    const identity: TargetIdentity = await identityOf(dst.path, st, size);
    await writeNewIndex(this.path, {
      blockSize: this.blockSize,
      imageSize: this.#o.imageSize,
      state,
      identity,
      hashes,
    });
  }

  /** After a complete copy whose writes are synced: writes the clean index. */
  async commit(): Promise<void> {
    if (this.#o.dryRun || this.#o.dst === undefined) return;
    const hashes = this.target?.table ?? this.#collected?.table;
    if (hashes === undefined) return;
    // DST's sink syncs only what this run wrote; what an earlier, killed run wrote may still
    // be only in the page cache, and the clean index is about to vouch for it
    await this.#o.dst.fh.sync();
    if (this.#o.partial !== undefined) await this.#hashOutside(this.#o.partial, hashes);
    await this.#write({ kind: 'clean' }, hashes);
    // every block of SRC was hashed: what this copy learnt about DST is SRC's content too
    await this.#source?.save(hashes);
  }

  /**
   * A bmap copy passed only the mapped ranges through the pipeline: gives the blocks outside
   * them their hashes. Zeroed there (a new file, holes punched): a zero block's. Otherwise
   * DST was not written there: a used index already knows those blocks, except where it did
   * not vouch for them (an interrupted copy's range), and a new index knows none; those are
   * read from DST and hashed.
   */
  async #hashOutside(
    partial: NonNullable<IndexSessionOptions['partial']>,
    table: Buffer,
  ): Promise<void> {
    const bs = this.blockSize;
    const size = this.#o.imageSize;
    const zeroed = partial.zeroedOutside();
    const outside: Range[] = [];
    let at = 0;
    for (const r of [...partial.ranges, { start: size, end: size }]) {
      if (r.start > at) outside.push({ start: at, end: r.start });
      at = Math.max(at, r.end);
    }
    const target = this.target;
    const zero = Buffer.alloc(bs);
    const zeroBlockHash = sha256(zero);
    const buf = Buffer.allocUnsafe(Math.max(bs, alignDown(HASH_READ_BYTES, bs)));
    for (const r of outside) {
      for (let s = r.start; s < r.end;) {
        const e = Math.min(r.end, s + buf.length);
        if (zeroed) {
          for (let b = s; b < e; b += bs) {
            const h = size - b >= bs ? zeroBlockHash : sha256(zero, 0, size - b);
            h.copy(table, (b / bs) * HASH_BYTES);
          }
        } else if (target === undefined || !target.trusts(s, e)) {
          const got = await readFully(this.#o.dst!.fh, buf, 0, e - s, s);
          hashBlocksSync(buf, 0, got, bs, table, (s / bs) * HASH_BYTES);
        }
        s = e;
      }
    }
  }

  report(): IndexReport {
    return {
      ...this.#report,
      bytesHashed: this.#pool.bytesHashed,
      bytesReread: this.target?.bytesReread ?? 0,
      ...(this.#source !== undefined ? { source: this.#source.report() } : {}),
    };
  }

  async close(): Promise<void> {
    await this.#pool.close();
    await this.#source?.close();
  }
}

/** Passes reads through and hands each whole chunk to the IndexTarget to start hashing. */
class HashingSource implements Source {
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

/**
 * Sits in front of DST's sink. Before a write reaches past the range the index marks as
 * possibly dirty, it syncs DST and moves the mark (IndexSession.checkpoint); in create mode
 * it removes a replaced index before DST's first byte changes.
 */
class IndexGuardSink implements Sink {
  readonly #sink: Sink;
  readonly #session: IndexSession;
  #markedEnd = -1;

  constructor(sink: Sink, session: IndexSession) {
    this.#sink = sink;
    this.#session = session;
  }

  async write(data: Buffer, offset: number): Promise<void> {
    if (this.#session.target === undefined) {
      await this.#session.beforeFirstWrite();
    } else if (offset + data.length > this.#markedEnd) {
      this.#markedEnd = await this.#session.checkpoint(offset);
    }
    await this.#sink.write(data, offset);
  }

  finish(): Promise<void> {
    return this.#sink.finish();
  }
}
