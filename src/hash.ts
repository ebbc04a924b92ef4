/** Block hashing: SHA-256 from node:crypto, the default hash of indexes, patches and bmaps. */

import { createHash, hash } from 'node:crypto';

export const HASH_ALGORITHM = 'sha256';
export const HASH_BYTES = 32;

/** SHA-256 of buf[start, end). crypto.hash is one call and no object, the fastest path here. */
export function sha256(buf: Buffer, start = 0, end = buf.length): Buffer {
  const view = start === 0 && end === buf.length ? buf : buf.subarray(start, end);
  return hash('sha256', view, 'buffer');
}

/** An incremental SHA-256 for data that arrives in pieces. */
export function sha256Stream(): ReturnType<typeof createHash> {
  return createHash('sha256');
}
