/**
 * Narrowing a plan to the chunks where SRC and DST differ, by comparing them on all cores
 * before the pipeline runs. A local copy onto a DST that already holds most of SRC (the
 * nightly update, the reflash of a device) spends its time proving chunks equal; the
 * pipeline does that through libuv's thread pool, two reads handed off per chunk and the
 * compare on the main thread, which keeps it at one core's speed. Here the main thread and
 * worker threads each read both sides of a chunk with plain `pread`s into their own aligned
 * buffers and compare them, claiming chunks from a shared counter: the loop a C program
 * would run, on every core. The pipeline then reads, compares and writes only the chunks
 * found to differ (and any a thread could not read, so a failure is reported there, by the
 * pipeline, as it always is).
 *
 *   shared memory:  next ─► chunk claimed by whichever thread asks first
 *                   state[i]: 0 not done · 1 equal · 2 differs (or unreadable)
 *                   done ─► chunks compared, so the main thread knows when all are
 *   main thread:    claim, compare, … yield to the event loop every few chunks (Ctrl-C,
 *                   progress), then wait until every claimed chunk is done
 *
 * A chunk found equal is not read again: the same as the pipeline, which also compares each
 * chunk once, at its turn. Another program's write to SRC meanwhile is caught by the
 * copy's SourceWatch either way.
 */

import { readSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { trace } from '../trace.js';
import { addressSpaceLimited } from '../io/address-space.js';
import { alignedBuffers } from '../io/buffer-pool.js';
import { chunksOf } from './pipeline.js';
import type { Plan, ProgressListener } from '../types.js';
import type { Range } from '../ranges.js';

/** Below this many bytes to compare, no worker is started: its start costs more than it gains. */
const WORKER_MIN_BYTES = 64 * 1024 * 1024;
/** Chunks the main thread compares between two turns of the event loop. */
const CHUNKS_PER_TURN = 8;
/** At most this many workers: past it the memory bus, not the cores, is the limit. */
const MAX_WORKERS = 3;
/** The scan stops once this many chunks differ and more than 1 in DENSE_FRACTION of those done. */
const DENSE_MIN_CHUNKS = 16;
const DENSE_FRACTION = 8;
/** Longest wait for a worker's chunk before looking again (whether the worker died). */
const WAIT_MS = 20;

/** state[i] of a chunk: not compared yet, equal, or differing (or unreadable). */
const EQUAL = 1;

/** The shared counters: the next chunk to claim, chunks compared, of them differing. */
const NEXT = 0;
const DONE = 1;
const DIFFERING = 2;

/** What the threads share; all of it in SharedArrayBuffers but the descriptors. */
interface Shared {
  srcFd: number;
  dstFd: number;
  /** Offset and length of chunk i at 2i and 2i + 1. */
  chunks: Float64Array;
  state: Uint8Array;
  counters: Int32Array;
  /** Bytes of the chunks found equal (exact: the progress reported goes on from it). */
  equalBytes: BigInt64Array;
}

/**
 * Compares chunk `i` of the two descriptors into `a` and `b` and records the outcome: equal,
 * or differing, also when it could not be read whole (the pipeline reads it again and reports
 * why). Plain JavaScript that uses nothing from outside: the worker runs its text.
 */
function scanChunk(
  readSync: typeof import('node:fs').readSync,
  w: Shared,
  a: Buffer,
  b: Buffer,
  i: number,
): void {
  const offset = w.chunks[2 * i]!;
  const length = w.chunks[2 * i + 1]!;
  let equal = false;
  try {
    let whole = true;
    for (let got = 0; whole && got < length;) {
      const n = readSync(w.srcFd, a, got, length - got, offset + got);
      whole = n > 0;
      got += n;
    }
    for (let got = 0; whole && got < length;) {
      const n = readSync(w.dstFd, b, got, length - got, offset + got);
      whole = n > 0;
      got += n;
    }
    equal = whole && a.compare(b, 0, length, 0, length) === 0;
  } catch {
    equal = false;
  }
  // the literal indexes are EQUAL, DIFFERING and DONE: the worker's text has no constants
  w.state[i] = equal ? 1 : 2;
  if (equal) Atomics.add(w.equalBytes, 0, BigInt(length));
  else Atomics.add(w.counters, 2, 1);
  Atomics.add(w.counters, 1, 1);
  Atomics.notify(w.counters, 1);
}

// CommonJS evaluated in the worker, so the same code runs from src/ (tsx) and from dist/.
// Its buffers are page-aligned like the main thread's (io/buffer-pool.ts: pread into an
// unaligned buffer copies far slower); the descriptors are the main thread's own.
const WORKER_SOURCE = `
const { readSync } = require('node:fs');
const { workerData: w } = require('node:worker_threads');
let a, b;
try {
  const pages = Math.ceil(w.chunkSize / 65536);
  const m = new WebAssembly.Memory({ initial: 2 * pages, maximum: 2 * pages });
  a = Buffer.from(m.buffer, 0, w.chunkSize);
  b = Buffer.from(m.buffer, pages * 65536, w.chunkSize);
} catch {
  a = Buffer.allocUnsafeSlow(w.chunkSize);
  b = Buffer.allocUnsafeSlow(w.chunkSize);
}
const scanChunk = (${scanChunk.toString()});
for (;;) {
  const i = Atomics.add(w.counters, ${NEXT}, 1);
  if (i >= w.state.length) break;
  scanChunk(readSync, w, a, b, i);
}
`;

export interface EqualScanOptions {
  chunkSize: number;
  signal?: AbortSignal | undefined;
  /** Progress while comparing: bytes compared of the plan's, nothing differing or written yet. */
  onProgress?: ProgressListener | undefined;
  /** Worker threads besides the main thread (default: one per further core, at most three). */
  workers?: number;
}

export interface EqualScanResult {
  /** The chunks that differ, could not be read, or were not reached before an interruption. */
  plan: Plan;
  /** Bytes found equal on both sides (read from DST, and from SRC, once each). */
  bytesEqual: number;
  /** Bytes of the plan scanned. */
  bytesTotal: number;
  /** Threads that compared, the main one included. */
  threads: number;
}

/** Atomics.waitAsync (Node 16 and later; TypeScript's lib before es2024 lacks it). */
const waitAsync = (
  Atomics as unknown as {
    waitAsync(
      this: void,
      a: Int32Array,
      index: number,
      value: number,
      timeoutMs: number,
    ): { value: Promise<string> | string };
  }
).waitAsync;

/**
 * Whether so many chunks differ that scanning on is reading them twice for little: the
 * pipeline then takes the rest as it always did, and a DST unlike SRC costs a few chunks
 * read twice, not all of it.
 */
function mostlyDiffering(counters: Int32Array): boolean {
  const differing = Atomics.load(counters, DIFFERING);
  return differing >= DENSE_MIN_CHUNKS && differing * DENSE_FRACTION > Atomics.load(counters, DONE);
}

/** Worker threads by default: none on one core or under `ulimit -v` (io/address-space.ts). */
function defaultWorkers(bytes: number): number {
  if (bytes < WORKER_MIN_BYTES || addressSpaceLimited()) return 0;
  return Math.max(0, Math.min(MAX_WORKERS, availableParallelism() - 1));
}

/**
 * Compares SRC and DST (open descriptors of local files or devices, both at least the plan's
 * image long as far as the plan goes) chunk by chunk, in the chunks the pipeline walks
 * `plan` in, and returns the plan of those that differ.
 */
export async function narrowToDiffering(
  plan: Plan,
  srcFd: number,
  dstFd: number,
  options: EqualScanOptions,
): Promise<EqualScanResult> {
  const { chunkSize, signal } = options;
  trace('equal scan started');
  const list = [...chunksOf(plan, chunkSize)];
  const count = list.length;
  const bytesTotal = list.reduce((n, c) => n + c.length, 0);
  const chunks = new Float64Array(new SharedArrayBuffer(Math.max(1, count) * 16));
  list.forEach((c, i) => {
    chunks[2 * i] = c.offset;
    chunks[2 * i + 1] = c.length;
  });
  const shared: Shared = {
    srcFd,
    dstFd,
    chunks,
    state: new Uint8Array(new SharedArrayBuffer(Math.max(1, count))),
    counters: new Int32Array(new SharedArrayBuffer(12)),
    equalBytes: new BigInt64Array(new SharedArrayBuffer(8)),
  };
  const { state, counters } = shared;

  const workers: Worker[] = [];
  const exited = new Set<Worker>();
  const wanted = options.workers ?? defaultWorkers(bytesTotal);
  for (let w = 0; w < wanted && count > 1; w++) {
    try {
      const worker = new Worker(WORKER_SOURCE, {
        eval: true,
        execArgv: [],
        workerData: { ...shared, chunkSize },
      });
      // it ends by itself once no chunk is left; it must not keep the process alive
      worker.unref();
      worker.on('error', () => exited.add(worker));
      worker.on('exit', () => exited.add(worker));
      workers.push(worker);
    } catch {
      break; // no worker threads here: the main thread compares alone
    }
  }

  const [a, b] = alignedBuffers(chunkSize, 2);
  // only what was found equal counts as scanned: the pipeline goes on from there
  const report = (): void =>
    options.onProgress?.({
      bytesScanned: Number(Atomics.load(shared.equalBytes, 0)),
      bytesTotal,
      bytesDiffering: 0,
      bytesWritten: 0,
    });
  let stopped: 'interrupted' | 'mostly differing' | undefined;
  // chunks handed out: all of them, unless the handing out was stopped
  let claimed = count;
  for (;;) {
    let i = -1;
    for (let k = 0; k < CHUNKS_PER_TURN; k++) {
      i = Atomics.add(counters, NEXT, 1);
      if (i >= count) break;
      scanChunk(readSync, shared, a!, b!, i);
    }
    if (i >= count) break;
    report();
    // a turn of the event loop: signals, timers and the progress bar run
    await new Promise((resolve) => setImmediate(resolve));
    if (signal?.aborted === true) stopped = 'interrupted';
    else if (mostlyDiffering(counters)) stopped = 'mostly differing';
    if (stopped !== undefined) {
      // the workers stop at their next claim; what no one reached stays in the plan
      claimed = Math.min(count, Atomics.exchange(counters, NEXT, count));
      break;
    }
  }
  // the chunks the workers still compare
  for (;;) {
    const done = Atomics.load(counters, DONE);
    if (done >= claimed) break;
    // a worker that died left its chunk not done: it counts as differing, below
    if (workers.every((w) => exited.has(w))) break;
    // the timer, not the wait, keeps the event loop alive: a pending Atomics.waitAsync does not,
    // and with the workers unref'd an empty loop would end the process here
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      waitAsync(counters, DONE, done, WAIT_MS).value,
      new Promise((resolve) => (timer = setTimeout(resolve, WAIT_MS))),
    ]);
    clearTimeout(timer);
  }
  report();

  const ranges: Range[] = [];
  let bytesEqual = 0;
  for (let i = 0; i < count; i++) {
    const offset = chunks[2 * i]!;
    const end = offset + chunks[2 * i + 1]!;
    if (state[i] === EQUAL) {
      bytesEqual += end - offset;
      continue;
    }
    const last = ranges[ranges.length - 1];
    if (last !== undefined && last.end === offset) last.end = end;
    else ranges.push({ start: offset, end });
  }
  trace(
    `equal scan: ${bytesEqual} of ${bytesTotal} bytes equal, ${1 + workers.length} threads` +
      (stopped !== undefined ? `, stopped: ${stopped}` : ''),
  );
  return {
    plan: { imageSize: plan.imageSize, ranges },
    bytesEqual,
    bytesTotal,
    threads: 1 + workers.length,
  };
}

/**
 * The pipeline's progress over the narrowed plan as progress over the whole one: it goes on
 * from the bytes the scan found equal.
 */
export function progressAfterScan(
  scan: EqualScanResult,
  onProgress: ProgressListener | undefined,
): ProgressListener | undefined {
  if (onProgress === undefined) return undefined;
  return (p) =>
    onProgress({
      ...p,
      bytesScanned: scan.bytesEqual + p.bytesScanned,
      bytesTotal: scan.bytesTotal,
    });
}
