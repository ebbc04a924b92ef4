/**
 * `copy` with a `host:path` end: push (local SRC → remote DST), pull (remote SRC → local
 * DST) and relay (both remote, through this host), each run by the same pipeline as a local
 * copy (docs/architecture.md, "Remote ends"):
 *
 *   push:  PushSource (SRC, re-read where it differs) ──► RefinedTarget ──► RemoteSink (DATA)
 *          or, for a source read once in order (compressed, stdin, URL, bmap plan):
 *          CheckedSource (hashes each chunk as it is read) ──► RefinedTarget ──► RemoteSink
 *   pull:  FetchedSource (blocks fetched from the agent) ──► RefinedTarget ──► FileSink(DST)
 *   relay: FetchedSource (blocks fetched from SRC's agent) ──► RefinedTarget ──► RemoteSink
 *
 * A Refiner (refiner.ts) compares each chunk's top-level hashes as soon as both are known —
 * the local file's from a HashScanner started before ssh connects, the agent's from its
 * stream; in a relay both agents' — and refines the chunks that differ ahead of the pipeline,
 * several at once. The sources hand its results to the pipeline in order, and the target
 * knowledge (RefinedTarget) reports the spans found. A push takes SRC from openCopySource, as a
 * local copy does, so compressed images, stdin, http(s) URLs and bmap plans push too.
 */

import { unlink } from 'node:fs/promises';
import { BlksyncError } from '../errors.js';
import {
  DEFAULT_VERIFY_SAMPLE,
  type IndexSession,
  type IndexTarget,
} from '../engine/index-target.js';
import { HASH_BYTES, sha256 } from '../hash.js';
import { cachedIndexPath } from '../io/cache-dir.js';
import { identityOf } from '../io/identity.js';
import type { Range } from '../ranges.js';
import { BufferPool, NoTarget, ZeroTarget } from '../engine/knowledge.js';
import { runPipeline, wholeImagePlan, type PipelineResult } from '../engine/pipeline.js';
import type {
  Plan,
  Progress,
  ProgressListener,
  Sink,
  Source,
  TargetKnowledge,
} from '../engine/types.js';
import type { CopyResult } from '../engine/copy.js';
import type { VerifyReport } from '../engine/verify-written.js';
import { compareWritten, readBackWritten, WrittenSink } from '../engine/written-log.js';
import {
  bmapSourcing,
  findBmap,
  openCopySource,
  type BmapReport,
  type BmapSourcing,
  type CopySourceOptions,
  type FoundBmap,
  signatureFlagsGiven,
} from '../engine/copy-source.js';
import { destinationSink } from '../io/destination-sink.js';
import type { FileSink } from '../io/file-sink.js';
import { FileSource } from '../io/file-source.js';
import {
  assertSeparateOutput,
  createTarget,
  inputOf,
  openTarget,
  type Opened,
} from '../io/open.js';
import { formatBytes } from '../size.js';
import { DEFLATE_RAW } from './compress.js';
import { HashDiffer } from './hash-differ.js';
import { agentPayload } from './agent-payload.js';
import {
  blockDigest,
  blockDigestHasher,
  zeroHasher,
  type IndexHello,
  MIN_HASH_UNIT,
  TOP_HASH_BLOCKS,
  unitHashes,
  WIRE_HASH_BYTES,
  wireHash,
  type Summary,
} from './protocol.js';
import { DEFAULT_INDEX_BLOCK_SIZE } from '../engine/make-index.js';
import { HashScanner } from './scanner.js';
import { MappedSource } from './mapped-source.js';
import { Refiner, type Found } from './refiner.js';
import { AgentLink, type RemoteOptions } from './link.js';
import {
  CountingSink,
  fetchSpans,
  FetchedSource,
  patchSpans,
  hashAheadPush,
  readChunk,
  RefinedTarget,
  REMOTE_CHUNK_BYTES,
  REMOTE_DEPTH,
  RemoteSink,
  SpanBook,
  topHashing,
  type TopHashing,
} from './roles.js';
import { readIndexIfAny, RemoteIndex } from './remote-index.js';
import { isRemote, parseRemote, shellQuote, type RemoteSpec } from './spec.js';

export { REMOTE_CHUNK_BYTES, REMOTE_DEPTH } from './roles.js';

/**
 * A remote copy's options. The CopySourceOptions (bmap, size, ...) describe a local SRC and
 * are handed to openCopySource as they are, so a push reads SRC exactly as a local copy does.
 */
export interface RemoteCopyOptions extends RemoteOptions, CopySourceOptions {
  blockSize: number;
  dryRun?: boolean;
  full?: boolean;
  signal?: AbortSignal;
  onProgress?: ProgressListener;
  chunkSize?: number;
  /** An index of the remote DST kept here (push only): see remote-index.ts. */
  index?: string;
  rebuildIndex?: boolean;
  verifySample?: number;
  /** Tuning (tests): bytes a pull's index marks as possibly dirty at a time. */
  indexCheckpointBytes?: number;
  hashThreads?: number;
  /** The block size given with -b (blockSize holds the default otherwise). */
  blockSizeGiven?: number;
  /** Both ends remote: SRC's host copies straight to DST's host (see direct.ts). */
  direct?: boolean;
  /** Read back what was written, past the page cache, and compare (written-log.ts). */
  verify?: boolean;
}

/** What the ssh channel carried, added to the copy result of a remote run. */
export interface ChannelStats {
  host: string;
  /** Bytes blksync wrote into ssh (agent code, requests, data) and read from it. */
  bytesSent: number;
  bytesReceived: number;
  /** CPU seconds the agent used (user + system). */
  remoteCpuSeconds: number;
  /** DATA encoding negotiated ('' for raw only). */
  encoding: string;
  remoteNode: string;
  /**
   * --direct: the ssh channel between the two hosts, which carried the hashes and the data
   * (the fields above count only blksync's own channel, to SRC's host).
   */
  direct?: { host: string; bytesSent: number; bytesReceived: number };
}

export type RemoteCopyResult = CopyResult & { channel: ChannelStats };

/**
 * Push from a source read once, in order (a decoder, stdin, a URL, a bmap plan): each chunk
 * is compared by hashes as soon as it has been read, before it is handed to the pipeline.
 * Several chunks are in flight, so their refinement round trips overlap.
 */
class CheckedSource implements Source {
  readonly size: number;
  readonly #inner: Source;
  readonly #book: SpanBook;
  readonly #spansOf: (offset: number, data: Buffer, length: number) => Promise<number[]>;

  constructor(
    inner: Source,
    book: SpanBook,
    spansOf: (offset: number, data: Buffer, length: number) => Promise<number[]>,
  ) {
    this.size = inner.size;
    this.#inner = inner;
    this.#book = book;
    this.#spansOf = spansOf;
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const got = await this.#inner.read(buf, offset, length);
    // a short source: the pipeline reports ESRC_SHORT
    this.#book.set(offset, got < length ? [] : await this.#spansOf(offset, buf, length));
    return got;
  }

