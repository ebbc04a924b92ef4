/**
 * Block and chunk sizes every operation shares: the defaults, and the check of a given size.
 * Apart from copy.ts so that make-index, compare, diff and apply take them without importing
 * the copy operation.
 */

import { BlksyncError } from '../errors.js';

/** Default block size: see the README's "Block size" section for the measurements. */
export const DEFAULT_BLOCK_SIZE = 4096;
/** Bytes read per chunk from each side: of 128 KiB to 16 MiB, 1-2 MiB with 4 in flight was fastest on a warm 1 GiB copy (smaller costs syscalls, larger spills the CPU caches). */
export const DEFAULT_CHUNK_SIZE = 1024 * 1024;
/** Bytes per chunk when hashing for an index. */
export const INDEX_CHUNK_SIZE = 4 * 1024 * 1024;
/** Chunks in flight at once. */
export const DEFAULT_DEPTH = 4;
/** Largest block size accepted. */
export const MAX_BLOCK_SIZE = 64 * 1024 * 1024;

/** Validates a block size: a power of two from 512 B to 64 MiB. */
export function checkBlockSize(blockSize: number): number {
  if (
    !Number.isInteger(blockSize) ||
    blockSize < 512 ||
    blockSize > MAX_BLOCK_SIZE ||
    (blockSize & (blockSize - 1)) !== 0
  ) {
    throw new BlksyncError(
      'EUSAGE',
      `invalid block size ${blockSize}: use a power of two from 512 to 64M (e.g. 4K, 64K, 1M)`,
    );
  }
  return blockSize;
}

/** Chunk size rounded to a multiple of the block size. */
export function chunkSizeFor(blockSize: number, chunkSize = DEFAULT_CHUNK_SIZE): number {
  return Math.max(blockSize, Math.floor(chunkSize / blockSize) * blockSize);
}
