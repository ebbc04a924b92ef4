/**
 * A local copy (`copyLocal`): write SRC onto DST, both on this machine, writing only the blocks
 * that differ. The router (src/copy.ts) sends copies with a `host:path` end to remote/copy/.
 *
 * Every refusal (same file, mounted, too small) happens before the first byte is written.
 * Rerunning an interrupted copy converges: the pipeline compares again and writes what
 * still differs, so no journal is needed.
 */

import { statSync } from 'node:fs';
import { BlksyncError } from '../errors.js';
import { destinationSink } from '../io/destination-sink.js';
import type { FileSink } from '../io/file-sink.js';
import { dropDeviceCaches } from '../io/device-cache.js';
import { assertSeparateOutput, inputOf, openTarget, type Opened } from '../io/open.js';
import {
  prepareDestination,
  undoPreparation,
  type PreparedDestination,
} from '../io/prepare-destination.js';
import { SourceWatch } from '../io/source-watch.js';
import { partlyWritten } from '../partial-write.js';
import { formatBytes } from '../size.js';
import type { IndexSession } from './index-session.js';
import { openCopySource, type CopySource } from './copy-source.js';
import { sourceIndexFor } from './source-index-choice.js';
import { NoTarget, ReadTarget, ZeroTarget } from './knowledge.js';
import { isWholePlan, runPipeline } from './pipeline.js';
import { SharedBufferPool } from '../io/buffer-pool.js';
import { narrowToData, type SparseSide } from './sparse-plan.js';
import {
  narrowToDiffering,
  prestartScanWorkers,
  progressAfterScan,
  RereadCheck,
  type EqualScanResult,
  type ScanWorker,
} from './equal-scan.js';
import { checksumError } from './bmap-verify.js';
import { FileSource } from '../io/file-source.js';
import type { VerifyReport } from './verify-written.js';
import { type Range, rangesBytes } from '../ranges.js';
import type { Plan, Sink, TargetKnowledge } from '../types.js';
import {
  chunkSizeFor,
  DEFAULT_BLOCK_SIZE,
  DEFAULT_DEPTH,
  INDEX_CHUNK_SIZE,
  MAX_BLOCK_SIZE,
} from './block-size.js';
import type { CopyResult, ResolvedCopyOptions } from './copy-options.js';

/**
 * Writes SRC onto DST, both local, writing only the blocks that differ. `opened`: SRC already
 * opened (fan-out hands each destination its view of one read of SRC); closed here.
 */
/**
 * The largest power of two (up to MAX_BLOCK_SIZE) dividing every boundary of `ranges` but
 * the image's end: the largest blocks that tile them.
 */
function tileOf(ranges: readonly Range[], imageSize: number): number {
  let tile = MAX_BLOCK_SIZE;
  for (const r of ranges) {
    for (const at of [r.start, r.end]) {
      if (at === imageSize || at === 0) continue;
      while (tile > 1 && at % tile !== 0) tile /= 2;
    }
  }
  return tile;
}

