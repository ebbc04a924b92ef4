/**
 * The one preparation of a copy's DST before its first write, used by a local copy
 * (engine/copy.ts), a pull (remote/copy/pull.ts) and the agent writing a pushed or relayed
 * copy (remote/agent/open-end.ts):
 *
 *   missing            → created at the image's size (sparse), reads as zeros
 *   empty regular file → grown to the image's size, reads as zeros
 *   smaller            → EDEST_TOO_SMALL (open.ts's destinationTooSmall), nothing written
 *   as large or larger → used as it is; the bytes past the image are left alone
 *
 * In a dry run nothing is created or grown. `made` says what this run did, so that a copy
 * failing before its first byte is written can leave DST as it was found.
 */

import { unlink } from 'node:fs/promises';
import { fromSystemError } from '../errors.js';
import { createTarget, destinationTooSmall, type Opened, type TargetOpened } from './open.js';

export interface PreparedDestination {
  /** DST, open; undefined only in a dry run onto a missing file (which reads as zeros). */
  target: Opened | undefined;
  /** DST did not exist. */
  created: boolean;
  /** DST reads as zeros: created, or an empty regular file grown to the image's size. */
  zero: boolean;
  /** What this run did to DST, undone when it fails before its first write. */
  made: 'created' | 'grown' | undefined;
  /** Bytes of DST past the image's end, left as they were. */
  extraBytes: number;
}

/** Prepares `found` (from openTarget) to receive an image of `size` bytes. */
export async function prepareDestination(
  found: TargetOpened,
  size: number,
  dryRun: boolean,
): Promise<PreparedDestination> {
  if (found.fh === undefined) {
    if (dryRun)
      return { target: undefined, created: true, zero: true, made: undefined, extraBytes: 0 };
    const target = await createTarget(found.path, size);
    return { target, created: true, zero: true, made: 'created', extraBytes: 0 };
  }
  if (found.size === 0 && found.kind === 'file') {
    if (dryRun)
      return { target: found, created: false, zero: true, made: undefined, extraBytes: 0 };
    // e.g. EFBIG: a size (a peer's claim) this file system cannot hold
    await found.fh.truncate(size).catch((err: unknown) => {
      throw fromSystemError('EDEST_OPEN', 'cannot grow destination', found.path, err);
    });
    return { target: found, created: false, zero: true, made: 'grown', extraBytes: 0 };
  }
  if (found.size < size) {
    throw destinationTooSmall(found.path, found.kind, found.size, size);
  }
  return {
    target: found,
    created: false,
    zero: false,
    made: undefined,
    extraBytes: found.size - size,
  };
}

/**
 * Leaves DST as it was found when the copy failed before its first byte was written
 * (`written` bytes, from FileSink.bytesWritten): a DST it created is removed, an empty file it
 * grew is truncated back to empty. A refusal after the preparation (a bad first range of a
 * bmap, an index that does not match) so leaves nothing behind.
 */
export async function undoPreparation(
  prepared: PreparedDestination | undefined,
  written: number,
): Promise<void> {
  const target = prepared?.target;
  if (prepared?.made === undefined || target === undefined || written !== 0) return;
  if (prepared.made === 'created') await unlink(target.path).catch(() => {});
  else await target.fh.truncate(0).catch(() => {});
}
