/** Finds where a block device, or any partition of it, is mounted (from /proc/self/mountinfo). */

import { readFile } from 'node:fs/promises';
import { devId, partitionIds } from './block-device.js';

export interface Mount {
  /** "MAJ:MIN" of the mounted device. */
  device: string;
  mountPoint: string;
}

/** Parses /proc/self/mountinfo text: field 3 is MAJ:MIN, field 5 the mount point. */
export function parseMountinfo(text: string): Mount[] {
  const mounts: Mount[] = [];
  for (const line of text.split('\n')) {
    const fields = line.split(' ');
    const device = fields[2];
    const mountPoint = fields[4];
    if (device === undefined || mountPoint === undefined) continue;
    // mountinfo escapes space, tab, newline and backslash as octal
    mounts.push({
      device,
      mountPoint: mountPoint.replace(/\\([0-7]{3})/g, (_, o: string) =>
        String.fromCharCode(parseInt(o, 8)),
      ),
    });
  }
  return mounts;
}

/** Mounts of the device with this rdev or of any of its partitions; also swap in use. */
export async function mountsOf(rdev: number): Promise<Mount[]> {
  const ids = new Set([devId(rdev), ...(await partitionIds(rdev))]);
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  return parseMountinfo(text).filter((m) => ids.has(m.device));
}
