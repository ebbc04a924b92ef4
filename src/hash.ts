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
