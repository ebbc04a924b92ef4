/**
 * `compare(a, b)`: cmp for images. Reports the byte ranges where A and B differ, exact at
 * their ends; differences in the same or neighbouring blocks are merged into one range so a
 * changed 100 KB region of random data is one range, not thousands.
 */

import { BlksyncError } from '../errors.js';
import { FileSource } from '../io/file-source.js';
import { openSource } from '../io/open.js';
import { RangeList, type Range } from '../ranges.js';
import { checkBlockSize, chunkSizeFor, DEFAULT_BLOCK_SIZE, DEFAULT_DEPTH } from './block-size.js';
import { narrowToDiffering, progressAfterScan } from './equal-scan.js';
import { ReadTarget } from './knowledge.js';
import { runPipeline, wholeImagePlan } from './pipeline.js';
import type { ProgressListener } from '../types.js';

export interface CompareOptions {
  /** Granularity of the scan; differences closer than this are merged (default 4096). */
  blockSize?: number;
  signal?: AbortSignal;
  onProgress?: ProgressListener;
  chunkSize?: number;
  depth?: number;
}

export interface CompareResult {
  a: string;
  b: string;
  sizeA: number;
  sizeB: number;
  /** True when the sizes are equal and no byte differs. */
  same: boolean;
  /** Bytes compared: the smaller of the two sizes. */
  bytesCompared: number;
  /** Differing bytes within the merged ranges' exact ends (upper bound of differing bytes). */
  bytesInRanges: number;
  rangeCount: number;
  /** The first 100,000 merged ranges. */
  ranges: Range[];
  seconds: number;
}

function firstDiff(a: Buffer, b: Buffer, start: number, end: number): number {
  for (let i = start; i < end; i++) if (a[i] !== b[i]) return i;
  return end;
}

function lastDiff(a: Buffer, b: Buffer, start: number, end: number): number {
  for (let i = end - 1; i >= start; i--) if (a[i] !== b[i]) return i + 1;
  return start;
}

/** Compares A and B over their common length and reports where they differ. */
export async function compare(
  a: string,
  b: string,
  options: CompareOptions = {},
): Promise<CompareResult> {
  const started = performance.now();
  const blockSize = checkBlockSize(options.blockSize ?? DEFAULT_BLOCK_SIZE);
  const chunkSize = chunkSizeFor(blockSize, options.chunkSize);
  const A = await openSource(a);
  try {
    const B = await openSource(b);
    try {
      const common = Math.min(A.size, B.size);
      const ranges = new RangeList({ gap: blockSize });
      // the target knowledge keeps B's chunk; compare it byte by byte only at the ends of spans
      const target = new ReadTarget(B.fh, b, chunkSize);
      // the chunks that differ, found on all cores; the pipeline finds where in them
      const scan = await narrowToDiffering(wholeImagePlan(common), A.fh.fd, B.fh.fd, {
        chunkSize,
        signal: options.signal,
        onProgress: options.onProgress,
      });
      const run = await runPipeline(scan.plan, new FileSource(A.fh, a, A.size, false), target, [], {
        blockSize,
        chunkSize,
        depth: options.depth ?? DEFAULT_DEPTH,
        signal: options.signal,
        onProgress: progressAfterScan(scan, options.onProgress),
        onDiffer: (offset, data, s, e, knowledge) => {
          const other = knowledge.held!;
          ranges.add(offset + firstDiff(data, other, s, e), offset + lastDiff(data, other, s, e));
        },
      });
      if (run.interrupted) {
        throw new BlksyncError('EINTERRUPTED', 'interrupted');
      }
      return {
        a,
        b,
        sizeA: A.size,
        sizeB: B.size,
        same: A.size === B.size && ranges.count === 0,
        bytesCompared: common,
        bytesInRanges: ranges.bytes,
        rangeCount: ranges.count,
        ranges: [...ranges.ranges],
        seconds: (performance.now() - started) / 1000,
      };
    } finally {
      await B.fh.close();
    }
  } finally {
    await A.fh.close();
  }
}