export async function copyLocal(
  src: string,
  dst: string,
  options: ResolvedCopyOptions,
  opened?: CopySource,
): Promise<CopyResult> {
  const started = performance.now();
  const { blockSize, dryRun, full } = options;
  // hashing for an index wants bigger chunks: fewer hand-offs to the worker threads
  const chunkSize = chunkSizeFor(
    blockSize,
    options.chunkSize ?? (options.index !== undefined ? INDEX_CHUNK_SIZE : undefined),
  );
  // options.destination (set by the router) lets DST steer how SRC is read: an overlay of DST
  // copies only its own clusters, a published URL fetches only what DST lacks. A fan-out
  // hands each destination its view of one read of SRC instead (`opened`)
  const source = opened ?? (await openCopySource(src, options));
  // the equal scan's workers start now, beside the set-up, when a scan is likely
  const prestarted =
    opened === undefined && scanLikely(source, dst, options)
      ? prestartScanWorkers(
          source.size,
          source.checksums !== undefined
            ? { ranges: source.checksums.units, chunkSize }
            : undefined,
        )
      : [];
  let target: Opened | undefined;
  let sink: Sink | undefined;
  // the bare file sink: on an error only it is finished, so wrappers' end-of-copy work (a
  // bmap copy punching the unmapped areas) happens only after success
  let fileSink: FileSink | undefined;
  let index: IndexSession | undefined;
  // what this run did to DST before its first write, undone if a refusal comes after it
  let prepared: PreparedDestination | undefined;
  // every differing block was written: a failure after that (index, verify) left DST whole
  let allWritten = false;
  try {
    // with a bmap, the index's blocks must tile the mapped ranges (whole bmap blocks)
    const bmapBlock = options.index !== undefined ? source.bmap?.blockSize : undefined;
    // a plan of part of the image other than a bmap's (an Android sparse image without its
    // don't-care chunks, an overlay of DST): DST keeps what it holds outside it, which an index
    // hashes from DST at the end; its blocks must tile the plan's ranges
    const keptOutside =
      options.index !== undefined && source.bmap === undefined && !isWholePlan(source.plan)
        ? source.plan.ranges
        : undefined;
    const keptBlock = keptOutside !== undefined ? tileOf(keptOutside, source.size) : undefined;
    const tile = bmapBlock ?? keptBlock;
    if (tile !== undefined && options.blockSizeGiven !== undefined && tile % blockSize !== 0) {
      const blocks =
        bmapBlock !== undefined
          ? `the bmap's ${tile}-byte blocks`
          : `the ${tile}-byte blocks of ${src}'s defined ranges`;
      throw new BlksyncError(
        'EUSAGE',
        `-b ${blockSize} does not divide ${blocks}; with --index omit -b`,
      );
    }
    // another program writing SRC meanwhile would leave DST a mix of old and new: checked at the end
    const watch =
      source.watched !== undefined ? await SourceWatch.start(source.watched, src) : undefined;
    const found = await openTarget(dst, { readOnly: dryRun });
    await source.checkTarget?.(found.fh !== undefined ? found.stats : undefined);
    if (found.fh !== undefined) {
      target = found;
      if (source.sameAs(found.stats)) throw sameFileError(src, dst);
    }
    prepared = await prepareDestination(found, source.size, dryRun);
    target = prepared.target;
    // what DST's cache (or a device's under it) holds may be older than the device: read anew
    if (target?.kind === 'block-device') await dropDeviceCaches(target.fh.fd, target.stats.rdev);
    const { created, zero: fresh } = prepared;
    let knowledge: TargetKnowledge;
    if (full) knowledge = new NoTarget();
    else if (fresh) {
      // new (or empty) file: it reads as zeros, so only non-zero blocks need writing,
      // and the rest stay holes
      knowledge = new ZeroTarget();
    } else {
      source.adviseTarget(target!.fh.fd);
      knowledge = new ReadTarget(target!.fh, dst, chunkSize);
    }

    // what a bmap copy punches to holes in DST's unmapped areas, counted before: a dry run
    // reports it too (the pipeline writes only mapped ranges, so it is the same after)
    const unmappedData =
      !created && target?.kind === 'file' ? source.unmappedData(target.fh, dst) : undefined;
    const srcIndex = sourceIndexFor(options, source);
    if (options.index !== undefined) {
      for (const out of [options.index, srcIndex?.index]) {
        if (out === undefined || out === 'auto') continue;
        await assertSeparateOutput(out, [
          { path: src, role: 'the source', isSame: (st) => source.sameAs(st) },
          ...(target !== undefined ? [inputOf(target, 'the destination')] : []),
        ]);
      }
      if (srcIndex !== undefined && srcIndex.index === options.index && options.index !== 'auto') {
        throw new BlksyncError(
          'EUSAGE',
          `--src-index and --index name the same file ${options.index}; give each its own`,
        );
      }
      // loaded only when asked for: a plain copy does not pay for hashing's modules
      const indexing = await import('./index-session.js');
      index = await indexing.IndexSession.open({
        index: options.index,
        dst: target,
        dstPath: dst,
        fresh,
        imageSize: source.size,
        blockSize:
          options.blockSizeGiven ??
          bmapBlock ??
          (keptBlock !== undefined ? Math.min(keptBlock, DEFAULT_BLOCK_SIZE) : undefined),
        ...(options.blockSizeGiven === undefined && bmapBlock !== undefined
          ? { blockSizeReason: "the bmap's blocks are" }
          : options.blockSizeGiven === undefined && keptBlock !== undefined
            ? { blockSizeReason: "the image's defined ranges are" }
            : {}),
        ...(source.bmap !== undefined
          ? {
              partial: {
                ranges: source.plan.ranges,
                // a new file stays a hole there; an existing one gets holes punched
                // (punched, or zeros written where the file system cannot punch)
                zeroedOutside: () =>
                  fresh ||
                  (target !== undefined && source.unmappedCleared(target.fh) !== undefined),
                punches: !fresh && target?.kind === 'file',
              },
            }
          : keptOutside !== undefined
            ? {
                // a new file stays a hole there; an existing one keeps what it holds
                partial: { ranges: keptOutside, zeroedOutside: () => fresh, punches: false },
              }
            : {}),
        chunkSize,
        rebuild: options.rebuildIndex,
        trust: options.trustIndex,
        verifySample: options.verifySample,
        full,
        dryRun,
        hashThreads: options.hashThreads,
        checkpointBytes: options.indexCheckpointBytes,
        source: srcIndex,
      });
      if (index.target !== undefined) knowledge = index.target;
    }
    // --verify without bmap checksums compares with the source's digests, taken as it is copied
    // loaded only with --verify: it brings koffi for aligned buffers
    const verifying = options.verify === true ? await import('./verify-written.js') : undefined;
    // not narrowed with an index: the blocks left out would keep no hash in the index written
    const plan =
      index?.plan ??
      (index !== undefined || full || options.verify === true || source.checksums !== undefined
        ? source.plan
        : narrowToData(source.plan, sparseSides(source, target, fresh, dst), blockSize));
    // digests of what the pipeline reads: with an index of SRC, only the blocks that differ
    const digests =
      verifying !== undefined && source.checksums === undefined
        ? new verifying.SourceDigests(plan.ranges)
        : undefined;
    const indexHook = index?.onChunk;
    const onChunk =
      digests === undefined
        ? indexHook
        : indexHook === undefined
          ? digests.onChunk
          : (offset: number, data: Buffer, length: number) => {
              digests.onChunk(offset, data, length);
              return indexHook(offset, data, length);
            };
    // SRC and DST read as they are and compared (a bmap's checksums verified on the way): on
    // all cores first, so the pipeline reads only the chunks that differ
    // not in a fan-out (`opened`): there SRC is read once for every destination
    const scan =
      opened === undefined &&
      knowledge instanceof ReadTarget &&
      onChunk === undefined &&
      index === undefined
        ? await scanFirst(src, source, target!, plan, chunkSize, options, prestarted)
        : undefined;
    // a bmap's large ranges read once, their writes held until their checksum passed; after a
    // scan that verified them, SRC is read as it is
    const hold = scan?.verified !== true ? source.holdWrites?.() : undefined;
    if (!dryRun && target !== undefined) {
      fileSink = destinationSink(target.fh, dst, target.kind);
      sink = hold !== undefined ? hold(fileSink) : fileSink;
      if (!created && target.kind === 'file') sink = source.wrapFileSink(sink, target.fh, dst);
      // outermost: the holes a bmap copy punches when it finishes are this copy's own change
      // of DST (index-session.ts keeps a file DST's ctime continuous through them)
      if (index !== undefined) sink = index.wrapSink(sink);
    }
    const from =
      scan?.verified === true
        ? new RereadCheck(
            new FileSource(source.file!.fh, src, source.size, false),
            scan.rereads!,
            src,
          )
        : (index?.wrapSource(source.source) ?? source.source);
    const run = await runPipeline(scan?.plan ?? plan, from, knowledge, sink ? [sink] : [], {
      blockSize: index?.target?.blockSize ?? blockSize,
      chunkSize,
      depth: options.depth ?? DEFAULT_DEPTH,
      signal: options.signal,
      onProgress:
        options.onProgress !== undefined && source.delta !== undefined
          ? (p) => options.onProgress!({ ...p, bytesFetched: source.delta!().bytesFetched })
          : scan !== undefined
            ? progressAfterScan(scan, options.onProgress)
            : options.onProgress,
      onChunk,
      // shared memory: a bmap's large ranges are hashed on a worker in the pipeline's buffers
      buffers: index?.buffers ?? (hold !== undefined ? new SharedBufferPool(chunkSize) : undefined),
    });
    await sink?.finish();
    // after finish(): a bmap's held writes beyond what memory keeps are read from SRC again
    // there, after their range's checksum passed, so a write to SRC before then is seen too
    if (!run.interrupted) {
      await watch?.check(
        dryRun
          ? 'what this dry run reports is neither'
          : `what was copied onto ${dst} may be a mix of its old and new content`,
      );
    }
    allWritten = !run.interrupted;
    let verified: VerifyReport | undefined;
    if (verifying !== undefined && !run.interrupted && target !== undefined) {
      // after finish(): fsynced, so the read-back sees what the medium holds
      const t0 = performance.now();
      const expected = source.checksums ?? {
        units: digests!.units(),
        algorithm: digests!.algorithm,
      };
      const session = index;
      const r = await verifying.verifyWritten(dst, expected.units, expected.algorithm, {
        fd: target.fh.fd,
        signal: options.signal,
        // with an index: which blocks differ, and the index marked stale over them
        explain: session && ((bad) => session.verifyFailed(bad)),
      });
      verified = {
        ...r,
        against: source.checksums !== undefined ? 'bmap' : 'source',
        algorithm: expected.algorithm,
        seconds: (performance.now() - t0) / 1000,
      };
    }
    if (!run.interrupted) await index?.commit();
    else await index?.settle();
    // how this DST's unmapped areas were made zeros (a fan-out's destinations share `source`)
    const cleared = target !== undefined ? source.unmappedCleared(target.fh) : undefined;
    const result: CopyResult = {
      source: src,
      destination: dst,
      bytesTotal: source.size,
      bytesScanned: (scan?.bytesEqual ?? 0) + run.bytesScanned,
      bytesRead: (scan?.bytesCompared ?? 0) + knowledge.bytesRead,
      blockSize: index?.target?.blockSize ?? blockSize,
      blocksDiffering: run.blocksDiffering,
      bytesDiffering: run.bytesDiffering,
      bytesWritten: run.bytesWritten,
      rangesWritten: run.ranges.count,
      ranges: [...run.ranges.ranges],
      created,
      destinationExtraBytes: prepared.extraBytes,
      ...(unmappedData !== undefined
        ? { bytesPunched: dryRun || cleared?.punched !== false ? unmappedData : 0 }
        : {}),
      ...(cleared !== undefined && cleared.bytesZeroed > 0
        ? { bytesZeroed: cleared.bytesZeroed }
        : {}),
      dryRun,
      full,
      seconds: (performance.now() - started) / 1000,
      ...(index !== undefined ? { index: index.report() } : {}),
      ...(source.bmap !== undefined
        ? {
            bmap: {
              ...source.bmap,
              rangesVerified:
                scan?.verified === true
                  ? source.checksums!.units.length
                  : source.bmap.rangesVerified,
              // this DST's own, or none (a device, or a dry run): never another destination's
              unmappedPunched: cleared?.punched,
            },
          }
        : {}),
      ...(source.container !== undefined ? { container: source.container } : {}),
      ...(verified !== undefined ? { verify: verified } : {}),
      ...(source.delta !== undefined ? { http: source.delta() } : {}),
    };
    if (run.interrupted) {
      // what reached DST: writes held for a range whose checksum was not verified yet never
      // did (the file sink's count; the pipeline's counts them as they were handed on)
      const reached =
        fileSink !== undefined
          ? { ...result, bytesWritten: Math.min(result.bytesWritten, fileSink.bytesWritten) }
          : result;
      throw new BlksyncError(
        'EINTERRUPTED',
        // of what the copy had to go through: with a bmap, its mapped bytes, not the image
        `interrupted after ${formatBytes(result.bytesScanned)} of ${formatBytes(rangesBytes(source.plan.ranges))}; rerun the same command to finish`,
        { partial: reached },
      );
    }
    return result;
  } catch (caught) {
    let err = caught;
    if (
      isAborted(options.signal) &&
      !(err instanceof BlksyncError && err.code === 'EINTERRUPTED')
    ) {
      // a read cut short by the interruption itself is not the source's fault
      err = new BlksyncError('EINTERRUPTED', 'interrupted; rerun the same command to finish', {
        cause: caught,
      });
    }
    // refused, or failed, before the first byte was written: leave DST as it was found
    await undoPreparation(prepared, fileSink?.bytesWritten ?? 0);
    // after the first write, the error says so: how much, and that a rerun converges
    throw partlyWritten(
      err,
      {
        source: src,
        destination: dst,
        bytesWritten: fileSink?.bytesWritten ?? 0,
        created: prepared?.made === 'created',
      },
      { allWritten },
    );
  } finally {
    for (const worker of prestarted) worker.release();
    // on an error, make what was written durable all the same, so a rerun starts from it
    await fileSink?.finish().catch(() => {});
    await index?.close();
    await target?.fh.close();
    await source.close();
  }
}

