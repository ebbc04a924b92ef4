/**
 * A copy with an index of DST (a local copy, or a pull's local DST): the index is used,
 * created or rebuilt as engine/index-policy.ts decides, kept honest while DST is written, and
 * written anew at the end:
 *
 *   open ─► decideIndex ─► use ─► sample of DST ok? ─► first write past the marked range:
 *     │         │                   │ no (decide again)  fsync DST, write the index
 *     │         │                   ▼                    "in progress, [x, x+W) dirty"
 *     │         ├─► refuse (EINDEX_STALE, EINDEX_MISMATCH, EUSAGE)     │
 *     │         └─► create / rebuild: compare DST as usual,            ▼
 *     │             hash every source chunk                end: fsync DST, write the clean
 *     │                                                    index with DST's identity then
 *     └ the identity recorded after each fsync (a file's mtime and ctime, a device's write
 *       counter) is what vouches for the index next time: it accounts for this copy's writes.
 */

import { rm, stat } from 'node:fs/promises';
import { BlksyncError } from '../errors.js';
import {
  readIndexIfAny,
  type IndexFile,
  type IndexState,
  writeNewIndex,
} from '../formats/index-file.js';
import { HASH_BYTES, sha256 } from '../hash.js';
import { cachedIndexPath, ensureCacheDir } from '../io/cache-dir.js';
import { CtimeWatch } from '../io/ctime-watch.js';
import { identityOf, syncedIdentityOf, type TargetIdentity } from '../io/identity.js';
import { OwnWrites } from '../io/write-counter.js';
import type { Opened } from '../io/open.js';
import { readFully } from '../io/read-fully.js';
import { rangesBytes, type Range } from '../ranges.js';
import { SharedBufferPool } from '../io/buffer-pool.js';
import { HashPool, hashBlocksSync } from './hash-pool.js';
import { decideIndex, indexFacts } from './index-policy.js';
import {
  alignDown,
  alignUp,
  HashingSource,
  IndexTarget,
  startingReport,
  type IndexReport,
} from './index-target.js';
import { BlockHashes, DEFAULT_INDEX_BLOCK_SIZE } from './make-index.js';
import { SourceIndex, type SourceIndexOptions } from './source-index.js';
import type { Plan, Sink, Source } from '../types.js';
import type { VerifyUnit } from './verify-written.js';

export { DEFAULT_VERIFY_SAMPLE } from './index-target.js';

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
/** Spans of differing blocks named in a --verify failure; the rest are counted. */
const MAX_BLOCK_SPANS_SHOWN = 8;

