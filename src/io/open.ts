/**
 * Opening sources and destinations safely: regular files and block devices only; block
 * devices are sized from sysfs, checked for mounts and swap (also of their partitions and of
 * their whole disk) and opened with O_EXCL, so that nothing can mount them or claim them
 * (md, LVM, another blksync) meanwhile. O_EXCL does not keep out a program that opens the
 * device without it (dd, for one): Linux has no way to refuse those.
 */

import { constants, type Stats } from 'node:fs';
import { open, realpath, stat, unlink, type FileHandle } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { BlksyncError, fromSystemError, isSystemError, type WarningListener } from '../errors.js';
import { formatBytes } from '../size.js';
import {
  blockDeviceSize,
  devId,
  devMajor,
  type FileId,
  isReadOnlyDevice,
  loopBackingFileSync,
  loopDevicesBacking,
  wholeDiskId,
  wholeDiskIdSync,
} from './block-device.js';
import { lockForWriting } from './file-lock.js';
import { mountsOf, swapsOf } from './mounts.js';

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

export interface OpenSourceOptions {
  /** Told when SRC is a block device mounted read-write (its content may change meanwhile). */
  onWarning?: WarningListener | undefined;
}

/** Opens SRC read-only. */
export async function openSource(path: string, options: OpenSourceOptions = {}): Promise<Opened> {
  // a FIFO's open() waits for a writer, where no signal ends it gracefully (a first Ctrl-C,
  // timeout(1)'s SIGTERM); refused below all the same, so refused before it is opened
  const before = await stat(path).catch(() => undefined);
  if (before !== undefined && kindOf(before) === undefined) {
    throw new BlksyncError('ESRC_KIND', `source ${path} is not a regular file or block device`, {
      path,
    });
  }
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
    if (kind === 'block-device' && options.onWarning !== undefined) {
      await warnIfMountedReadWrite(path, stats, options.onWarning);
    }
    return { path, fh, kind, size: await sizeOf(stats), stats };
  } catch (err) {
    await fh.close();
    throw fromSystemError('ESRC_OPEN', 'cannot open source', path, err);
  }
}

/**
 * A device mounted read-write (itself, a partition of it, or its whole disk) is being
 * changed by its file system while it is read: the image taken is not consistent. Reading
 * it is allowed (a live backup may be what is meant), with a warning.
 */
async function warnIfMountedReadWrite(
  path: string,
  st: Stats,
  onWarning: WarningListener,
): Promise<void> {
  const rw = (await mountsOf(st.rdev)).filter((m) => !m.readOnly);
  const first = rw[0];
  if (first === undefined) return;
  onWarning({
    code: 'WSRC_MOUNTED_RW',
    message:
      `${path} is mounted read-write${await relation(first.device, st)} on ${rw.map((m) => m.mountPoint).join(', ')}; ` +
      'what is read may change while it is read, so the copy may not be consistent: unmount it or remount it read-only ' +
      `(mount -o remount,ro ${first.mountPoint}) first`,
    path,
  });
}

/**
 * True when both stats name the same file or the same device, or when one device is a
 * partition of the other: writing either would overwrite what is being read from the other.
 */
export function sameFile(a: Stats, b: Stats): boolean {
  // a loop device is its backing file (or part of it): compare the files underneath
  const fa = loopBackingSync(a) ?? a;
  const fb = loopBackingSync(b) ?? b;
  if (fa !== a || fb !== b) {
    if (!fa.isBlockDevice() && !fb.isBlockDevice()) return fa.dev === fb.dev && fa.ino === fb.ino;
  }
  if (a.isBlockDevice() && b.isBlockDevice()) {
    return (
      a.rdev === b.rdev ||
      wholeDiskIdSync(a.rdev) === devId(b.rdev) ||
      wholeDiskIdSync(b.rdev) === devId(a.rdev)
    );
  }
  return a.dev === b.dev && a.ino === b.ino;
}

/**
 * The file a loop device (or a partition of one) reads and writes, or undefined for anything
 * else. Synchronous: a few small sysfs reads, for the same-file check.
 */
function loopBackingSync(st: Stats): FileId | undefined {
  if (!st.isBlockDevice()) return undefined;
  const disk = wholeDiskIdSync(st.rdev) ?? devId(st.rdev);
  if (!disk.startsWith(`${LOOP_MAJOR}:`)) return undefined;
  return loopBackingFileSync(`/sys/dev/block/${disk}`);
}

/** How the device in use (`id`) relates to the destination, for the message. */
async function relation(id: string, st: Stats): Promise<string> {
  if (id === devId(st.rdev)) return '';
  return id === (await wholeDiskId(st.rdev)) ? ' (its whole disk)' : ' (a partition of it)';
}

/**
 * Refuses a block device that is mounted or used as swap, or whose partitions or whole disk
 * are.
 */
export async function assertNotMounted(path: string, st: Stats): Promise<void> {
  if (st.isFile()) return assertNotBackingMounted(path, st);
  if (!st.isBlockDevice()) return;
  const mounts = await mountsOf(st.rdev);
  const first = mounts[0];
  if (first !== undefined) {
    const where = mounts.map((m) => m.mountPoint).join(', ');
    throw new BlksyncError(
      'EDEST_MOUNTED',
      `${path} is mounted${await relation(first.device, st)} on ${where}; unmount it first (umount ${first.mountPoint})`,
      { path },
    );
  }
  const swap = (await swapsOf(st.rdev))[0];
  if (swap !== undefined) {
    throw new BlksyncError(
      'EDEST_BUSY',
      `${path} is in use as swap${await relation(swap.device, st)}; stop that first (swapoff ${swap.path})`,
      { path },
    );
  }
}

