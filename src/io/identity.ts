/**
 * What identifies a destination, so an index made for one disk is never trusted for another.
 *
 * A block device is known by the most stable name Linux offers, in this order: the WWN or
 * serial that udev recorded (/run/udev/data/bMAJ:MIN), the kernel's wwid and serial in sysfs,
 * a /dev/disk/by-id link, a loop device's backing file (and its offset in it, when not 0),
 * and last the bare MAJ:MIN (weak: it names a slot, not a disk). A partition adds its number to its disk's name. A regular file
 * is known by its device and inode.
 *
 * Beside the name, what vouches that the content has not changed since (see
 * engine/index-policy.ts): for a regular file its mtime and ctime in nanoseconds (ctime cannot
 * be put back by `touch -r`, and any write or truncate moves it), for a block device the
 * kernel's count of sectors written to it and the boot that count is from (io/write-counter.ts).
 */

import type { Stats } from 'node:fs';
import { type FileHandle, readdir, readFile, realpath, stat } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { isSystemError } from '../errors.js';
import { devId } from './block-device.js';
import { writeStamp } from './write-counter.js';

export interface TargetIdentity {
  kind: 'file' | 'block-device';
  /** Size in bytes of the file or device. */
  size: number;
  /** The stable name compared between runs, e.g. "wwn:0x5002538e4…", "file:2049:1234". */
  key: string;
  /** True when the key is only MAJ:MIN, which another disk may take after a replug. */
  weak: boolean;
  /** For a regular file: its mtime in nanoseconds, as a decimal string. */
  mtimeNs?: string;
  /** For a regular file: its ctime in nanoseconds (any write, truncate or `touch` moves it). */
  ctimeNs?: string;
  /** For a block device: /proc/sys/kernel/random/boot_id when the identity was taken. */
  bootId?: string;
  /** For a block device: 512-byte sectors written to it in that boot, as a decimal string. */
  sectorsWritten?: string;
  /** For a block device: 512-byte sectors discarded in that boot (kernels >= 4.18). */
  sectorsDiscarded?: string;
  /** For a partition: its whole disk's sectors written and discarded (a write through the disk). */
  diskSectorsWritten?: string;
  diskSectorsDiscarded?: string;
  /**
   * For a loop device: its backing file's "dev:ino:size:ctimeNs:mtimeNs" and the device's
   * "offset:sizelimit" (a write to the file, or through another loop device on it, moves the
   * file's ctime and not this device's counter); over a block device (a partition, another
   * loop device) that device's write counters and its own chain instead; "unknown" when any
   * of it cannot be read.
   */
  backingFile?: string;
  /**
   * For a block device: its disk's diskseq (/sys/block/DISK/diskseq, kernels >= 5.15), a new
   * number at every attach or replug: the write counter starts again then, and may happen to
   * come back to the count recorded (0 after a copy that wrote nothing).
   */
  diskSeq?: string;
  /** For a stacked device (device mapper, md): the devices under it, whose writes it does not count. */
  stackedOn?: string;
  /** Human hints shown by `blksync info`; not compared. */
  model?: string;
  path?: string;
}

async function readText(path: string): Promise<string | undefined> {
  try {
    const text = (await readFile(path, 'utf8')).trim();
    return text === '' ? undefined : text;
  } catch {
    return undefined;
  }
}

/** Parses udev's database file: "E:KEY=value" properties and "S:symlink" lines. */
function parseUdev(text: string): { props: Map<string, string>; links: string[] } {
  const props = new Map<string, string>();
  const links: string[] = [];
  for (const line of text.split('\n')) {
    if (line.startsWith('E:')) {
      const eq = line.indexOf('=');
      if (eq > 2) props.set(line.slice(2, eq), line.slice(eq + 1));
    } else if (line.startsWith('S:')) {
      links.push(line.slice(2));
    }
  }
  return { props, links };
}

async function byIdLink(devPath: string | undefined): Promise<string | undefined> {
  if (devPath === undefined) return undefined;
  let names: string[];
  try {
    names = (await readdir('/dev/disk/by-id')).sort();
  } catch {
    return undefined;
  }
  for (const name of names) {
    try {
      if ((await realpath(join('/dev/disk/by-id', name))) === devPath) return `by-id:${name}`;
    } catch {
      // a dangling link
    }
  }
  return undefined;
}