  /** The CopySource the inner source came from closes it. */
  async close(): Promise<void> {}
}

function chunkSizeOf(options: RemoteCopyOptions): number {
  const bs = options.blockSize;
  return Math.max(bs, Math.floor((options.chunkSize ?? REMOTE_CHUNK_BYTES) / bs) * bs);
}

/** What push, pull, relay and --direct all start from, taken once from the options. */
interface Session {
  started: number;
  blockSize: number;
  chunkSize: number;
  dryRun: boolean;
  full: boolean;
}

function sessionOf(options: RemoteCopyOptions): Session {
  return {
    started: performance.now(),
    blockSize: options.blockSize,
    chunkSize: chunkSizeOf(options),
    dryRun: options.dryRun === true,
    full: options.full === true,
  };
}

/** What the pipeline found: a run here, or the report of an agent that ran it (--direct). */
interface Counts {
  bytesScanned: number;
  blocksDiffering: number;
  bytesDiffering: number;
  rangesWritten: number;
  ranges: Range[];
}

function countsOf(run: PipelineResult): Counts {
  return {
    bytesScanned: run.bytesScanned,
    blocksDiffering: run.blocksDiffering,
    bytesDiffering: run.bytesDiffering,
    rangesWritten: run.ranges.count,
    ranges: [...run.ranges.ranges],
  };
}

/**
 * A remote copy's result: the counts, and what each direction knows in its own way (`dstSize`:
 * DST's size as found, which extends past the image unless DST was created).
 */
function resultOf(
  session: Session,
  src: string,
  dst: string,
  size: number,
  counts: Counts,
  ends: {
    bytesRead: number;
    blockSize: number;
    bytesWritten: number;
    created: boolean;
    dstSize: number;
    channel: ChannelStats;
  },
): RemoteCopyResult {
  return {
    source: src,
    destination: dst,
    bytesTotal: size,
    bytesScanned: counts.bytesScanned,
    bytesRead: ends.bytesRead,
    blockSize: ends.blockSize,
    blocksDiffering: counts.blocksDiffering,
    bytesDiffering: counts.bytesDiffering,
    bytesWritten: ends.bytesWritten,
    rangesWritten: counts.rangesWritten,
    ranges: counts.ranges,
    created: ends.created,
    destinationExtraBytes: ends.created ? 0 : ends.dstSize - size,
    dryRun: session.dryRun,
    full: session.full,
    seconds: (performance.now() - session.started) / 1000,
    channel: ends.channel,
  };
}

/** Copies between a local path and `host:path` (either way), or between two hosts. */
export async function remoteCopy(
  src: string,
  dst: string,
  options: RemoteCopyOptions,
): Promise<RemoteCopyResult> {
  const srcRemote = parseRemote(src);
  const dstRemote = parseRemote(dst);
  if (
    options.index !== undefined &&
    srcRemote !== undefined &&
    dstRemote !== undefined &&
    keptRemotely(options.index, dstRemote) === undefined
  ) {
    // the index would have to learn SRC's blocks, whose bytes stay on the hosts
    throw new BlksyncError(
      'EUSAGE',
      `--index ${options.index}: with two remote ends the index is kept beside DST by its agent; use --index ${dstRemote.destination}:FILE or --index auto`,
    );
  }
  if (
    options.index !== undefined &&
    srcRemote !== undefined &&
    dstRemote === undefined &&
    isRemote(options.index)
  ) {
    throw new BlksyncError(
      'EUSAGE',
      `--index ${options.index}: a pull's index describes the local DST and is kept here; name a local FILE or auto`,
    );
  }
  if (options.direct === true) {
    const given = [
      ...(options.bmap !== undefined ? ['--bmap'] : []),
      ...(options.size !== undefined ? ['--size'] : []),
      ...signatureFlagsGiven(options),
    ];
    if (given.length > 0) {
      // the copy runs on SRC's host, which has neither the bmap nor gpg's verdict
      throw new BlksyncError(
        'EUSAGE',
        `${given.join(', ')} with --direct: drop --direct to relay the copy through this machine`,
      );
    }
  }
  options.signal?.throwIfAborted();
  if (options.direct === true) {
    if (srcRemote === undefined || dstRemote === undefined) {
      throw new BlksyncError(
        'EUSAGE',
        '--direct copies between two hosts: give both SRC and DST as [user@]host:path',
      );
    }
  }
  if (dstRemote !== undefined && srcRemote === undefined) return push(src, dst, dstRemote, options);
  if (srcRemote === undefined) throw new BlksyncError('EUSAGE', 'neither end is remote');
  try {
    if (dstRemote === undefined) return await pull(src, dst, srcRemote, options);
    if (options.direct === true) return await direct(src, dst, srcRemote, dstRemote, options);
    return await relay(src, dst, srcRemote, dstRemote, options);
  } catch (err) {
    throw compressedRemote(err, dst, srcRemote, options);
  }
}

/**
 * The agent refuses a compressed SRC (it would copy the compressed bytes); this adds what to
 * do, which only this end knows how to spell: stream it through here, where it is decoded.
 */
function compressedRemote(
  err: unknown,
  dst: string,
  spec: RemoteSpec,
  options: RemoteCopyOptions,
): unknown {
  if (!(err instanceof BlksyncError) || err.code !== 'ESRC_COMPRESSED') return err;
  const cat = `${options.sudo === true ? 'sudo -n ' : ''}cat ${shellQuote(spec.path)}`;
  const stream = `${options.ssh ?? 'ssh'} ${spec.destination} ${shellQuote(cat)} | blksync copy --size BYTES - ${shellQuote(dst)}`;
  return new BlksyncError(
    'ESRC_COMPRESSED',
    `${err.message}, and blksync decodes only on this machine: stream it through here with \`${stream}\` (BYTES: its decompressed size), or decompress it on ${spec.destination} first`,
    { cause: err, ...(err.path !== undefined ? { path: err.path } : {}) },
  );
}

/** How long a dropped link waits for a Ctrl-C that may have dropped it to be noticed. */
const SIGNAL_GRACE_MS = 200;

async function connectionLost(
  err: unknown,
  dst: string,
  written: number,
  signal: AbortSignal | undefined,
): Promise<unknown> {
  if (err instanceof BlksyncError && err.code === 'ECONNECTION_LOST') {
    if (signal !== undefined && !signal.aborted) {
      // ssh may have died of the same SIGINT whose handler has not run yet
      await new Promise((resolve) => setTimeout(resolve, SIGNAL_GRACE_MS));
    }
    if (signal?.aborted === true) {
      // Ctrl-C reaches ssh too (same process group, which it needs for password prompts),
      // so an interrupted run usually sees the link drop first: it is still an interruption
      return new BlksyncError(
        'EINTERRUPTED',
        `interrupted after ${formatBytes(written)} had been written to ${dst}; rerun the same command to finish`,
        { cause: err },
      );
    }
    return new BlksyncError(
      'ECONNECTION_LOST',
      `${err.message}; ${formatBytes(written)} had been written to ${dst}; rerun the same command to finish`,
      { cause: err },
    );
  }
  return err;
}

