/**
 * What `copy` reads: turns the SRC argument and the bmap options into the pipeline's Source
 * and Plan.
 *
 *   SRC:   a file or block device   → FileSource (reads by offset)
 *          the same, compressed     → decoder (by magic bytes) → SequentialSource
 *          "-" (stdin)              → FileSource when stdin is a file, else as a stream
 *          http(s)://...            → GET → [decoder] → SequentialSource
 *   bmap:  --bmap FILE|URL, or found beside SRC as bmaptool finds it (find-bmap.ts);
 *          --no-bmap: none
 *   Plan:  the bmap's mapped ranges, or the whole image
 *   Source is wrapped in a VerifyingSource when the bmap has range checksums.
 *   container (zip, tar, Android sparse, qcow2, ...; by magic, also inside a compressed
 *   stream): decoded by containers/open.ts, or refused; --raw: SRC as it is
 *
 * The image size comes from the bmap, the file, Content-Length, or for a compressed local
 * file without a bmap from one decoding pass that only counts bytes.
 */

import type { Stats } from 'node:fs';
import { fstat } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { Readable } from 'node:stream';
import { promisify } from 'node:util';
import { BlksyncError, fromSystemError } from '../errors.js';
import type { Bmap } from '../formats/bmap.js';
import {
  decompress,
  decompressedSize,
  detectCompression,
  type Compression,
  type Decoder,
} from '../io/decompress.js';
import { addressSpaceLimited } from '../io/address-space.js';
import { FileSource } from '../io/file-source.js';
import { openSource, sameFile, type Opened } from '../io/open.js';
import { SequentialSource, type WrongEnd } from '../io/sequential-source.js';
import { checkUrl, isUrl, isWebPage } from '../io/url.js';
import {
  CONTAINER_HEAD_BYTES,
  CONTAINER_TAIL_BYTES,
  detectContainer,
  type Detected,
} from '../containers/detect.js';
import type { OpenedContainer } from '../containers/open.js';
import { checksAtEnd, ReadsToEnd, refuseVhdFooterAtEnd } from '../containers/stream-end.js';
import type { VerifiedRange } from './bmap-verify.js';
import { intersectRanges, type Range, rangesBytes } from '../ranges.js';
import { findBmap, signatureFlagsGiven, type FoundBmap } from './find-bmap.js';
import { gapMustBeZero, refuseDataInUnmapped, unmappedOf } from './bmap-unmapped.js';
import { wholeImagePlan } from './pipeline.js';
import type {
  BmapReport,
  CopySource,
  CopySourceOptions,
  UnmappedCleared,
} from './copy-source-types.js';

export type { BmapReport, CopySource, CopySourceOptions } from './copy-source-types.js';
import type { Plan, Sink, Source } from '../types.js';

/**
 * What only a bmap copy needs (saxes, koffi, hashing workers), loaded only then: a plain copy
 * starts faster without them.
 */
async function bmapModules() {
  const [formats, verify, sparse] = await Promise.all([
    import('../formats/bmap.js'),
    import('./bmap-verify.js'),
    import('../io/sparse-map.js'),
  ]);
  return { ...formats, ...verify, ...sparse };
}

/** Mapped bytes from which range checksums are computed on worker threads. */
export const WORKER_HASHING_MIN_BYTES = 64 * 1024 * 1024;
/**
 * Worker threads hashing ranges: one per core but one, left for reading and writing, at
 * most two (more ranges in memory buy little); none on 2 cores, where the main thread hashes.
 * There a range's hash is one sequential stream whichever thread runs it, and the main
 * thread has little else to do (the reads run on libuv's pool): a bmap copy of the realistic
 * pair (272 MiB mapped, `npm run bench -- realistic`) took the same wall time with one worker
 * as with none (0.32 s, `perf stat -r 12`), and 15–30% more CPU (455–519 ms against
 * 363–397 ms): the worker's start (~30 ms) and two threads contending for 2 cores. On 2
 * cores one worker had copied a raw 300 MiB-mapped image as fast as two, with 15% less CPU.
 * None under `ulimit -v` either, where a worker's start could abort the process
 * (io/address-space.ts).
 */
const HASH_WORKERS =
  availableParallelism() > 2 && !addressSpaceLimited()
    ? Math.min(2, availableParallelism() - 1)
    : 0;