/** The stable key of a whole disk (or of a partition, from its own udev data). */
async function diskKey(
  majMin: string,
  devPath: string | undefined,
): Promise<{ key: string | undefined; model: string | undefined }> {
  const sys = `/sys/dev/block/${majMin}`;
  const udevText = await readText(`/run/udev/data/b${majMin}`);
  const udev = udevText === undefined ? undefined : parseUdev(udevText);
  const model = udev?.props.get('ID_MODEL') ?? (await readText(`${sys}/device/model`));
  const wwn = udev?.props.get('ID_WWN_WITH_EXTENSION') ?? udev?.props.get('ID_WWN');
  if (wwn !== undefined) return { key: `wwn:${wwn}`, model };
  const serial = udev?.props.get('ID_SERIAL');
  if (serial !== undefined) return { key: `serial:${serial}`, model };
  const wwid = (await readText(`${sys}/device/wwid`)) ?? (await readText(`${sys}/wwid`));
  if (wwid !== undefined) return { key: `wwid:${wwid}`, model };
  const sysSerial = await readText(`${sys}/device/serial`);
  if (sysSerial !== undefined) return { key: `serial:${sysSerial}`, model };
  const link = await byIdLink(devPath);
  if (link !== undefined) return { key: link, model };
  const backing = await readText(`${sys}/loop/backing_file`);
  if (backing !== undefined) {
    // two loop devices on one file at other offsets are other disks (and other cache entries)
    const offset = await readText(`${sys}/loop/offset`);
    const at = offset === undefined || offset === '0' ? '' : `@${offset}`;
    return { key: `loop:${backing}${at}`, model };
  }
  return { key: undefined, model };
}

/**
 * The identity of the open file or block device `fh` as a stamp to compare with an index's,
 * taken after a sync: what another program left dirty in a block device's page cache is
 * counted now, not later by blksync's own sync as if it were blksync's; and a file's pages
 * another program dirtied through a shared writable map are clean again, so that its next
 * writes through the map move the file's ctime (while dirty, they move nothing).
 */
export async function syncedIdentityOf(
  path: string,
  fh: FileHandle,
  stats: Stats,
  size: number,
): Promise<TargetIdentity> {
  await syncForStamp(fh);
  return identityOf(path, stats, size);
}

/**
 * fsync(2) before a stamp is taken (see syncedIdentityOf). A file system without fsync
 * (squashfs, iso9660, erofs: EINVAL) is read-only: nothing writes its files, through a map
 * or otherwise, so there is nothing to sync.
 */
export async function syncForStamp(fh: FileHandle): Promise<void> {
  try {
    await fh.sync();
  } catch (err) {
    if (!isSystemError(err) || (err.code !== 'EINVAL' && err.code !== 'EROFS')) throw err;
  }
}

/** The identity of an open file or block device, from its stats and its size. */
export async function identityOf(
  path: string,
  stats: Stats,
  size: number,
): Promise<TargetIdentity> {
  if (!stats.isBlockDevice()) {
    const big = await stat(path, { bigint: true }).catch(() => undefined);
    return {
      kind: 'file',
      size,
      key: `file:${stats.dev}:${stats.ino}`,
      weak: false,
      mtimeNs: big?.mtimeNs.toString() ?? String(Math.round(stats.mtimeMs * 1e6)),
      ...(big !== undefined ? { ctimeNs: big.ctimeNs.toString() } : {}),
      path,
    };
  }
  const devPath = await realpath(path).catch(() => undefined);
  const sys = `/sys/dev/block/${devId(stats.rdev)}`;
  const partition = await readText(`${sys}/partition`);
  let found = await diskKey(devId(stats.rdev), devPath);
  if (partition !== undefined && found.key === undefined) {
    // a partition without its own udev data: name it by its disk and number
    const parentDev = await readText(join(await realpath(sys).catch(() => sys), '..', 'dev'));
    if (parentDev !== undefined && /^\d+:\d+$/.test(parentDev)) {
      const parent = await diskKey(parentDev, undefined);
      if (parent.key !== undefined) {
        found = { key: `${parent.key}-part${partition}`, model: parent.model };
      }
    }
  }
  const key = found.key ?? `devnum:${devId(stats.rdev)}`;
  const stamp = await writeStamp(stats.rdev);
  // a partition's data is its disk's: a loop device's backing file, a stacked disk's slaves
  const disk =
    partition === undefined ? undefined : join(await realpath(sys).catch(() => sys), '..');
  const slavesOf = (dir: string) => readdir(`${dir}/slaves`).catch(() => [] as string[]);
  const slaves = [...(await slavesOf(sys)), ...(disk !== undefined ? await slavesOf(disk) : [])];
  const backingFile =
    (await loopBacking(sys)) ?? (disk !== undefined ? await loopBacking(disk) : undefined);
  const seq = await readText(`${disk ?? sys}/diskseq`);
  const diskSeq = seq !== undefined && /^\d+$/.test(seq) ? seq : undefined;
  return {
    kind: 'block-device',
    size,
    key,
    weak: found.key === undefined,
    ...(stamp !== undefined ? stamp : {}),
    ...(backingFile !== undefined ? { backingFile } : {}),
    ...(diskSeq !== undefined ? { diskSeq } : {}),
    ...(slaves.length > 0 ? { stackedOn: slaves.join(',') } : {}),
    ...(found.model !== undefined ? { model: found.model } : {}),
    ...(devPath !== undefined ? { path: devPath } : {}),
  };
}