function interrupted(result: CopyResult): BlksyncError {
  return new BlksyncError(
    'EINTERRUPTED',
    `interrupted after ${formatBytes(result.bytesScanned)} of ${formatBytes(result.bytesTotal)}; rerun the same command to finish`,
    { partial: result },
  );
}

async function push(
  src: string,
  dst: string,
  spec: RemoteSpec,
  options: RemoteCopyOptions,
): Promise<RemoteCopyResult> {
  const session = sessionOf(options);
  const { blockSize, chunkSize, dryRun, full } = session;
  // SRC as a local copy reads it: a file, compressed, stdin, a URL; a bmap's plan
  const opened = await openCopySource(src, options);
  const { plan, size } = opened;
  const whole =
    plan.ranges.length === 0 ||
    (plan.ranges.length === 1 && plan.ranges[0]!.end === size && plan.ranges[0]!.start === 0);
  // --index auto or host:FILE: the index is kept beside DST by the agent (agent-index.ts)
  const kept = keptRemotely(options.index, spec);
  const indexing = options.index !== undefined && kept === undefined;
  // a plain file read by offset is hashed ahead and re-read only where it differs; any
  // other source is hashed chunk by chunk as the pipeline reads it (CheckedSource), also
  // when an index is made or used: it needs every chunk's bytes
  const file =
    whole && !indexing && opened.source instanceof FileSource ? opened.source : undefined;
  const top = topHashing();
  let refiner: Refiner | undefined;
  // SRC's hashes are computed while ssh connects and the agent scans DST
  const scanner =
    full || file === undefined
      ? undefined
      : new HashScanner(file, src, size, chunkSize, top.hash).start();
  let link: AgentLink | undefined;
  let index: RemoteIndex | undefined;
  try {
    let found: Awaited<ReturnType<typeof readIndexIfAny>>;
    // with a bmap, the index's blocks tile the mapped ranges: the bmap's blocks, or -b's
    // dividing them (as a local copy's)
    const bmapBlock = options.index !== undefined ? opened.bmap?.blockSize : undefined;
    if (
      bmapBlock !== undefined &&
      options.blockSizeGiven !== undefined &&
      bmapBlock % options.blockSizeGiven !== 0
    ) {
      throw new BlksyncError(
        'EUSAGE',
        `-b ${options.blockSizeGiven} does not divide the bmap's ${bmapBlock}-byte blocks; with --index and a bmap omit -b`,
      );
    }
    const indexBlock = options.blockSizeGiven ?? bmapBlock;
    if (options.index !== undefined && indexing) {
      found = await readIndexIfAny(options.index, options.rebuildIndex === true);
    }
    // an index that may be used makes the agent's scan of DST needless
    const mayUseIndex = found !== undefined && 'index' in found;
    const topUnit = full || !whole || mayUseIndex ? 0 : chunkSize;
    link = await AgentLink.open(
      spec,
      options,
      {
        role: 'target',
        path: spec.path,
        size,
        dryRun,
        // a bmap plan asks for the mapped ranges' hashes instead of a scan of all of DST
        topUnit,
        ...top.hello,
        encodings: [DEFLATE_RAW],
        ...(indexing ? { identity: true } : {}),
        ...(options.verify === true ? { verify: true } : {}),
        ...(kept !== undefined
          ? { index: agentIndexHello(kept, options, chunkSize, indexBlock) }
          : {}),
      },
      await agentPayload(),
    );
    const ready = link.ready;
    const book = new SpanBook();
    const l = link;
    // the agent's index is used: it answers hashes in its blocks, and DST is not read
    const ibs = ready.index?.mode === 'used' ? ready.index.blockSize : undefined;
    const digests = ready.index?.digests === true;
    if (options.index !== undefined && indexing) {
      index = await RemoteIndex.open(
        {
          index: options.index,
          imageSize: size,
          blockSize: indexBlock,
          ...(options.blockSizeGiven === undefined && bmapBlock !== undefined
            ? { blockSizeReason: "the bmap's blocks are" }
            : {}),
          ...(whole ? {} : { partial: { ranges: plan.ranges } }),
          chunkSize,
          rebuild: options.rebuildIndex === true,
          verifySample: options.verifySample ?? DEFAULT_VERIFY_SAMPLE,
          full,
          dryRun,
          hashThreads: options.hashThreads,
        },
        found,
        l,
        (bs) => new HashDiffer(l, chunkSize, bs),
      );
    }
    let knowledge: TargetKnowledge;
    let input: Source = opened.source;
    if (full) knowledge = new NoTarget();
    else if (index?.knowledge !== undefined) knowledge = index.knowledge;
    else if (ibs !== undefined) {
      await scanner?.stop();
      input = new CheckedSource(opened.source, book, async (offset, data, length) => {
        const mine = unitHashes(data, length, ibs);
        // one 16-byte digest per chunk from the index; its blocks only where it differs
        if (digests && blockDigest(mine).equals(await l.topHash(offset))) return [];
        const theirs = await l.hashes(offset, length, ibs);
        const spans: number[] = [];
        for (let s = 0, k = 0; s < length; s += ibs, k++) {
          const h = k * WIRE_HASH_BYTES;
          if (mine.compare(theirs, h, h + WIRE_HASH_BYTES, h, h + WIRE_HASH_BYTES) === 0) continue;
          const e = Math.min(s + ibs, length);
          if (spans.length > 0 && spans[spans.length - 1] === s) spans[spans.length - 1] = e;
          else spans.push(s, e);
        }
        return spans;
      });
      knowledge = new RefinedTarget(book, () => 0);
    } else if (ready.zero) {
      knowledge = new ZeroTarget();
      await scanner?.stop();
    } else if (file !== undefined && scanner !== undefined) {
      const ahead = hashAheadPush(file, src, size, chunkSize, blockSize, scanner, link, book);
      refiner = ahead.refiner;
      input = ahead.input;
      knowledge = new RefinedTarget(book, () => 0);
    } else {
      const differ = new HashDiffer(link, chunkSize, blockSize);
      input = new CheckedSource(opened.source, book, async (offset, data, length) => {
        const chunk = data.subarray(0, length);
        // the whole image: the agent's TOP_HASHES stream; a bmap's piece: one hash asked for
        const same =
          topUnit > 0
            ? top.hash(chunk).equals(await l.topHash(offset))
            : wireHash(chunk).equals(
                await l.hashes(offset, length, Math.max(length, MIN_HASH_UNIT)),
              );
        const spans: number[] = [];
        if (!same) await differ.refine(offset, data, length, false, spans);
        return spans;
      });
      knowledge = new RefinedTarget(book, () => 0);
    }
    const sink: Sink = index?.wrapSink(new RemoteSink(link)) ?? new RemoteSink(link);
    const pipelineBlockSize = index?.knowledge !== undefined ? index.blockSize : (ibs ?? blockSize);
    const run = await runPipeline(plan, input, knowledge, dryRun ? [] : [sink], {
      blockSize: pipelineBlockSize,
      chunkSize,
      depth: REMOTE_DEPTH,
      signal: options.signal,
      onProgress: options.onProgress && withChannel(options.onProgress, link),
      onChunk: index?.onChunk,
    });
    await refiner?.stop();
    // an index kept by the agent is written clean at DONE; an interrupted run ends as a killed
    // one does instead (no DONE: the agent syncs and exits), leaving the index marked in
    // progress rather than having the agent read back what it never compared
    const summary =
      run.interrupted && ready.index !== undefined ? await closedEarly(link) : await link.finish();
    if (!run.interrupted) await index?.commit(summary.identity);
    const result: RemoteCopyResult = {
      ...resultOf(session, src, dst, size, countsOf(run), {
        bytesRead: summary.bytesRead,
        blockSize: pipelineBlockSize,
        bytesWritten: summary.bytes,
        created: ready.created,
        dstSize: ready.size,
        channel: channelStats(link, spec, summary),
      }),
      ...(index !== undefined ? { index: index.report() } : {}),
      ...(summary.index !== undefined ? { index: summary.index } : {}),
      ...(opened.bmap !== undefined ? { bmap: opened.bmap } : {}),
      ...verifyReport(link.verified),
    };
    await link.close();
    result.channel = channelStats(link, spec, summary);
    result.seconds = (performance.now() - session.started) / 1000;
    if (run.interrupted) throw interrupted(result);
    return result;
  } catch (err) {
    throw await connectionLost(err, dst, link?.bytesConfirmed ?? 0, options.signal);
  } finally {
    await refiner?.stop();
    await scanner?.stop();
    await link?.close();
    await index?.close();
    await opened.close();
  }
}

