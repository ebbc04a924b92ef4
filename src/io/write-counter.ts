/**
 * What the kernel knows about writes to a block device: the count of 512-byte sectors written
 * to it (field 7 of /sys/dev/block/MAJ:MIN/stat, a partition's own for a partition) and which
 * boot that count belongs to (/proc/sys/kernel/random/boot_id). Every write that reaches the
 * device moves the counter, whoever makes it (dd, a mounted file system, another tool), so an
 * index that recorded both after blksync's own final fsync can be trusted without reading the
 * device exactly when both are unchanged. The counter starts again at every boot and when a
 * device is detached and attached again (a loop device, a card replugged): then it no longer
 * vouches, and the boot id or the count itself differs.
 */

import { readFile } from 'node:fs/promises';
import { devId } from './block-device.js';

/** Field index (0-based) of "write sectors" in a block device's stat file (Documentation/block/stat.rst). */
const WRITE_SECTORS_FIELD = 6;

/** The kernel's write count of a block device, and the boot it counts from. */
export interface WriteStamp {
  /** /proc/sys/kernel/random/boot_id. */
  bootId: string;
  /** 512-byte sectors written since the device appeared, as a decimal string. */
  sectorsWritten: string;
}

async function readText(path: string): Promise<string | undefined> {
  try {
    return (await readFile(path, 'utf8')).trim();
  } catch {
    return undefined;
  }
}

/** This boot's id, or undefined where the kernel does not say (not Linux, no /proc). */
export async function bootId(): Promise<string | undefined> {
  const id = await readText('/proc/sys/kernel/random/boot_id');
  return id === undefined || id === '' ? undefined : id;
}

/** Sectors written to the block device `rdev` so far, or undefined where sysfs does not say. */
export async function sectorsWritten(rdev: number): Promise<bigint | undefined> {
  const text = await readText(`/sys/dev/block/${devId(rdev)}/stat`);
  const field = text?.split(/\s+/)[WRITE_SECTORS_FIELD];
  return field !== undefined && /^\d+$/.test(field) ? BigInt(field) : undefined;
}

/** The write stamp of the block device `rdev` now; undefined when either part is unknown. */
export async function writeStamp(rdev: number): Promise<WriteStamp | undefined> {
  const [boot, sectors] = await Promise.all([bootId(), sectorsWritten(rdev)]);
  if (boot === undefined || sectors === undefined) return undefined;
  return { bootId: boot, sectorsWritten: sectors.toString() };
}

/** The page cache writes whole pages back: a write's sectors are those of the pages it touches. */
export const PAGE_BYTES = 4096;
const SECTOR_BYTES = 512;

/**
 * The sectors blksync's own writes to a device add to its write counter, counted as the pages
 * they touch (what writeback sends; measured equal on a loop device). Writes to the same page
 * twice count twice, so the count errs high, never low.
 */
export class OwnWrites {
  #sectors = 0n;

  add(offset: number, length: number): void {
    if (length <= 0) return;
    const start = Math.floor(offset / PAGE_BYTES) * PAGE_BYTES;
    const end = Math.ceil((offset + length) / PAGE_BYTES) * PAGE_BYTES;
    this.#sectors += BigInt((end - start) / SECTOR_BYTES);
  }

  get sectors(): bigint {
    return this.#sectors;
  }

  /**
   * Sectors others wrote to the device between the stamps `before` and `now` (taken after
   * blksync's own writes were synced), beyond these writes; 0 when the counter is unknown.
   */
  foreign(before: Partial<WriteStamp> | undefined, now: Partial<WriteStamp>): bigint {
    if (before?.sectorsWritten === undefined || now.sectorsWritten === undefined) return 0n;
    if (before.bootId !== now.bootId) return 0n;
    const extra = BigInt(now.sectorsWritten) - BigInt(before.sectorsWritten) - this.#sectors;
    return extra > 0n ? extra : 0n;
  }
}