/** Devices stacked under a loop device followed at most this deep (a loop over a loop …). */
const MAX_BACKING_DEPTH = 8;

/**
 * A loop device's backing stamp ("dev:ino:size:ctimeNs:mtimeNs offset:sizelimit" for a file,
 * the backing device's own stamp for a block device), or "unknown" when it cannot be read;
 * undefined for a device that is not a loop device.
 */
async function loopBacking(sys: string, depth = 0): Promise<string | undefined> {
  const file = await readText(`${sys}/loop/backing_file`);
  if (file === undefined) {
    return (await readText(`${sys}/loop/offset`)) === undefined ? undefined : 'unknown';
  }
  const offset = (await readText(`${sys}/loop/offset`)) ?? '?';
  const limit = (await readText(`${sys}/loop/sizelimit`)) ?? '?';
  const st = await stat(file, { bigint: true }).catch(() => undefined);
  if (st === undefined) return 'unknown';
  if (st.isBlockDevice()) {
    // a write to that device (through any node of it, a partition's disk, a file system on
    // it) moves its write counter, not this device's nor the node's timestamps
    const under = await backingDeviceStamp(Number(st.rdev), depth + 1);
    return under === undefined ? 'unknown' : `${under} ${offset}:${limit}`;
  }
  return `${st.dev}:${st.ino}:${st.size}:${st.ctimeNs}:${st.mtimeNs} ${offset}:${limit}`;
}

/**
 * What vouches for a block device under a loop device, all of its chain included: its write
 * and discard counts (and its disk's for a partition) and, for a loop device, its own backing
 * stamp; undefined when any of it is unknown or the device is stacked (device mapper, md).
 */
async function backingDeviceStamp(rdev: number, depth: number): Promise<string | undefined> {
  if (depth > MAX_BACKING_DEPTH) return undefined;
  const stamp = await writeStamp(rdev);
  if (stamp === undefined) return undefined;
  const sys = `/sys/dev/block/${devId(rdev)}`;
  const partition = await readText(`${sys}/partition`);
  const disk =
    partition === undefined ? undefined : join(await realpath(sys).catch(() => sys), '..');
  const slavesOf = (dir: string) => readdir(`${dir}/slaves`).catch(() => [] as string[]);
  const slaves = [...(await slavesOf(sys)), ...(disk !== undefined ? await slavesOf(disk) : [])];
  if (slaves.length > 0) return undefined;
  const backing =
    (await loopBacking(sys, depth)) ??
    (disk !== undefined ? await loopBacking(disk, depth) : undefined);
  if (backing === 'unknown') return undefined;
  const counts = [
    stamp.sectorsWritten,
    stamp.sectorsDiscarded,
    stamp.diskSectorsWritten,
    stamp.diskSectorsDiscarded,
  ].map((c) => c ?? '-');
  const under = backing === undefined ? '' : ` (${backing})`;
  return `blk:${devId(rdev)}:${stamp.bootId}:${counts.join(':')}${under}`;
}

/** Why two identities are not the same target, or undefined when they are. */
export function identityMismatch(stored: TargetIdentity, now: TargetIdentity): string | undefined {
  if (stored.kind !== now.kind) return `it was made for a ${stored.kind}, this is a ${now.kind}`;
  if (stored.key !== now.key) return `it was made for ${stored.key}, this is ${now.key}`;
  if (stored.size !== now.size) {
    return `it was made for a ${stored.kind} of ${stored.size} bytes, this one is ${now.size} bytes`;
  }
  return undefined;
}

/** A short name for messages: the path's base name and the key. */
export function describeIdentity(id: TargetIdentity): string {
  const name = id.path === undefined ? '' : `${basename(id.path)} `;
  return `${name}(${id.key}${id.weak ? ', weak' : ''})`;
}
