/**
 * An index of SRC for `copy --index` (`--src-index FILE`, or the cache with `--index auto`).
 *
 * With an index of DST alone, every block of SRC is read and hashed to find what differs.
 * With an index of SRC as well, the two tables are compared first and only the blocks whose
 * hashes differ are read: flashing the same image again (or a new image that was indexed
 * once) reads a few megabytes instead of the whole image.
 *
 *   SRC index ─┐                          ┌─► plan: the blocks that differ, plus what the
 *              ├─ compare hash by hash ───┤   DST index does not vouch for
 *   DST index ─┘                          └─► each planned block read is hashed and must
 *                                             equal SRC's index (else EINDEX_STALE)
 *
 * An index of SRC is trusted only when it was made for this very file (identity), SRC's mtime
 * has not changed since, it is clean, of SRC's size and of DST's index's block size, and a
 * sample of SRC's blocks matches it. Anything less is not an error (SRC being rebuilt is
 * normal): SRC is hashed as it is without an index, and the index is rewritten after the
 * copy. Only an explicit FILE made for another file, or unreadable, is refused, unless
 * --rebuild-index. Only regular files qualify: a device has no mtime to vouch for it.
 */

import { rm, stat } from 'node:fs/promises';
import { BlksyncError, isSystemError } from '../errors.js';
import { readIndexFile, type IndexFile, writeNewIndex } from '../formats/index-file.js';
import { HASH_BYTES } from '../hash.js';
import { cachedIndexPath, ensureCacheDir } from '../io/cache-dir.js';
import {
  describeIdentity,
  identityMismatch,
  identityOf,
  syncForStamp,
  type TargetIdentity,
} from '../io/identity.js';
import { assertSeparateOutput, sameFile, type Opened } from '../io/open.js';
import { settledPast } from '../io/ctime-watch.js';
import { RangeList, type Range } from '../ranges.js';
import { sampleMismatch } from './index-sample.js';
import { unvouchedSince } from './index-policy.js';

/** Blocks whose hashes are compared in one go when planning (most groups are equal). */
const PLAN_GROUP_BLOCKS = 64;

export interface SourceIndexOptions {
  /** Index file of SRC, or "auto": the cache's entry for SRC's identity. */
  index: string;
  /** SRC: a regular file read by offset. */
  opened: Opened;
  /** Refuse an explicit FILE made for another file, or unreadable, unless set. */
  rebuild: boolean;
  dryRun: boolean;
}

/** What the copy did with SRC's index, for its summary. */
export interface SourceIndexReport {
  path: string;
  /**
   * used: only differing blocks of SRC were read; created / rebuilt: written after the copy;
   * kept: valid, but of no use while DST's index is not used (left as it is).
   */
  mode: 'used' | 'created' | 'rebuilt' | 'kept';
  /** Why an existing index was not used. */
  reason?: string;
  /** SRC blocks read to check the index before trusting it. */
  sampleBlocks: number;
  /** Bytes of SRC a push read besides the sample (where the pipeline's count would mislead). */
  bytesRead?: number;
  /** created / rebuilt, yet no index was saved after the copy: why (the next run reads SRC). */
  notWritten?: string;
}

export class SourceIndex {
  readonly path: string;
  /** SRC's hashes, when the index is trusted; undefined when SRC must be hashed. */
  readonly hashes: Buffer | undefined;
  readonly #o: SourceIndexOptions;
  readonly #identity: TargetIdentity;
  readonly #blockSize: number;
  readonly #report: SourceIndexReport;
  /** Set when a block read from SRC did not match the index. */
  #stale = false;
  /** SRC's ctime was not yet past its clock tick when it was taken: a save could not vouch. */
  #unsettled = false;

  private constructor(
    o: SourceIndexOptions,
    path: string,
    identity: TargetIdentity,
    blockSize: number,
    hashes: Buffer | undefined,
    report: SourceIndexReport,
  ) {
    this.#o = o;
    this.path = path;
    this.#identity = identity;
    this.#blockSize = blockSize;
    this.hashes = hashes;
    this.#report = report;
  }