/** "block 7 (bytes 458752-524287)" or "blocks 7-9 (bytes …)". */
function describeBlocks(r: Range, bs: number): string {
  const a = r.start / bs;
  const b = Math.ceil(r.end / bs) - 1;
  return `${a === b ? `block ${a}` : `blocks ${a}-${b}`} (bytes ${r.start}-${r.end - 1})`;
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
  /** --rebuild-index: read DST once and write a fresh index, whatever the old one says. */
  rebuild: boolean;
  /** --trust-index: use the index although nothing vouches that DST is unchanged. */
  trust?: boolean | undefined;
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
  /** DST's identity when the session opened: its write counter before this copy's writes. */
  #openedAs: TargetIdentity | undefined;
  /** The sectors this copy's writes add to DST's write counter (at least). */
  readonly #own: OwnWrites;
  /** A regular file DST: its ctime moves only by this copy's own writes, or another wrote it. */
  #ctime: CtimeWatch | undefined;
  /** Where the first range marked possibly dirty began (undefined: nothing marked yet). */
  #markedFrom: number | undefined;

  private constructor(
    o: IndexSessionOptions,
    path: string,
    pool: HashPool,
    use: { index: IndexFile; target: IndexTarget; sampled: number; onWord: boolean } | undefined,
    create: { reason: string | undefined; oldExists: boolean } | undefined,
  ) {
    this.#o = o;
    this.path = path;
    this.#pool = pool;
    this.buffers = new SharedBufferPool(o.chunkSize);
    this.#removeBeforeWrite = create?.oldExists === true;
    this.#own = new OwnWrites(o.dst?.size);
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
    this.#report = startingReport(path, this.blockSize, use, create);
  }

  /** Opens the index for a copy onto `o.dst`: decides to use, create or rebuild it. */
  static async open(o: IndexSessionOptions): Promise<IndexSession> {
    const pool = new HashPool(o.hashThreads);
    // with an index of SRC there may be little to hash: decided once it is read
    if (o.source === undefined) pool.prestart();
    try {
      const session = await IndexSession.#open(o, pool);
      if (o.source !== undefined) await session.#openSource(o.source);
      const planned = session.plan !== undefined ? rangesBytes(session.plan.ranges) : undefined;
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
      o.dst === undefined
        ? undefined
        : await syncedIdentityOf(o.dstPath, o.dst.fh, o.dst.stats, o.dst.size);
    let path = o.index;
    const named = path === 'auto' ? 'auto' : 'file';
    if (path === 'auto') {
      if (id === undefined) {
        // dry run onto a file that does not exist yet: nothing to key the cache by
        return new IndexSession(o, path, pool, undefined, { reason: undefined, oldExists: false });
      }
      path = cachedIndexPath(id, await ensureCacheDir(process.env, !o.dryRun));
    }
    const found = await readIndexIfAny(path);
    const facts = indexFacts(found, id, {
      path,
      named,
      dst: o.dstPath,
      dstFresh: o.fresh,
      full: o.full,
      rebuild: o.rebuild,
      trust: o.trust === true,
      chunkSize: o.chunkSize,
      askedBlockSize: o.blockSize,
      blockSizeReason: o.blockSizeReason,
    });
    let decision = decideIndex(facts);
    let session: IndexSession | undefined;
    if (decision.action === 'use' && typeof found === 'object' && 'hashes' in found) {
      const dst = o.dst!; // an index is used only for a DST with an identity
      const target = new IndexTarget(found, o.imageSize, dst, o.chunkSize, pool);
      const bad = await target.verifySample(o.verifySample, dst);
      if (bad === undefined) {
        const use = {
          index: found,
          target,
          sampled: target.sampledBlocks,
          onWord: decision.onWord,
        };
        session = new IndexSession(o, path, pool, use, undefined);
      } else {
        decision = decideIndex({ ...facts, sampleMismatchAt: bad });
      }
    }
    if (decision.action === 'refuse') throw decision.error;
    session ??= new IndexSession(o, path, pool, undefined, {
      reason: decision.action === 'rebuild' ? decision.reason : undefined,
      oldExists: decision.action === 'rebuild',
    });
    // DST's write counter before this copy's writes: what the index written after them vouches
    session.#openedAs = id;
    if (o.dst !== undefined && !o.dryRun) session.#ctime = await CtimeWatch.start(o.dst.fh);
    return session;
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
    this.#own.synced();
    await this.#write({ kind: 'in-progress', dirty: { start, end } }, target.table);
    this.#report.checkpoints++;
    this.#markedFrom ??= start;
    return end;
  }

  /**
   * After a copy that was interrupted and whose writes were synced (its sink finished): the
   * index, still in progress, is written again with DST's identity now, so that this run's
   * own writes (all from the first marked range on, which stays untrusted) do not make the
   * rerun distrust the rest. A copy killed outright leaves the last mark, which nothing then
   * vouches for: the rerun reads all of DST (index-policy.ts).
   */
  async settle(): Promise<void> {
    const target = this.target;
    if (this.#o.dryRun || this.#o.dst === undefined || target === undefined) return;
    if (this.#markedFrom === undefined) return; // nothing written: the index still vouches
    await this.#ctime?.before();
    await this.#o.dst.fh.sync();
    const dirty = { start: this.#markedFrom, end: this.#o.imageSize };
    await this.#write({ kind: 'in-progress', dirty }, target.table);
  }

  /** DST's bytes [offset, offset + length) are about to be written by this copy. */
  async ownWrite(offset: number, length: number): Promise<void> {
    this.#own.add(offset, length);
    await this.#ctime?.before();
  }

  /** This copy's own write (or hole punching at the end) is done: DST's ctime now is its. */
  async ownWriteDone(): Promise<void> {
    await this.#ctime?.after();
  }

  async #write(state: IndexState, hashes: Buffer): Promise<void> {
    const dst = this.#o.dst!;
    // a write in the same clock tick as this copy's last would leave the ctime stamped
    await this.#ctime?.settle();
    const st = dst.stats.isBlockDevice() ? dst.stats : await stat(dst.path);
    const size = dst.stats.isBlockDevice() ? dst.size : st.size;
    const identity: TargetIdentity = await identityOf(dst.path, st, size);
    // the stamp must show the ctime of this copy's last own write: a change since is another's
    if (identity.kind === 'file') this.#ctime?.stamped(identity.ctimeNs);
    const foreign = this.#own.foreign(this.#openedAs, identity);
    const backingMoved = this.#own.backingMovedAlone(this.#openedAs, identity);
    if (foreign > 0n || this.#ctime?.broken === true || backingMoved) {
      // someone else wrote DST during this copy (or the kernel wrote more than this copy's
      // pages): the stamp would vouch for their writes too, so the index vouches for no
      // block of DST (the next copy compares all of it)
      state = { kind: 'in-progress', dirty: { start: 0, end: this.#o.imageSize } };
      if (foreign > 0n) this.#report.sectorsWrittenMeanwhile = Number(foreign);
      else this.#report.changedMeanwhile = true;
    } else if (this.#ctime?.unsettled === true) {
      // DST's ctime is ahead of this clock: a later write might not move it
      state = { kind: 'in-progress', dirty: { start: 0, end: this.#o.imageSize } };
    }
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
    await this.#ctime?.before();
    await this.#o.dst.fh.sync();
    this.#own.synced();
    if (this.#o.partial !== undefined) await this.#hashOutside(this.#o.partial, hashes);
    await this.#write({ kind: 'clean' }, hashes);
    // every block of SRC was hashed: what this copy learnt about DST is SRC's content too
    await this.#source?.save(hashes);
  }

  /**
   * `--verify` found `bad` ranges of DST that do not hold what SRC has: names the blocks that
   * differ (reading those ranges and hashing them in the index's blocks) and marks the index
   * in progress over them, so that the next copy compares them with SRC instead of trusting
   * the index. Returns the error the copy fails with.
   */
  async verifyFailed(bad: readonly VerifyUnit[]): Promise<BlksyncError | undefined> {
    const dst = this.#o.dst;
    const table = this.target?.table ?? this.#collected?.table;
    if (dst === undefined || table === undefined || bad.length === 0) return undefined;
    const bs = this.blockSize;
    const differing: Range[] = [];
    const buf = Buffer.allocUnsafe(Math.max(bs, alignDown(HASH_READ_BYTES, bs)));
    const hashes = Buffer.allocUnsafe((buf.length / bs) * HASH_BYTES);
    for (const u of bad) {
      for (let s = alignDown(u.start, bs); s < u.end;) {
        const e = Math.min(this.#o.imageSize, alignUp(u.end, bs), s + buf.length);
        const got = await readFully(dst.fh, buf, 0, e - s, s);
        hashBlocksSync(buf, 0, got, bs, hashes, 0);
        for (let b = s; b < e; b += bs) {
          const h = ((b - s) / bs) * HASH_BYTES;
          const t = (b / bs) * HASH_BYTES;
          if (b - s < got && hashes.compare(table, t, t + HASH_BYTES, h, h + HASH_BYTES) === 0) {
            continue;
          }
          const last = differing[differing.length - 1];
          const end = Math.min(b + bs, this.#o.imageSize);
          if (last !== undefined && last.end === b) last.end = end;
          else differing.push({ start: b, end });
        }
        s = e;
      }
    }
    const spans =
      differing.length > 0 ? differing : bad.map((u) => ({ start: u.start, end: u.end }));
    const first = alignDown(spans[0]!.start, bs);
    const last = spans[spans.length - 1]!.end;
    if (!this.#o.dryRun) {
      // a bmap copy's table may not know the blocks outside its ranges: none of it is vouched
      const partial = this.#o.partial !== undefined;
      const dirty = partial ? { start: 0, end: this.#o.imageSize } : { start: first, end: last };
      await dst.fh.sync();
      this.#own.synced();
      await this.#write({ kind: 'in-progress', dirty }, table);
    }
    const shown = spans
      .slice(0, MAX_BLOCK_SPANS_SHOWN)
      .map((r) => describeBlocks(r, bs))
      .join(', ');
    const more =
      spans.length > MAX_BLOCK_SPANS_SHOWN
        ? ` and ${spans.length - MAX_BLOCK_SPANS_SHOWN} more`
        : '';
    const why =
      this.target !== undefined
        ? `the index said they already held it, so they were not compared: ${this.#o.dstPath} was changed behind the index's back`
        : `${this.#o.dstPath} did not store what was written: check the medium (dmesg)`;
    return new BlksyncError(
      'EVERIFY',
      `${this.#o.dstPath}: read back after the copy, ${shown}${more} (${bs}-byte blocks) do not hold what SRC has; ${why}. ` +
        `The index ${this.path} is marked stale there: copy again to rewrite them`,
      { path: this.#o.dstPath },
    );
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
    await this.#session.ownWrite(offset, data.length);
    await this.#sink.write(data, offset);
    await this.#session.ownWriteDone();
  }

  async finish(): Promise<void> {
    // finishing may punch holes or sync: DST's ctime after it is this copy's
    await this.#session.ownWrite(0, 0);
    await this.#sink.finish();
    await this.#session.ownWriteDone();
  }
}
