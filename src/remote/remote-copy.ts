/**
 * `copy` with a `host:path` end: push (local SRC → remote DST), pull (remote SRC → local
 * DST) and relay (both remote, through this host), each run by the same pipeline as a local
 * copy (docs/architecture.md, "Remote ends"):
 *
 *   push:  FileSource(SRC) + hash refinement ──► RefinedTarget ──► RemoteSink (DATA frames)
 *   pull:  PullSource (DST's bytes, patched with fetched blocks) ──► RefinedTarget ──► FileSink(DST)
 *   relay: RelaySource (blocks fetched from SRC's agent) ──► RefinedTarget ──► RemoteSink
 *
 * In push and pull the side that holds the file locally compares its own hashes with the
 * agent's (hash-differ.ts) while the chunk is being read ahead, so refinements of several
 * chunks overlap; in a relay both agents' hashes are compared here. The target knowledge
 * then just reports the spans found.
 */

import { randomBytes } from 'node:crypto';
import { BlksyncError } from '../errors.js';
import { NoTarget, ZeroTarget } from '../engine/knowledge.js';
import { runPipeline } from '../engine/pipeline.js';
import type {
  ChunkKnowledge,
  ProgressListener,
  Sink,
  Source,
  TargetKnowledge,
} from '../engine/types.js';
import type { CopyResult } from '../engine/copy.js';
import { FileSink } from '../io/file-sink.js';
import { FileSource } from '../io/file-source.js';
import { createTarget, openSource, openTarget, type Opened } from '../io/open.js';
import { formatBytes } from '../size.js';
import { DEFLATE_RAW } from './compress.js';
import { HashDiffer } from './hash-differ.js';
import {
  GMAC_KEY_BYTES,
  TOP_HASH_GMAC,
  topHasher,
  zeroHasher,
  type Summary,
  type TopHasher,
} from './protocol.js';
import { HashScanner } from './scanner.js';
import { AgentLink, type RemoteOptions } from './link.js';
import { parseRemote, type RemoteSpec } from './spec.js';

/** Bytes per chunk: the top level of the hash tree. */
export const REMOTE_CHUNK_BYTES = 4 * 1024 * 1024;
/** Chunks in flight: their refinement round trips overlap. */
export const REMOTE_DEPTH = 8;

export interface RemoteCopyOptions extends RemoteOptions {
  blockSize: number;
  dryRun?: boolean;
  full?: boolean;
  signal?: AbortSignal;
  onProgress?: ProgressListener;
  chunkSize?: number;
  /** Not supported with a remote end yet; refused. */
  index?: string;
  bmap?: string;
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
}

export type RemoteCopyResult = CopyResult & { channel: ChannelStats };

/** Spans per chunk offset, found while reading and reported by the knowledge. */
class SpanBook {
  readonly #spans = new Map<number, number[]>();
  set(offset: number, spans: number[]): void {
    this.#spans.set(offset, spans);
  }
  take(offset: number): number[] {
    const s = this.#spans.get(offset) ?? [];
    this.#spans.delete(offset);
    return s;
  }
}

/** The knowledge of DST gained while the chunk was read: the spans the hashes found. */
class RefinedTarget implements TargetKnowledge {
  readonly #book: SpanBook;
  readonly #bytesRead: () => number;

  constructor(book: SpanBook, bytesRead: () => number) {
    this.#book = book;
    this.#bytesRead = bytesRead;
  }

  get bytesRead(): number {
    return this.#bytesRead();
  }

  load(offset: number): Promise<ChunkKnowledge> {
    return Promise.resolve({
      diff: (_data, _length, _blockSize, out) => {
        for (const x of this.#book.take(offset)) out.push(x);
      },
      release: () => {},
    });
  }

  async close(): Promise<void> {}
}

/**
 * Push: a chunk whose hash (from the scanner) equals the agent's is not read again; the
 * others are read and refined to blocks.
 */
class PushSource implements Source {
  readonly size: number;
  readonly #file: FileSource;
  readonly #scanner: HashScanner;
  readonly #link: AgentLink;
  readonly #differ: HashDiffer;
  readonly #book: SpanBook;