/**
 * The regular files among SRC and DST whose holes narrow the plan (engine/sparse-plan.ts):
 * none unless SRC is a plain file read as it is; DST too when it held something before.
 */
function sparseSides(
  source: CopySource,
  target: Opened | undefined,
  fresh: boolean,
  dst: string,
): SparseSide[] {
  const file = source.file;
  if (file?.fh === undefined || file.kind !== 'file' || source.compression !== undefined) return [];
  const sides: SparseSide[] = [{ fh: file.fh, path: source.path }];
  if (fresh) return sides;
  if (target?.fh === undefined || target.kind !== 'file') return [];
  sides.push({ fh: target.fh, path: dst });
  return sides;
}

/**
 * Whether the equal scan can run for this SRC: a local file or device read as it is, without
 * `--verify`, and with a bmap only one whose ranges all have checksums (with some, the
 * VerifyingSource's way).
 */
function scannable(source: CopySource, options: ResolvedCopyOptions): boolean {
  return (
    source.file?.fh !== undefined &&
    source.compression === undefined &&
    source.container === undefined &&
    source.delta === undefined &&
    options.verify !== true &&
    (source.checksums !== undefined || source.holdWrites === undefined)
  );
}

/**
 * Whether a scan is likely, before DST is opened: it is scannable and DST exists, not empty
 * (a DST just created is known to be zeros, and is not read).
 */
