/** The first bytes of a file, for recognising blksync's own formats by their magic. */

import { open } from 'node:fs/promises';
import { fromSystemError, type ErrorCode } from '../errors.js';

/** Reads up to `bytes` bytes from the start of `path` (fewer if the file is shorter). */
export async function readHead(path: string, bytes: number, code: ErrorCode): Promise<Buffer> {
  let fh;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    throw fromSystemError(code, 'cannot open', path, err);
  }
  try {
    const buf = Buffer.alloc(bytes);
    const { bytesRead } = await fh.read(buf, 0, bytes, 0);
    return buf.subarray(0, bytesRead);
  } catch (err) {
    throw fromSystemError(code, 'cannot read', path, err);
  } finally {
    await fh.close();
  }
}

/** True when `head` starts with `magic`. */
export function startsWith(head: Buffer, magic: Buffer): boolean {
  return head.length >= magic.length && head.subarray(0, magic.length).equals(magic);
}

/** True when the file at `path` starts with `magic`; false when it cannot be read. */
export async function hasMagic(path: string, magic: Buffer): Promise<boolean> {
  try {
    return startsWith(await readHead(path, magic.length, 'ESRC_OPEN'), magic);
  } catch {
    return false; // the caller's own open reports the error properly
  }
}
