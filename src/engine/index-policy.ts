/**
 * The one index policy: whether an index of DST is used, created, rebuilt, or refused. A local
 * copy and a pull (engine/index-session.ts), a push that keeps the index here
 * (remote/remote-index.ts) and the agent that keeps it beside DST (remote/agent-index.ts) all
 * gather what they know into `IndexFacts` and call `decideIndex`; none of them decides itself.
 *
 * An index stands in for DST's bytes, so it is trusted only when something vouches that DST
 * has not changed since it was written (`unvouched`): for a regular file the same mtime and
 * ctime (ctime cannot be put back), for a block device the kernel's count of sectors written
 * in the same boot. When nothing vouches, `--index auto` reads and compares DST and rewrites
 * the index; a named `--index FILE` is refused, unless the user vouches (`--trust-index`) or
 * asks for the rebuild (`--rebuild-index`). A sample of DST's blocks is read as well before a
 * used index is trusted; it catches little, and never vouches on its own.
 *
 *   no index ──────────────────────────────────────────────► create
 *   --rebuild-index ───────────────────────────────────────► rebuild
 *   unreadable ─────────────── auto: rebuild · FILE: refuse (its error)
 *   DST new or empty, --full ──────────────────────────────► rebuild
 *   made for another target ── auto: rebuild · FILE: refuse EINDEX_MISMATCH
 *   its blocks do not fit ─────────────────────────────────► refuse EUSAGE
 *   nothing vouches ── --trust-index: use (on the user's word)
 *                      interrupted copy: rebuild · auto: rebuild · FILE: refuse EINDEX_STALE
 *   a sampled block differs ── auto: rebuild · FILE: refuse EINDEX_STALE
 *   otherwise ─────────────────────────────────────────────► use (then sample)
 */

import { BlksyncError } from '../errors.js';
import { describeIdentity, identityMismatch, type TargetIdentity } from '../io/identity.js';

/** What is known about an index of DST when deciding what to do with it. */
export interface IndexFacts {
  /** The index file (the cache's path for auto), for messages. */
  path: string;
  /** `--index auto` (the cache's, a copy of DST's state) or a FILE the user named. */
  named: 'auto' | 'file';
  /** DST's name, for messages. */
  dst: string;
  /** Whether there is an index, and when it cannot be read, the error that says why. */
  found: 'absent' | 'present' | { unreadable: BlksyncError };
  /** DST was just created or was empty: no index can describe it. */
  dstFresh: boolean;
  /** --full: everything is written, the index only made. */
  full: boolean;
  /** --rebuild-index: read DST once and write a fresh index, whatever the old one says. */
  rebuild: boolean;
  /** --trust-index: the user vouches that DST holds what the index says. */
  trust: boolean;
  /** Why the index names another target (identity, kind or size), when it does. */
  otherTarget?: string | undefined;
  /** The index's block size, and what the copy needs of it. */
  blockSize?: {
    index: number;
    chunk: number;
    asked?: number | undefined;
    reason?: string | undefined;
  };
  /** Why nothing vouches that DST is unchanged since the index was written; undefined: vouched. */
  unvouched?: string | undefined;
  /** The index is marked in progress (a copy with it was interrupted). */
  inProgress: boolean;
  /** After a sample of DST was read: the offset of a sampled block that does not match. */
  sampleMismatchAt?: number | undefined;
}

export type IndexDecision =
  /** No index yet: DST is compared as usual and the index made. */
  | { action: 'create' }
  /** The index is replaced: DST is compared (read) once, as without one, and a fresh index written. */
  | { action: 'rebuild'; reason: string }
  /** The index stands in for DST; `onWord`: only because the user vouched (--trust-index). */
  | { action: 'use'; onWord: boolean }
  | { action: 'refuse'; error: BlksyncError };

const WHAT_TO_DO = (dst: string): string =>
  `Pass --rebuild-index to read ${dst} once and rebuild the index, or --trust-index if you know ${dst} holds what the index says`;

