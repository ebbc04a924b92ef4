/**
 * `apply(patch, target)`: write a patch into TARGET, refusing a TARGET that is not the base.
 *
 *   plan: the records to write × source: the patch's payloads × knowledge: none (each record
 *   was already checked against TARGET) → FileSink
 *
 * Each record is in one of three states on TARGET, found by hashing TARGET's bytes there:
 *   done      TARGET already holds the record's new content: skip it
 *   ready     TARGET holds the old content: write it
 *   mismatch  neither: TARGET is not the base (EBASE_MISMATCH), unless --force
 * That makes apply idempotent record by record, so a run cut short (Ctrl-C, a bad record
 * on stdin) is finished by rerunning it with the whole patch.
 *
 * Between the records, TARGET must hold what base and result share: each gap's hash list
 * (version 2 patches) is checked against TARGET's bytes there (engine/gap-check.ts), so a
 * TARGET changed outside the records is refused too, not patched into a mix.
 *
 * From a file, the whole patch is read and checked (every CRC, bound and payload hash, the
 * trailer's count and SHA-256), the gaps checked and every record's state found before the
 * first write. From
 * a stream, records are read in batches of up to STREAM_BATCH_BYTES; each batch is checked
 * the same way before it is written, and the last batch only after the trailer checked out,
 * so a patch smaller than a batch is as safe from stdin as from a file.
 */

import { open, type FileHandle } from 'node:fs/promises';
import type { Readable } from 'node:stream';
import { BlksyncError, fromSystemError } from '../errors.js';
import {
  contentHash,
  withEdges,
  RECORD_NEW_COMPRESSED,
  RECORD_OLD_COMPRESSED,
  type Compression,
  type PatchHeader,
} from '../formats/patch.js';
import { decompressPayload } from '../formats/patch-compression.js';
import { PatchReader, type Gap, type PatchRecord } from '../formats/patch-reader.js';
import { destinationSink } from '../io/destination-sink.js';
import { dropDeviceCaches } from '../io/device-cache.js';
import type { FileSink } from '../io/file-sink.js';
import { destinationTooSmall, openTarget, sameFile, type Opened } from '../io/open.js';
import { SequentialReader } from '../io/stream-source.js';
import { formatBytes } from '../size.js';
import { chunkSizeFor, DEFAULT_DEPTH } from './block-size.js';
import { checkGaps } from './gap-check.js';
import { NoTarget } from './knowledge.js';
import { runPipeline } from './pipeline.js';
import type { ProgressListener, Source } from '../types.js';

/** Payload bytes read from a stream before a batch is checked against TARGET and written. */
export const STREAM_BATCH_BYTES = 64 * 1024 * 1024;
/** TARGET reads in flight while records are checked. */
const CHECK_DEPTH = 4;

export interface ApplyOptions {
  /** Undo the patch (it must have been made with --reversible). */
  reverse?: boolean;
  /** Write records even where TARGET holds neither the old nor the new content. */
  force?: boolean;
  /** Check and report; write nothing. */
  dryRun?: boolean;
  /**
   * Check TARGET only where the records go, not between them: no full read of TARGET (a slow
   * device), at the price of patching a TARGET changed outside the records as it is.
   */
  recordsOnly?: boolean;
  signal?: AbortSignal;
  onProgress?: ProgressListener;
  chunkSize?: number;
  depth?: number;
  /** Tuning: payload bytes per batch when the patch is a stream (default STREAM_BATCH_BYTES). */
  batchBytes?: number;
}

export interface ApplyResult {
  /** The patch's path, or "-" for a stream. */
  patch: string;
  target: string;
  reverse: boolean;
  dryRun: boolean;
  /** True when TARGET already held the result: nothing was written. */
  alreadyApplied: boolean;
  blockSize: number;
  /** The size TARGET had to hold and the size it holds after (swapped by --reverse). */
  fromSize: number;
  toSize: number;
  compression: Compression;
  /** The patch's format version (1: no hashes of the bytes between the records). */
  patchVersion: number;
  records: number;
  /** Records written, skipped because already there, and written over a mismatch (--force). */
  recordsWritten: number;
  recordsAlreadyApplied: number;
  recordsForced: number;
  /** Bytes written: 0 in a dry run (as for copy), which reports them in bytesToWrite. */
  bytesWritten: number;
  /** Records and bytes TARGET did not hold yet: written, or in a dry run what would be. */
  recordsToWrite: number;
  bytesToWrite: number;
  /** Bytes of TARGET read to check the records and the bytes between them. */
  bytesRead: number;
  /**
   * True when TARGET was checked between the records too; false for a version 1 patch
   * (it has no hashes of those bytes), with --force and with --records-only.
   */
  unchangedChecked: boolean;
  /** True when a TARGET file was truncated or extended to the result size. */
  resized: boolean;
  /** True when the patch came from a stream. */
  streamed: boolean;
  seconds: number;
}