function scanLikely(source: CopySource, dst: string, options: ResolvedCopyOptions): boolean {
  if (!scannable(source, options) || options.full || options.index !== undefined) return false;
  try {
    const st = statSync(dst, { throwIfNoEntry: false });
    return st !== undefined && (st.isBlockDevice() || (st.isFile() && st.size > 0));
  } catch {
    return false; // openTarget refuses DST with the right code (ENOTDIR, ELOOP, …)
  }
}

/**
 * The equal scan (engine/equal-scan.ts) when SRC is a local file or device read as it is:
 * undefined otherwise. With a bmap whose ranges all have checksums, the scan hashes them as
 * it compares, and a range that does not match is refused here, before anything is written
 * (`verified`: the pipeline then reads SRC as it is); a scan that stopped early leaves the
 * copy to the VerifyingSource, which checks them as it reads.
 */
async function scanFirst(
  src: string,
  source: CopySource,
  target: Opened,
  plan: Plan,
  chunkSize: number,
  options: ResolvedCopyOptions,
  prestarted: readonly ScanWorker[],
): Promise<(EqualScanResult & { verified: boolean }) | undefined> {
  const checksums = source.checksums;
  if (!scannable(source, options)) return undefined;
  const scan = await narrowToDiffering(plan, source.file!.fh.fd, target.fh.fd, {
    chunkSize,
    prestarted,
    signal: options.signal,
    onProgress: options.onProgress,
    hash:
      checksums !== undefined
        ? { algorithm: checksums.algorithm, ranges: checksums.units }
        : undefined,
  });
  if (scan === undefined || checksums === undefined) {
    return scan !== undefined ? { ...scan, verified: false } : undefined;
  }
  const computed = scan.digests!;
  // SRC could not be read whole somewhere: the VerifyingSource reports where and why
  if (computed.some((d) => d === undefined)) return undefined;
  checksums.units.forEach((range, i) => {
    if (computed[i] !== range.checksum) {
      throw checksumError(src, range, checksums.algorithm, computed[i]!, true);
    }
  });
  return { ...scan, verified: true };
}

/** A function, not `signal?.aborted` inline: TypeScript narrows that to false after the first check. */
function isAborted(signal: AbortSignal | undefined): boolean {
  return signal?.aborted === true;
}

function sameFileError(src: string, dst: string): BlksyncError {
  return new BlksyncError(
    'ESAME_FILE',
    `${src} and ${dst} are the same file or device (or one is a partition of the other, or a loop device over the other); choose another destination`,
    {
      path: dst,
    },
  );
}
