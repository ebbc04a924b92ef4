/**
 * An index kept beside a remote DST (`--index host:FILE`, or `--index auto` for a push: the
 * remote's own cache keyed by DST's identity), kept by the target agent. It decides as a
 * local copy does, by the one index policy (engine/index-policy.ts, with the identity and the
 * write stamp taken here, on DST's host), and then stands in for DST:
 *
 *   open ─► decideIndex ─► use ─► sample of DST ok? ─► used: HASH_REQ in the index's blocks
 *                │                  │ no: decide again     is answered from the table
 *                ├─► refuse (EINDEX_STALE, EINDEX_MISMATCH, EUSAGE)
 *                └─► create / rebuild: DST's blocks are hashed as the TOP_HASHES scan reads
 *                                      them (zeros for a new DST)
 *
 * Either way the table follows DST: a HASH_REQ that reads DST in the index's blocks stores
 * their hashes, each DATA frame replaces the hashes of the blocks it covers, and blocks no
 * one hashed (a partial block, --full) are read back at DONE. Before the first DATA the file
 * is marked in progress from there to the end (after syncing DST), so a killed copy leaves
 * an index that vouches only for what was durable; after DONE has synced DST the clean index
 * is written with DST's identity then.
 */

import type { Stats } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { rm } from 'node:fs/promises';
import { BlksyncError } from '../errors.js';
import {
  blockCountFor,
  MAX_INDEX_BLOCKS,
  readIndexIfAny,
  type IndexFile,
  type IndexState,
  writeNewIndex,
} from '../formats/index-file.js';
import { decideIndex, indexFacts } from '../engine/index-policy.js';
import { cachedIndexPath, ensureCacheDir } from '../io/cache-dir.js';
import { CtimeWatch } from '../io/ctime-watch.js';
import { identityOf, syncedIdentityOf, type TargetIdentity } from '../io/identity.js';
import { OwnWrites } from '../io/write-counter.js';
import { assertSeparateOutput, sameFile } from '../io/open.js';
import { readFully } from '../io/read-fully.js';
import { sampleMismatch } from '../engine/index-sample.js';
import { HASH_BYTES, sha256 } from '../hash.js';
import type { Range } from '../ranges.js';
import { blockDigest, WIRE_HASH_BYTES, type IndexHello, type IndexWireReport } from './protocol.js';

/** DST as the agent opened it. */
export interface IndexedTarget {
  path: string;
  fh: FileHandle | undefined;
  stats: Stats | undefined;
  kind: 'file' | 'block-device';
  /** The file's or device's size (after a new or empty file was grown). */
  size: number;
}

/**
 * The byte ranges (block-aligned) of a used index that do not vouch for DST's blocks: an
 * interrupted copy's dirty range, and what the index does not cover at the same extent.
 */
function untrustedRanges(index: IndexFile, imageSize: number): Range[] {
  const ibs = index.blockSize;
  const untrusted: Range[] = [];
  if (index.state.kind === 'in-progress') {
    const s = Math.floor(index.state.dirty.start / ibs) * ibs;
    const e = Math.min(imageSize, Math.ceil(index.state.dirty.end / ibs) * ibs);
    if (s < e) untrusted.push({ start: s, end: e });
  }
  // a block is trusted only if it had the same extent when it was hashed
  const covered =
    index.imageSize === imageSize
      ? imageSize
      : Math.floor(Math.min(index.imageSize, imageSize) / ibs) * ibs;
  if (covered < imageSize) {
    const last = untrusted[untrusted.length - 1];
    if (last !== undefined && last.end >= covered) {
      last.start = Math.min(last.start, covered);
      last.end = imageSize;
    } else untrusted.push({ start: covered, end: imageSize });
  }
  return untrusted;
}

export class AgentIndex {
  readonly path: string;
  readonly blockSize: number;
  readonly used: boolean;
  /** Bytes of DST read for the sample and the read-back at DONE. */
  bytesRead = 0;
  readonly #imageSize: number;
  readonly #dst: IndexedTarget;
  readonly #dryRun: boolean;
  readonly #table: Buffer;
  /** 1 where the table holds the hash of what DST holds now. */
  readonly #known: Uint8Array;
  readonly #untrusted: Range[];
  readonly #report: IndexWireReport;
  #removeBeforeWrite: boolean;
  #marked = false;
  /** Where the range marked possibly dirty begins (it runs to the end), once marked. */
  #markedFrom: number | undefined;
  #committed = false;
  /** DST's identity when the index was opened: its write counter before this run's writes. */
  #openedAs: TargetIdentity | undefined;
  /** The sectors this run's writes add to DST's write counter (at least). */
  readonly #own: OwnWrites;
  /** A regular file DST: its ctime moves only by this run's own writes, or another wrote it. */
  #ctime: CtimeWatch | undefined;

