/**
 * A hash list built as its blocks arrive: SHA-256 over the SHA-256 of each block, in order.
 * It is the content hash of patch records and the gap hash of the bytes between them
 * (formats/patch.ts); runs of zero blocks (holes) are added without hashing each block.
 */

import { HASH_BYTES, sha256Stream, zeroHash } from '../hash.js';

/** Zero-block hashes handed to SHA-256 at once when a run of zeros is added. */
const ZERO_RUN_BLOCKS = 1024;

/**
 * ZERO_RUN_BLOCKS zero-block hashes per block size, made once: a list is made per gap (per
 * record), and making them per list cost more than hashing a short gap.
 */
const zeroRuns = new Map<number, Buffer>();

function zeroRun(blockSize: number): Buffer {
  let run = zeroRuns.get(blockSize);
  if (run === undefined) {
    const h = zeroHash(blockSize);
    run = Buffer.allocUnsafe(ZERO_RUN_BLOCKS * HASH_BYTES);
    for (let i = 0; i < ZERO_RUN_BLOCKS; i++) h.copy(run, i * HASH_BYTES);
    zeroRuns.set(blockSize, run);
  }
  return run;
}

export class HashList {
  readonly #h = sha256Stream();
  readonly #blockSize: number;
  /** Image bytes covered so far. */
  bytes = 0;

  constructor(blockSize: number) {
    this.#blockSize = blockSize;
  }

  /** Adds the hashes of the next blocks, covering `bytes` bytes of the image. */
  add(hashes: Buffer, bytes: number): void {
    this.#h.update(hashes);
    this.bytes += bytes;
  }

  /** Adds `bytes` zero bytes (whole blocks; the last one may be short at the image's end). */
  addZeros(bytes: number): void {
    const bs = this.#blockSize;
    const whole = Math.floor(bytes / bs);
    const run = zeroRun(bs);
    for (let left = whole; left > 0; left -= ZERO_RUN_BLOCKS) {
      this.#h.update(run.subarray(0, Math.min(left, ZERO_RUN_BLOCKS) * HASH_BYTES));
    }
    if (bytes > whole * bs) this.#h.update(zeroHash(bytes - whole * bs));
    this.bytes += bytes;
  }

  digest(): Buffer {
    return this.#h.digest();
  }
}