async function pull(
  src: string,
  dst: string,
  spec: RemoteSpec,
  options: RemoteCopyOptions,
): Promise<RemoteCopyResult> {
  const session = sessionOf(options);
  const { blockSize, chunkSize, dryRun, full } = session;
  let link: AgentLink | undefined;
  let target: Opened | undefined;
  let sink: CountingSink | undefined;
  let scanner: HashScanner | undefined;
  let refiner: Refiner | undefined;
  let index: IndexSession | undefined;
  let mapped: BmapSourcing | undefined;
  // the bare file sink: on an error only it is finished, so a bmap copy punches the unmapped
  // areas only after success (as a local copy)
  let fileSink: FileSink | undefined;
  /** DST as this run made it: created, or an empty file grown to the image's size. */
  let made: 'created' | 'grown' | undefined;
  const top = topHashing();
  // with --index, TOP_HASHES are block digests in the index's blocks, which the index knows
  // for DST without reading it (protocol.ts, TOP_HASH_BLOCKS)
  const indexing = options.index !== undefined;
  try {
    // a local bmap describing the remote image, its signature checked before ssh starts
    const bmap = await givenBmap(options);
    if (bmap !== undefined && indexing) {
      throw new BlksyncError(
        'EUSAGE',
        `--index with --bmap is not supported when SRC is remote (${src}); drop one of them`,
      );
    }
    // refusals of the local end come before ssh is even started
    const found = await openTarget(dst, { readOnly: dryRun });
    if (found.fh !== undefined) target = found;
    const topBlock = indexing && !full ? await digestBlockFor(options, target, dst, chunkSize) : 0;
    // DST's hashes are computed while ssh connects and the agent scans SRC (with a bmap,
    // only the mapped ranges are compared, piece by piece)
    if (!full && !indexing && bmap === undefined && target !== undefined && target.size > 0) {
      const file = new FileSource(target.fh, dst, target.size, false);
      scanner = new HashScanner(file, dst, target.size, chunkSize, top.hash).start();
    }
    link = await AgentLink.open(
      spec,
      options,
      {
        role: 'source',
        path: spec.path,
        topUnit: full || bmap !== undefined ? 0 : chunkSize,
        ...(topBlock > 0 ? { topHash: TOP_HASH_BLOCKS, topBlock } : top.hello),
        encodings: [DEFLATE_RAW],
      },
      await agentPayload(),
    );
    const size = link.ready.size;
    // as a local copy checks a local SRC, before DST is created or written
    await checkRemoteSize(size, src, options.size, bmap);
    scanner?.truncate(size);
    let created = false;
    let zero = false;
    if (target === undefined) {
      created = true;
      zero = true;
      if (!dryRun) {
        target = await createTarget(dst, size);
        made = 'created';
      }
    } else if (target.size === 0 && target.kind === 'file') {
      zero = true;
      if (!dryRun) {
        await target.fh.truncate(size);
        made = 'grown';
      }
    } else if (target.size < size) {
      throw new BlksyncError(
        'EDEST_TOO_SMALL',
        `${dst} is ${target.size} bytes (${formatBytes(target.size)}) but the source is ${size} bytes (${formatBytes(size)}); use a larger destination`,
        { path: dst },
      );
    }
    if (options.index !== undefined) {
      if (options.index !== 'auto' && target !== undefined) {
        await assertSeparateOutput(options.index, [inputOf(target, 'the destination')]);
      }
      // the index describes the local DST: the local copy's IndexSession keeps it
      const kept = await import('../engine/index-target.js');
      index = await kept.IndexSession.open({
        index: options.index,
        dst: target,
        dstPath: dst,
        fresh: zero,
        imageSize: size,
        blockSize: options.blockSizeGiven,
        chunkSize,
        rebuild: options.rebuildIndex === true,
        verifySample: options.verifySample ?? kept.DEFAULT_VERIFY_SAMPLE,
        full,
        dryRun,
        hashThreads: options.hashThreads,
        checkpointBytes: options.indexCheckpointBytes,
      });
    }
    const book = new SpanBook();
    const l = link;
    const s = scanner;
    const used = index?.target;
    // an index being made hashes every chunk's new content: the chunk is handed over whole
    const whole = index?.onChunk !== undefined;
    const local =
      target !== undefined && !zero
        ? new FileSource(target.fh, dst, target.size, false)
        : undefined;
    let reread = 0;
    const tableUpdates = new Map<number, () => void>();
    let plan: Plan = wholeImagePlan(size);
    let pulled: MappedSource | undefined;
    if (bmap !== undefined) {
      pulled = new MappedSource(link, book, {
        size,
        chunkSize,
        blockSize,
        local: full ? undefined : local,
        dst,
        full,
        dryRun,
      });
      // DST holds each piece as it will be when it is handed on: its range checksums are
      // verified here, as a local bmap copy's (not in a dry run: nothing is fetched)
      mapped = await bmapSourcing(bmap, pulled, src, {
        noVerifyChecksums: options.noVerifyChecksums === true || dryRun,
        rereadable: false,
      });
      plan = mapped.plan;
      if (local !== undefined && !full) mapped.adviseTarget(target!.fh.fd);
    } else if (!full && index !== undefined) {
      // a chunk's new hashes go into the table only when the pipeline reaches the chunk: the
      // refiner runs chunks ahead of the writes, and a checkpoint writes the table as it is
      // (an interrupted pull's index vouched for blocks fetched but never written)
      const later = (offset: number, update: () => void): void => {
        if (used !== undefined) tableUpdates.set(offset, update);
      };
      const differ = new HashDiffer(link, chunkSize, used?.blockSize ?? blockSize);
      const trusted = (offset: number, length: number): boolean =>
        used !== undefined && isTrusted(used.untrusted, offset, length);
      // the index's own digest of the chunk: no DST read, 16 bytes on the wire
      const byDigest = (offset: number, length: number): boolean =>
        trusted(offset, length) && used!.blockSize === topBlock;
      refiner = new Refiner(
        size,
        chunkSize,
        async (offset, length) =>
          byDigest(offset, length) &&
          tableDigest(used!, offset, length).equals(await l.topHash(offset)),
        async (offset, length): Promise<Found> => {
          if (trusted(offset, length)) {
            // the agent's digest was taken by the comparison above (or is not one of ours)
            if (!byDigest(offset, length)) await l.topHash(offset);
            return byIndex(used!, l, offset, length, dryRun, (u) => later(offset, u));
          }
          const buf = Buffer.alloc(length);
          if (local !== undefined) {
            await readChunk(local, dst, buf, offset, length);
            reread += length;
          }
          const spans: number[] = [];
          const theirs = await l.topHash(offset);
          if (!blockDigest(unitHashes(buf, length, topBlock)).equals(theirs)) {
            await differ.refine(offset, buf, length, local === undefined, spans);
          }
          if (dryRun) return { spans };
          const data = await fetchSpans(l, offset, spans);
          patchSpans(buf, spans, data);
          // the index will hold this chunk's new content's hashes
          later(offset, () => hashInto(used!.table, used!.blockSize, offset, buf, 0, length));
          return whole ? { spans, data, whole: buf } : { spans, data };
        },
      );
    } else if (!full) {
      const differ = new HashDiffer(link, chunkSize, blockSize);
      const pool = new BufferPool(chunkSize);
      refiner = new Refiner(
        size,
        chunkSize,
        async (offset, length) => {
          const theirs = l.topHash(offset);
          if (local === undefined || s === undefined) return top.zero(length).equals(await theirs);
          const [mine, scanned] = await s.hash(offset);
          // the image ends inside this unit of a larger DST: let the finer hashes decide
          if (scanned !== length) {
            await theirs;
            return false;
          }
          return mine.equals(await theirs);
        },
        async (offset, length): Promise<Found> => {
          const spans: number[] = [];
          if (local === undefined)
            await differ.refine(offset, Buffer.alloc(0), length, true, spans);
          else {
            const buf = pool.get();
            try {
              await readChunk(local, dst, buf, offset, length);
              reread += length;
              await differ.refine(offset, buf, length, false, spans);
            } finally {
              pool.put(buf);
            }
          }
          return dryRun ? { spans } : { spans, data: await fetchSpans(l, offset, spans) };
        },
      );
    }
    const source: Source = mapped?.source ?? new FetchedSource(size, link, refiner, book, !dryRun);
    const bytesRead = (): number =>
      (scanner?.bytesRead ?? 0) + reread + (used?.bytesRead ?? 0) + (pulled?.bytesRead ?? 0);
    // --verify: what is written is recorded, and read back after the fsync (with a bmap's
    // checksums, the mapped ranges are read back and compared with them, as locally)
    let logged: WrittenSink | undefined;
    if (!dryRun && target !== undefined) {
      fileSink = destinationSink(target.fh, dst, target.kind);
      let inner: Sink = fileSink;
      if (options.verify === true && mapped?.checksums === undefined) {
        inner = logged = new WrittenSink(inner);
      }
      // with an index: marked in progress before DST changes (IndexSession's guard)
      if (index !== undefined) inner = index.wrapSink(inner);
      // with a bmap, an existing file gets its unmapped areas punched (a new one has holes)
      if (mapped !== undefined && !created && target.kind === 'file') {
        inner = mapped.wrapFileSink(inner, target.fh, dst);
      }
      sink = new CountingSink(inner);
    }
    const run = await runPipeline(
      plan,
      source,
      new RefinedTarget(book, bytesRead, (offset) => {
        tableUpdates.get(offset)?.();
        tableUpdates.delete(offset);
      }),
      sink ? [sink] : [],
      {
        blockSize: used?.blockSize ?? blockSize,
        chunkSize,
        depth: REMOTE_DEPTH,
        signal: options.signal,
        onProgress: options.onProgress && withChannel(options.onProgress, link),
        onChunk: index?.onChunk,
      },
    );
    await sink?.finish();
    await refiner?.stop();
    await pulled?.stop();
    const summary = await link.finish();
    // the refiner fetches ahead, so an interrupted run received more than it wrote
    if (!dryRun && !run.interrupted && summary.bytes !== run.bytesWritten) {
      throw new BlksyncError(
        'EVERIFY',
        `${link.name}: sent ${summary.bytes} bytes but ${run.bytesWritten} were written; rerun the command`,
      );
    }
    await link.close();
    let verified: VerifyReport | undefined;
    const checksums = mapped?.checksums;
    if (options.verify === true && checksums !== undefined && target !== undefined) {
      if (!run.interrupted) {
        verified = await verifyAgainstBmap(dst, target, checksums, options.signal);
      }
    } else if (logged !== undefined && target !== undefined && !run.interrupted) {
      // DST is local: the local --verify's read-back (O_DIRECT, koffi's aligned buffer)
      const t0 = performance.now();
      const { alignedBuffer } = await import('../engine/verify-written.js');
      const back = await readBackWritten(dst, logged.ranges, {
        fd: target.fh.fd,
        signal: options.signal,
        alignedBuffer,
      });
      const r = compareWritten(logged.digests.digests(), back.digests, dst, back.direct);
      verified = {
        ...r,
        direct: back.direct,
        against: 'written',
        algorithm: 'sha256',
        seconds: (performance.now() - t0) / 1000,
      };
    }
    if (!run.interrupted) await index?.commit();
    const result: RemoteCopyResult = {
      ...resultOf(session, src, dst, size, countsOf(run), {
        bytesRead: bytesRead(),
        blockSize: used?.blockSize ?? blockSize,
        bytesWritten: run.bytesWritten,
        created,
        dstSize: target?.size ?? size,
        channel: channelStats(link, spec, summary),
      }),
      ...(index !== undefined ? { index: { ...index.report(), bytesReread: reread } } : {}),
      ...(mapped !== undefined ? { bmap: mapped.report } : {}),
      ...(verified !== undefined ? { verify: verified } : {}),
    };
    if (run.interrupted) throw interrupted(result);
    return result;
  } catch (err) {
    if (made !== undefined && target !== undefined && (fileSink?.bytesWritten ?? 0) === 0) {
      // failed before the first byte was written: leave DST as it was found (as copy.ts does)
      if (made === 'created') await unlink(dst).catch(() => {});
      else await target.fh.truncate(0).catch(() => {});
    }
    throw await connectionLost(err, dst, sink?.written ?? 0, options.signal);
  } finally {
    await refiner?.stop();
    await scanner?.stop();
    await fileSink?.finish().catch(() => {});
    await link?.close();
    await index?.close();
    await mapped?.close();
    await target?.fh.close();
  }
}

