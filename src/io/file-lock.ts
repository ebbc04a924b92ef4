/**
 * An exclusive advisory lock (flock(2), not waiting) on a regular file about to be written, so
 * that a second blksync writing the same file (copy, apply, a pull) refuses with EDEST_BUSY
 * instead of interleaving its writes with the first's: both would end with exit 0 and the
 * file would hold neither image. A block device gets the same from O_EXCL (open.ts).
 *
 * The lock belongs to the open file and goes with it: at close, and when the process dies
 * (kill -9 too), so it never outlives a run. Programs that take no lock (dd, an editor) are
 * not kept out. Node has no flock: it is called through koffi, loaded on first use; where
 * koffi cannot be loaded (the agent bundle on a remote host) and where the file system has no
 * locks, the file is written unlocked, as before.
 */

import type { FileHandle } from 'node:fs/promises';
import { BlksyncError } from '../errors.js';
import { loadKoffi } from './koffi.js';

const LOCK_EX = 2;
const LOCK_NB = 4;
/** EWOULDBLOCK (= EAGAIN on Linux): another open file holds the lock. */
const EWOULDBLOCK = 11;

type Flock = (fd: number, operation: number) => number;

let flockFn: { call: Flock; errno: () => number } | null | undefined;

function loadFlock(): { call: Flock; errno: () => number } | null {
  if (flockFn !== undefined) return flockFn;
  try {
    const koffi = loadKoffi();
    const call = koffi.load('libc.so.6').func('int flock(int, int)') as Flock;
    flockFn = { call, errno: () => koffi.errno() };
  } catch {
    flockFn = null;
  }
  return flockFn;
}

/** Takes the exclusive lock on the open regular file `fh`, or throws EDEST_BUSY. */
export function lockForWriting(fh: FileHandle, path: string): void {
  const flock = loadFlock();
  if (flock === null) return;
  if (flock.call(fh.fd, LOCK_EX | LOCK_NB) === 0) return;
  if (flock.errno() !== EWOULDBLOCK) return; // ENOLCK, EINVAL: the file system has no locks
  throw new BlksyncError(
    'EDEST_BUSY',
    `${path} is being written by another blksync (it holds a lock on the file); wait for it to end, or choose another destination`,
    { path },
  );
}