type State = 'done' | 'ready' | 'mismatch';

/** One record seen in the direction of the apply (old→new, or new→old with --reverse). */
interface Step {
  rec: PatchRecord;
  offset: number;
  fromBytes: number;
  toBytes: number;
  fromHash: Buffer;
  toHash: Buffer;
  /** Leading and trailing bytes shared by both contents: taken from TARGET, not the patch. */
  head: number;
  tail: number;
  /** Where the payload to write is stored, and how; its size unpacked. */
  toPos: number;
  toStored: number;
  toCompressed: boolean;
  toPayload: number;
  toData: Buffer | undefined;
  state: State;
  /** A mismatch whose first bytes (whole blocks, not all) hold the new content: a write cut short. */
  newPrefix?: number;
}

function stepOf(rec: PatchRecord, reverse: boolean): Step {
  const shared = {
    rec,
    offset: rec.offset,
    head: rec.head,
    tail: rec.tail,
    state: 'mismatch' as State,
  };
  return reverse
    ? {
        ...shared,
        fromBytes: rec.newBytes,
        toBytes: rec.oldBytes,
        fromHash: rec.newHash,
        toHash: rec.oldHash,
        toPos: rec.oldPos,
        toStored: rec.oldStored,
        toCompressed: (rec.flags & RECORD_OLD_COMPRESSED) !== 0,
        toPayload: rec.oldPayload,
        toData: rec.oldData,
      }
    : {
        ...shared,
        fromBytes: rec.oldBytes,
        toBytes: rec.newBytes,
        fromHash: rec.oldHash,
        toHash: rec.newHash,
        toPos: rec.newPos,
        toStored: rec.newStored,
        toCompressed: (rec.flags & RECORD_NEW_COMPRESSED) !== 0,
        toPayload: rec.newPayload,
        toData: rec.newData,
      };
}

/** A step's payload, unpacked (without the shared edges): kept from a stream, or read again. */
async function payloadOf(
  s: Step,
  header: PatchHeader,
  patch: FileHandle | undefined,
): Promise<Buffer> {
  if (s.toData !== undefined) return s.toData;
  const stored = Buffer.allocUnsafe(s.toStored);
  const { bytesRead } = await patch!.read(stored, 0, s.toStored, s.toPos);
  // the patch file was checked in full before; a difference now means it changed since
  if (bytesRead !== s.toStored) throw changedError();
  return s.toCompressed ? decompressPayload(header.compression, stored, s.toPayload) : stored;
}

/** The content to write: the payload between TARGET's shared edges (`edges`, at their places). */
function contentOf(s: Step, header: PatchHeader, payload: Buffer, edges: Buffer): Buffer {
  const data = withEdges(payload, edges, s.head, s.tail, s.toBytes);
  if (s.state !== 'mismatch' && !contentHash(data, header.blockSize).equals(s.toHash)) {
    throw new BlksyncError(
      'EPATCH_CHECKSUM',
      `the patch is corrupted: the content of the record at offset ${s.offset} does not match its hash; nothing more was written`,
    );
  }
  return data;
}

/**
 * The bytes at the start of the record (whole blocks) that TARGET already holds of its new
 * content, when that is some but not all of it: what an apply killed inside the record's
 * write leaves (the rest still old). 0 otherwise, or when the payload cannot be read.
 */
