/**
 * Pull: a remote SRC onto a local DST (docs/architecture.md, "Remote ends").
 *
 *   FetchedSource (blocks fetched from the agent) ──► RefinedTarget ──► FileSink (DST)
 *
 * DST's top-level hashes are computed by a HashScanner while ssh connects and the agent scans
 * SRC; a Refiner compares them with the agent's and refines the chunks that differ ahead of
 * the pipeline, fetching their differing blocks. With `--index` (pull-index.ts) the index of
 * DST answers for the chunks it vouches for; with `--bmap FILE` a MappedSource hands the
 * pipeline each mapped piece as DST will hold it.
 *
 * One `Pull` is one run: its fields are what the run has opened so far, so that a failure at
 * any step closes exactly those and undoes a DST it created before the first write.
 */

import { BlksyncError } from '../../errors.js';
import { bmapSourcing, type BmapSourcing } from '../../engine/copy-source.js';
import type { FoundBmap } from '../../engine/find-bmap.js';
import type { IndexSession } from '../../engine/index-session.js';
import { BufferPool } from '../../io/buffer-pool.js';
import { runPipeline, wholeImagePlan, type PipelineResult } from '../../engine/pipeline.js';
import { dataRangesOf } from '../../engine/sparse-plan.js';
import type { VerifyReport } from '../../engine/verify-written.js';
import { WrittenSink } from '../../engine/written-log.js';
import { destinationSink } from '../../io/destination-sink.js';
import { dropDeviceCaches } from '../../io/device-cache.js';
import type { FileSink } from '../../io/file-sink.js';
import { FileSource } from '../../io/file-source.js';
import {
  assertSeparateOutput,
  inputOf,
  openTarget,
  type Opened,
  type TargetOpened,
} from '../../io/open.js';
import {
  prepareDestination,
  undoPreparation,
  type PreparedDestination,
} from '../../io/prepare-destination.js';
import type { Plan, Sink, Source } from '../../types.js';
import { agentPayload } from '../agent-payload.js';
import { DEFLATE_RAW } from '../compress.js';
import { HashDiffer } from '../hash-differ.js';
import { AgentLink, type StartedAgent } from '../link.js';
import { MappedSource } from '../mapped-source.js';
import { blockDigest, TOP_HASH_BLOCKS, unitHashes } from '../protocol.js';
import { Refiner, type Found } from '../refiner.js';
import {
  CountingSink,
  fetchSpans,
  FetchedSource,
  patchSpans,
  readChunk,
  RefinedTarget,
  REMOTE_DEPTH,
  SpanBook,
  topHashing,
} from '../roles.js';
import { HashScanner } from '../scanner.js';
import type { RemoteSpec } from '../spec.js';
import {
  checkRemoteSize,
  givenBmap,
  remoteSourceIndex,
  sessionOf,
  type RemoteCopyOptions,
  type Session,
} from './options.js';
import {
  channelStats,
  connectionLost,
  countsOf,
  interrupted,
  resultOf,
  sourceIndexReport,
  withChannel,
  type RemoteCopyResult,
} from './outcome.js';
import { byIndex, digestBlockFor, hashInto, isTrusted, tableDigest } from './pull-index.js';
import { verifyAgainstBmap, verifyLogged } from './pull-verify.js';

/** Copies the remote SRC `spec` onto the local `dst`. */
export function pull(
  src: string,
  dst: string,
  spec: RemoteSpec,
  options: RemoteCopyOptions,
): Promise<RemoteCopyResult> {
  return new Pull(src, dst, spec, options).run();
}

class Pull {
  readonly #src: string;
  readonly #dst: string;
  readonly #spec: RemoteSpec;
  readonly #options: RemoteCopyOptions;
  readonly #session: Session;
  readonly #top = topHashing();
  // with --index, TOP_HASHES are block digests in the index's blocks, which the index knows
  // for DST without reading it (protocol.ts, TOP_HASH_BLOCKS)
  readonly #indexing: boolean;
  readonly #book = new SpanBook();
  /**
   * A chunk's new hashes go into the index's table only when the pipeline reaches the chunk:
   * the refiner runs chunks ahead of the writes, and a checkpoint writes the table as it is
   * (an interrupted pull's index vouched for blocks fetched but never written).
   */
  readonly #tableUpdates = new Map<number, () => void>();

