/**
 * The sample check done before trusting an index (of DST, or of SRC): read a few blocks and
 * compare their hashes with the stored ones. It catches a whole-disk rewrite or a new
 * partition table behind blksync's back; it cannot catch a one-block change, so it never
 * vouches for an index on its own: what does is decided first (engine/index-policy.ts: the
 * identity, a file's mtime and ctime, a device's write counter).
 */

import { randomInt } from 'node:crypto';
import type { FileHandle } from 'node:fs/promises';
import { blockCountFor } from '../formats/index-file.js';
import { HASH_BYTES, sha256 } from '../hash.js';
import { readFully } from '../io/read-fully.js';

export interface SampleResult {
  /** Offset of the first sampled block that does not match, if any. */
  mismatchAt: number | undefined;
  blocks: number;
  bytes: number;
}

/**
 * Which blocks to sample: `count` of the `blocks` for which `trusted(i)` holds, the first and
 * the last block first (where partition tables live, and what other tools most often
 * rewrite), then random ones; all of them, in order, when `count` covers them.
 */
export function pickSampleBlocks(
  blocks: number,
  count: number,
  trusted: (block: number) => boolean = () => true,
): number[] {
  const picked = new Set<number>();
  if (count <= 0 || blocks === 0) return [];
  const candidates = [0, blocks - 1];
  const all = count >= blocks;
  const tries = all ? blocks : count * 8;
  for (let t = 0; picked.size < count && t < tries; t++) {
    const i = all ? t : (candidates.shift() ?? randomInt(blocks));
    if (!picked.has(i) && trusted(i)) picked.add(i);
  }
  return [...picked];
}

/**
 * Reads `count` random blocks of `file` for which `trusted(start, end)` holds — always the
 * first and last of them, where partition tables live — and compares their SHA-256 with
 * `hashes` (block 0 first). All blocks, in order, when `count` covers them.
 */
export async function sampleMismatch(
  file: { fh: FileHandle },
  hashes: Buffer,
  blockSize: number,
  imageSize: number,
  count: number,
  trusted: (start: number, end: number) => boolean = () => true,
): Promise<SampleResult> {
  const result: SampleResult = { mismatchAt: undefined, blocks: 0, bytes: 0 };
  const blocks = blockCountFor(imageSize, blockSize);
  const end = (i: number): number => Math.min((i + 1) * blockSize, imageSize);
  const picked = pickSampleBlocks(blocks, count, (i) => trusted(i * blockSize, end(i)));
  const buf = Buffer.allocUnsafe(blockSize);
  for (const i of picked) {
    const s = i * blockSize;
    const e = end(i);
    const got = await readFully(file.fh, buf, 0, e - s, s);
    result.bytes += got;
    result.blocks++;
    const h = sha256(buf, 0, got);
    if (got < e - s || h.compare(hashes, i * HASH_BYTES, (i + 1) * HASH_BYTES) !== 0) {
      result.mismatchAt = s;
      return result;
    }
  }
  return result;
}
