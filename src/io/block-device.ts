/**
 * Facts about block devices that node:fs does not give: fstat reports size 0 for a block
 * device, so the size comes from sysfs (/sys/dev/block/MAJ:MIN/size, in 512-byte sectors).
 */

import { readFileSync, realpathSync } from 'node:fs';
import { readdir, readFile, realpath, stat } from 'node:fs/promises';
import { join } from 'node:path';

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

/**
 * The loop devices (as /dev/loopN) whose backing file is the file with these stats: writing
 * to that file writes to what the loop device holds.
 */
export async function loopDevicesBacking(st: { dev: number; ino: number }): Promise<string[]> {
  const names = await readdir('/sys/block').catch(() => [] as string[]);
  const found: string[] = [];
  for (const name of names) {
    if (!name.startsWith('loop')) continue;
    const backing = await readFile(`/sys/block/${name}/loop/backing_file`, 'utf8').catch(
      () => undefined,
    );
    if (backing === undefined) continue;
    const file = await stat(backing.trim().replace(/ \(deleted\)$/, '')).catch(() => undefined);
    if (file?.dev === st.dev && file.ino === st.ino) found.push(`/dev/${name}`);
  }
  return found;
}
