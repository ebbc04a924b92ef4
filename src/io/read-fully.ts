/**
 * pread until `length` bytes are in or the file ends: one read may return less than asked.
 * What the page cache holds is copied on this thread first (io/cached-read.ts); the rest is
 * read through libuv's thread pool, so waiting for a disk never blocks the event loop.
 */

import type { FileHandle } from 'node:fs/promises';
import { readCached } from './cached-read.js';

/** Reads `length` bytes at `position` into buf[bufOffset...]; returns fewer only at end of file. */
export async function readFully(
  fh: FileHandle,
  buf: Buffer,
  bufOffset: number,
  length: number,
  position: number,
): Promise<number> {
  let got = readCached(fh, buf, bufOffset, length, position);
  while (got < length) {
    const { bytesRead } = await fh.read(buf, bufOffset + got, length - got, position + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return got;
}
