/**
 * Narrowing a plan with what the file systems know: where SRC and DST are both holes, both
 * read as zeros, so they are equal without reading either. A copy of a mostly empty image
 * (an OS image: a quarter data, the rest holes) then reads and compares only the data.
 *
 * Only regular files report holes (SEEK_DATA/SEEK_HOLE); a block device, a stream or a file
 * system that does not report them leaves the plan as it is. Where one side is a hole and
 * the other holds data, the range stays in the plan: the hole reads as zeros (no I/O) and
 * the compare decides.
 */

import type { FileHandle } from 'node:fs/promises';
import { mappedRanges } from '../io/sparse-map.js';
import { intersectRanges, unionRanges, type Range } from '../ranges.js';
import type { Plan } from '../types.js';

/**
 * Data ranges closer than this are read as one: reading a short hole costs less than the
 * extra chunk boundaries (an ext4 image of small files has thousands of small extents).
 */
const MERGE_GAP_BYTES = 256 * 1024;

export interface SparseSide {
  fh: FileHandle;
  path: string;
}

/** Granularity of a data map: any block a file system uses is a multiple of it. */
const MIN_FS_BLOCK = 512;

/**
 * Where a regular file holds data (ascending, merged); a unit outside them is all hole and
 * reads as zeros. Undefined when the file system does not report holes (or koffi cannot
 * load): then every byte must be read. A block device reports all of itself as data.
 */
export function dataRangesOf(fh: FileHandle, size: number, path: string): Range[] | undefined {
  try {
    return mappedRanges(fh, size, MIN_FS_BLOCK, path);
  } catch {
    return undefined;
  }
}

/**
 * The plan less the block-aligned ranges where every side given is a hole. `sides` are the
 * regular files among SRC and DST (a DST that was just created is all hole: pass only SRC).
 * Returns the plan unchanged when a side's file system does not report holes.
 */
export function narrowToData(plan: Plan, sides: readonly SparseSide[], blockSize: number): Plan {
  if (sides.length === 0) return plan;
  let data: Range[] = [];
  try {
    for (const side of sides) {
      data = unionRanges(
        data,
        mappedRanges(side.fh, plan.imageSize, blockSize, side.path),
        MERGE_GAP_BYTES,
      );
    }
  } catch {
    // no SEEK_DATA here (or koffi cannot load): read everything, as before
    return plan;
  }
  return { imageSize: plan.imageSize, ranges: intersectRanges(plan.ranges, data) };
}