/** Reads the first bytes of a stream and gives back a stream that still starts with them. */
async function peek(stream: Readable, n: number): Promise<{ head: Buffer; rest: Readable }> {
  const it = stream[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  const seen: Buffer[] = [];
  let have = 0;
  while (have < n) {
    const r = await it.next();
    if (r.done === true) break;
    seen.push(r.value);
    have += r.value.length;
  }
  async function* replay(): AsyncGenerator<Buffer> {
    yield* seen;
    for (;;) {
      const r = await it.next();
      if (r.done === true) return;
      yield r.value;
    }
  }
  const rest = Readable.from(replay(), { objectMode: false });
  rest.on('close', () => stream.destroy());
  return { head: Buffer.concat(seen).subarray(0, n), rest };
}

function verifiedRanges(
  bmap: Bmap,
  rangeEnd: (b: Bmap, r: Bmap['ranges'][number]) => number,
): VerifiedRange[] {
  const out: VerifiedRange[] = [];
  for (const r of bmap.ranges) {
    if (r.checksum === undefined) continue;
    out.push({
      start: r.first * bmap.blockSize,
      end: rangeEnd(bmap, r),
      checksum: r.checksum,
      label: r.first === r.last ? `block ${r.first}` : `blocks ${r.first}-${r.last}`,
    });
  }
  return out;
}

function unknownSize(src: string, bmapHint: boolean): BlksyncError {
  return new BlksyncError(
    'EUSAGE',
    `the size of the image in ${src} is not known before reading it all; give ` +
      (bmapHint ? 'its bmap (--bmap FILE), ' : '') +
      'its size (--size BYTES), or decompress it to a file first',
    { path: src },
  );
}

/**
 * --size names an image: a size of nothing would copy nothing and, with no read to meet the
 * stream's end, never see that the stream holds more (exit 0 on an empty DST).
 */
function checkGivenSize(size: number | undefined): void {
  if (size === undefined) return;
  if (!Number.isSafeInteger(size) || size <= 0) {
    throw new BlksyncError(
      'EUSAGE',
      `--size ${size} is not an image size; give the image's size in bytes (more than 0), or leave --size out`,
    );
  }
}

/**
 * A stream whose size was taken from its bmap (nothing else knew it: a pipe, a compressed
 * stream) must end exactly there: one that ends before or holds more is another image, which
 * a copy of the bmap's ranges would silently cut or pad.
 */
function bmapSizeWrong(bmapPath: string, bmap: Bmap, name: string): WrongEnd {
  return (ended) =>
    new BlksyncError(
      'EBMAP_MISMATCH',
      `${bmapPath} describes an image of ${bmap.imageSize} bytes but ${name} ` +
        (ended !== undefined ? `ended after ${ended} bytes` : 'holds more') +
        '; the bmap belongs to another image (pass the right one with --bmap, or --no-bmap), or the stream was cut short',
      { path: bmapPath },
    );
}

/** Opens SRC for `copy`: see the file header. */
export async function openCopySource(
  src: string,
  options: CopySourceOptions = {},
): Promise<CopySource> {
  if (isUrl(src)) checkUrl(src);
  checkGivenSize(options.size);
  if (
    isUrl(src) &&
    options.destination !== undefined &&
    options.bmap === undefined &&
    options.noBmap !== true &&
    signatureFlagsGiven(options).length === 0
  ) {
    const published = await openPublishedSource(src, options.destination, options);
    if (published !== undefined) return published;
  }
  // a bmap copy hashes on workers: they boot while the bmap is checked and parsed
  let verify: Promise<typeof import('./bmap-verify.js')> | undefined;
  try {
    const found = await findBmap(src, {
      ...options,
      onBmapFound: () => {
        verify ??= import('./bmap-verify.js').then((m) => {
          m.prestartDigestWorkers(HASH_WORKERS);
          return m;
        });
      },
    });
    if (found === undefined) refuseBmapOnlyFlags(options);
    return await openFound(src, options, found);
  } finally {
    // those no VerifyingSource took (no checksums, a small image, a bad bmap or signature):
    // an idle worker left running would keep the process from exiting
    await verify?.then(
      (m) => m.stopIdleDigestWorkers(),
      () => {},
    );
  }
}

/**
 * Options that only turn off a bmap's checks do nothing without a bmap: refused, as the
 * signature options are (find-bmap.ts), rather than accepted and ignored.
 */
function refuseBmapOnlyFlags(options: CopySourceOptions): void {
  const given = [
    options.noVerifyChecksums === true ? '--no-verify-checksums' : undefined,
    options.noSigVerify === true ? '--no-sig-verify' : undefined,
  ].filter((o) => o !== undefined);
  if (given.length === 0) return;
  throw new BlksyncError(
    'EUSAGE',
    `${given.join(' and ')} ${given.length > 1 ? 'turn' : 'turns'} off a bmap's checks, but no bmap is used${options.noBmap === true ? ' (--no-bmap)' : ''}; leave ${given.length > 1 ? 'them' : 'it'} out`,
  );
}

/** SRC published beside its URL (`blksync publish`): only the chunks DST lacks are fetched. */
async function openPublishedSource(
  src: string,
  destination: string,
  options: CopySourceOptions,
): Promise<CopySource | undefined> {
  const { openPublished } = await import('../delta/published-source.js');
  const p = await openPublished(src, {
    destination,
    signal: options.signal,
    timeout: options.timeout,
    raw: options.raw,
    onWarning: options.onWarning,
    onHashed: (bytesScanned, bytesTotal) =>
      options.onProgress?.({
        bytesScanned,
        bytesTotal,
        bytesDiffering: 0,
        bytesWritten: 0,
        phase: 'hashing DST',
      }),
  });
  if (p === undefined) return undefined;
  if (options.size !== undefined && options.size !== p.size) {
    // as for any source whose size is known: a --size that says otherwise is not taken
    await p.source.close();
    throw new BlksyncError(
      'EUSAGE',
      `--size ${options.size} contradicts the size ${p.size} of ${src} (as published)`,
    );
  }
  return {
    path: src,
    kind: 'url',
    compression: undefined,
    size: p.size,
    source: p.source,
    plan: p.plan,
    bmap: undefined,
    checksums: undefined,
    container: undefined,
    file: undefined,
    opened: undefined,
    watched: undefined,
    sameAs: () => false,
    wrapFileSink: (sink) => sink,
    unmappedData: () => undefined,
    unmappedCleared: () => undefined,
    adviseTarget: () => {},
    delta: () => p.report(),
    checkTarget: (stats) => p.checkTarget(stats),
    close: () => p.source.close(),
  };
}

async function openFound(
  src: string,
  options: CopySourceOptions,
  found: Awaited<ReturnType<typeof findBmap>>,
): Promise<CopySource> {
  const bmap = found?.bmap;
  if (bmap !== undefined && options.size !== undefined && options.size !== bmap.imageSize) {
    // whatever SRC is, its size is the bmap's: a --size that says otherwise is not taken
    throw new BlksyncError(
      'EUSAGE',
      `--size ${options.size} contradicts the image size ${bmap.imageSize} in ${found!.path}; give the right one, or leave --size out`,
    );
  }
  const lib = bmap === undefined ? undefined : await bmapModules();
  const cleanups: (() => void | Promise<void>)[] = [];
  const closeAll = async (): Promise<void> => {
    for (const c of cleanups.reverse()) await c();
    cleanups.length = 0;
  };
  try {
    let kind: CopySource['kind'];
    let compression: Compression | undefined;
    let size = -1;
    let source: Source;
    let sameAs: (st: Stats) => boolean = () => false;
    let file: Opened | undefined;
    let opened: Opened | undefined;
    let watched: FileHandle | undefined;
    let container: OpenedContainer | undefined;
    const decode = async (
      how: (m: typeof import('../containers/open.js')) => Promise<OpenedContainer>,
    ): Promise<OpenedContainer> => {
      const c = await how(await import('../containers/open.js'));
      cleanups.push(() => c.close());
      container = c;
      return c;
    };
    const detect = (head: Buffer, tail?: Buffer): Detected | undefined =>
      options.raw === true ? undefined : detectContainer(head, tail);
    // a fixed VHD shows only at its end, which a stream reaches last: checked there
    const rawStream = (s: AsyncIterable<Buffer>, name: string): AsyncIterable<Buffer> =>
      options.raw === true ? s : refuseVhdFooterAtEnd(s, name);
    // the image's size was taken from the bmap alone: the stream is read to its end (past the
    // last mapped range) to check that it ends there
    let sizeFromBmap = false;
    // a bmap's unmapped areas must read as zeros (engine/bmap-unmapped.ts): a stream's gaps
    // are checked as they pass, a raw file's (rawFh) before the copy
    const gapCheck =
      bmap === undefined
        ? undefined
        : gapMustBeZero({ image: src === '-' ? 'stdin' : src, bmap: found!.path });
    let rawFh: FileHandle | undefined;

    const streamed = async (
      stream: Readable,
      head: Buffer,
      name: string,
      sizeHint: number | undefined,
    ): Promise<Source> => {
      let s = stream;
      if (compression !== undefined) {
        const d: Decoder = decompress(stream, compression, name);
        cleanups.push(() => d.stop());
        // a tar (or other container) inside: recognised in the decoded bytes
        ({ head, rest: s } = await peek(d.output, CONTAINER_HEAD_BYTES));
        sizeHint = undefined;
      } else {
        cleanups.push(() => void stream.destroy());
      }
      const detected = detect(head);
      const c =
        detected === undefined
          ? undefined
          : await decode((m) => m.openContainerStream(s, name, detected, options));
      if (c !== undefined) sizeHint = c.size;
      const given = options.size;
      const known = bmap?.imageSize ?? sizeHint;
      if (given !== undefined && known !== undefined && known !== given) {
        throw new BlksyncError(
          'EUSAGE',
          `--size ${given} contradicts the size ${known} of ${name}`,
        );
      }
      size = known ?? given ?? -1;
      if (size < 0) throw unknownSize(name, options.noBmap !== true);
      if (bmap !== undefined && sizeHint !== undefined)
        lib!.checkBmapMatches(bmap, sizeHint, found!.path, name);
      if (c !== undefined) return c.source(size);
      // a size taken on trust is checked: the stream must end exactly there
      sizeFromBmap = bmap !== undefined && sizeHint === undefined;
      return new SequentialSource(
        rawStream(s, name),
        size,
        name,
        undefined,
        sizeFromBmap ? bmapSizeWrong(found!.path, bmap!, name) : known === undefined,
        gapCheck,
      );
    };

    if (options.stream !== undefined) {
      kind = 'stream';
      const { head, rest } = await peek(options.stream, CONTAINER_HEAD_BYTES);
      compression = detectCompression(head);
      source = await streamed(rest, head, src, undefined);
    } else if (isUrl(src)) {
      kind = 'url';
      const { bodyStream, httpOpenOk } = await import('../io/http-source.js');
      const res = await httpOpenOk(src, options);
      const type = res.body.headers['content-type'];
      if (isWebPage(type) && options.raw !== true) {
        // a "not found" page sent with 200 would otherwise be written over DST's first blocks
        res.body.resume();
        throw new BlksyncError(
          'ESRC_HTTP',
          `${src}: the server answered a web page (Content-Type ${JSON.stringify(type)}), not an image: check the URL (--raw writes what it sends)`,
          { path: src },
        );
      }
      const body = bodyStream(res);
      // destroyed directly: the peeked stream's destroy waits for a pending read that a
      // stalled connection never completes
      cleanups.push(() => void body.destroy());
      const { head, rest } = await peek(body, CONTAINER_HEAD_BYTES);
      compression = detectCompression(head);
      source = await streamed(rest, head, src, res.length);
    } else if (src === '-') {
      kind = 'stdin';
      const st = await promisify(fstat)(0);
      if (st.isFile()) {
        // `< image`: a file after all, read by offset
        const fh = await open('/dev/stdin', 'r');
        cleanups.push(() => fh.close());
        watched = fh;
        ({ compression, size, source } = await fromFile(fh, 'stdin', st.size));
        sameAs = (other) => sameFile(st, other);
      } else {
        cleanups.push(() => void process.stdin.destroy());
        const { head, rest } = await peek(process.stdin, CONTAINER_HEAD_BYTES);
        compression = detectCompression(head);
        source = await streamed(rest, head, 'stdin', undefined);
      }
    } else {
      const o = await openSource(src, { onWarning: options.onWarning });
      cleanups.push(() => o.fh.close());
      opened = o;
      watched = o.fh;
      kind = o.kind;
      ({ compression, size, source } = await fromFile(o.fh, src, o.size));
      sameAs = (other) => sameFile(o.stats, other);
      if (compression === undefined && container === undefined) file = o;
    }

    // a file or device read by offset: raw, or decoded by a spawned decoder
    async function fromFile(
      fh: FileHandle,
      name: string,
      fileSize: number,
    ): Promise<{ compression: Compression | undefined; size: number; source: Source }> {
      const head = Buffer.alloc(Math.min(CONTAINER_HEAD_BYTES, fileSize));
      const { bytesRead } = await fh.read(head, 0, head.length, 0);
      const comp = detectCompression(head.subarray(0, bytesRead));
      // each decoder gets its own descriptor: a spawned one reads from the file offset
      const path = name === 'stdin' ? '/dev/stdin' : name;
      if (comp === undefined) {
        const tail = Buffer.alloc(fileSize >= CONTAINER_TAIL_BYTES ? CONTAINER_TAIL_BYTES : 0);
        await fh.read(tail, 0, tail.length, fileSize - tail.length);
        const detected = detect(head.subarray(0, bytesRead), tail);
        const c =
          detected === undefined
            ? undefined
            : await decode((m) =>
                m.openContainerFile(
                  fh,
                  // a spawned qemu-img has its own stdin: it opens ours by this process's fd
                  name === 'stdin' ? `/proc/${process.pid}/fd/0` : path,
                  name,
                  fileSize,
                  detected,
                  options,
                ),
              );
        const imageSize = c?.size ?? fileSize;
        if (bmap !== undefined) lib!.checkBmapMatches(bmap, imageSize, found!.path, name);
        if (c === undefined) rawFh = fh;
        if (options.size !== undefined && options.size !== imageSize) {
          throw new BlksyncError(
            'EUSAGE',
            `--size ${options.size} contradicts the size ${imageSize} of ${name}`,
          );
        }
        return {
          compression: comp,
          size: imageSize,
          source: c?.source(imageSize) ?? new FileSource(fh, name, fileSize, false),
        };
      }
      const decodeFh = await open(path, 'r');
      cleanups.push(() => decodeFh.close());
      const d = decompress(decodeFh.fd, comp, name);
      cleanups.push(() => d.stop());
      const decoded = await peek(d.output, CONTAINER_HEAD_BYTES);
      const detected = detect(decoded.head);
      if (detected !== undefined) {
        // a container's size is in its headers: no counting pass
        const c = await decode((m) => m.openContainerStream(decoded.rest, name, detected, options));
        const imageSize = c.size ?? bmap?.imageSize ?? options.size;
        if (imageSize === undefined) throw unknownSize(name, false);
        if (bmap !== undefined) lib!.checkBmapMatches(bmap, imageSize, found!.path, name);
        return { compression: comp, size: imageSize, source: c.source(imageSize) };
      }
      // with --size and no bmap, the counting pass is skipped and the stream checked at its end
      let imageSize = bmap?.imageSize ?? options.size;
      const onTrust = bmap === undefined && options.size !== undefined;
      if (imageSize === undefined) {
        const counting = await open(path, 'r');
        try {
          imageSize = await decompressedSize(counting.fd, comp, name);
        } finally {
          await counting.close();
        }
      }
      sizeFromBmap = bmap !== undefined;
      return {
        compression: comp,
        size: imageSize,
        source: new SequentialSource(
          rawStream(decoded.rest, name),
          imageSize,
          name,
          undefined,
          sizeFromBmap ? bmapSizeWrong(found!.path, bmap!, name) : onTrust,
          gapCheck,
        ),
      };
    }

    let bmapped: BmapSourcing | undefined;
    if (found !== undefined) {
      // a file is read by offset: large ranges can be verified before they are copied
      const b = await bmapSourcing(found, source, src, {
        noVerifyChecksums: options.noVerifyChecksums,
        rereadable: source instanceof FileSource,
        signal: options.signal,
      });
      cleanups.push(() => b.close());
      bmapped = b;
      if (rawFh !== undefined) {
        let data;
        try {
          data = lib!.mappedRanges(rawFh, size, 1, src);
        } catch {
          data = [{ start: 0, end: size }]; // no SEEK_DATA: every byte is read
        }
        b.report.unmappedBytesChecked = await refuseDataInUnmapped(
          rawFh,
          unmappedOf(b.plan.ranges, size),
          data,
          { image: src, bmap: found.path },
          options.signal,
        );
      }
      const planEnd = b.plan.ranges.at(-1)?.end ?? 0;
      if ((container !== undefined || sizeFromBmap) && checksAtEnd(source) && planEnd < size) {
        // a container streamed, or a stream sized by its bmap: what only its end tells is
        // checked all the same
        b.source = new ReadsToEnd(b.source, source, planEnd);
      }
    }
    if (options.entry !== undefined) {
      const c = container?.report;
      if (c?.format !== 'zip' && c?.format !== 'tar') {
        throw new BlksyncError(
          'EUSAGE',
          `--entry names a file inside a zip or tar SRC; ${src} is ${options.raw === true ? 'written as it is (--raw)' : c === undefined ? 'no archive' : `a ${c.name}`}`,
        );
      }
    }
    const defined =
      container?.only ?? (options.skipDontCare === true ? container?.defined : undefined);
    return {
      path: src,
      kind,
      compression,
      container: container?.report,
      size: size,
      source: bmapped?.source ?? source,
      plan:
        bmapped?.plan ??
        (defined !== undefined ? { imageSize: size, ranges: defined } : wholeImagePlan(size)),
      bmap: bmapped?.report,
      checksums: bmapped?.checksums,
      file,
      opened,
      watched,
      sameAs,
      adviseTarget: (fd) => bmapped?.adviseTarget(fd),
      unmappedData: (fh, path) => bmapped?.unmappedData(fh, path),
      unmappedCleared: (fh) => bmapped?.unmappedCleared(fh),
      holdWrites: bmapped?.holdWrites,
      wrapFileSink: (sink, fh, path) => bmapped?.wrapFileSink(sink, fh, path) ?? sink,
      close: async () => {
        await closeAll();
      },
    };
  } catch (err) {
    await closeAll();
    throw err;
  }
}

/**
 * What a bmap adds to a copy's source, wherever the image's bytes come from (a local file or
 * stream, or a remote SRC fetched over ssh): the plan of its mapped ranges, the source wrapped
 * in a VerifyingSource when the ranges have checksums, its report, and the holes punched in
 * the unmapped areas of an existing file DST.
 */
export interface BmapSourcing {
  plan: Plan;
  source: Source;
  report: BmapReport;
  checksums: CopySource['checksums'];
  /** See CopySource.wrapFileSink. */
  wrapFileSink(sink: Sink, fh: FileHandle, path: string): Sink;
  /** See CopySource.unmappedData. */
  unmappedData(fh: FileHandle, path: string): number | undefined;
  /** See CopySource.unmappedCleared. */
  unmappedCleared(fh: FileHandle): UnmappedCleared | undefined;
  /** See CopySource.holdWrites. */
  holdWrites: (() => (sink: Sink) => Sink) | undefined;
  adviseTarget(fd: number): void;
  /** Closes the VerifyingSource (its workers and the inner source). */
  close(): Promise<void>;
}

/**
 * The bmap part of a copy's source (see BmapSourcing). The image's size must have been checked
 * against the bmap (checkBmapMatches) or taken from it. `rereadable`: `source` reads by
 * offset in any order, so ranges too large to buffer are verified before they are copied.
 */
export async function bmapSourcing(
  found: FoundBmap,
  source: Source,
  image: string,
  options: {
    noVerifyChecksums?: boolean | undefined;
    rereadable: boolean;
    /** Stops the zeros written over an unmapped area where holes cannot be punched. */
    signal?: AbortSignal | undefined;
  },
): Promise<BmapSourcing> {
  const lib = await bmapModules();
  const { bmap } = found;
  const plan: Plan = lib.bmapPlan(bmap);
  const ranges = options.noVerifyChecksums === true ? [] : verifiedRanges(bmap, lib.rangeEnd);
  let verifying: InstanceType<typeof lib.VerifyingSource> | undefined;
  let checksums: CopySource['checksums'];
  if (ranges.length > 0 && bmap.checksumType !== undefined) {
    const verifiedBytes = rangesBytes(ranges);
    verifying = new lib.VerifyingSource(source, ranges, bmap.checksumType, image, {
      prefetch: ranges.length === bmap.ranges.length,
      workerThreads: verifiedBytes >= WORKER_HASHING_MIN_BYTES ? HASH_WORKERS : 0,
      rereadable: options.rereadable,
    });
    if (ranges.length === bmap.ranges.length) {
      checksums = { units: ranges, algorithm: bmap.checksumType };
    }
  }
  const unmapped = unmappedOf(plan.ranges, plan.imageSize);
  // the unmapped areas where each DST holds data, once unmappedData has looked at it: only
  // those are punched (punching a hole into a hole still costs the kernel a walk of the
  // range). By DST: a fan-out's destinations share this sourcing
  const unmappedWithData = new WeakMap<FileHandle, Range[]>();
  // how each DST's unmapped areas were made zeros, once its copy finished
  const cleared = new WeakMap<FileHandle, UnmappedCleared>();
  const report: BmapReport = {
    path: found.path,
    version: bmap.version,
    blockSize: bmap.blockSize,
    ranges: bmap.ranges.length,
    mappedBytes: lib.mappedBytes(bmap),
    // the ranges whose checksum matched so far: an interrupted copy must not claim them all
    get rangesVerified() {
      return verifying?.verified ?? 0;
    },
    ...(found.signature !== undefined ? { signature: found.signature } : {}),
  };
  return {
    plan,
    source: verifying ?? source,
    report,
    checksums,
    adviseTarget: (fd) => lib.adviseNoReadahead(fd),
    holdWrites: verifying !== undefined ? () => verifying.holdWrites() : undefined,
    unmappedData: (fh, path) => {
      let data;
      try {
        data = lib.mappedRanges(fh, plan.imageSize, 1, path);
      } catch {
        unmappedWithData.delete(fh);
        return undefined; // the file system does not tell its holes: all are punched
      }
      const withData = intersectRanges(unmapped, data);
      unmappedWithData.set(fh, withData);
      return rangesBytes(withData);
    },
    unmappedCleared: (fh) => cleared.get(fh),
    wrapFileSink: (sink, fh, path) => {
      let done = false;
      return {
        write: (data, offset) => sink.write(data, offset),
        finish: async () => {
          if (!done) {
            done = true;
            // a copy writes only mapped ranges: what held no data there still holds none
            const ranges = unmappedWithData.get(fh) ?? unmapped;
            const punched = lib.punchHoles(fh, ranges, path);
            // a file system that cannot punch holes (ramfs, FAT, some FUSE): zeros written
            // over what is not zeros already, so DST still ends equal to the image
            const bytesZeroed = punched
              ? 0
              : await writeZerosOver(fh, ranges, path, options.signal);
            // reported per DST (copy.ts, pull.ts): a fan-out's destinations share this report
            cleared.set(fh, { punched, bytesZeroed });
          }
          await sink.finish();
        },
      };
    },
    close: async () => {
      await verifying?.close();
    },
  };
}

/** Bytes read at a time by writeZerosOver, and the blocks of them it writes zeros over. */
const ZERO_PIECE = 1024 * 1024;
const ZERO_BLOCK = 4096;

/**
 * Writes zeros over what is not zeros already in `ranges` of `fh`: read a piece at a time,
 * zeros written only over its blocks that are not zeros (flash media and the like are spared
 * writes of what already reads as zeros), neighbours in one write. Returns the bytes written.
 * Interrupted (`signal`), it stops with EINTERRUPTED: DST is not yet equal to the image there.
 */
async function writeZerosOver(
  fh: FileHandle,
  ranges: readonly Range[],
  path: string,
  signal: AbortSignal | undefined,
): Promise<number> {
  const buf = Buffer.allocUnsafe(ZERO_PIECE);
  const zeros = Buffer.alloc(ZERO_PIECE);
  let written = 0;
  try {
    for (const r of ranges) {
      for (let at = r.start; at < r.end; at += ZERO_PIECE) {
        if (signal?.aborted === true) {
          throw new BlksyncError(
            'EINTERRUPTED',
            `interrupted while writing zeros over ${path}'s unmapped areas; rerun the same command to finish`,
            { path },
          );
        }
        const want = Math.min(ZERO_PIECE, r.end - at);
        const { bytesRead } = await fh.read(buf, 0, want, at);
        // runs of blocks that are not zeros, each written over once
        let run = -1;
        for (let b = 0; b <= bytesRead; b += ZERO_BLOCK) {
          const end = Math.min(b + ZERO_BLOCK, bytesRead);
          const dirty = b < bytesRead && !buf.subarray(b, end).equals(zeros.subarray(0, end - b));
          if (dirty && run < 0) run = b;
          if (!dirty && run >= 0) {
            await fh.write(zeros, 0, b - run, at + run);
            written += b - run;
            run = -1;
          }
        }
        if (run >= 0) {
          await fh.write(zeros, 0, bytesRead - run, at + run);
          written += bytesRead - run;
        }
      }
    }
  } catch (err) {
    throw fromSystemError('EWRITE', 'cannot write zeros over the unmapped areas of', path, err);
  }
  return written;
}