  constructor(
    file: FileSource,
    scanner: HashScanner,
    link: AgentLink,
    differ: HashDiffer,
    book: SpanBook,
  ) {
    this.size = file.size;
    this.#file = file;
    this.#scanner = scanner;
    this.#link = link;
    this.#differ = differ;
    this.#book = book;
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const [[mine], theirs] = await Promise.all([
      this.#scanner.hash(offset),
      this.#link.topHash(offset),
    ]);
    const spans: number[] = [];
    this.#book.set(offset, spans);
    if (mine.equals(theirs)) return length;
    const got = await this.#file.read(buf, offset, length);
    if (got < length) return got;
    await this.#differ.refine(offset, buf, length, false, spans);
    return got;
  }

  close(): Promise<void> {
    return this.#file.close();
  }
}

/** The agent as a Sink: DATA frames, written there in order. */
class RemoteSink implements Sink {
  readonly #link: AgentLink;
  constructor(link: AgentLink) {
    this.#link = link;
  }
  write(data: Buffer, offset: number): Promise<void> {
    return this.#link.sendData(data, offset);
  }
  async finish(): Promise<void> {}
}

/**
 * Pull: the new bytes are on the remote. A chunk is DST's own bytes (or zeros) with the
 * differing spans fetched into it, so only those spans are ever sent; DST is read again only
 * where its hash (from the scanner) differs from the agent's.
 */
class PullSource implements Source {
  readonly size: number;
  #reread = 0;
  readonly #link: AgentLink;
  readonly #dst: FileSource | undefined;
  readonly #scanner: HashScanner | undefined;
  readonly #differ: HashDiffer | undefined;
  readonly #book: SpanBook;
  readonly #fetch: boolean;
  readonly #top: TopHashing;

  constructor(
    size: number,
    link: AgentLink,
    top: TopHashing,
    local: { dst: FileSource; scanner: HashScanner } | undefined,
    differ: HashDiffer | undefined,
    book: SpanBook,
    fetch: boolean,
  ) {
    this.size = size;
    this.#link = link;
    this.#top = top;
    this.#dst = local?.dst;
    this.#scanner = local?.scanner;
    this.#differ = differ;
    this.#book = book;
    this.#fetch = fetch;
  }