async function relay(
  src: string,
  dst: string,
  fromSpec: RemoteSpec,
  toSpec: RemoteSpec,
  options: RemoteCopyOptions,
): Promise<RemoteCopyResult> {
  const session = sessionOf(options);
  const { blockSize, chunkSize, dryRun, full } = session;
  const kept = keptRemotely(options.index, toSpec);
  // with DST's agent keeping an index, both sides' top hashes are block digests, which a
  // used index knows without reading DST
  const top = kept !== undefined ? blockTopHashing(indexBlockOf(options)) : topHashing();
  let from: AgentLink | undefined;
  let to: AgentLink | undefined;
  let refiner: Refiner | undefined;
  let mapped: MappedSource | undefined;
  try {
    // a local bmap of SRC's image: only its mapped ranges are compared (one hash per piece
    // from each agent, no TOP_HASHES scan)
    const bmap = await givenBmap(options);
    if (bmap !== undefined && kept !== undefined) {
      throw new BlksyncError(
        'EUSAGE',
        `--index with --bmap is not supported when SRC is remote (${src}); drop one of them`,
      );
    }
    const topUnit = full || bmap !== undefined ? 0 : chunkSize;
    from = await AgentLink.open(
      fromSpec,
      options,
      {
        role: 'source',
        path: fromSpec.path,
        topUnit,
        ...top.hello,
        encodings: [DEFLATE_RAW],
      },
      await agentPayload(),
    );
    const size = from.ready.size;
    // before DST's agent opens (or creates) DST
    await checkRemoteSize(size, src, options.size, bmap);
    to = await AgentLink.open(
      toSpec,
      options,
      {
        role: 'target',
        path: toSpec.path,
        size,
        dryRun,
        topUnit,
        ...top.hello,
        encodings: [DEFLATE_RAW],
        ...(options.verify === true ? { verify: true } : {}),
        ...(kept !== undefined
          ? { index: agentIndexHello(kept, options, chunkSize, options.blockSizeGiven) }
          : {}),
      },
      await agentPayload(),
    );
    const book = new SpanBook();
    const f = from;
    const t = to;
    let plan: Plan = wholeImagePlan(size);
    let bmapReport: BmapReport | undefined;
    if (bmap !== undefined) {
      mapped = new MappedSource(from, book, {
        size,
        chunkSize,
        blockSize,
        local: t.ready.zero ? undefined : t,
        dst,
        full,
        dryRun,
      });
      // the range checksums cannot be checked: DST's unchanged blocks never pass through here
      const b = await bmapSourcing(bmap, mapped, src, {
        noVerifyChecksums: true,
        rereadable: false,
      });
      plan = b.plan;
      bmapReport = b.report;
    } else if (!full) {
      const differ = new HashDiffer(from, chunkSize, blockSize);
      refiner = new Refiner(
        size,
        chunkSize,
        async (offset, length) => {
          const [theirs, mine] = await Promise.all([
            f.topHash(offset),
            t.ready.zero ? top.zero(length) : t.topHash(offset),
          ]);
          return mine.equals(theirs);
        },
        async (offset, length): Promise<Found> => {
          const spans: number[] = [];
          if (t.ready.zero) await differ.refine(offset, Buffer.alloc(0), length, true, spans);
          else await differ.refineBetween(offset, length, t, spans);
          return dryRun ? { spans } : { spans, data: await fetchSpans(f, offset, spans) };
        },
      );
    }
    const source = mapped ?? new FetchedSource(size, from, refiner, book, !dryRun);
    const links = [from, to];
    const run = await runPipeline(
      plan,
      source,
      new RefinedTarget(book, () => 0),
      dryRun ? [] : [new RemoteSink(to)],
      {
        blockSize,
        chunkSize,
        depth: REMOTE_DEPTH,
        signal: options.signal,
        onProgress:
          options.onProgress &&
          ((p) =>
            options.onProgress!({
              ...p,
              channelBytesSent: links.reduce((n, l) => n + l.bytesSent, 0),
              channelBytesReceived: links.reduce((n, l) => n + l.bytesReceived, 0),
            })),
      },
    );
    await refiner?.stop();
    await mapped?.stop();
    const fromSummary = await from.finish();
    // an interrupted run leaves DST's agent index marked in progress (as a push does)
    const toSummary =
      run.interrupted && to.ready.index !== undefined ? await closedEarly(to) : await to.finish();
    await Promise.all([from.close(), to.close()]);
    const a = channelStats(from, fromSpec, fromSummary);
    const b = channelStats(to, toSpec, toSummary);
    const result: RemoteCopyResult = {
      ...resultOf(session, src, dst, size, countsOf(run), {
        bytesRead: toSummary.bytesRead,
        blockSize,
        bytesWritten: toSummary.bytes,
        created: to.ready.created,
        dstSize: to.ready.size,
        channel: {
          host: `${a.host} → ${b.host}`,
          bytesSent: a.bytesSent + b.bytesSent,
          bytesReceived: a.bytesReceived + b.bytesReceived,
          remoteCpuSeconds: a.remoteCpuSeconds + b.remoteCpuSeconds,
          encoding: a.encoding === b.encoding ? a.encoding : `${a.encoding}/${b.encoding}`,
          remoteNode:
            a.remoteNode === b.remoteNode ? a.remoteNode : `${a.remoteNode}/${b.remoteNode}`,
        },
      }),
      ...verifyReport(to.verified),
      ...(toSummary.index !== undefined ? { index: toSummary.index } : {}),
      ...(bmapReport !== undefined ? { bmap: bmapReport } : {}),
    };
    if (run.interrupted) throw interrupted(result);
    return result;
  } catch (err) {
    throw await connectionLost(err, dst, to?.bytesConfirmed ?? 0, options.signal);
  } finally {
    await refiner?.stop();
    await mapped?.stop();
    await to?.close();
    await from?.close();
  }
}

