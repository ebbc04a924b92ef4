/**
 * Facts about block devices that node:fs does not give: fstat reports size 0 for a block
 * device, so the size comes from sysfs (/sys/dev/block/MAJ:MIN/size, in 512-byte sectors).
 */

import { closeSync, openSync, readFileSync, realpathSync, statSync } from 'node:fs';
import { readdir, readFile, realpath } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { loadKoffi } from './koffi.js';

/** Linux's dev_t split (glibc's gnu_dev_major/minor). */
export function devMajor(rdev: number): number {
  return ((rdev >>> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
}

export function devMinor(rdev: number): number {
  return (rdev & 0xff) | ((rdev >>> 12) & ~0xff & 0xfffff);
}

export function devId(rdev: number): string {
  return `${devMajor(rdev)}:${devMinor(rdev)}`;
}

function sysDir(rdev: number): string {
  return `/sys/dev/block/${devId(rdev)}`;
}

/** Size in bytes of the block device with this rdev. */
export async function blockDeviceSize(rdev: number): Promise<number> {
  const sectors = Number((await readFile(join(sysDir(rdev), 'size'), 'utf8')).trim());
  return sectors * 512;
}

/** The "MAJ:MIN" ids of the partitions of a whole disk (empty for a partition or a bare disk). */
export async function partitionIds(rdev: number): Promise<string[]> {
  let dir: string;
  try {
    dir = await realpath(sysDir(rdev));
  } catch {
    return [];
  }
  const ids: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    if (!entry.isDirectory()) continue;
    try {
      await readFile(join(dir, entry.name, 'partition'), 'utf8');
      ids.push((await readFile(join(dir, entry.name, 'dev'), 'utf8')).trim());
    } catch {
      // not a partition directory (queue/, power/, holders/, ...)
    }
  }
  return ids;
}

/** The "MAJ:MIN" of the whole disk a partition belongs to (undefined for a whole disk). */
export async function wholeDiskId(rdev: number): Promise<string | undefined> {
  try {
    const dir = await realpath(sysDir(rdev));
    await readFile(join(dir, 'partition'), 'utf8');
    return (await readFile(join(dir, '..', 'dev'), 'utf8')).trim();
  } catch {
    return undefined; // a whole disk (no partition file), or no sysfs entry
  }
}

/**
 * wholeDiskId for callers that need a plain predicate (sameFile): two small sysfs reads, so
 * blocking is harmless.
 */
export function wholeDiskIdSync(rdev: number): string | undefined {
  try {
    const dir = realpathSync(sysDir(rdev));
    readFileSync(join(dir, 'partition'), 'utf8');
    return readFileSync(join(dir, '..', 'dev'), 'utf8').trim();
  } catch {
    return undefined;
  }
}

/**
 * True when the kernel marks the device read-only (/sys/dev/block/MAJ:MIN/ro: a card's lock
 * switch, `losetup -r`, `blockdev --setro`). Unknown (no sysfs entry) counts as writable: the
 * first write then fails as it would have.
 */
export async function isReadOnlyDevice(rdev: number): Promise<boolean> {
  try {
    return (await readFile(join(sysDir(rdev), 'ro'), 'utf8')).trim() === '1';
  } catch {
    return false;
  }
}

/** A file as `stat` names it: what a loop device's backing file is compared by. */
export interface FileId {
  dev: number;
  ino: number;
  isBlockDevice(): boolean;
}

/** ioctl LOOP_GET_STATUS64, and its struct loop_info64 (lo_device, lo_inode, lo_rdevice first, u64 each). */
const LOOP_GET_STATUS64 = 0x4c05;
const LOOP_INFO64_BYTES = 232;

type Ioctl = (fd: number, request: number, arg: Buffer) => number;

let ioctlFn: Ioctl | null | undefined;

function loadIoctl(): Ioctl | null {
  if (ioctlFn !== undefined) return ioctlFn;
  try {
    ioctlFn = loadKoffi()
      .load('libc.so.6')
      .func('int ioctl(int, unsigned long, uint8_t *)') as Ioctl;
  } catch {
    ioctlFn = null;
  }
  return ioctlFn;
}

/** The backing file of the loop device at `sys` (its sysfs directory), asked of the kernel. */
function loopStatusFile(sys: string): FileId | undefined {
  const ioctl = loadIoctl();
  if (ioctl === null) return undefined;
  let fd: number;
  try {
    const node = `/dev/${basename(realpathSync(sys))}`;
    if (devId(statSync(node).rdev) !== readFileSync(join(sys, 'dev'), 'utf8').trim()) {
      return undefined;
    }
    fd = openSync(node, 'r');
  } catch {
    return undefined;
  }
  try {
    const info = Buffer.alloc(LOOP_INFO64_BYTES);
    if (ioctl(fd, LOOP_GET_STATUS64, info) !== 0) return undefined;
    if (info.readBigUInt64LE(16) !== 0n) return undefined; // a device node: not a file
    // lo_device is the kernel's new_encode_dev; Node's dev is glibc's makedev of the same
    const d = Number(info.readBigUInt64LE(0));
    const major = (d & 0xfff00) >>> 8;
    const minor = (d & 0xff) | ((d >>> 12) & 0xfff00);
    const dev = (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & ~0xff) * 2 ** 12);
    return { dev, ino: Number(info.readBigUInt64LE(8)), isBlockDevice: () => false };
  } finally {
    closeSync(fd);
  }
}

/**
 * The file the loop device at `sys` (its sysfs directory) reads and writes, or undefined
 * when it is not a loop device or its file cannot be told. sysfs names the file by path, and
 * once that path is unlinked (while another link or an open descriptor keeps the file) it
 * reads "PATH (deleted)", naming nothing or another file: then the kernel is asked for the
 * file's device and inode (LOOP_GET_STATUS64, through koffi). Synchronous: a few small
 * reads, for the same-file check.
 */
export function loopBackingFileSync(sys: string): FileId | undefined {
  let backing: string;
  try {
    backing = readFileSync(join(sys, 'loop', 'backing_file'), 'utf8').replace(/\n$/, '');
  } catch {
    return undefined;
  }
  if (backing.endsWith(' (deleted)')) {
    const file = loopStatusFile(sys);
    if (file !== undefined) return file;
  }
  for (const path of [backing, backing.replace(/ \(deleted\)$/, '')]) {
    try {
      return statSync(path);
    } catch {
      // the next name, if any
    }
  }
  return undefined;
}

/**
 * The loop devices (as /dev/loopN) whose backing file is the file with these stats: writing
 * to that file writes to what the loop device holds.
 */
export async function loopDevicesBacking(st: { dev: number; ino: number }): Promise<string[]> {
  const names = await readdir('/sys/block').catch(() => [] as string[]);
  const found: string[] = [];
  for (const name of names) {
    if (!name.startsWith('loop')) continue;
    const file = loopBackingFileSync(`/sys/block/${name}`);
    if (file?.dev === st.dev && file.ino === st.ino) found.push(`/dev/${name}`);
  }
  return found;
}
