/**
 * Finds what holds a block device: mounts (from /proc/self/mountinfo) and swap (from
 * /proc/swaps) of the device itself, of any of its partitions, or of the whole disk it is a
 * partition of.
 */

import { readFile, stat } from 'node:fs/promises';
import { devId, partitionIds, wholeDiskId } from './block-device.js';

export interface Mount {
  /**
   * "MAJ:MIN" of the mounted device. File systems that report an anonymous device in
   * mountinfo (btrfs: "0:35") are matched by their source instead, and this is the source's.
   */
  device: string;
  mountPoint: string;
  /** The mount source as the kernel shows it: "/dev/sdb1", or "tmpfs", "none", ... */
  source: string;
  /** Mounted read-only (the per-mount "ro" option, field 6 of mountinfo). */
  readOnly: boolean;
}

/** mountinfo and /proc/swaps escape space, tab, newline and backslash as octal. */
function unescape(text: string): string {
  return text.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/**
 * Parses /proc/self/mountinfo text: field 3 is MAJ:MIN, field 5 the mount point, field 6 the
 * mount options; after the optional fields and a lone "-" come the file system type, the
 * source and the super block's options (a file system mounted "ro" anywhere has "ro" there).
 */
export function parseMountinfo(text: string): Mount[] {
  const mounts: Mount[] = [];
  for (const line of text.split('\n')) {
    const fields = line.split(' ');
    const device = fields[2];
    const mountPoint = fields[4];
    if (device === undefined || mountPoint === undefined) continue;
    const dash = fields.indexOf('-', 6);
    const source = dash > 0 ? (fields[dash + 2] ?? '') : '';
    const options = [fields[5] ?? '', dash > 0 ? (fields[dash + 3] ?? '') : ''];
    const readOnly = options.some((o) => o.split(',').includes('ro'));
    mounts.push({ device, mountPoint: unescape(mountPoint), source: unescape(source), readOnly });
  }
  return mounts;
}

/** The device ids a use of which makes writing to `rdev` unsafe. */
async function relatedIds(rdev: number): Promise<Set<string>> {
  const disk = await wholeDiskId(rdev);
  return new Set([devId(rdev), ...(await partitionIds(rdev)), ...(disk ? [disk] : [])]);
}

/** "MAJ:MIN" of the block device at `path`, or undefined when it is not one. */
async function blockDeviceId(path: string): Promise<string | undefined> {
  if (!path.startsWith('/')) return undefined;
  const st = await stat(path).catch(() => undefined);
  return st?.isBlockDevice() === true ? devId(st.rdev) : undefined;
}

/** Mounts of the device with this rdev, of any of its partitions, or of its whole disk. */
export async function mountsOf(rdev: number): Promise<Mount[]> {
  const ids = await relatedIds(rdev);
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  const found: Mount[] = [];
  for (const m of parseMountinfo(text)) {
    if (ids.has(m.device)) {
      found.push(m);
    } else if (m.device.startsWith('0:')) {
      const id = await blockDeviceId(m.source);
      if (id !== undefined && ids.has(id)) found.push({ ...m, device: id });
    }
  }
  return found;
}

export interface Swap {
  /** "MAJ:MIN" of the device swapped on. */
  device: string;
  path: string;
}

/** Swap areas in use on the device with this rdev, its partitions or its whole disk. */
export async function swapsOf(rdev: number): Promise<Swap[]> {
  const ids = await relatedIds(rdev);
  let text: string;
  try {
    text = await readFile('/proc/swaps', 'utf8');
  } catch {
    return []; // no swap support
  }
  const found: Swap[] = [];
  for (const line of text.split('\n').slice(1)) {
    const path = unescape(line.split(/\s+/)[0] ?? '');
    const id = await blockDeviceId(path);
    if (id !== undefined && ids.has(id)) found.push({ device: id, path });
  }
  return found;
}