/**
 * The bmap of a remote SRC: only --bmap's, a local file or URL (none is looked for beside SRC
 * on its host), its signature checked as a local copy checks it. As for stdin, without
 * --bmap there is none and the signature options are refused.
 */
function givenBmap(options: RemoteCopyOptions): Promise<FoundBmap | undefined> {
  return findBmap('-', options);
}

/** --size and the bmap must describe the remote SRC's size, as a local SRC's (EUSAGE, EBMAP_MISMATCH). */
async function checkRemoteSize(
  size: number,
  src: string,
  given: number | undefined,
  bmap: FoundBmap | undefined,
): Promise<void> {
  if (given !== undefined && given !== size) {
    throw new BlksyncError('EUSAGE', `--size ${given} contradicts the size ${size} of ${src}`);
  }
  if (bmap !== undefined) {
    const { checkBmapMatches } = await import('../formats/bmap.js');
    checkBmapMatches(bmap.bmap, size, bmap.path, src);
  }
}

/** A pull's --verify with a bmap's checksums: DST's mapped ranges read back and compared, as locally. */
async function verifyAgainstBmap(
  dst: string,
  target: Opened,
  checksums: NonNullable<BmapSourcing['checksums']>,
  signal: AbortSignal | undefined,
): Promise<VerifyReport> {
  const t0 = performance.now();
  const { verifyWritten } = await import('../engine/verify-written.js');
  const r = await verifyWritten(dst, checksums.units, checksums.algorithm, {
    fd: target.fh.fd,
    signal,
  });
  return {
    ...r,
    against: 'bmap',
    algorithm: checksums.algorithm,
    seconds: (performance.now() - t0) / 1000,
  };
}