async function newPrefixOf(
  s: Step,
  header: PatchHeader,
  patch: FileHandle | undefined,
  target: Buffer,
): Promise<number> {
  if (s.toData === undefined && patch === undefined) return 0;
  const payload = await payloadOf(s, header, patch).catch(() => undefined);
  if (payload === undefined) return 0;
  const bs = header.blockSize;
  const data = withEdges(payload, target, s.head, s.tail, s.toBytes);
  let n = 0;
  while (n < s.toBytes) {
    const end = Math.min(n + bs, s.toBytes);
    if (data.compare(target, n, end, n, end) !== 0) break;
    n = end;
  }
  return n < s.toBytes ? n : 0;
}

/**
 * The records' states on TARGET, a few reads in flight; for records to write whose payload
 * leaves out shared edges, also checks the content they will make. Returns the bytes read.
 */
async function classify(
  steps: Step[],
  fh: FileHandle,
  path: string,
  header: PatchHeader,
  patch: FileHandle | undefined,
): Promise<number> {
  const blockSize = header.blockSize;
  let next = 0;
  let bytesRead = 0;
  const worker = async (): Promise<void> => {
    let buf = Buffer.alloc(0);
    for (let i = next++; i < steps.length; i = next++) {
      const s = steps[i]!;
      const want = Math.max(s.fromBytes, s.toBytes);
      if (buf.length < want) buf = Buffer.allocUnsafe(want);
      let got = 0;
      try {
        while (got < want) {
          const { bytesRead: n } = await fh.read(buf, got, want - got, s.offset + got);
          if (n === 0) break;
          got += n;
        }
      } catch (err) {
        throw fromSystemError('EREAD', 'cannot read', path, err);
      }
      bytesRead += got;
      if (got >= s.toBytes && contentHash(buf.subarray(0, s.toBytes), blockSize).equals(s.toHash))
        s.state = 'done';
      else if (
        got >= s.fromBytes &&
        contentHash(buf.subarray(0, s.fromBytes), blockSize).equals(s.fromHash)
      ) {
        s.state = 'ready';
        if (s.head > 0 || s.tail > 0) contentOf(s, header, await payloadOf(s, header, patch), buf);
      } else {
        s.state = 'mismatch';
        if (got >= s.toBytes) s.newPrefix = await newPrefixOf(s, header, patch, buf);
      }
    }
  };
  await Promise.all(Array.from({ length: CHECK_DEPTH }, worker));
  return bytesRead;
}

/** Serves the content of the steps to write as a Source, making each record's once. */
class StepSource implements Source {
  readonly size: number;
  readonly #steps: Step[];
  readonly #header: PatchHeader;
  readonly #patch: FileHandle | undefined;
  readonly #target: FileHandle;
  readonly #cache = new Map<number, Promise<Buffer>>();

  constructor(
    steps: Step[],
    header: PatchHeader,
    size: number,
    patch: FileHandle | undefined,
    target: FileHandle,
  ) {
    this.#steps = steps;
    this.#header = header;
    this.size = size;
    this.#patch = patch;
    this.#target = target;
  }

