/**
 * A block device's page cache is its own: a partition's is not its disk's, and a loop
 * device over a block device reads through that device's cache. The kernel drops a device's
 * cache at its last close, but while something holds the device open (a loop device stacked
 * on it holds it for as long as it is attached) a write through another path (the whole disk,
 * another node of the device) leaves the cached pages stale: a compare would read the old
 * bytes, find nothing to write, and end with exit 0 while the device holds other bytes.
 * So before DST is read to be compared, the clean cached pages of DST and of every block
 * device under it (a loop device's backing device, down the chain) are dropped.
 */

import { constants } from 'node:fs';
import { open, readFile, stat } from 'node:fs/promises';
import { devId } from './block-device.js';
import { dropCachedPages } from './sparse-map.js';

/** Devices followed under a loop device at most (a loop over a loop …). */
const MAX_CHAIN = 8;

async function backingDevice(rdev: number): Promise<{ path: string; rdev: number } | undefined> {
  const sys = `/sys/dev/block/${devId(rdev)}`;
  const file = await readFile(`${sys}/loop/backing_file`, 'utf8').catch(() => undefined);
  if (file === undefined) return undefined;
  const path = file.trim();
  const st = await stat(path).catch(() => undefined);
  return st?.isBlockDevice() === true ? { path, rdev: st.rdev } : undefined;
}

/**
 * Drops the clean cached pages of the block device open as `fd` (device number `rdev`) and of
 * the block devices under it. Best effort: a device that cannot be opened keeps its cache.
 */
export async function dropDeviceCaches(fd: number, rdev: number): Promise<void> {
  dropCachedPages(fd);
  let at = rdev;
  for (let i = 0; i < MAX_CHAIN; i++) {
    const under = await backingDevice(at);
    if (under === undefined) return;
    const fh = await open(under.path, constants.O_RDONLY).catch(() => undefined);
    if (fh === undefined) return;
    try {
      dropCachedPages(fh.fd);
    } finally {
      await fh.close();
    }
    at = under.rdev;
  }
}