  #link: AgentLink | undefined;
  /** ssh started, its HELLO not yet sent (#connect). */
  #started: StartedAgent | undefined;
  /** DST as openTarget found it, before ssh starts. */
  #found: TargetOpened | undefined;
  #target: Opened | undefined;
  /** What this run did to DST (created, or an empty file grown), undone on an early failure. */
  #prepared: PreparedDestination | undefined;
  #scanner: HashScanner | undefined;
  #refiner: Refiner | undefined;
  #index: IndexSession | undefined;
  #pulled: MappedSource | undefined;
  #mapped: BmapSourcing | undefined;
  // the bare file sink: on an error only it is finished, so a bmap copy punches the unmapped
  // areas only after success (as a local copy)
  #fileSink: FileSink | undefined;
  #sink: CountingSink | undefined;
  /** --verify without a bmap's checksums: what was written, read back after the fsync. */
  #logged: WrittenSink | undefined;
  /** Bytes of DST read again to refine differing chunks. */
  #reread = 0;
  /** The block size of TOP_HASH_BLOCKS digests with --index (0: the usual top hashes). */
  #topBlock = 0;

  constructor(src: string, dst: string, spec: RemoteSpec, options: RemoteCopyOptions) {
    this.#src = src;
    this.#dst = dst;
    this.#spec = spec;
    this.#options = options;
    this.#session = sessionOf(options);
    this.#indexing = options.index !== undefined;
  }

