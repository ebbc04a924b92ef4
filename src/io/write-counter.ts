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

import { readFile, realpath } from 'node:fs/promises';
import { join } from 'node:path';
import { devId } from './block-device.js';

/** Field indexes (0-based) in a block device's stat file (Documentation/block/stat.rst). */
const WRITE_SECTORS_FIELD = 6;
/** "discard sectors" (kernels >= 4.18): a discard changes what the device reads too. */
const DISCARD_SECTORS_FIELD = 13;

/** The kernel's write count of a block device, and the boot it counts from. */
export interface WriteStamp {
  /** /proc/sys/kernel/random/boot_id. */
  bootId: string;
  /** 512-byte sectors written since the device appeared, as a decimal string. */
  sectorsWritten: string;
  /** 512-byte sectors discarded since the device appeared (absent: the kernel does not count them). */
  sectorsDiscarded?: string;
  /** For a partition: the whole disk's counts, which a write through the disk moves. */
  diskSectorsWritten?: string;
  diskSectorsDiscarded?: string;
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

function field(fields: string[] | undefined, i: number): bigint | undefined {
  const f = fields?.[i];
  return f !== undefined && /^\d+$/.test(f) ? BigInt(f) : undefined;
}

/** Sectors written and discarded so far per the stat file in sysfs directory `sys`. */
async function counts(
  sys: string,
): Promise<{ written: bigint; discarded: bigint | undefined } | undefined> {
  const fields = (await readText(`${sys}/stat`))?.split(/\s+/);
  const written = field(fields, WRITE_SECTORS_FIELD);
  if (written === undefined) return undefined;
  return { written, discarded: field(fields, DISCARD_SECTORS_FIELD) };
}

/** Sectors written to the block device `rdev` so far, or undefined where sysfs does not say. */
export async function sectorsWritten(rdev: number): Promise<bigint | undefined> {
  return (await counts(`/sys/dev/block/${devId(rdev)}`))?.written;
}

/**
 * The write stamp of the block device `rdev` now; undefined when any part is unknown. A
 * partition's stamp holds its whole disk's counts too: a write through the disk into the
 * partition moves only the disk's.
 */
export async function writeStamp(rdev: number): Promise<WriteStamp | undefined> {
  const sys = `/sys/dev/block/${devId(rdev)}`;
  const isPartition = (await readText(`${sys}/partition`)) !== undefined;
  const disk = isPartition ? join(await realpath(sys).catch(() => sys), '..') : undefined;
  const [boot, own, whole] = await Promise.all([
    bootId(),
    counts(sys),
    disk === undefined ? undefined : counts(disk),
  ]);
  if (boot === undefined || own === undefined) return undefined;
  if (isPartition && whole === undefined) return undefined;
  return {
    bootId: boot,
    sectorsWritten: own.written.toString(),
    ...(own.discarded !== undefined ? { sectorsDiscarded: own.discarded.toString() } : {}),
    ...(whole !== undefined ? { diskSectorsWritten: whole.written.toString() } : {}),
    ...(whole?.discarded !== undefined ? { diskSectorsDiscarded: whole.discarded.toString() } : {}),
  };
}

/** The page cache writes whole pages back: a write's sectors are those of the pages it touches. */
export const PAGE_BYTES = 4096;
const SECTOR_BYTES = 512;

/**
 * The sectors blksync's own writes to a device add to its write counter, as a LOWER bound:
 * the distinct pages written between two syncs (what writeback sends at least once each),
 * clipped at the device's end. The kernel may send a page twice (written back, then written
 * again before the sync): then the counter is above this count, and the index written after
 * vouches for nothing (an extra read next time), never for a foreign write hidden in the slack.
 */
export class OwnWrites {
  #sectors = 0n;
  /** Page ranges [start, end) written since the last sync, as written. */
  #epoch: [number, number][] = [];
  readonly #deviceEnd: number;

  constructor(deviceEnd = Number.MAX_SAFE_INTEGER) {
    this.#deviceEnd = deviceEnd;
  }

  add(offset: number, length: number): void {
    if (length <= 0) return;
    const start = Math.floor(offset / PAGE_BYTES);
    const end = Math.ceil((offset + length) / PAGE_BYTES);
    const last = this.#epoch[this.#epoch.length - 1];
    if (last !== undefined && start >= last[0] && start <= last[1]) {
      last[1] = Math.max(last[1], end);
    } else {
      this.#epoch.push([start, end]);
    }
  }

  /** DST was synced: pages written from now on are written back again. */
  synced(): void {
    const ranges = this.#epoch.sort((a, b) => a[0] - b[0]);
    this.#epoch = [];
    let bytes = 0;
    let at = 0;
    for (const [s, e] of ranges) {
      const from = Math.max(s, at) * PAGE_BYTES;
      const to = Math.min(e * PAGE_BYTES, this.#deviceEnd);
      if (to > from) bytes += to - from;
      at = Math.max(at, e);
    }
    this.#sectors += BigInt(Math.ceil(bytes / SECTOR_BYTES));
  }

  get sectors(): bigint {
    this.synced();
    return this.#sectors;
  }

  /**
   * Sectors written or discarded on the device between the stamps `before` and `now` (taken
   * after blksync's own writes were synced) that these writes do not account for exactly (the
   * sum of the differences, 0 when the counter is unknown or every count is exactly
   * accounted for).
   */
  foreign(before: Partial<WriteStamp> | undefined, now: Partial<WriteStamp>): bigint {
    if (before?.sectorsWritten === undefined || now.sectorsWritten === undefined) return 0n;
    if (before.bootId !== now.bootId) return 0n;
    const own = this.sectors;
    const off = (a: string | undefined, b: string | undefined, expected: bigint): bigint => {
      if (a === undefined || b === undefined) return 0n;
      const d = BigInt(b) - BigInt(a) - expected;
      return d < 0n ? -d : d;
    };
    return (
      off(before.sectorsWritten, now.sectorsWritten, own) +
      off(before.sectorsDiscarded, now.sectorsDiscarded, 0n) +
      off(before.diskSectorsWritten, now.diskSectorsWritten, own) +
      off(before.diskSectorsDiscarded, now.diskSectorsDiscarded, 0n)
    );
  }

  /**
   * Whether a loop device's backing file (or device) changed between the stamps `before` and
   * `now` while these writes are none: then another program wrote it, behind the loop
   * device's counter. (This copy's own writes move the backing file too, and another's
   * cannot be told from them: that is not seen.)
   */
  backingMovedAlone(
    before: { backingFile?: string } | undefined,
    now: { backingFile?: string },
  ): boolean {
    return before !== undefined && before.backingFile !== now.backingFile && this.sectors === 0n;
  }
}
