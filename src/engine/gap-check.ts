/**
 * The check of TARGET between a patch's records: what base and result share there (the
 * gaps) must be what TARGET holds, or applying the records would leave TARGET neither the
 * base nor the result (a file changed on the device since it was flashed, or another image
 * whose changed blocks happen to match).
 *
 *   plan: the gaps, less TARGET's holes × source: TARGET × knowledge: none → no sink; each
 *   chunk's pieces (cut at the patch's gap unit) are hashed on the pool into its gap's list
 *
 * A hole of a TARGET file reads as zeros: its pieces join the list as zero-piece hashes
 * without a read, so a mostly empty image is checked at the speed of its data.
 */

import { rangesBytes } from '../ranges.js';
import type { FileHandle } from 'node:fs/promises';
import { BlksyncError } from '../errors.js';
import { HashList, pieceHashes } from '../formats/hash-list.js';
import type { Gap } from '../formats/patch-reader.js';
import { FileSource } from '../io/file-source.js';
import { chunkSizeFor, DEFAULT_DEPTH } from './block-size.js';
import { SharedBufferPool } from '../io/buffer-pool.js';
import { HashPool } from './hash-pool.js';
import { INLINE_HASH_MAX_BYTES } from './index-session.js';
import { NoTarget } from './knowledge.js';
import { runPipeline } from './pipeline.js';
import { narrowToData } from './sparse-plan.js';
import type { Plan, ProgressListener } from '../types.js';

export interface GapCheck {
  /** The gaps whose bytes on TARGET differ from the patch's hash, in order. */
  differing: Gap[];
  bytesRead: number;
}

/**
 * Hashes TARGET over `gaps` (ascending, block-aligned starts, each ending at a record or
 * at the smaller image size) and returns those that do not match. `file`: TARGET is a
 * regular file, whose holes need no reading.
 */
export async function checkGaps(
  gaps: readonly Gap[],
  target: { fh: FileHandle; path: string; size: number; file: boolean },
  sizes: { blockSize: number; gapUnit: number },
  options: { signal?: AbortSignal | undefined; onProgress?: ProgressListener | undefined } = {},
): Promise<GapCheck> {
  const { blockSize, gapUnit } = sizes;
  const check: GapCheck = { differing: [], bytesRead: 0 };
  const ranges = gaps.filter((g) => g.end > g.start).map((g) => ({ start: g.start, end: g.end }));
  let plan: Plan = { imageSize: ranges[ranges.length - 1]?.end ?? 0, ranges };
  if (target.file) plan = narrowToData(plan, [{ fh: target.fh, path: target.path }], blockSize);
  const toRead = rangesBytes(plan.ranges);
  const pool = new HashPool();
  if (toRead < INLINE_HASH_MAX_BYTES) pool.inline();
  const chunkSize = chunkSizeFor(gapUnit);

  // the gaps in order, each hashed from its start; bytes not read are holes (zeros); an
  // empty gap has the hash of an empty list
  let g = 0;
  let list = new HashList(gapUnit, gaps[0]?.start ?? 0);
  const endGap = (): void => {
    const gap = gaps[g]!;
    list.addZeros(gap.end);
    if (!list.digest().equals(gap.hash)) check.differing.push(gap);
    g++;
    list = new HashList(gapUnit, gaps[g]?.start ?? gap.end);
  };
  try {
    if (plan.ranges.length === 0) {
      while (g < gaps.length) endGap();
      return check;
    }
    const run = await runPipeline(
      plan,
      new FileSource(target.fh, target.path, target.size, false),
      new NoTarget(),
      [],
      {
        blockSize,
        chunkSize,
        depth: DEFAULT_DEPTH,
        signal: options.signal,
        buffers: new SharedBufferPool(chunkSize),
        onProgress: options.onProgress,
        onChunk: async (offset, data, length) => {
          while (offset >= gaps[g]!.end) endGap();
          list.addZeros(offset);
          const hashes = await pieceHashes(pool, data, 0, length, offset, gapUnit);
          if (hashes === undefined) list.addZeros(offset + length);
          else list.add(hashes, offset + length);
        },
      },
    );
    check.bytesRead = run.bytesScanned;
    if (run.interrupted) {
      // the caller knows what was written before (a stream's earlier batches) and says so
      throw new BlksyncError('EINTERRUPTED', 'interrupted while checking TARGET');
    }
    while (g < gaps.length) endGap();
    return check;
  } finally {
    await pool.close();
  }
}