  private constructor(
    path: string,
    blockSize: number,
    imageSize: number,
    dst: IndexedTarget,
    dryRun: boolean,
    use: { index: IndexFile; untrusted: Range[]; onWord: boolean } | undefined,
    create: { reason: string | undefined; oldExists: boolean; zero: boolean } | undefined,
  ) {
    this.path = path;
    this.blockSize = blockSize;
    this.used = use !== undefined;
    this.#imageSize = imageSize;
    this.#dst = dst;
    this.#dryRun = dryRun;
    this.#own = new OwnWrites(dst.size);
    const blocks = blockCountFor(imageSize, blockSize);
    this.#table = Buffer.alloc(blocks * HASH_BYTES);
    this.#known = new Uint8Array(blocks);
    this.#untrusted = use?.untrusted ?? [];
    this.#removeBeforeWrite = create?.oldExists === true;
    if (use !== undefined) {
      use.index.hashes.copy(
        this.#table,
        0,
        0,
        Math.min(use.index.hashes.length, this.#table.length),
      );
      this.#known.fill(1);
      for (const r of this.#untrusted) {
        this.#known.fill(0, r.start / blockSize, Math.ceil(r.end / blockSize));
      }
    } else if (create?.zero === true && blocks > 0) {
      // a new or empty DST reads as zeros
      const full = sha256(Buffer.alloc(blockSize), 0, blockSize);
      for (let i = 0; i < blocks; i++) full.copy(this.#table, i * HASH_BYTES);
      const tail = imageSize - (blocks - 1) * blockSize;
      sha256(Buffer.alloc(tail), 0, tail).copy(this.#table, (blocks - 1) * HASH_BYTES);
      this.#known.fill(1);
    }
    this.#report = {
      path,
      mode: use !== undefined ? 'used' : create?.oldExists === true ? 'rebuilt' : 'created',
      blockSize,
      bytesHashed: 0,
      sampleBlocks: 0,
      bytesReread: 0,
      checkpoints: 0,
      ...(create?.reason !== undefined ? { reason: create.reason } : {}),
      ...(use?.onWord === true ? { trustedOnWord: true } : {}),
    };
  }

  /** Decides whether the index at `o.path` (or the cache's, for "auto") is used or made. */
  static async open(
    o: IndexHello,
    dst: IndexedTarget,
    imageSize: number,
    fresh: boolean,
    dryRun: boolean,
  ): Promise<AgentIndex> {
    const bs = o.blockSize;
    if (blockCountFor(imageSize, bs) > MAX_INDEX_BLOCKS) {
      throw new BlksyncError(
        'EUSAGE',
        `an index of ${imageSize} bytes in ${bs}-byte blocks would hold too many hashes; use larger blocks (-b 1M)`,
      );
    }
    const id =
      dst.fh !== undefined && dst.stats !== undefined
        ? await syncedIdentityOf(dst.path, dst.fh, dst.stats, dst.size)
        : undefined;
    let path = o.path;
    const make = (reason: string | undefined, oldExists: boolean, p = path): AgentIndex =>
      new AgentIndex(p, bs, imageSize, dst, dryRun, undefined, {
        reason,
        oldExists,
        zero: fresh,
      });
    if (path === 'auto') {
      // a dry run onto a file that does not exist yet: nothing to key the cache by
      if (id === undefined) return make(undefined, false);
      path = cachedIndexPath(id, await ensureCacheDir(process.env, !dryRun));
    }
    const stats = dst.stats;
    if (stats !== undefined) {
      // the index is written by rename: over DST itself it would destroy it
      await assertSeparateOutput(path, [
        { path: dst.path, role: 'the destination', isSame: (st) => sameFile(stats, st) },
      ]);
    }
    const found = await readIndexIfAny(path);
    const facts = indexFacts(found, id, {
      path,
      named: o.path === 'auto' ? 'auto' : 'file',
      dst: dst.path,
      dstFresh: fresh,
      full: o.full,
      rebuild: o.rebuild,
      trust: o.trust === true,
      chunkSize: o.chunkSize,
      askedBlockSize: o.blockSizeGiven ? bs : undefined,
    });
    let decision = decideIndex(facts);
    if (decision.action === 'use' && typeof found === 'object' && 'hashes' in found) {
      const untrusted = untrustedRanges(found, imageSize);
      const use = { index: found, untrusted, onWord: decision.onWord };
      const used = new AgentIndex(path, found.blockSize, imageSize, dst, dryRun, use, undefined);
      const bad = await used.#verifySample(o.verifySample);
      if (bad === undefined) {
        await used.#opened(id);
        return used;
      }
      decision = decideIndex({ ...facts, sampleMismatchAt: bad });
    }
    if (decision.action === 'refuse') throw decision.error;
    const made = make(
      decision.action === 'rebuild' ? decision.reason : undefined,
      decision.action === 'rebuild',
      path,
    );
    await made.#opened(id);
    return made;
  }

  /** DST's identity before this run's writes: what the index written after them vouches. */
  async #opened(id: TargetIdentity | undefined): Promise<void> {
    this.#openedAs = id;
    const fh = this.#dst.fh;
    if (fh !== undefined && !this.#dryRun) this.#ctime = await CtimeWatch.start(fh);
  }

  /** Reads `count` trusted blocks (first, last, then random) and checks them; the first bad one. */
  async #verifySample(count: number): Promise<number | undefined> {
    const bs = this.blockSize;
    const r = await sampleMismatch(
      { fh: this.#dst.fh! },
      this.#table,
      bs,
      this.#imageSize,
      count,
      (start) => this.#known[start / bs] === 1,
    );
    this.bytesRead += r.bytes;
    this.#report.sampleBlocks += r.blocks;
    return r.mismatchAt;
  }

  /**
   * The reply to a HASH_REQ from the table, when the index vouches for every block of it and
   * the unit is the index's block; undefined when DST must be read.
   */
  hashesFor(offset: number, length: number, unit: number): Buffer | undefined {
    const bs = this.blockSize;
    if (!this.used || unit !== bs || offset % bs !== 0) return undefined;
    const end = offset + length;
    if (end !== this.#imageSize && end % bs !== 0) return undefined;
    const first = offset / bs;
    const n = Math.ceil(length / bs);
    const out = Buffer.allocUnsafe(n * WIRE_HASH_BYTES);
    for (let i = 0; i < n; i++) {
      if (this.#known[first + i] !== 1) return undefined;
      const h = (first + i) * HASH_BYTES;
      this.#table.copy(out, i * WIRE_HASH_BYTES, h, h + WIRE_HASH_BYTES);
    }
    return out;
  }

  /** Whether the table holds the current hash of every block of [offset, offset + length). */
  knows(offset: number, length: number): boolean {
    const bs = this.blockSize;
    for (let i = Math.floor(offset / bs); i * bs < offset + length; i++) {
      if (this.#known[i] !== 1) return false;
    }
    return true;
  }

  /** The block digest of [offset, offset + length) (block-aligned; every block known). */
  digest(offset: number, length: number): Buffer {
    const bs = this.blockSize;
    const first = offset / bs;
    const n = Math.ceil(length / bs);
    const hashes = Buffer.allocUnsafe(n * WIRE_HASH_BYTES);
    for (let i = 0; i < n; i++) {
      const h = (first + i) * HASH_BYTES;
      this.#table.copy(hashes, i * WIRE_HASH_BYTES, h, h + WIRE_HASH_BYTES);
    }
    return blockDigest(hashes);
  }

  /** DST's bytes at `offset` were read (a scan, a HASH_REQ): the whole blocks' hashes are now known. */
  learned(offset: number, data: Buffer, length: number): void {
    this.#hashBlocks(offset, data, length);
  }

  /** Before DST's first byte changes: remove a replaced index, or mark the used one in progress. */
  async beforeWrite(offset: number): Promise<void> {
    await this.#ctime?.before();
    if (this.#marked || this.#dryRun) return;
    this.#marked = true;
    if (this.#removeBeforeWrite) await rm(this.path, { force: true });
    if (!this.used) return;
    let start = offset;
    for (const r of this.#untrusted) start = Math.min(start, r.start);
    start = Math.floor(start / this.blockSize) * this.blockSize;
    // what an earlier, killed run wrote may be only in the page cache; the mark vouches for it
    await this.#dst.fh!.sync();
    this.#own.synced();
    await this.#write({ kind: 'in-progress', dirty: { start, end: this.#imageSize } });
    this.#markedFrom = start;
    this.#report.checkpoints++;
  }

  /**
   * The run ended without DONE (blksync went away, interrupted) after DST's writes were
   * synced: the in-progress index is written again with DST's identity now, so that this
   * run's own writes (all inside the marked range, which stays untrusted) do not make the
   * rerun distrust the rest (engine/index-policy.ts).
   */
  async settle(): Promise<void> {
    const start = this.#markedFrom;
    if (start === undefined || this.#committed || this.#dryRun) return;
    await this.#ctime?.before();
    await this.#dst.fh!.sync();
    await this.#write({ kind: 'in-progress', dirty: { start, end: this.#imageSize } });
  }

  /** DATA was written at `offset`. */
  async wrote(offset: number, raw: Buffer): Promise<void> {
    this.#own.add(offset, raw.length);
    this.#hashBlocks(offset, raw, raw.length);
    await this.#ctime?.after();
  }

  /** Before DST is finished (its sink may punch holes): was it changed since this run's last write? */
  async beforeFinish(): Promise<void> {
    await this.#ctime?.before();
  }

  /** After DST was finished: its ctime now is this run's. */
  async afterFinish(): Promise<void> {
    await this.#ctime?.after();
  }

  /** After DONE synced DST: reads back the blocks no one hashed, and writes the clean index. */
  async commit(): Promise<void> {
    const fh = this.#dst.fh;
    if (this.#dryRun || fh === undefined) return;
    await this.#ctime?.before();
    this.#own.synced();
    const bs = this.blockSize;
    const buf = Buffer.allocUnsafe(bs);
    for (let i = 0; i < this.#known.length; i++) {
      if (this.#known[i] === 1) continue;
      const s = i * bs;
      const len = Math.min(bs, this.#imageSize - s);
      const got = await readFully(fh, buf, 0, len, s);
      this.bytesRead += got;
      this.#report.bytesReread += got;
      if (got < len) {
        throw new BlksyncError('EDEST_SHORT', `${this.#dst.path} ended at ${s + got} bytes`);
      }
      this.#hashBlocks(s, buf, len);
    }
    await this.#write({ kind: 'clean' });
    this.#committed = true;
  }

  report(): IndexWireReport {
    return { ...this.#report };
  }

  /** Stores the hashes of the whole blocks in data[0, length) at image `offset`. */
  #hashBlocks(offset: number, data: Buffer, length: number): void {
    const bs = this.blockSize;
    const end = offset + length;
    let i = Math.floor(offset / bs);
    for (; i * bs < end && i < this.#known.length; i++) {
      const s = i * bs;
      const e = Math.min(s + bs, this.#imageSize);
      if (s < offset || e > end) {
        // only part of the block: its hash is no longer known
        this.#known[i] = 0;
        continue;
      }
      sha256(data, s - offset, e - offset).copy(this.#table, i * HASH_BYTES);
      this.#report.bytesHashed += e - s;
      this.#known[i] = 1;
    }
  }

  async #write(state: IndexState): Promise<void> {
    const d = this.#dst;
    // a write in the same clock tick as this run's last would leave the ctime stamped
    await this.#ctime?.settle();
    const st = await d.fh!.stat();
    const identity: TargetIdentity = await identityOf(
      d.path,
      st,
      d.kind === 'file' ? st.size : d.size,
    );
    // the stamp must show the ctime of this copy's last own write: a change since is another's
    if (identity.kind === 'file') this.#ctime?.stamped(identity.ctimeNs);
    const foreign = this.#own.foreign(this.#openedAs, identity);
    const backingMoved = this.#own.backingMovedAlone(this.#openedAs, identity);
    if (foreign > 0n || this.#ctime?.broken === true || backingMoved) {
      // someone else wrote DST during this run: the stamp would vouch for their writes too
      state = { kind: 'in-progress', dirty: { start: 0, end: this.#imageSize } };
      if (foreign > 0n) this.#report.sectorsWrittenMeanwhile = Number(foreign);
      else this.#report.changedMeanwhile = true;
    } else if (this.#ctime?.unsettled === true) {
      // DST's ctime is ahead of this clock: a later write might not move it
      state = { kind: 'in-progress', dirty: { start: 0, end: this.#imageSize } };
    }
    await writeNewIndex(this.path, {
      blockSize: this.blockSize,
      imageSize: this.#imageSize,
      state,
      identity,
      hashes: this.#table,
    });
  }
}
