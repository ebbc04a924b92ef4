/** pread until `length` bytes are in or the file ends: one read may return less than asked. */

import type { FileHandle } from 'node:fs/promises';

/** Reads `length` bytes at `position` into buf[bufOffset...]; returns fewer only at end of file. */
export async function readFully(
  fh: FileHandle,
  buf: Buffer,
  bufOffset: number,
  length: number,
  position: number,
): Promise<number> {
  let got = 0;
  while (got < length) {
    const { bytesRead } = await fh.read(buf, bufOffset + got, length - got, position + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return got;
}