/** Decides what to do with an index of DST; pure: every fact is gathered by the caller. */
export function decideIndex(f: IndexFacts): IndexDecision {
  if (f.found === 'absent') return { action: 'create' };
  if (f.rebuild) {
    const why = typeof f.found === 'object' ? f.found.unreadable.message : '--rebuild-index';
    return { action: 'rebuild', reason: why };
  }
  if (typeof f.found === 'object') {
    if (f.named === 'auto') return { action: 'rebuild', reason: f.found.unreadable.message };
    return { action: 'refuse', error: f.found.unreadable };
  }
  if (f.full) return { action: 'rebuild', reason: '--full writes everything' };
  if (f.dstFresh) return { action: 'rebuild', reason: 'the destination is new' };
  if (f.otherTarget !== undefined) {
    if (f.named === 'auto') return { action: 'rebuild', reason: f.otherTarget };
    return {
      action: 'refuse',
      error: new BlksyncError(
        'EINDEX_MISMATCH',
        `index ${f.path} does not describe this destination: ${f.otherTarget}; pass --rebuild-index to replace it (${f.dst} is then read once)`,
        { path: f.path },
      ),
    };
  }
  const bs = f.blockSize;
  if (bs !== undefined && bs.chunk % bs.index !== 0) {
    return {
      action: 'refuse',
      error: new BlksyncError(
        'EUSAGE',
        `index ${f.path} has ${bs.index}-byte blocks, more than the ${bs.chunk}-byte chunks read; rebuild it with smaller blocks`,
      ),
    };
  }
  if (bs?.asked !== undefined && bs.asked !== bs.index) {
    const reason = bs.reason ?? '-b asks for';
    return {
      action: 'refuse',
      error: new BlksyncError(
        'EUSAGE',
        `index ${f.path} has ${bs.index}-byte blocks but ${reason} ${bs.asked}; ${bs.reason === undefined ? 'omit -b, or ' : ''}pass --rebuild-index`,
      ),
    };
  }
  if (f.unvouched !== undefined && !f.trust) {
    if (f.inProgress) {
      // its own interrupted writes moved what would vouch: they cannot be told from others'
      return {
        action: 'rebuild',
        reason: `a copy with it was interrupted and ${f.unvouched}`,
      };
    }
    if (f.named === 'auto') return { action: 'rebuild', reason: f.unvouched };
    return {
      action: 'refuse',
      error: new BlksyncError(
        'EINDEX_STALE',
        `index ${f.path} cannot be trusted: ${f.unvouched}; nothing was written. ${WHAT_TO_DO(f.dst)}`,
        { path: f.path },
      ),
    };
  }
  if (f.sampleMismatchAt !== undefined) {
    const why = `the block at byte ${f.sampleMismatchAt} of ${f.dst} does not match its hash`;
    if (f.named === 'auto') return { action: 'rebuild', reason: why };
    return {
      action: 'refuse',
      error: new BlksyncError(
        'EINDEX_STALE',
        `index ${f.path} is stale: ${why} (${f.dst} was changed behind blksync's back); nothing was written. Pass --rebuild-index to read ${f.dst} once and rebuild it`,
        { path: f.path },
      ),
    };
  }
  return { action: 'use', onWord: f.unvouched !== undefined };
}

/** The stored index's version and identity: what `unvouchedSince` compares with DST's now. */
export interface StoredStamp {
  versionMajor: number;
  versionMinor: number;
  identity: TargetIdentity;
}

/**
 * Why nothing vouches that DST (identity `now`, taken just now) is unchanged since the index
 * was written (`stored`); undefined when something does. Only meaningful when the identities
 * name the same target.
 */
