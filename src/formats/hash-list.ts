/**
 * The gap hash of a patch (formats/patch.ts), built as its bytes arrive: SHA-256 over the
 * SHA-256 of each piece of the gap, where the pieces are the gap cut at multiples of the
 * patch's gap unit (aligned to the image, so the first and last may be short). Runs of zeros
 * (holes) are added without hashing each piece; pieces of bytes are hashed on the hash pool.
 */

import { HASH_BYTES, isZero, sha256, sha256Stream, zeroHash } from '../hash.js';

/** Whole-unit zero hashes handed to SHA-256 at once when a run of zeros is added. */
const ZERO_RUN_UNITS = 1024;

/**
 * ZERO_RUN_UNITS zero-piece hashes per unit, made once: a list is made per gap (per record),
 * and making them per list cost more than hashing a short gap.
 */
const zeroRuns = new Map<number, Buffer>();

function zeroRun(unit: number): Buffer {
  let run = zeroRuns.get(unit);
  if (run === undefined) {
    const h = zeroHash(unit);
    run = Buffer.allocUnsafe(ZERO_RUN_UNITS * HASH_BYTES);
    for (let i = 0; i < ZERO_RUN_UNITS; i++) h.copy(run, i * HASH_BYTES);
    zeroRuns.set(unit, run);
  }
  return run;
}

/** Hashes blocks of data[start, end) (start aligned) into out from outOffset: the hash pool. */
export interface BlockHasher {
  hashBlocks(
    data: Buffer,
    start: number,
    end: number,
    blockSize: number,
    out: Buffer,
    outOffset: number,
  ): Promise<void>;
}

/**
 * The hashes of the pieces of data[start, end), which is the image at `at` (the chunk's
 * offset plus `start`), cut at multiples of `unit`; undefined when it is all zeros (then
 * HashList.addZeros takes it). A piece cut short at the start is hashed here, the aligned
 * rest on the pool.
 */
export async function pieceHashes(
  pool: BlockHasher,
  data: Buffer,
  start: number,
  end: number,
  at: number,
  unit: number,
): Promise<Buffer | undefined> {
  if (isZero(data, start, end)) return undefined;
  const head = Math.min(end - start, (unit - (at % unit)) % unit);
  const out = Buffer.allocUnsafe(
    ((head > 0 ? 1 : 0) + Math.ceil((end - start - head) / unit)) * HASH_BYTES,
  );
  if (head > 0) sha256(data, start, start + head).copy(out, 0);
  if (start + head < end) {
    await pool.hashBlocks(data, start + head, end, unit, out, head > 0 ? HASH_BYTES : 0);
  }
  return out;
}

export class HashList {
  readonly #h = sha256Stream();
  readonly #unit: number;
  /** The image offset the next bytes added start at. */
  at: number;

  constructor(unit: number, start: number) {
    this.#unit = unit;
    this.at = start;
  }

  /** Adds the bytes up to `end` by their pieces' hashes (pieceHashes). */
  add(hashes: Buffer, end: number): void {
    this.#h.update(hashes);
    this.at = end;
  }

  /** Adds zero bytes up to `end`, piece by piece as pieceHashes cuts them. */
  addZeros(end: number): void {
    const unit = this.#unit;
    let at = this.at;
    const first = Math.min(end, Math.ceil(at / unit) * unit);
    if (first > at) this.#h.update(zeroHash(first - at));
    at = first;
    const whole = Math.floor((end - at) / unit);
    const run = zeroRun(unit);
    for (let left = whole; left > 0; left -= ZERO_RUN_UNITS) {
      this.#h.update(run.subarray(0, Math.min(left, ZERO_RUN_UNITS) * HASH_BYTES));
    }
    at += whole * unit;
    if (end > at) this.#h.update(zeroHash(end - at));
    this.at = end;
  }

  digest(): Buffer {
    return this.#h.digest();
  }
}