  get bytesRead(): number {
    return (this.#scanner?.bytesRead ?? 0) + this.#reread;
  }

  async #readDst(buf: Buffer, offset: number, length: number): Promise<void> {
    const got = await this.#dst!.read(buf, offset, length);
    this.#reread += got;
    if (got < length) {
      throw new BlksyncError(
        'EDEST_SHORT',
        `destination ended at ${offset + got} bytes while being read; did it shrink? Rerun the command.`,
      );
    }
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const spans: number[] = [];
    this.#book.set(offset, spans);
    if (this.#differ === undefined) {
      spans.push(0, length); // --full
    } else {
      const theirs = this.#link.topHash(offset);
      let mine: Buffer;
      let held = false;
      if (this.#scanner === undefined) mine = this.#top.zero(length);
      else {
        const [h, scanned] = await this.#scanner.hash(offset);
        mine = h;
        if (scanned !== length) {
          // the image ends inside this unit of a larger DST: hash just the image's part
          await this.#readDst(buf, offset, length);
          mine = this.#top.hash(buf.subarray(0, length));
          held = true;
        }
      }
      if (!mine.equals(await theirs)) {
        if (this.#scanner !== undefined && !held) await this.#readDst(buf, offset, length);
        await this.#differ.refine(offset, buf, length, this.#scanner === undefined, spans);
      }
    }
    if (this.#fetch) {
      const fetches: Promise<void>[] = [];
      for (let i = 0; i < spans.length; i += 2) {
        const s = spans[i]!;
        fetches.push(this.#link.fetch(offset + s, spans[i + 1]! - s, buf, s));
      }
      await Promise.all(fetches);
    }
    return length;
  }

  async close(): Promise<void> {}
}

/**
 * Between two hosts, relayed through this one: the hashes of both agents are compared here
 * and the differing spans fetched from SRC's agent, then sent on to DST's.
 */
class RelaySource implements Source {
  readonly size: number;
  readonly #from: AgentLink;
  readonly #to: AgentLink;
  readonly #differ: HashDiffer | undefined;
  readonly #book: SpanBook;
  readonly #fetch: boolean;
  readonly #top: TopHashing;

  constructor(
    size: number,
    from: AgentLink,
    to: AgentLink,
    top: TopHashing,
    differ: HashDiffer | undefined,
    book: SpanBook,
    fetch: boolean,
  ) {
    this.size = size;
    this.#from = from;
    this.#to = to;
    this.#top = top;
    this.#differ = differ;
    this.#book = book;
    this.#fetch = fetch;
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const spans: number[] = [];
    this.#book.set(offset, spans);
    if (this.#differ === undefined)
      spans.push(0, length); // --full
    else {
      const zero = this.#to.ready.zero;
      const [theirs, mine] = await Promise.all([
        this.#from.topHash(offset),
        zero ? this.#top.zero(length) : this.#to.topHash(offset),
      ]);
      if (!mine.equals(theirs)) {
        if (zero) await this.#differ.refine(offset, buf, length, true, spans);
        else await this.#differ.refineBetween(offset, length, this.#to, spans);
      }
    }
    if (this.#fetch) {
      const fetches: Promise<void>[] = [];
      for (let i = 0; i < spans.length; i += 2) {
        const s = spans[i]!;
        fetches.push(this.#from.fetch(offset + s, spans[i + 1]! - s, buf, s));
      }
      await Promise.all(fetches);
    }
    return length;
  }

  async close(): Promise<void> {}
}

/** Counts what a sink wrote, for the message when the link drops. */
class CountingSink implements Sink {
  written = 0;
  readonly #inner: Sink;
  constructor(inner: Sink) {
    this.#inner = inner;
  }
  async write(data: Buffer, offset: number): Promise<void> {
    await this.#inner.write(data, offset);
    this.written += data.length;
  }
  finish(): Promise<void> {
    return this.#inner.finish();
  }
}

/** The top-level hash of one session: GMAC under a fresh random key (protocol.ts). */
interface TopHashing {
  hello: { topHash: string; key: string };
  hash: TopHasher;
  zero: (length: number) => Buffer;
}

function topHashing(): TopHashing {
  const key = randomBytes(GMAC_KEY_BYTES);
  const hash = topHasher(key);
  return {
    hello: { topHash: TOP_HASH_GMAC, key: key.toString('hex') },
    hash,
    zero: zeroHasher(hash),
  };
}

function chunkSizeOf(options: RemoteCopyOptions): number {
  const bs = options.blockSize;
  return Math.max(bs, Math.floor((options.chunkSize ?? REMOTE_CHUNK_BYTES) / bs) * bs);
}

/** Copies between a local path and `host:path` (either way), or between two hosts. */
export async function remoteCopy(
  src: string,
  dst: string,
  options: RemoteCopyOptions,
): Promise<RemoteCopyResult> {
  const srcRemote = parseRemote(src);
  const dstRemote = parseRemote(dst);
  if (options.index !== undefined || options.bmap !== undefined) {
    throw new BlksyncError(
      'EUSAGE',
      '--index and --bmap do not work with a host:path end yet; copy without them',
    );
  }
  options.signal?.throwIfAborted();
  if (srcRemote !== undefined && dstRemote !== undefined) {
    return relay(src, dst, srcRemote, dstRemote, options);
  }
  if (dstRemote !== undefined) return push(src, dst, dstRemote, options);
  if (srcRemote !== undefined) return pull(src, dst, srcRemote, options);
  throw new BlksyncError('EUSAGE', 'neither end is remote');
}

function connectionLost(err: unknown, dst: string, written: number): unknown {
  if (err instanceof BlksyncError && err.code === 'ECONNECTION_LOST') {
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
  const started = performance.now();
  const blockSize = options.blockSize;
  const chunkSize = chunkSizeOf(options);
  const dryRun = options.dryRun === true;
  const full = options.full === true;
  const source = await openSource(src);
  const top = topHashing();
  // SRC's hashes are computed while ssh connects and the agent scans DST
  const scanner = full
    ? undefined
    : new HashScanner(source.fh, src, source.size, chunkSize, top.hash).start();
  let link: AgentLink | undefined;
  try {
    link = await AgentLink.open(spec, options, {
      role: 'target',
      path: spec.path,
      size: source.size,
      dryRun,
      topUnit: full ? 0 : chunkSize,
      ...top.hello,
      encodings: [DEFLATE_RAW],
    });
    const ready = link.ready;
    const book = new SpanBook();
    const file = new FileSource(source.fh, src, source.size, false);
    let knowledge: TargetKnowledge;
    let input: Source = file;
    if (full) knowledge = new NoTarget();
    else if (ready.zero || scanner === undefined) {
      knowledge = new ZeroTarget();
      await scanner?.stop();
    } else {
      input = new PushSource(file, scanner, link, new HashDiffer(link, chunkSize, blockSize), book);
      knowledge = new RefinedTarget(book, () => 0);
    }
    const run = await runPipeline(
      { imageSize: source.size, ranges: source.size > 0 ? [{ start: 0, end: source.size }] : [] },
      input,
      knowledge,
      dryRun ? [] : [new RemoteSink(link)],
      {
        blockSize,
        chunkSize,
        depth: REMOTE_DEPTH,
        signal: options.signal,
        onProgress: options.onProgress && withChannel(options.onProgress, link),
      },
    );
    const summary = await link.finish();
    const result: RemoteCopyResult = {
      source: src,
      destination: dst,
      bytesTotal: source.size,
      bytesScanned: run.bytesScanned,
      bytesRead: summary.bytesRead,
      blockSize,
      blocksDiffering: run.blocksDiffering,
      bytesDiffering: run.bytesDiffering,
      bytesWritten: summary.bytes,
      rangesWritten: run.ranges.count,
      ranges: [...run.ranges.ranges],
      created: ready.created,
      destinationExtraBytes: ready.created ? 0 : ready.size - source.size,
      dryRun,
      full,
      seconds: 0,
      channel: channelStats(link, spec, summary),
    };
    await link.close();
    result.channel = channelStats(link, spec, summary);
    result.seconds = (performance.now() - started) / 1000;
    if (run.interrupted) throw interrupted(result);
    return result;
  } catch (err) {
    throw connectionLost(err, dst, link?.bytesConfirmed ?? 0);
  } finally {
    await scanner?.stop();
    await link?.close();
    await source.fh.close();
  }
}

async function pull(
  src: string,
  dst: string,
  spec: RemoteSpec,
  options: RemoteCopyOptions,
): Promise<RemoteCopyResult> {
  const started = performance.now();
  const blockSize = options.blockSize;
  const chunkSize = chunkSizeOf(options);
  const dryRun = options.dryRun === true;
  const full = options.full === true;
  let link: AgentLink | undefined;
  let target: Opened | undefined;
  let sink: CountingSink | undefined;
  let scanner: HashScanner | undefined;
  const top = topHashing();
  try {
    // refusals of the local end come before ssh is even started
    const found = await openTarget(dst, { readOnly: dryRun });
    if (found.fh !== undefined) target = found;
    // DST's hashes are computed while ssh connects and the agent scans SRC
    if (!full && target !== undefined && target.size > 0) {
      scanner = new HashScanner(target.fh, dst, target.size, chunkSize, top.hash).start();
    }
    link = await AgentLink.open(spec, options, {
      role: 'source',
      path: spec.path,
      topUnit: full ? 0 : chunkSize,
      ...top.hello,
      encodings: [DEFLATE_RAW],
    });
    const size = link.ready.size;
    scanner?.truncate(size);
    let created = false;
    let zero = false;
    if (target === undefined) {
      created = true;
      zero = true;
      if (!dryRun) target = await createTarget(dst, size);
    } else if (target.size === 0 && target.kind === 'file') {
      zero = true;
      if (!dryRun) await target.fh.truncate(size);
    } else if (target.size < size) {
      throw new BlksyncError(
        'EDEST_TOO_SMALL',
        `${dst} is ${target.size} bytes (${formatBytes(target.size)}) but the source is ${size} bytes (${formatBytes(size)}); use a larger destination`,
        { path: dst },
      );
    }
    const book = new SpanBook();
    const local =
      target !== undefined && !zero && scanner !== undefined
        ? { dst: new FileSource(target.fh, dst, target.size, false), scanner }
        : undefined;
    const source = new PullSource(
      size,
      link,
      top,
      local,
      full ? undefined : new HashDiffer(link, chunkSize, blockSize),
      book,
      !dryRun,
    );
    if (!dryRun && target !== undefined) {
      sink = new CountingSink(
        new FileSink(target.fh, dst, { boundedSync: target.kind === 'block-device' }),
      );
    }
    const run = await runPipeline(
      { imageSize: size, ranges: size > 0 ? [{ start: 0, end: size }] : [] },
      source,
      new RefinedTarget(book, () => source.bytesRead),
      sink ? [sink] : [],
      {
        blockSize,
        chunkSize,
        depth: REMOTE_DEPTH,
        signal: options.signal,
        onProgress: options.onProgress && withChannel(options.onProgress, link),
      },
    );
    await sink?.finish();
    const summary = await link.finish();
    if (!dryRun && summary.bytes !== run.bytesWritten) {
      throw new BlksyncError(
        'EVERIFY',
        `${link.name}: sent ${summary.bytes} bytes but ${run.bytesWritten} were written; rerun the command`,
      );
    }
    await link.close();
    const result: RemoteCopyResult = {
      source: src,
      destination: dst,
      bytesTotal: size,
      bytesScanned: run.bytesScanned,
      bytesRead: source.bytesRead,
      blockSize,
      blocksDiffering: run.blocksDiffering,
      bytesDiffering: run.bytesDiffering,
      bytesWritten: run.bytesWritten,
      rangesWritten: run.ranges.count,
      ranges: [...run.ranges.ranges],
      created,
      destinationExtraBytes: target !== undefined && !created ? target.size - size : 0,
      dryRun,
      full,
      seconds: (performance.now() - started) / 1000,
      channel: channelStats(link, spec, summary),
    };
    if (run.interrupted) throw interrupted(result);
    return result;
  } catch (err) {
    throw connectionLost(err, dst, sink?.written ?? 0);
  } finally {
    await scanner?.stop();
    await sink?.finish().catch(() => {});
    await link?.close();
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
  const started = performance.now();
  const blockSize = options.blockSize;
  const chunkSize = chunkSizeOf(options);
  const dryRun = options.dryRun === true;
  const full = options.full === true;
  const topUnit = full ? 0 : chunkSize;
  const top = topHashing();
  let from: AgentLink | undefined;
  let to: AgentLink | undefined;
  try {
    from = await AgentLink.open(fromSpec, options, {
      role: 'source',
      path: fromSpec.path,
      topUnit,
      ...top.hello,
      encodings: [DEFLATE_RAW],
    });
    const size = from.ready.size;
    to = await AgentLink.open(toSpec, options, {
      role: 'target',
      path: toSpec.path,
      size,
      dryRun,
      topUnit,
      ...top.hello,
      encodings: [DEFLATE_RAW],
    });
    const book = new SpanBook();
    const source = new RelaySource(
      size,
      from,
      to,
      top,
      full ? undefined : new HashDiffer(from, chunkSize, blockSize),
      book,
      !dryRun,
    );
    const links = [from, to];
    const run = await runPipeline(
      { imageSize: size, ranges: size > 0 ? [{ start: 0, end: size }] : [] },
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
            } as typeof p)),
      },
    );
    const fromSummary = await from.finish();
    const toSummary = await to.finish();
    await Promise.all([from.close(), to.close()]);
    const a = channelStats(from, fromSpec, fromSummary);
    const b = channelStats(to, toSpec, toSummary);
    const result: RemoteCopyResult = {
      source: src,
      destination: dst,
      bytesTotal: size,
      bytesScanned: run.bytesScanned,
      bytesRead: toSummary.bytesRead,
      blockSize,
      blocksDiffering: run.blocksDiffering,
      bytesDiffering: run.bytesDiffering,
      bytesWritten: toSummary.bytes,
      rangesWritten: run.ranges.count,
      ranges: [...run.ranges.ranges],
      created: to.ready.created,
      destinationExtraBytes: to.ready.created ? 0 : to.ready.size - size,
      dryRun,
      full,
      seconds: (performance.now() - started) / 1000,
      channel: {
        host: `${a.host} → ${b.host}`,
        bytesSent: a.bytesSent + b.bytesSent,
        bytesReceived: a.bytesReceived + b.bytesReceived,
        remoteCpuSeconds: a.remoteCpuSeconds + b.remoteCpuSeconds,
        encoding: a.encoding === b.encoding ? a.encoding : `${a.encoding}/${b.encoding}`,
        remoteNode:
          a.remoteNode === b.remoteNode ? a.remoteNode : `${a.remoteNode}/${b.remoteNode}`,
      },
    };
    if (run.interrupted) throw interrupted(result);
    return result;
  } catch (err) {
    throw connectionLost(err, dst, to?.bytesConfirmed ?? 0);
  } finally {
    await to?.close();
    await from?.close();
  }
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
    } as typeof p);
}