export function unvouchedSince(
  stored: StoredStamp,
  now: TargetIdentity,
  dst: string,
): string | undefined {
  const s = stored.identity;
  // 1.2 added discards, a partition's disk and a loop device's backing file to the stamp, and
  // a file's ctime kept continuous through the copy
  const olderThanStamp = stored.versionMajor === 1 && stored.versionMinor < 2;
  if (now.kind === 'file') {
    if (olderThanStamp || s.ctimeNs === undefined || s.mtimeNs === undefined) {
      // before 1.2 a copy did not check that only it changed the file while it wrote
      return `it was written by an older blksync, whose record of ${dst}'s ctime does not show it unchanged`;
    }
    if (now.mtimeNs === undefined || now.ctimeNs === undefined) {
      return `the ctime of ${dst} cannot be read`;
    }
    if (s.mtimeNs !== now.mtimeNs) return `${dst} was modified after the index was written`;
    if (s.ctimeNs !== now.ctimeNs) {
      return `${dst} was changed after the index was written (its ctime moved, though its mtime is the same)`;
    }
    return undefined;
  }
  if (now.stackedOn !== undefined) {
    return `${dst} is stacked on ${now.stackedOn} (device mapper, md), which can be written without moving its write counter, so nothing shows it unchanged`;
  }
  if (now.bootId === undefined || now.sectorsWritten === undefined) {
    return `the kernel's write counter of ${dst} cannot be read here, so nothing shows it unchanged`;
  }
  if (now.backingFile === 'unknown') {
    return `the backing file of the loop device ${dst} cannot be examined, so nothing shows it unchanged`;
  }
  if (olderThanStamp) {
    return `it was written by an older blksync that did not record all that vouches for ${dst} (discards, a partition's disk, a loop device's backing file)`;
  }
  if (s.bootId === undefined || s.sectorsWritten === undefined) {
    return `it does not record the kernel's write counter of ${dst}`;
  }
  if (s.bootId !== now.bootId) {
    return `it was written in another boot (or on another machine), so the kernel's write counter of ${dst} cannot show it unchanged`;
  }
  const moved = (was: string | undefined, is: string | undefined): bigint | undefined =>
    was === is ? undefined : was === undefined || is === undefined ? -1n : BigInt(is) - BigInt(was);
  const written = moved(s.sectorsWritten, now.sectorsWritten);
  if (written !== undefined && written > 0n) {
    return `${written.toString()} sectors were written to ${dst} since the index was written, unaccounted for (a killed run, or another program)`;
  }
  if (written !== undefined) {
    return `the kernel's write counter of ${dst} started again (it was detached and attached again since the index was written)`;
  }
  const discarded = moved(s.sectorsDiscarded, now.sectorsDiscarded);
  if (discarded !== undefined) {
    return `${discarded > 0n ? discarded.toString() : 'some'} sectors of ${dst} were discarded since the index was written (blkdiscard, fstrim)`;
  }
  const disk =
    moved(s.diskSectorsWritten, now.diskSectorsWritten) ??
    moved(s.diskSectorsDiscarded, now.diskSectorsDiscarded);
  if (disk !== undefined) {
    return `the disk holding the partition ${dst} was written or discarded since the index was written (possibly inside ${dst}, through the whole disk)`;
  }
  if (s.backingFile !== now.backingFile) {
    if (now.backingFile?.startsWith('blk:') === true) {
      return `the backing device of the loop device ${dst} was changed since the index was written (written through any node of it, its disk or another loop device, or replaced)`;
    }
    return `the backing file of the loop device ${dst} was changed since the index was written (written directly, through another loop device, or replaced)`;
  }
  // a loop device's backing stamp vouches across a re-attach; a disk's counter does not
  if (
    now.backingFile === undefined &&
    s.diskSeq !== undefined &&
    now.diskSeq !== undefined &&
    s.diskSeq !== now.diskSeq
  ) {
    return `${dst} was detached or re-plugged since the index was written (its diskseq moved), so its write counter, started again, cannot show it unchanged`;
  }
  return undefined;
}

/** What a caller knows besides the index and DST's identity, for `indexFacts`. */
export interface IndexAsk {
  path: string;
  named: 'auto' | 'file';
  dst: string;
  dstFresh: boolean;
  full: boolean;
  rebuild: boolean;
  trust: boolean;
  /** The chunk compared at a time: the index's blocks must divide it. */
  chunkSize: number;
  /** The block size asked for (-b, a bmap's blocks), if any. */
  askedBlockSize?: number | undefined;
  /** Why that block size is asked for, for messages (default "-b asks for"). */
  blockSizeReason?: string | undefined;
}

/**
 * The facts about the index `found` (as read, or 'absent', or unreadable) of DST whose identity
 * is `now` (undefined: DST does not exist yet), for `decideIndex`.
 */
export function indexFacts(
  found:
    | (StoredStamp & { blockSize: number; state: { kind: string } })
    | 'absent'
    | { unreadable: BlksyncError },
  now: TargetIdentity | undefined,
  ask: IndexAsk,
): IndexFacts {
  const base = {
    path: ask.path,
    named: ask.named,
    dst: ask.dst,
    dstFresh: ask.dstFresh || now === undefined,
    full: ask.full,
    rebuild: ask.rebuild,
    trust: ask.trust,
    inProgress: false,
  };
  if (found === 'absent' || 'unreadable' in found) return { ...base, found };
  const other = now === undefined ? undefined : identityMismatch(found.identity, now);
  return {
    ...base,
    found: 'present',
    inProgress: found.state.kind !== 'clean',
    otherTarget:
      other === undefined || now === undefined ? undefined : `${other} (${describeIdentity(now)})`,
    blockSize: {
      index: found.blockSize,
      chunk: ask.chunkSize,
      asked: ask.askedBlockSize,
      reason: ask.blockSizeReason,
    },
    unvouched: now === undefined ? undefined : unvouchedSince(found, now, ask.dst),
  };
}
