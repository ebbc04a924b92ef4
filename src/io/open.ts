/**
 * Opening sources and destinations safely: regular files and block devices only; block
 * devices are sized from sysfs, checked for mounts (also of their partitions) and opened
 * with O_EXCL so nothing else can have them open for writing or mounted meanwhile.
 */

import { constants, type Stats } from 'node:fs';
import { open, stat, type FileHandle } from 'node:fs/promises';
import { BlksyncError, fromSystemError, isSystemError } from '../errors.js';
import { blockDeviceSize, devId } from './block-device.js';
import { mountsOf } from './mounts.js';

export type FileKind = 'file' | 'block-device';

export interface Opened {
  path: string;
  fh: FileHandle;
  kind: FileKind;
  size: number;
  stats: Stats;
}

function kindOf(st: Stats): FileKind | undefined {
  if (st.isFile()) return 'file';
  if (st.isBlockDevice()) return 'block-device';
  return undefined;
}

async function sizeOf(st: Stats): Promise<number> {
  return st.isBlockDevice() ? blockDeviceSize(st.rdev) : st.size;
}

/** Opens SRC read-only. */
export async function openSource(path: string): Promise<Opened> {
  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    throw fromSystemError('ESRC_OPEN', 'cannot open source', path, err);
  }
  try {
    const stats = await fh.stat();
    const kind = kindOf(stats);
    if (kind === undefined) {
      throw new BlksyncError('ESRC_KIND', `source ${path} is not a regular file or block device`, {
        path,
      });
    }
    return { path, fh, kind, size: await sizeOf(stats), stats };
  } catch (err) {
    await fh.close();
    throw fromSystemError('ESRC_OPEN', 'cannot open source', path, err);
  }
}

/** True when both stats name the same file or the same device. */
export function sameFile(a: Stats, b: Stats): boolean {
  if (a.isBlockDevice() && b.isBlockDevice()) return a.rdev === b.rdev;
  return a.dev === b.dev && a.ino === b.ino;
}

/** Refuses a block device that is mounted, or one of whose partitions is mounted. */
export async function assertNotMounted(path: string, st: Stats): Promise<void> {
  if (!st.isBlockDevice()) return;
  const mounts = await mountsOf(st.rdev);
  const first = mounts[0];
  if (first !== undefined) {
    const where = mounts.map((m) => m.mountPoint).join(', ');
    const part = first.device === devId(st.rdev) ? '' : ' (a partition of it)';
    throw new BlksyncError(
      'EDEST_MOUNTED',
      `${path} is mounted${part} on ${where}; unmount it first (umount ${first.mountPoint})`,
      { path },
    );
  }
}

export interface OpenTargetOptions {
  /** Open read-only (dry run, compare). */
  readOnly: boolean;
}

/** What openTarget found: an existing file or device, or nothing (`fh` undefined). */
export type TargetOpened = Opened | { path: string; fh: undefined; missing: true };

/** Opens an existing DST for reading and writing; a missing one is reported, not created. */
export async function openTarget(path: string, options: OpenTargetOptions): Promise<TargetOpened> {
  let st: Stats;
  try {
    st = await stat(path);
  } catch (err) {
    if (isSystemError(err) && err.code === 'ENOENT') {
      if (path.startsWith('/dev/')) {
        throw new BlksyncError(
          'EDEST_MISSING',
          `${path} does not exist; check the device name (lsblk lists them)`,
          { path },
        );
      }
      return { path, fh: undefined, missing: true };
    }
    throw fromSystemError('EDEST_OPEN', 'cannot open destination', path, err);
  }
  const kind = kindOf(st);
  if (kind === undefined) {
    throw new BlksyncError(
      'EDEST_KIND',
      `destination ${path} is not a regular file or block device`,
      { path },
    );
  }
  await assertNotMounted(path, st);
  let flags = options.readOnly ? constants.O_RDONLY : constants.O_RDWR;
  if (kind === 'block-device') flags |= constants.O_EXCL;
  let fh: FileHandle;
  try {
    fh = await open(path, flags);
  } catch (err) {
    if (isSystemError(err) && err.code === 'EBUSY') {
      throw new BlksyncError(
        'EDEST_BUSY',
        `${path} is in use (mounted, swap, RAID/LVM member or open by another program); stop that use first`,
        { path, cause: err },
      );
    }
    throw fromSystemError('EDEST_OPEN', 'cannot open destination', path, err);
  }
  try {
    const stats = await fh.stat();
    return { path, fh, kind, size: await sizeOf(stats), stats };
  } catch (err) {
    await fh.close();
    throw fromSystemError('EDEST_OPEN', 'cannot open destination', path, err);
  }
}

/** Creates a new regular file DST of `size` bytes, all holes. */
export async function createTarget(path: string, size: number): Promise<Opened> {
  let fh: FileHandle;
  try {
    fh = await open(path, 'wx+');
  } catch (err) {
    throw fromSystemError('EDEST_OPEN', 'cannot create destination', path, err);
  }
  try {
    await fh.truncate(size);
    const stats = await fh.stat();
    return { path, fh, kind: 'file', size, stats };
  } catch (err) {
    await fh.close();
    throw fromSystemError('EDEST_OPEN', 'cannot create destination', path, err);
  }
}