/**
 * Refuses a regular file that backs a loop device which is mounted (or has a mounted
 * partition): writing it would change a mounted file system's blocks under the kernel.
 */
async function assertNotBackingMounted(path: string, st: Stats): Promise<void> {
  for (const loop of await loopDevicesBacking(st)) {
    const dev = await stat(loop).catch(() => undefined);
    if (dev?.isBlockDevice() !== true) continue;
    const first = (await mountsOf(dev.rdev))[0];
    if (first === undefined) continue;
    throw new BlksyncError(
      'EDEST_MOUNTED',
      `${path} is the backing file of ${loop}, mounted on ${first.mountPoint}; unmount it first (umount ${first.mountPoint})`,
      { path },
    );
  }
}

/** True when `path` names something in /dev (also as //dev/x, ../dev/x or through a symlink). */
async function inDev(path: string): Promise<boolean> {
  const parent = dirname(resolve(path));
  const real = await realpath(parent).catch(() => parent);
  return real === '/dev' || real.startsWith('/dev/');
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
      // creating a regular file in /dev (a RAM-backed devtmpfs) is never what was meant
      if (await inDev(path)) {
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
  if (!options.readOnly && kind === 'block-device') await assertWritableDevice(path, st);
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
    // a second blksync writing the same file refuses instead of mixing its writes in
    if (!options.readOnly && kind === 'file') lockForWriting(fh, path);
    const stats = await fh.stat();
    return { path, fh, kind, size: await sizeOf(stats), stats };
  } catch (err) {
    await fh.close();
    if (err instanceof BlksyncError) throw err;
    throw fromSystemError('EDEST_OPEN', 'cannot open destination', path, err);
  }
}

/** The block major of loop devices (Documentation/admin-guide/devices.txt). */
const LOOP_MAJOR = 7;

/**
 * Refuses a read-only block device before anything is read: the kernel lets it be opened for
 * writing and fails only the first write (EPERM, even for root).
 */
async function assertWritableDevice(path: string, st: Stats): Promise<void> {
  if (!(await isReadOnlyDevice(st.rdev))) return;
  // a loop device attached with -r stays read-only whatever blockdev says
  const how =
    devMajor(st.rdev) === LOOP_MAJOR
      ? `detach it and attach its file again without -r (losetup -d ${path}; losetup ${path} FILE), or blockdev --setrw ${path} if it was set read-only that way`
      : `blockdev --setrw ${path}, or slide the card's lock switch`;
  throw new BlksyncError(
    'EDEST_READONLY',
    `${path} is a read-only device (a write-protect switch, losetup -r or blockdev --setro); ` +
      `make it writable first (${how}) or choose another destination`,
    { path },
  );
}

/**
 * EDEST_TOO_SMALL, worded once for every path (copy, pull, the agent, apply), with advice that
 * fits DST: a file can be grown, a device cannot. `needs` says what needs `need` bytes.
 */
export function destinationTooSmall(
  path: string,
  kind: FileKind,
  have: number,
  need: number,
  needs = 'the source is',
): BlksyncError {
  const advice =
    kind === 'file'
      ? `grow it first (truncate -s ${need} ${path}) or choose another destination`
      : `use a device of at least ${formatBytes(need)}`;
  return new BlksyncError(
    'EDEST_TOO_SMALL',
    `${path} is ${have} bytes (${formatBytes(have)}) but ${needs} ${need} bytes (${formatBytes(need)}); ${advice}`,
    { path },
  );
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
    lockForWriting(fh, path);
  } catch (err) {
    // another blksync opened it between its creation and this lock: it is that one's now
    await fh.close();
    throw err;
  }
  try {
    await fh.truncate(size);
    const stats = await fh.stat();
    return { path, fh, kind: 'file', size, stats };
  } catch (err) {
    // e.g. EFBIG for a size the file system cannot hold: leave no empty file behind
    await fh.close();
    await unlink(path).catch(() => {});
    throw fromSystemError('EDEST_OPEN', 'cannot create destination', path, err);
  }
}

/** An input an output must not overwrite: its path and role for messages, a same-file test. */
export interface InputFile {
  path: string;
  /** "the source", "the destination", "BASE", ... */
  role: string;
  isSame: (st: Stats) => boolean;
}

/**
 * Refuses an output file (an index, a bmap, a patch) that is one of the command's inputs, or
 * a block device; an output that does not exist yet is fine. Called before anything is read.
 */
export async function assertSeparateOutput(
  output: string,
  inputs: readonly InputFile[],
): Promise<void> {
  let st: Stats;
  try {
    st = await stat(output);
  } catch (err) {
    if (isSystemError(err) && err.code === 'ENOENT') return;
    throw fromSystemError('EDEST_OPEN', 'cannot write', output, err);
  }
  for (const input of inputs) {
    if (input.isSame(st)) {
      throw new BlksyncError(
        'ESAME_FILE',
        `the output ${output} is ${input.role} (${input.path}); writing it would destroy that: choose another output file`,
        { path: output },
      );
    }
  }
  if (st.isBlockDevice()) {
    throw new BlksyncError(
      'EOUTPUT_KIND',
      `the output ${output} is a block device; write it to a file`,
      {
        path: output,
      },
    );
  }
}

/** The same-file test for an opened file. */
export function inputOf(opened: Opened, role: string): InputFile {
  return { path: opened.path, role, isSame: (st) => sameFile(opened.stats, st) };
}