  /**
   * Opens SRC's index for hashes of `blockSize` bytes over `imageSize` bytes; `usable` is
   * false when DST's index is not used, so SRC's index could not save a read anyway (it is
   * then only written at the end). `verifySample` blocks of SRC are checked, as for DST.
   */
  static async open(
    o: SourceIndexOptions,
    blockSize: number,
    imageSize: number,
    usable: boolean,
    verifySample: number,
  ): Promise<SourceIndex> {
    const src = o.opened;
    if (src.kind !== 'file') {
      throw new BlksyncError(
        'EUSAGE',
        `--src-index needs SRC to be a regular file; ${src.path} is a ${src.kind}, which has no mtime to vouch for an index`,
      );
    }
    // a page another program dirtied through a shared writable map takes its next writes
    // without moving the mtime until writeback cleans it: synced, a later write moves it
    await syncForStamp(src.fh);
    const identity = await identityOf(src.path, src.stats, src.size);
    // a write in the clock tick of the ctime recorded would leave it as recorded: SRC is read
    // (and an index saved after the copy vouches for it) only once that tick is over, as for
    // `blksync index`; a ctime ahead of the clock leaves nothing saved
    const settled = identity.ctimeNs !== undefined && (await settledPast(BigInt(identity.ctimeNs)));
    const path =
      o.index === 'auto'
        ? cachedIndexPath(identity, await ensureCacheDir(process.env, !o.dryRun))
        : o.index;
    // the index is written by rename: over SRC itself it would destroy it (a push's and a
    // remote SRC's agent's too, where nothing checked it before)
    await assertSeparateOutput(path, [
      { path: src.path, role: 'the source', isSame: (st) => sameFile(src.stats, st) },
    ]);
    const make = (
      hashes: Buffer | undefined,
      mode: SourceIndexReport['mode'],
      reason?: string,
      sampleBlocks = 0,
    ): SourceIndex => {
      const made = new SourceIndex(o, path, identity, blockSize, hashes, {
        path,
        mode,
        sampleBlocks,
        ...(reason !== undefined ? { reason } : {}),
      });
      made.#unsettled = !settled;
      return made;
    };
    let index: IndexFile;
    try {
      index = await readIndexFile(path);
    } catch (err) {
      if (err instanceof BlksyncError && isSystemError(err.cause) && err.cause.code === 'ENOENT') {
        return make(undefined, 'created');
      }
      const explicitRefusal = o.index !== 'auto' && !o.rebuild;
      if (explicitRefusal || !(err instanceof BlksyncError) || err.code !== 'EINDEX_FORMAT') {
        throw err;
      }
      return make(undefined, 'rebuilt', err.message);
    }
    const other = identityMismatch(index.identity, identity);
    if (other !== undefined) {
      if (o.index !== 'auto' && !o.rebuild) {
        throw new BlksyncError(
          'EINDEX_MISMATCH',
          `index ${path} does not describe SRC: ${other} (${describeIdentity(identity)}); give the index made for SRC, or pass --rebuild-index to replace it`,
          { path },
        );
      }
      return make(undefined, 'rebuilt', other);
    }
    const why = untrustedBecause(index, identity, blockSize, imageSize);
    if (why !== undefined) return make(undefined, 'rebuilt', why);
    if (!usable) return make(undefined, 'kept', 'the index of DST is not used in this copy');
    const sample = await sampleMismatch(src, index.hashes, blockSize, imageSize, verifySample);
    if (sample.mismatchAt !== undefined) {
      return make(
        undefined,
        'rebuilt',
        `the block at byte ${sample.mismatchAt} of SRC does not match its hash`,
        sample.blocks,
      );
    }
    return make(index.hashes, 'used', undefined, sample.blocks);
  }

