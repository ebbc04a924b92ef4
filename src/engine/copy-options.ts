/**
 * A copy's options, their defaults and its result: the one place that lists them, for a local
 * copy (engine/copy.ts) and the remote ones (remote/copy/) alike. `resolveCopyOptions` checks
 * what every copy checks before it starts and fills in the defaults, once, in the router.
 */

import { BlksyncError } from '../errors.js';
import type { Range } from '../ranges.js';
import type { ProgressListener } from '../types.js';
import { checkBlockSize, DEFAULT_BLOCK_SIZE } from './block-size.js';
import type { ContainerReport } from '../containers/open.js';
import type { BmapReport, CopySourceOptions } from './copy-source.js';
import type { DeltaReport } from '../delta/published-source.js';
import type { IndexReport } from './index-target.js';
import type { VerifyReport } from './verify-written.js';

/** Blocks of DST checked against an index before trusting it, unless told otherwise. */
export const DEFAULT_VERIFY_SAMPLE = 16;

/**
 * The options of a copy between local ends (the router adds those of remote ends). SRC's bmap,
 * signature, size and the signal are CopySourceOptions, handed to openCopySource as they are.
 */
export interface LocalCopyOptions extends CopySourceOptions {
  /** Compare and write granularity in bytes (default 4096). */
  blockSize?: number;
  /** Scan and report; write nothing, create nothing. */
  dryRun?: boolean;
  /** Write everything without reading DST (dd behaviour). */
  full?: boolean;
  onProgress?: ProgressListener;
  /** Tuning: bytes per read (default 1 MiB, 4 MiB with an index) and reads in flight (default 4). */
  chunkSize?: number;
  depth?: number;
  /** An index of DST to use instead of reading it, and to update ("auto": the cache's). */
  index?: string;
  /**
   * An index of SRC (a regular file), with `index`: only the blocks whose hashes differ from
   * DST's are read, when it can be trusted; written after the copy otherwise. "auto": the
   * cache's, which `index: "auto"` implies; false: none.
   */
  srcIndex?: string | false;
  /** Read DST once and write a fresh index, whatever the old one says. */
  rebuildIndex?: boolean;
  /** Use the index although nothing vouches that DST is unchanged (the user does). */
  trustIndex?: boolean;
  /** Blocks of DST checked against the index before trusting it (default 16; 0 skips). */
  verifySample?: number;
  /** Worker threads hashing for the index (default: one per core, at most 4). */
  hashThreads?: number;
  /** Tuning (tests): bytes the index marks as possibly dirty at a time while writing. */
  indexCheckpointBytes?: number;
  /**
   * After the copy, read back what was written (bypassing the page cache where the file
   * system allows) and compare checksums: the bmap's, or the source's taken while copying.
   */
  verify?: boolean;
}

export interface CopyResult {
  source: string;
  destination: string;
  /** SRC's size, the bytes considered. */
  bytesTotal: number;
  bytesScanned: number;
  /** Bytes of DST read to compare. */
  bytesRead: number;
  blockSize: number;
  blocksDiffering: number;
  bytesDiffering: number;
  bytesWritten: number;
  rangesWritten: number;
  /** The first ranges written (or that would be, in a dry run). */
  ranges: Range[];
  /** True when DST did not exist and was created (sparse). */
  created: boolean;
  /** Bytes of DST past SRC's end, left as they were. */
  destinationExtraBytes: number;
  /**
   * A bmap copy onto an existing file: bytes of DST's data in the bmap's unmapped areas made
   * holes (reading as zeros, like the image's), or that would be in a dry run; 0 when its file
   * system cannot punch holes.
   */
  bytesPunched?: number;
  /**
   * A bmap copy onto an existing file whose file system cannot punch holes (ramfs, FAT):
   * bytes of zeros written over DST's data in the unmapped areas instead.
   */
  bytesZeroed?: number;
  dryRun: boolean;
  full: boolean;
  seconds: number;
  /** What was done with --index. */
  index?: IndexReport;
  /** The bmap used: only its mapped ranges were considered. */
  bmap?: BmapReport;
  /** The container SRC's image was decoded from (zip, tar, Android sparse, qcow2, ...). */
  container?: ContainerReport;
  /** What --verify read back and compared. */
  verify?: VerifyReport;
  /** SRC was published (`blksync publish`): what was fetched by ranges. */
  http?: DeltaReport;
}

/** The options with the defaults filled in, as every copy path takes them. */
export interface ResolvedCopyOptions extends LocalCopyOptions {
  blockSize: number;
  /** The block size given (-b); blockSize holds the default otherwise. */
  blockSizeGiven: number | undefined;
  dryRun: boolean;
  full: boolean;
  rebuildIndex: boolean;
  trustIndex: boolean;
  verifySample: number;
}

/** Index options that would be silently ignored, or that contradict each other, are refused. */
function checkIndexOptions(options: LocalCopyOptions): void {
  const given = [
    ...(options.trustIndex === true ? ['--trust-index'] : []),
    ...(options.rebuildIndex === true ? ['--rebuild-index'] : []),
    ...(options.verifySample !== undefined ? ['--verify-sample'] : []),
  ];
  if (options.index === undefined && given.length > 0) {
    throw new BlksyncError('EUSAGE', `${given.join(', ')} work with --index FILE or --index auto`);
  }
  if (options.trustIndex === true && options.rebuildIndex === true) {
    throw new BlksyncError(
      'EUSAGE',
      '--trust-index uses the index as it is and --rebuild-index replaces it: give one of them',
    );
  }
}

/**
 * Checks what every copy checks before it starts (the block size, a signal already aborted,
 * --verify in a dry run, index options without an index) and fills in the defaults.
 */
export function resolveCopyOptions(options: LocalCopyOptions): ResolvedCopyOptions {
  const blockSize = checkBlockSize(options.blockSize ?? DEFAULT_BLOCK_SIZE);
  const dryRun = options.dryRun === true;
  if (options.signal?.aborted === true) {
    throw new BlksyncError('EINTERRUPTED', 'interrupted before starting; nothing was written');
  }
  if (options.verify === true && dryRun) {
    throw new BlksyncError('EUSAGE', '--verify has nothing to read back in a dry run');
  }
  checkIndexOptions(options);
  return {
    ...options,
    blockSize,
    blockSizeGiven: options.blockSize,
    dryRun,
    full: options.full === true,
    // an Android sparse image's don't-care chunks are left as they are, like a bmap's
    // unmapped ranges (with --index too: its blocks there are hashed from DST, engine/copy.ts)
    skipDontCare: options.skipDontCare ?? options.full !== true,
    rebuildIndex: options.rebuildIndex === true,
    trustIndex: options.trustIndex === true,
    verifySample: options.verifySample ?? DEFAULT_VERIFY_SAMPLE,
  };
}
