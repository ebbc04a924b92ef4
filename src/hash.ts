/** Block hashing: SHA-256 from node:crypto, the default hash of indexes, patches and bmaps. */

import * as crypto from 'node:crypto';
import { createHash } from 'node:crypto';

export const HASH_ALGORITHM = 'sha256';
export const HASH_BYTES = 32;

/**
 * crypto.hash (Node >= 20.12) is one call and no object, the fastest path here; the remote
 * agent also runs on older Node (>= 18), which has only createHash.
 */
const oneShot = (crypto as { hash?: typeof crypto.hash }).hash;

/** SHA-256 of buf[start, end). */
export function sha256(buf: Buffer, start = 0, end = buf.length): Buffer {
  const view = start === 0 && end === buf.length ? buf : buf.subarray(start, end);
  return oneShot !== undefined
    ? oneShot('sha256', view, 'buffer')
    : createHash('sha256').update(view).digest();
}

/** An incremental SHA-256 for data that arrives in pieces. */
export function sha256Stream(): ReturnType<typeof createHash> {
  return createHash('sha256');
}

let zeroBuf = Buffer.alloc(0);
/** `n` zero bytes (a shared buffer: never write into it). */
export function zeroes(n: number): Buffer {
  if (zeroBuf.length < n) zeroBuf = Buffer.alloc(n);
  return zeroBuf.subarray(0, n);
}

/** True when buf[start, end) is all zeros (compared at memcmp speed). */
export function isZero(buf: Buffer, start = 0, end = buf.length): boolean {
  return buf.compare(zeroes(end - start), 0, end - start, start, end) === 0;
}

const zeroHashes = new Map<number, Buffer>();
/** SHA-256 of `len` zero bytes, computed once per length. */
export function zeroHash(len: number): Buffer {
  let h = zeroHashes.get(len);
  if (h === undefined) zeroHashes.set(len, (h = sha256(zeroes(len))));
  return h;
}