  /**
   * The ranges to copy: the blocks where SRC's hashes differ from `dstHashes`, and the
   * `untrusted` ranges where DST's hashes do not vouch for DST (ascending, block-aligned).
   */
  plan(dstHashes: Buffer, untrusted: readonly Range[], imageSize: number): Range[] {
    const src = this.hashes!;
    const bs = this.#blockSize;
    const found = new RangeList({ limit: Number.MAX_SAFE_INTEGER });
    const blocks = Math.ceil(imageSize / bs);
    let u = 0;
    for (let b = 0; b < blocks; b++) {
      const start = b * bs;
      while (u < untrusted.length && untrusted[u]!.end <= start) u++;
      const distrusted = u < untrusted.length && untrusted[u]!.start < start + bs;
      // most of an image is unchanged: skip equal groups with one compare each
      const group = Math.min(PLAN_GROUP_BLOCKS, blocks - b);
      const groupEnd = start + group * bs;
      const groupDistrusted = u < untrusted.length && untrusted[u]!.start < groupEnd;
      const h = b * HASH_BYTES;
      if (
        !groupDistrusted &&
        src.compare(dstHashes, h, h + group * HASH_BYTES, h, h + group * HASH_BYTES) === 0
      ) {
        b += group - 1;
        continue;
      }
      if (distrusted || src.compare(dstHashes, h, h + HASH_BYTES, h, h + HASH_BYTES) !== 0) {
        found.add(start, Math.min(start + bs, imageSize));
      }
    }
    return [...found.ranges];
  }

  /**
   * The error for a block read from SRC whose hash is not the one SRC's index holds: SRC was
   * changed without its mtime changing. A cached index is removed so the rerun rebuilds it.
   */
  mismatch(offset: number): BlksyncError {
    this.#stale = true;
    return new BlksyncError(
      'EINDEX_STALE',
      `index ${this.path} of SRC is stale: the block at byte ${offset} of ${this.#o.opened.path} does not match its hash; rerun without --src-index${this.#o.index === 'auto' ? ' (the cached index was removed)' : ''}`,
      { path: this.path },
    );
  }

  /**
   * After a copy that hashed all of SRC: records `hashes` (SRC's, block by block) as SRC's
   * index, unless SRC changed while it was read.
   */
  async save(hashes: Buffer): Promise<void> {
    if (this.#report.mode === 'used' || this.#report.mode === 'kept' || this.#o.dryRun) return;
    const src = this.#o.opened;
    if (this.#unsettled) {
      this.#report.notWritten = `${src.path}'s ctime is ahead of this machine's clock, so no index can vouch for it`;
      return;
    }
    const now = await stat(src.path, { bigint: true }).catch(() => undefined);
    if (
      now === undefined ||
      now.size !== BigInt(src.size) ||
      now.mtimeNs.toString() !== this.#identity.mtimeNs ||
      now.ctimeNs.toString() !== this.#identity.ctimeNs
    ) {
      this.#report.notWritten = `${src.path} changed while it was read`;
      return;
    }
    await writeNewIndex(this.path, {
      blockSize: this.#blockSize,
      imageSize: src.size,
      state: { kind: 'clean' },
      identity: this.#identity,
      hashes,
    });
  }

  /** Removes a cached index found stale, so the next run rebuilds it. */
  async close(): Promise<void> {
    if (this.#stale && this.#o.index === 'auto') await rm(this.path, { force: true });
  }

  report(): SourceIndexReport {
    return { ...this.#report };
  }
}

/** Why a readable index made for SRC's file cannot be trusted now, or undefined. */
function untrustedBecause(
  index: IndexFile,
  identity: TargetIdentity,
  blockSize: number,
  imageSize: number,
): string | undefined {
  if (index.state.kind !== 'clean') return 'it is marked in progress';
  // mtime and ctime (touch -r puts back only the mtime), as for an index of DST
  const changed = unvouchedSince(index, identity, 'SRC');
  if (changed !== undefined) return changed;
  if (index.imageSize !== imageSize) {
    return `it covers ${index.imageSize} bytes, SRC has ${imageSize}`;
  }
  if (index.blockSize !== blockSize) {
    return `it has ${index.blockSize}-byte blocks, the index of DST ${blockSize}-byte ones`;
  }
  return undefined;
}