/**
 * The index path the agent keeps for `--index`, on DST's host: "auto" (its cache) or the path
 * of `host:FILE`; undefined for an index kept here. FILE must be on DST's host.
 */
function keptRemotely(index: string | undefined, dst: RemoteSpec): string | undefined {
  if (index === undefined) return undefined;
  if (index === 'auto') return 'auto';
  const at = parseRemote(index);
  if (at === undefined) return undefined;
  if (at.destination !== dst.destination) {
    throw new BlksyncError(
      'EUSAGE',
      `--index ${index} is on ${at.destination}, but an index kept remotely lives beside DST on ${dst.destination}; use ${dst.destination}:FILE, or a local FILE`,
    );
  }
  return at.path;
}

/** The block size of an index the agent makes: -b's, else the default. */
function indexBlockOf(options: RemoteCopyOptions): number {
  return options.blockSizeGiven ?? DEFAULT_INDEX_BLOCK_SIZE;
}

/**
 * The HELLO's `index` for an index DST's agent keeps (push, relay, --direct): `blockSize`
 * given (-b, or a bmap's blocks) makes an index of other blocks be refused or rebuilt.
 */
function agentIndexHello(
  path: string,
  options: RemoteCopyOptions,
  chunkSize: number,
  blockSize: number | undefined,
): IndexHello {
  return {
    path,
    blockSize: blockSize ?? DEFAULT_INDEX_BLOCK_SIZE,
    blockSizeGiven: blockSize !== undefined,
    chunkSize,
    rebuild: options.rebuildIndex === true,
    verifySample: options.verifySample ?? DEFAULT_VERIFY_SAMPLE,
    full: options.full === true,
    topDigest: true,
  };
}

/**
 * Top hashes as block digests in `block` blocks (TOP_HASH_BLOCKS): what an index DST's agent
 * keeps knows for DST without reading it, and what SRC's side computes from its bytes.
 */
function blockTopHashing(block: number): TopHashing {
  const hash = blockDigestHasher(block);
  return { hello: { topHash: TOP_HASH_BLOCKS, topBlock: block }, hash, zero: zeroHasher(hash) };
}

/**
 * Both ends remote, --direct: the agent on SRC's host starts the one on DST's host and runs
 * the copy itself (direct.ts); this end sends the HELLO and DONE and receives PROGRESS and
 * the SUMMARY, so no hash or data of the image crosses this machine.
 */
async function direct(
  src: string,
  dst: string,
  fromSpec: RemoteSpec,
  toSpec: RemoteSpec,
  options: RemoteCopyOptions,
): Promise<RemoteCopyResult> {
  const session = sessionOf(options);
  const { chunkSize, dryRun, full } = session;
  const kept = keptRemotely(options.index, toSpec);
  let link: AgentLink | undefined;
  let last: Progress | undefined;
  const signal = options.signal;
  const onAbort = (): void => void link?.close();
  try {
    link = await AgentLink.open(
      fromSpec,
      options,
      {
        role: 'source',
        path: fromSpec.path,
        topUnit: 0,
        ...(kept !== undefined ? blockTopHashing(indexBlockOf(options)) : topHashing()).hello,
        encodings: [],
        direct: {
          destination: toSpec.destination,
          path: toSpec.path,
          ...(options.ssh !== undefined ? { ssh: options.ssh } : {}),
          ...(options.remoteNode !== undefined ? { remoteNode: options.remoteNode } : {}),
          sudo: options.sudo === true,
          ...(options.timeout !== undefined ? { timeout: options.timeout } : {}),
          blockSize: options.blockSize,
          chunkSize,
          dryRun,
          full,
          ...(options.verify === true ? { verify: true } : {}),
          ...(kept !== undefined
            ? { index: agentIndexHello(kept, options, chunkSize, options.blockSizeGiven) }
            : {}),
        },
      },
      await agentPayload(),
    );
    const l = link;
    l.onProgress = (p) => {
      last = p;
      options.onProgress?.({
        ...p,
        channelBytesSent: l.bytesSent + (p.channelBytesSent ?? 0),
        channelBytesReceived: l.bytesReceived + (p.channelBytesReceived ?? 0),
      });
    };
    // Ctrl-C: closing the channel makes the agent stop the copy (the far agent syncs)
    signal?.addEventListener('abort', onAbort, { once: true });
    const size = link.ready.size;
    const target = link.ready.target;
    if (target === undefined) {
      throw new BlksyncError('EREMOTE_PROTOCOL', `${link.name}: READY lacks the direct target`);
    }
    const summary = await link.finish();
    const report = summary.direct;
    if (report === undefined) {
      throw new BlksyncError('EREMOTE_PROTOCOL', `${link.name}: SUMMARY lacks the direct report`);
    }
    await link.close();
    const result: RemoteCopyResult = {
      // the copy ran on SRC's host: its report has the pipeline's counts
      ...resultOf(session, src, dst, size, report, {
        bytesRead: report.target.bytesRead,
        blockSize: options.blockSize,
        bytesWritten: report.target.bytes,
        created: target.created,
        dstSize: target.size,
        channel: {
          host: `${fromSpec.destination} (direct to ${toSpec.destination})`,
          bytesSent: link.bytesSent,
          bytesReceived: link.bytesReceived,
          remoteCpuSeconds: (summary.cpuSeconds ?? 0) + (report.target.cpuSeconds ?? 0),
          encoding: target.encoding,
          remoteNode:
            link.ready.node === target.node ? target.node : `${link.ready.node}/${target.node}`,
          direct: {
            host: `${fromSpec.destination} → ${toSpec.destination}`,
            bytesSent: report.bytesSent,
            bytesReceived: report.bytesReceived,
          },
        },
      }),
      ...verifyReport(report.verify),
      ...(report.target.index !== undefined ? { index: report.target.index } : {}),
    };
    if (report.interrupted || signal?.aborted === true) throw interrupted(result);
    return result;
  } catch (err) {
    if (err instanceof BlksyncError && err.code === 'EINTERRUPTED') throw err;
    // what the far agent confirmed is known only to the near one: the last progress says
    const lost = await connectionLost(err, dst, last?.bytesWritten ?? 0, signal);
    if (lost instanceof BlksyncError && lost.code === 'EINTERRUPTED' && last !== undefined) {
      throw new BlksyncError(
        'EINTERRUPTED',
        `interrupted after ${formatBytes(last.bytesScanned)} of ${formatBytes(last.bytesTotal)}; rerun the same command to finish`,
        { cause: err },
      );
    }
    throw lost;
  } finally {
    signal?.removeEventListener('abort', onAbort);
    await link?.close();
  }
}