  async run(): Promise<RemoteCopyResult> {
    const options = this.#options;
    try {
      // a local bmap describing the remote image, its signature checked before ssh starts
      const bmap = await givenBmap(options);
      if (bmap !== undefined && this.#indexing) {
        throw new BlksyncError(
          'EUSAGE',
          `--index with --bmap is not supported when SRC is remote (${this.#src}); drop one of them`,
        );
      }
      const link = await this.#connect(bmap);
      const size = link.ready.size;
      // as a local copy checks a local SRC, before DST is created or written
      await checkRemoteSize(size, this.#src, options.size, bmap);
      this.#scanner?.truncate(size);
      // created, or an empty file grown, at the image's size; a smaller DST is refused
      const prepared = await prepareDestination(this.#found!, size, this.#session.dryRun);
      this.#prepared = prepared;
      this.#target = prepared.target;
      const { created, zero } = prepared;
      if (options.index !== undefined) await this.#openIndex(options.index, size, zero);
      const local =
        this.#target !== undefined && !zero
          ? new FileSource(this.#target.fh, this.#dst, this.#target.size, false)
          : undefined;
      const plan = await this.#choosePlan(link, size, bmap, local);
      // what a bmap copy punches in an existing file DST's unmapped areas, a dry run's too
      const unmappedData =
        !created && this.#target?.kind === 'file'
          ? this.#mapped?.unmappedData(this.#target.fh, this.#dst)
          : undefined;
      const source: Source =
        this.#mapped?.source ??
        new FetchedSource(size, link, this.#refiner, this.#book, !this.#session.dryRun);
      this.#openSink(created);
      const run = await this.#runPipeline(link, plan, source);
      // DST's fsync and the agent's DONE/SUMMARY round trip overlap
      const [, summary] = await Promise.all([this.#sink?.finish(), link.finish()]);
      // the refiner fetches ahead, so an interrupted run received more than it wrote
      if (!this.#session.dryRun && !run.interrupted && summary.bytes !== run.bytesWritten) {
        throw new BlksyncError(
          'EVERIFY',
          `${link.name}: sent ${summary.bytes} bytes but ${run.bytesWritten} were written; rerun the command`,
        );
      }
      await link.close();
      const verified = run.interrupted ? undefined : await this.#verify();
      if (!run.interrupted) await this.#index?.commit();
      else await this.#index?.settle();
      const used = this.#index?.target;
      // how DST's unmapped areas were made zeros (engine/copy-source.ts)
      const cleared =
        this.#target !== undefined ? this.#mapped?.unmappedCleared(this.#target.fh) : undefined;
      const result: RemoteCopyResult = {
        ...resultOf(this.#session, this.#src, this.#dst, size, countsOf(run), {
          bytesRead: this.#bytesRead(),
          blockSize: used?.blockSize ?? this.#session.blockSize,
          bytesWritten: run.bytesWritten,
          created,
          dstSize: size + prepared.extraBytes,
          channel: channelStats(link, this.#spec, summary),
        }),
        ...(this.#index !== undefined
          ? {
              index: {
                ...this.#index.report(),
                bytesReread: this.#reread,
                ...sourceIndexReport(link.ready, summary),
              },
            }
          : {}),
        ...(this.#mapped !== undefined
          ? { bmap: { ...this.#mapped.report, unmappedPunched: cleared?.punched } }
          : {}),
        ...(unmappedData !== undefined
          ? {
              bytesPunched: this.#session.dryRun || cleared?.punched !== false ? unmappedData : 0,
            }
          : {}),
        ...(cleared !== undefined && cleared.bytesZeroed > 0
          ? { bytesZeroed: cleared.bytesZeroed }
          : {}),
        ...(verified !== undefined ? { verify: verified } : {}),
      };
      if (run.interrupted) throw interrupted(result);
      return result;
    } catch (err) {
      // failed before the first byte was written: leave DST as it was found, as copyLocal does
      await undoPreparation(this.#prepared, this.#fileSink?.bytesWritten ?? 0);
      throw await connectionLost(err, this.#dst, this.#sink?.written ?? 0, options.signal);
    } finally {
      await this.#refiner?.stop();
      await this.#scanner?.stop();
      await this.#fileSink?.finish().catch(() => {});
      // ssh started and no HELLO sent: the failure came first
      if (this.#link === undefined) await this.#started?.abort();
      await this.#link?.close();
      await this.#index?.close();
      await this.#mapped?.close();
      await this.#target?.fh.close();
    }
  }

  /**
   * Opens DST (its refusals come before ssh is even started), starts hashing it while ssh
   * connects and the agent scans SRC, and starts the agent.
   */
  async #connect(bmap: FoundBmap | undefined): Promise<AgentLink> {
    const { dryRun, full, chunkSize } = this.#session;
    const dst = this.#dst;
    // the agent code, read (and deflated) while DST is opened and ssh logs in
    const payload = agentPayload();
    payload.catch(() => {}); // awaited where ssh starts
    const found = await openTarget(dst, { readOnly: dryRun });
    this.#found = found;
    // ssh logs in while the rest of the HELLO is got ready (DST's cache, its index's blocks)
    this.#started = AgentLink.start(this.#spec, this.#options);
    // what DST's cache (or a device's under it) holds may be older than the device: read anew
    if (found.fh !== undefined && found.kind === 'block-device') {
      await dropDeviceCaches(found.fh.fd, found.stats.rdev);
    }
    if (found.fh !== undefined) this.#target = found;
    const target = this.#target;
    const topBlock =
      this.#indexing && !full ? await digestBlockFor(this.#options, target, dst, chunkSize) : 0;
    const sourceIndex = remoteSourceIndex(this.#options, this.#spec);
    // with a bmap, only the mapped ranges are compared, piece by piece
    if (!full && !this.#indexing && bmap === undefined && target !== undefined && target.size > 0) {
      const file = new FileSource(target.fh, dst, target.size, false);
      // DST's holes are not read (a block device reports none)
      const { fh, size } = target;
      // started once ssh is: its reads would fill libuv's thread pool ahead of the agent's
      this.#scanner = new HashScanner(file, dst, size, chunkSize, this.#top.hash, () =>
        dataRangesOf(fh, size, dst),
      );
    }
    const opening = this.#started.open(
      {
        role: 'source',
        path: this.#spec.path,
        ...(this.#options.raw === true ? { raw: true } : {}),
        topUnit: full || bmap !== undefined ? 0 : chunkSize,
        ...(topBlock > 0 ? { topHash: TOP_HASH_BLOCKS, topBlock } : this.#top.hello),
        encodings: [DEFLATE_RAW],
        // --src-index: SRC's index in the digests' blocks, kept by the agent on SRC's host
        ...(sourceIndex !== undefined && topBlock > 0 ? { sourceIndex, dryRun } : {}),
      },
      await payload,
    );
    // the HELLO is out: DST's reads no longer delay it
    this.#scanner?.start();
    this.#link = await opening;
    this.#topBlock = topBlock;
    return this.#link;
  }

  /** The index describes the local DST: the local copy's IndexSession keeps it. */
  async #openIndex(path: string, size: number, zero: boolean): Promise<void> {
    const options = this.#options;
    if (path !== 'auto' && this.#target !== undefined) {
      await assertSeparateOutput(path, [inputOf(this.#target, 'the destination')]);
    }
    const kept = await import('../../engine/index-session.js');
    this.#index = await kept.IndexSession.open({
      index: path,
      dst: this.#target,
      dstPath: this.#dst,
      fresh: zero,
      imageSize: size,
      blockSize: options.blockSizeGiven,
      chunkSize: this.#session.chunkSize,
      rebuild: options.rebuildIndex,
      trust: options.trustIndex,
      verifySample: options.verifySample,
      full: this.#session.full,
      dryRun: this.#session.dryRun,
      hashThreads: options.hashThreads,
      checkpointBytes: options.indexCheckpointBytes,
    });
  }

  /**
   * The plan, and what finds the differing spans: a bmap's mapped pieces (MappedSource), or a
   * Refiner comparing chunks by the index's digests or by DST's hashes. `--full` needs neither.
   */
  async #choosePlan(
    link: AgentLink,
    size: number,
    bmap: FoundBmap | undefined,
    local: FileSource | undefined,
  ): Promise<Plan> {
    const { chunkSize, blockSize, full, dryRun } = this.#session;
    if (bmap !== undefined) {
      this.#pulled = new MappedSource(link, this.#book, {
        size,
        chunkSize,
        blockSize,
        local: full ? undefined : local,
        dst: this.#dst,
        full,
        dryRun,
      });
      // DST holds each piece as it will be when it is handed on: its range checksums are
      // verified here, as a local bmap copy's (not in a dry run: nothing is fetched)
      this.#mapped = await bmapSourcing(bmap, this.#pulled, this.#src, {
        noVerifyChecksums: this.#options.noVerifyChecksums === true || dryRun,
        rereadable: false,
        signal: this.#options.signal,
      });
      if (local !== undefined && !full) this.#mapped.adviseTarget(this.#target!.fh.fd);
      return this.#mapped.plan;
    }
    if (!full && this.#index !== undefined) this.#refiner = this.#indexRefiner(link, size, local);
    else if (!full) this.#refiner = this.#hashRefiner(link, size, local);
    return wholeImagePlan(size);
  }

  /** Chunks the index vouches for are compared by its digests and hashes, the rest by reading DST. */
  #indexRefiner(link: AgentLink, size: number, local: FileSource | undefined): Refiner {
    const { chunkSize, blockSize, dryRun } = this.#session;
    const dst = this.#dst;
    const topBlock = this.#topBlock;
    const used = this.#index?.target;
    // an index being made hashes every chunk's new content: the chunk is handed over whole
    const whole = this.#index?.onChunk !== undefined;
    const later = (offset: number, update: () => void): void => {
      if (used !== undefined) this.#tableUpdates.set(offset, update);
    };
    const differ = new HashDiffer(link, chunkSize, used?.blockSize ?? blockSize);
    const trusted = (offset: number, length: number): boolean =>
      used !== undefined && isTrusted(used.untrusted, offset, length);
    // the index's own digest of the chunk: no DST read, 16 bytes on the wire
    const byDigest = (offset: number, length: number): boolean =>
      trusted(offset, length) && used!.blockSize === topBlock;
    return new Refiner(
      size,
      chunkSize,
      async (offset, length) =>
        byDigest(offset, length) &&
        tableDigest(used!, offset, length).equals(await link.topHash(offset)),
      async (offset, length): Promise<Found> => {
        if (trusted(offset, length)) {
          // the agent's digest was taken by the comparison above (or is not one of ours)
          if (!byDigest(offset, length)) await link.topHash(offset);
          return byIndex(used!, link, offset, length, dryRun, (u) => later(offset, u));
        }
        const buf = Buffer.alloc(length);
        if (local !== undefined) {
          await readChunk(local, dst, buf, offset, length);
          this.#reread += length;
        }
        const spans: number[] = [];
        const theirs = await link.topHash(offset);
        if (!blockDigest(unitHashes(buf, length, topBlock)).equals(theirs)) {
          await differ.refine(offset, buf, length, local === undefined, spans);
        }
        if (dryRun) return { spans };
        const data = await fetchSpans(link, offset, spans);
        patchSpans(buf, spans, data);
        // the index will hold this chunk's new content's hashes
        later(offset, () => hashInto(used!.table, used!.blockSize, offset, buf, 0, length));
        return whole ? { spans, data, whole: buf } : { spans, data };
      },
    );
  }

  /** Chunks compared by DST's top-level hashes (the scanner's), refined where they differ. */
  #hashRefiner(link: AgentLink, size: number, local: FileSource | undefined): Refiner {
    const { chunkSize, blockSize, dryRun } = this.#session;
    const dst = this.#dst;
    const scanner = this.#scanner;
    const top = this.#top;
    const differ = new HashDiffer(link, chunkSize, blockSize);
    const pool = new BufferPool(chunkSize);
    return new Refiner(
      size,
      chunkSize,
      async (offset, length) => {
        const theirs = link.topHash(offset);
        if (local === undefined || scanner === undefined) {
          return top.zero(length).equals(await theirs);
        }
        const [mine, scanned] = await scanner.hash(offset);
        // the image ends inside this unit of a larger DST: let the finer hashes decide
        if (scanned !== length) {
          await theirs;
          return false;
        }
        return mine.equals(await theirs);
      },
      async (offset, length): Promise<Found> => {
        const spans: number[] = [];
        if (local === undefined) await differ.refine(offset, Buffer.alloc(0), length, true, spans);
        else {
          const buf = pool.get();
          try {
            await readChunk(local, dst, buf, offset, length);
            this.#reread += length;
            await differ.refine(offset, buf, length, false, spans);
          } finally {
            pool.put(buf);
          }
        }
        return dryRun ? { spans } : { spans, data: await fetchSpans(link, offset, spans) };
      },
    );
  }

  /** DST's sink, wrapped for --verify, the index's guard and a bmap's hole punching. */
  #openSink(created: boolean): void {
    const target = this.#target;
    if (this.#session.dryRun || target === undefined) return;
    this.#fileSink = destinationSink(target.fh, this.#dst, target.kind);
    let inner: Sink = this.#fileSink;
    // --verify: what is written is recorded, and read back after the fsync (with a bmap's
    // checksums, the mapped ranges are read back and compared with them, as locally)
    if (this.#options.verify === true && this.#mapped?.checksums === undefined) {
      inner = this.#logged = new WrittenSink(inner);
    }
    // with a bmap, an existing file gets its unmapped areas punched (a new one has holes)
    if (this.#mapped !== undefined && !created && target.kind === 'file') {
      inner = this.#mapped.wrapFileSink(inner, target.fh, this.#dst);
    }
    // with an index: marked in progress before DST changes (IndexSession's guard); outermost,
    // so that the holes punched at the end are seen as this copy's own change of DST's ctime
    if (this.#index !== undefined) inner = this.#index.wrapSink(inner);
    this.#sink = new CountingSink(inner);
  }

  async #runPipeline(link: AgentLink, plan: Plan, source: Source): Promise<PipelineResult> {
    const options = this.#options;
    const used = this.#index?.target;
    const knowledge = new RefinedTarget(
      this.#book,
      () => this.#bytesRead(),
      (offset) => {
        this.#tableUpdates.get(offset)?.();
        this.#tableUpdates.delete(offset);
      },
    );
    const run = await runPipeline(plan, source, knowledge, this.#sink ? [this.#sink] : [], {
      blockSize: used?.blockSize ?? this.#session.blockSize,
      chunkSize: this.#session.chunkSize,
      depth: REMOTE_DEPTH,
      signal: options.signal,
      onProgress: options.onProgress && withChannel(options.onProgress, link),
      onChunk: this.#index?.onChunk,
    });
    // no request may follow DONE
    await this.#refiner?.stop();
    await this.#pulled?.stop();
    return run;
  }

  /** --verify after an uninterrupted run: DST read back after the fsync. */
  async #verify(): Promise<VerifyReport | undefined> {
    const target = this.#target;
    if (this.#options.verify !== true || target === undefined) return undefined;
    const checksums = this.#mapped?.checksums;
    if (checksums !== undefined) {
      return verifyAgainstBmap(this.#dst, target, checksums, this.#options.signal);
    }
    if (this.#logged === undefined) return undefined;
    return verifyLogged(this.#dst, target, this.#logged, this.#options.signal);
  }

  #bytesRead(): number {
    return (
      (this.#scanner?.bytesRead ?? 0) +
      this.#reread +
      (this.#index?.target?.bytesRead ?? 0) +
      (this.#pulled?.bytesRead ?? 0)
    );
  }
}