  #find(offset: number): number {
    let lo = 0;
    let hi = this.#steps.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.#steps[mid]!.offset <= offset) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  async #content(i: number): Promise<Buffer> {
    const s = this.#steps[i]!;
    const payload = await payloadOf(s, this.#header, this.#patch);
    const edges = Buffer.allocUnsafe(s.head > 0 || s.tail > 0 ? s.toBytes : 0);
    // the edges are read before this record is written: the pipeline writes in order
    for (const [at, n] of [
      [0, s.head],
      [s.toBytes - s.tail, s.tail],
    ] as const) {
      if (n === 0) continue;
      const { bytesRead } = await this.#target.read(edges, at, n, s.offset + at);
      if (bytesRead !== n) throw changedError();
    }
    return contentOf(s, this.#header, payload, edges);
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const i = this.#find(offset);
    let p = this.#cache.get(i);
    if (p === undefined) {
      p = this.#content(i);
      p.catch(() => {});
      this.#cache.set(i, p);
      for (const k of this.#cache.keys()) if (k < i - 1) this.#cache.delete(k);
    }
    const data = await p;
    const at = offset - this.#steps[i]!.offset;
    return data.copy(buf, 0, at, Math.min(at + length, data.length));
  }

  async close(): Promise<void> {}
}

function changedError(): BlksyncError {
  return new BlksyncError(
    'EPATCH_CHECKSUM',
    'the patch file or TARGET changed while being applied; rerun the same command',
  );
}

/** Whether earlier batches of a stream were written (a dry run writes none). */
function wroteBefore(result: ApplyResult): boolean {
  return result.recordsWritten > 0 && !result.dryRun;
}

function mismatchError(
  steps: Step[],
  target: string,
  reverse: boolean,
  result: ApplyResult,
): BlksyncError {
  const bad = steps.filter((s) => s.state === 'mismatch');
  const first = bad[0]!;
  const what = reverse ? 'the result of this patch' : 'the base this patch was made from';
  const applied = wroteBefore(result)
    ? ` (${result.recordsWritten} records, ${formatBytes(result.bytesWritten)}, were written before this batch)`
    : '; nothing was written';
  // every mismatch begins with its new content: a write cut short (kill -9, a crash) inside it
  const torn = bad.every((s) => (s.newPrefix ?? 0) > 0);
  const advice = torn
    ? `; ${bad.length === 1 ? 'it begins' : 'each begins'} with the patch's new content (first ${bad[0]!.newPrefix} bytes) and has other bytes after, as an apply killed while writing leaves it: if that is what happened, rerun with --force to finish`
    : '; check TARGET, or use --force to write anyway';
  return new BlksyncError(
    'EBASE_MISMATCH',
    `${target} is not ${what}: ${bad.length} of ${steps.length} records find other content ` +
      `(first at offset ${first.offset})${applied}${advice}`,
    { path: target, partial: result },
  );
}

interface Run {
  header: PatchHeader;
  target: Opened;
  sink: FileSink | undefined;
  result: ApplyResult;
  options: ApplyOptions;
}

/**
 * Checks TARGET in the gaps before each step (and in `last`, the gap after the last record)
 * against the patch's hashes: refused with EBASE_MISMATCH when it holds other bytes there.
 */
async function checkUnchanged(run: Run, steps: Step[], last: Gap | undefined): Promise<void> {
  const { header, target, result, options } = run;
  if (!result.unchangedChecked) return;
  const gaps = steps.map((s) => ({ start: s.rec.gapStart, end: s.offset, hash: s.rec.gapHash! }));
  if (last !== undefined) gaps.push(last);
  const applied = wroteBefore(result)
    ? `; ${result.recordsWritten} records, ${formatBytes(result.bytesWritten)}, were written before this batch`
    : '; nothing was written';
  let check: Awaited<ReturnType<typeof checkGaps>>;
  try {
    check = await checkGaps(
      gaps,
      { fh: target.fh, path: target.path, size: target.size, file: target.kind === 'file' },
      header,
      {
        signal: options.signal,
        onProgress:
          options.onProgress && ((p) => options.onProgress!({ ...p, phase: 'checking TARGET' })),
      },
    );
  } catch (err) {
    // from a stream, earlier batches may have been written: say so, and carry what they did
    if (err instanceof BlksyncError && err.code === 'EINTERRUPTED') {
      throw new BlksyncError(
        'EINTERRUPTED',
        `${err.message}${applied}; rerun the same command${wroteBefore(result) ? ' to finish' : ''}`,
        // a summary of what was written; none ("wrote 0 of N records") when nothing was
        { cause: err, ...(wroteBefore(result) && { partial: result }) },
      );
    }
    throw err;
  }
  result.bytesRead += check.bytesRead;
  if (check.differing.length === 0) return;
  const first = check.differing[0]!;
  const what =
    options.reverse === true ? 'the result of this patch' : 'the base this patch was made from';
  throw new BlksyncError(
    'EBASE_MISMATCH',
    `${target.path} is not ${what}: outside the patch's records it holds other bytes, ` +
      `in ${check.differing.length} of ${gaps.length} unchanged stretches (first between offsets ${first.start} and ${first.end})${applied}; ` +
      `it was changed since it held the base, or is another image: find the differences with blksync compare, or use --force to write the records anyway`,
    { path: target.path, partial: result },
  );
}

/** Checks the steps against TARGET and writes those that need it. */
async function applySteps(
  run: Run,
  steps: Step[],
  patchFh: FileHandle | undefined,
  classified = false,
): Promise<void> {
  const { header, target, result, options } = run;
  if (!classified) {
    await checkUnchanged(run, steps, undefined);
    result.bytesRead += await classify(steps, target.fh, target.path, header, patchFh);
  }
  if (options.force !== true && steps.some((s) => s.state === 'mismatch')) {
    throw mismatchError(steps, target.path, options.reverse === true, result);
  }
  const todo = steps.filter((s) => s.state !== 'done' && s.toBytes > 0);
  for (const s of steps) {
    if (s.state === 'done') result.recordsAlreadyApplied++;
    else if (s.state === 'mismatch') result.recordsForced++;
  }
  if (todo.length === 0) return;
  result.recordsToWrite += todo.length;
  result.bytesToWrite += todo.reduce((n, s) => n + s.toBytes, 0);
  // a dry run reports what it would write (in the ToWrite counts), and writes nothing
  if (options.dryRun === true) return;
  const chunkSize = chunkSizeFor(header.blockSize, options.chunkSize);
  const out = await runPipeline(
    {
      imageSize: Math.max(header.baseSize, header.resultSize),
      ranges: todo.map((s) => ({ start: s.offset, end: s.offset + s.toBytes })),
    },
    new StepSource(todo, header, result.toSize, patchFh, target.fh),
    new NoTarget(),
    [run.sink!],
    {
      blockSize: header.blockSize,
      chunkSize,
      depth: options.depth ?? DEFAULT_DEPTH,
      signal: options.signal,
      onProgress: options.onProgress,
    },
  );
  result.bytesWritten += out.bytesWritten;
  if (out.interrupted) {
    throw new BlksyncError(
      'EINTERRUPTED',
      `interrupted after writing ${formatBytes(result.bytesWritten)}; rerun the same command to finish`,
      { partial: result },
    );
  }
  result.recordsWritten += todo.length;
}

/**
 * Applies a patch to TARGET. `patch` is a path or a stream (stdin). Throws EBASE_MISMATCH
 * when TARGET is not the base (nothing written), EPATCH_* when the patch is damaged; returns
 * with `alreadyApplied` when TARGET holds the result already.
 */
export async function apply(
  patch: string | Readable,
  target: string,
  options: ApplyOptions = {},
): Promise<ApplyResult> {
  const started = performance.now();
  const reverse = options.reverse === true;
  const dryRun = options.dryRun === true;
  const patchName = typeof patch === 'string' ? patch : '-';
  options.signal?.throwIfAborted();

  let patchFh: FileHandle | undefined;
  /** A patch named by a path that is no regular file (a FIFO, /dev/stdin): read once, as stdin. */
  let pipeFh: FileHandle | undefined;
  if (typeof patch === 'string') {
    try {
      patchFh = await open(patch, 'r');
      if (!(await patchFh.stat()).isFile()) [pipeFh, patchFh] = [patchFh, undefined];
    } catch (err) {
      await patchFh?.close();
      throw fromSystemError('ESRC_OPEN', 'cannot open the patch', patch, err);
    }
  }
  const streamed = patchFh === undefined;
  const input =
    typeof patch !== 'string'
      ? new SequentialReader(patch, '-')
      : pipeFh !== undefined
        ? new SequentialReader(pipeFh.createReadStream({ autoClose: false }), patch)
        : SequentialReader.fromFile(patch);
  const reader = new PatchReader(input);
  let t: Opened | undefined;
  let sink: FileSink | undefined;
  try {
    const header = await reader.header();
    if (reverse && !header.reversible) {
      throw new BlksyncError(
        'EPATCH_NOT_REVERSIBLE',
        `the patch ${patchName} was made without --reversible: it holds no old content to restore`,
      );
    }
    const found = await openTarget(target, { readOnly: dryRun });
    if (found.fh === undefined) {
      throw new BlksyncError(
        'EDEST_MISSING',
        `${target} does not exist; apply writes into an existing copy of the base`,
        {
          path: target,
        },
      );
    }
    t = found;
    // what TARGET's cache (or a device's under it) holds may be older than the device
    if (t.kind === 'block-device') await dropDeviceCaches(t.fh.fd, t.stats.rdev);
    if (patchFh !== undefined && sameFile(await patchFh.stat(), t.stats)) {
      throw new BlksyncError('ESAME_FILE', `${patchName} and ${target} are the same file`, {
        path: target,
      });
    }
    const fromSize = reverse ? header.resultSize : header.baseSize;
    const toSize = reverse ? header.baseSize : header.resultSize;
    if (t.kind === 'block-device' && t.size < Math.max(fromSize, toSize)) {
      throw destinationTooSmall(
        target,
        t.kind,
        t.size,
        Math.max(fromSize, toSize),
        'the patch needs',
      );
    }
    // a file ends resized to the result; one whose size is not between base and result (where
    // a run cut short while the file grew leaves it) is not the base, even when no record says so
    if (
      t.kind === 'file' &&
      (t.size < Math.min(fromSize, toSize) || t.size > Math.max(fromSize, toSize)) &&
      options.force !== true
    ) {
      throw new BlksyncError(
        'EBASE_MISMATCH',
        `${target} is ${t.size} bytes but the ${reverse ? 'result of this patch' : 'base this patch was made from'} ` +
          `is ${fromSize} bytes; nothing was written; check TARGET, or use --force to write anyway`,
        { path: target },
      );
    }
    if (!dryRun) sink = destinationSink(t.fh, target, t.kind);
    const result: ApplyResult = {
      patch: patchName,
      target,
      reverse,
      dryRun,
      alreadyApplied: false,
      blockSize: header.blockSize,
      fromSize,
      toSize,
      compression: header.compression,
      patchVersion: header.version,
      records: 0,
      recordsWritten: 0,
      recordsAlreadyApplied: 0,
      recordsForced: 0,
      bytesWritten: 0,
      recordsToWrite: 0,
      bytesToWrite: 0,
      bytesRead: 0,
      unchangedChecked:
        header.version > 1 && options.force !== true && options.recordsOnly !== true,
      resized: false,
      streamed,
      seconds: 0,
    };
    const run: Run = { header, target: t, sink, result, options };

    // read and check records; from a file all of them before writing, from a stream by batches
    let batch: Step[] = [];
    let batchBytes = 0;
    for (;;) {
      options.signal?.throwIfAborted();
      let rec: PatchRecord | undefined;
      try {
        rec = await reader.next(streamed ? 'keep' : 'verify');
      } catch (err) {
        if (wroteBefore(result) && err instanceof BlksyncError) {
          throw new BlksyncError(
            err.code,
            `${err.message}. ${result.recordsWritten} records (${formatBytes(result.bytesWritten)}) were applied before; ` +
              'rerun with the complete patch to finish',
            { cause: err, partial: result },
          );
        }
        throw err;
      }
      if (rec === undefined) break;
      result.records++;
      batch.push(stepOf(rec, reverse));
      batchBytes += rec.newBytes + (header.reversible ? rec.oldBytes : 0);
      if (streamed && batchBytes >= (options.batchBytes ?? STREAM_BATCH_BYTES)) {
        await applySteps(run, batch, undefined);
        batch = [];
        batchBytes = 0;
      }
    }
    const nothingYet = result.recordsWritten === 0 && result.recordsForced === 0;
    // the last batch (from a file: all records) is checked first, so "already applied" is known
    await checkUnchanged(run, batch, reader.lastGap);
    result.bytesRead += await classify(batch, t.fh, target, header, patchFh);
    const needResize = t.kind === 'file' && t.size !== toSize;
    if (nothingYet && !needResize && batch.every((s) => s.state === 'done')) {
      result.alreadyApplied = true;
      result.recordsAlreadyApplied += batch.length;
    } else {
      await applySteps(run, batch, patchFh, true);
      if (needResize && !dryRun) {
        try {
          await sink!.finish();
          await t.fh.truncate(toSize);
          await t.fh.sync();
        } catch (err) {
          throw fromSystemError('EWRITE', 'cannot resize', target, err);
        }
        result.resized = true;
      } else if (needResize) result.resized = true;
    }
    await sink?.finish();
    result.seconds = (performance.now() - started) / 1000;
    return result;
  } catch (err) {
    if (options.signal?.aborted === true && !(err instanceof BlksyncError)) {
      throw new BlksyncError('EINTERRUPTED', 'interrupted; rerun the same command to finish', {
        cause: err,
      });
    }
    throw err;
  } finally {
    await sink?.finish().catch(() => {});
    input.close();
    await t?.fh.close();
    await patchFh?.close();
    await pipeFh?.close();
  }
}