function isTrusted(untrusted: readonly Range[], offset: number, length: number): boolean {
  return untrusted.every((r) => offset + length <= r.start || offset >= r.end);
}

/** Stores the SHA-256 of each block of `data[start, end)` (at image `offset`) in `table`. */
function hashInto(
  table: Buffer,
  blockSize: number,
  offset: number,
  data: Buffer,
  start: number,
  end: number,
): void {
  for (let s = start; s < end; s += blockSize) {
    sha256(data, s, Math.min(s + blockSize, end)).copy(
      table,
      ((offset + s) / blockSize) * HASH_BYTES,
    );
  }
}

/**
 * The block size of a pull's TOP_HASH_BLOCKS stream: the index's, read before ssh starts
 * (the IndexSession reads it again once SRC's size is known), else that of an index about to
 * be made. Any block size compares chunks correctly; the index's lets it answer unread.
 */
async function digestBlockFor(
  options: RemoteCopyOptions,
  target: Opened | undefined,
  dst: string,
  chunkSize: number,
): Promise<number> {
  // divides the chunk: it is -b's, which the chunk is made of, or 64 KiB of 4 MiB
  const made = options.blockSizeGiven ?? DEFAULT_INDEX_BLOCK_SIZE;
  let path = options.index!;
  if (path === 'auto') {
    if (target === undefined) return made;
    path = cachedIndexPath(await identityOf(dst, target.stats, target.size));
  }
  const found = await readIndexIfAny(path, true).catch(() => undefined);
  const bs = found !== undefined && 'index' in found ? found.index.blockSize : made;
  // an index whose blocks do not divide the chunk is refused by the IndexSession anyway
  return chunkSize % bs === 0 ? bs : made;
}

/** An index's block digest of [offset, offset + length): the stored hashes' prefixes. */
function tableDigest(target: IndexTarget, offset: number, length: number): Buffer {
  const bs = target.blockSize;
  const first = offset / bs;
  const n = Math.ceil(length / bs);
  const hashes = Buffer.allocUnsafe(n * WIRE_HASH_BYTES);
  for (let i = 0; i < n; i++) {
    const h = (first + i) * HASH_BYTES;
    target.table.copy(hashes, i * WIRE_HASH_BYTES, h, h + WIRE_HASH_BYTES);
  }
  return blockDigest(hashes);
}

/**
 * Pull with an index that vouches for the chunk: the agent hashes SRC's blocks of the index's
 * size and only those whose hash differs from the stored one (a wire hash is a prefix of it)
 * are fetched; `later` gets what puts their new hashes into the table. DST is not read.
 */
async function byIndex(
  target: IndexTarget,
  link: AgentLink,
  offset: number,
  length: number,
  dryRun: boolean,
  later: (update: () => void) => void,
): Promise<Found> {
  const bs = target.blockSize;
  const theirs = await link.hashes(offset, length, Math.max(bs, MIN_HASH_UNIT));
  const spans: number[] = [];
  for (let s = 0, k = 0; s < length; s += bs, k++) {
    const h = ((offset + s) / bs) * HASH_BYTES;
    const w = k * WIRE_HASH_BYTES;
    if (theirs.compare(target.table, h, h + WIRE_HASH_BYTES, w, w + WIRE_HASH_BYTES) === 0)
      continue;
    const e = Math.min(s + bs, length);
    if (spans.length > 0 && spans[spans.length - 1] === s) spans[spans.length - 1] = e;
    else spans.push(s, e);
  }
  if (dryRun) return { spans };
  const data = await fetchSpans(link, offset, spans);
  later(() => {
    for (let i = 0, at = 0; i < spans.length; i += 2) {
      const len = spans[i + 1]! - spans[i]!;
      hashInto(target.table, bs, offset + spans[i]!, data, at, at + len);
      at += len;
    }
  });
  return { spans, data };
}

/** The copy result's `verify` from what a target agent read back and was found equal. */
function verifyReport(
  v: { bytesVerified: number; ranges: number; direct: boolean; seconds: number } | undefined,
): { verify?: VerifyReport } {
  if (v === undefined) return {};
  return { verify: { ...v, against: 'written', algorithm: 'sha256' } };
}

/** Ends a session without DONE; what the agent confirmed stands in for its summary. */
async function closedEarly(link: AgentLink): Promise<Summary> {
  await link.close();
  return { bytes: link.bytesConfirmed, frames: 0, digest: '', bytesRead: 0 };
}

function channelStats(link: AgentLink, spec: RemoteSpec, summary: Summary): ChannelStats {
  return {
    remoteCpuSeconds: summary.cpuSeconds ?? 0,
    host: spec.destination,
    bytesSent: link.bytesSent,
    bytesReceived: link.bytesReceived,
    encoding: link.ready.encoding,
    remoteNode: link.ready.node,
  };
}

function withChannel(listener: ProgressListener, link: AgentLink): ProgressListener {
  return (p) =>
    listener({
      ...p,
      channelBytesSent: link.bytesSent,
      channelBytesReceived: link.bytesReceived,
    });
}
