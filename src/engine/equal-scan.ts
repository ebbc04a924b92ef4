/**
 * Narrowing a plan to the chunks where SRC and DST differ, by comparing them on all cores
 * before the pipeline runs. A local copy onto a DST that already holds most of SRC (the
 * nightly update, the reflash of a device) spends its time proving chunks equal; the
 * pipeline does that through libuv's thread pool, two reads handed off per chunk and the
 * compare on the main thread, which keeps it at one core's speed. Here the main thread and
 * worker threads each read both sides of a chunk with plain `pread`s into their own aligned
 * buffers and compare them, claiming work from a shared counter: the loop a C program would
 * run, on every core. The pipeline then reads, compares and writes only the chunks found to
 * differ (and any a thread could not read, so a failure is reported there, by the pipeline,
 * as it always is).
 *
 * The work is claimed in units: one chunk each, or with `hash` one range each (a bmap's
 * range with its checksum), whose chunks one thread reads in order and hashes as it
 * compares them, so one read of SRC feeds both. Ranges go out largest first, which spreads
 * the two or three large ranges of an OS image over the threads.
 *
 *   shared memory:  next ─► unit claimed by whichever thread asks first
 *                   state[chunk]: 0 not compared · 1 equal · 2 differs (or unreadable)
 *                   counters: units done, chunks done, chunks differing, stop, chunks
 *                   by workers
 *                   digests[unit]: the hex digest of its SRC bytes (with `hash`)
 *                   chunkDigests[chunk]: SHA-256 of a differing chunk's SRC bytes (`hash`)
 *   main thread:    claim, compare, … yield to the event loop every few chunks (Ctrl-C,
 *                   progress), then wait until every claimed unit is done
 *
 * A chunk found equal is not read again: the same as the pipeline, which also compares each
 * chunk once, at its turn. A chunk that differs is read again by the pipeline; another
 * program's write to a file SRC in between is caught by the copy's SourceWatch, and after a
 * scan that verified a bmap's checksums each chunk read again is checked against the
 * SHA-256 taken here (RereadCheck), so what is written is what was verified, also from a
 * device whose writes no SourceWatch sees.
 */

import { createHash, hash as oneShot } from 'node:crypto';
import { read, readSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { trace } from '../trace.js';
import { addressSpaceLimited } from '../io/address-space.js';
import { alignedBuffers } from '../io/buffer-pool.js';
import { poolDigest, poolDigestsAvailable } from '../io/pool-digest.js';
import { chunksOf } from './pipeline.js';
import { BlksyncError } from '../errors.js';
import type { Plan, ProgressListener, Source } from '../types.js';
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
/** Longest wait for a worker's unit before looking again (whether the worker died). */
const WAIT_MS = 20;
/**
 * Ranges hashed side by side on the thread pool, at most: libuv's has four threads by
 * default, and SRC's reads ahead need one besides the hashes.
 */
const MAX_LANES = 3;
/**
 * A range of fewer chunks than this is hashed on the main thread as it is compared, not on
 * the pool, whose round trips would cost more than the hash; and a scan hashes on the pool
 * only when ranges at least this long hold most of the bytes (POOL_MIN_SHARE).
 */
const POOL_MIN_CHUNKS = 4;
const POOL_MIN_SHARE = 0.75;
/** Chunks of SRC a lane reads ahead of its hash (each read while the others are hashed). */
const SLABS_PER_LANE = 3;
/** Room for one hex digest (SHA-512's 128 characters). */
const DIGEST_CHARS = 128;

/** state[chunk] of a chunk not compared (yet), and of one found equal. */
const NOT_COMPARED = 0;
const EQUAL = 1;

/**
 * The shared counters: the next unit to claim, units done, chunks done, chunks differing,
 * and a flag that tells the workers to abandon their unit. scanChunk and the worker's text
 * use the literal indexes (they have no constants).
 */
const NEXT = 0;
const UNITS_DONE = 1;
const CHUNKS_DONE = 2;
const DIFFERING = 3;
const STOP = 4;
/** Chunks the workers compared (for the trace and the tests: did they take part). */
const BY_WORKERS = 5;
const COUNTERS = 6;

/** What the threads share; all of it in SharedArrayBuffers but the descriptors. */
interface Shared {
  srcFd: number;
  dstFd: number;
  /** Offset and length of chunk i at 2i and 2i + 1. */
  chunks: Float64Array;
  /** Unit u is the chunks unitFirst[u] .. unitFirst[u + 1] - 1. */
  unitFirst: Int32Array;
  state: Uint8Array;
  counters: Int32Array;
  /** Bytes of the chunks found equal (exact: the progress reported goes on from it). */
  equalBytes: BigInt64Array;
  /** With `hash`: unit u's hex digest at u * DIGEST_CHARS, as Latin-1 bytes. */
  digests: Uint8Array;
  /** The hash algorithm of the units (empty: none). */
  algorithm: string;
  /** With `hash`: SHA-256 of SRC's bytes of chunk i at i * 32, for the chunks that differ. */
  chunkDigests: Uint8Array;
}

/**
 * Compares chunk `i` of the two descriptors into `a` and `b`, feeding SRC's bytes to `hash`
 * on the way, and records the outcome: equal, or differing, also when it could not be read
 * whole (the pipeline reads it again and reports why). Returns false when SRC could not be
 * read whole: the unit's digest is then worthless. With `srcRead`, `a` holds SRC's bytes
 * already (read by someone else, whole or not). Plain JavaScript that uses nothing from
 * outside: the worker runs its text.
 */
function scanChunk(
  readSync: typeof import('node:fs').readSync,
  w: Shared,
  a: Buffer,
  b: Buffer,
  i: number,
  hash: { update(data: Buffer): unknown } | undefined,
  digestOf: ((data: Buffer) => Buffer) | undefined,
  srcRead?: boolean,
): boolean {
  const offset = w.chunks[2 * i]!;
  const length = w.chunks[2 * i + 1]!;
  // `srcRead` given: `a` holds SRC's bytes already (read whole, or not)
  let read = srcRead ?? true;
  let equal = false;
  try {
    for (let got = srcRead === undefined ? 0 : length; read && got < length;) {
      const n = readSync(w.srcFd, a, got, length - got, offset + got);
      read = n > 0;
      got += n;
    }
    if (read && hash !== undefined) hash.update(a.subarray(0, length));
    let whole = read;
    for (let got = 0; whole && got < length;) {
      const n = readSync(w.dstFd, b, got, length - got, offset + got);
      whole = n > 0;
      got += n;
    }
    equal = whole && a.compare(b, 0, length, 0, length) === 0;
  } catch {
    read = false;
    equal = false;
  }
  // what the pipeline reads again of a chunk that differs must be what was hashed here
  if (!equal && read && digestOf !== undefined)
    w.chunkDigests.set(digestOf(a.subarray(0, length)), i * 32);
  w.state[i] = equal ? 1 : 2;
  if (equal) Atomics.add(w.equalBytes, 0, BigInt(length));
  else Atomics.add(w.counters, 3, 1);
  Atomics.add(w.counters, 2, 1);
  return read;
}

/** Records that unit `u` is done, with its digest when its SRC bytes were all hashed. */
function finishUnit(
  w: Shared,
  u: number,
  hash: { digest(encoding: 'hex'): string } | undefined,
  whole: boolean,
): void {
  if (hash !== undefined && whole) {
    const hex = hash.digest('hex');
    // 128: DIGEST_CHARS
    for (let k = 0; k < hex.length; k++) w.digests[u * 128 + k] = hex.charCodeAt(k);
  }
  Atomics.add(w.counters, 1, 1);
  Atomics.notify(w.counters, 1);
}

// CommonJS evaluated in the worker, so the same code runs from src/ (tsx) and from dist/.
// Its buffers are page-aligned like the main thread's (io/buffer-pool.ts: pread into an
// unaligned buffer copies far slower); the descriptors are the main thread's own.
const WORKER_SOURCE = `
const { readSync } = require('node:fs');
const { createHash, hash: oneShot } = require('node:crypto');
const { parentPort } = require('node:worker_threads');
// started ahead of its scan (ScanWorker), it waits for the scan's shared memory, or for 'close'
parentPort.once('message', (w) => {
if (w === 'close') return parentPort.close();
const digestOf = w.algorithm !== '' ? (data) => oneShot('sha256', data, 'buffer') : undefined;
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
const finishUnit = (${finishUnit.toString()});
const units = w.unitFirst.length - 1;
for (;;) {
  const u = Atomics.add(w.counters, ${NEXT}, 1);
  if (u >= units) break;
  const hash = w.algorithm !== '' ? createHash(w.algorithm) : undefined;
  let whole = true;
  for (let i = w.unitFirst[u]; i < w.unitFirst[u + 1]; i++) {
    if (Atomics.load(w.counters, ${STOP}) !== 0) { whole = false; break; }
    if (!scanChunk(readSync, w, a, b, i, hash, digestOf)) whole = false;
    Atomics.add(w.counters, ${BY_WORKERS}, 1);
  }
  finishUnit(w, u, hash, whole);
}
parentPort.close();
});
`;

/**
 * A worker thread for a scan, started ahead of it: its start (~30 ms on this project's
 * machines) then overlaps the copy's set-up instead of the scan. It waits for its scan; one
 * never used must be released, or it waits until the process ends.
 */
export class ScanWorker {
  readonly #worker: Worker;
  #used = false;
  exited = false;
  readonly errors: string[] = [];

  constructor() {
    this.#worker = new Worker(WORKER_SOURCE, { eval: true, execArgv: [] });
    // it ends by itself after its scan; it must not keep the process alive
    this.#worker.unref();
    this.#worker.on('error', (err) => {
      // a bug, not a condition of the files: the main thread compares what it left
      this.errors.push(String(err));
      trace(`equal scan: a worker failed: ${String(err)}`);
      this.exited = true;
    });
    this.#worker.on('exit', () => (this.exited = true));
  }

  /** Hands it its scan. */
  run(data: Shared & { chunkSize: number }): void {
    this.#used = true;
    this.#worker.postMessage(data);
  }

  /** Lets it end if it was never handed a scan. */
  release(): void {
    if (this.#used) return;
    this.#used = true;
    this.#worker.postMessage('close');
  }
}

/**
 * The workers a scan of `bytes` would start, started now (none on one core, under
 * `ulimit -v`, below WORKER_MIN_BYTES, or for a scan that will hash `hashing`'s ranges on
 * the thread pool). Each must be handed to a scan or released.
 */
export function prestartScanWorkers(
  bytes: number,
  hashing?: { ranges: readonly Range[]; chunkSize: number },
): ScanWorker[] {
  const out: ScanWorker[] = [];
  // a scan that hashes on the thread pool starts no workers
  if (hashing !== undefined && hashesOnPool(hashing.ranges, hashing.chunkSize)) return out;
  for (let i = defaultWorkers(bytes); i > 0; i--) {
    try {
      out.push(new ScanWorker());
    } catch {
      break; // no worker threads here: the main thread compares alone
    }
  }
  return out;
}

export interface EqualScanOptions {
  chunkSize: number;
  signal?: AbortSignal | undefined;
  /** Progress while comparing: bytes found equal of the plan's, nothing differing or written. */
  onProgress?: ProgressListener | undefined;
  /** Worker threads besides the main thread (default: one per further core, at most three). */
  workers?: number;
  /** Workers started ahead (prestartScanWorkers), used first; those not used are released. */
  prestarted?: readonly ScanWorker[] | undefined;
  /**
   * Hash SRC's bytes of each of these ranges (which must cover the plan, each within it) as
   * they are compared: a bmap's ranges with checksums. The scan then is all or nothing:
   * stopped early (interrupted, or SRC mostly differing), it returns undefined.
   */
  hash?: { algorithm: string; ranges: readonly Range[] } | undefined;
  /**
   * Where `hash` hashes: on libuv's thread pool, the main thread reading and comparing
   * (the default where io/pool-digest.ts can be had), or on the threads that read (the
   * main thread and workers).
   */
  hashOn?: 'pool' | 'threads' | undefined;
}

export interface EqualScanResult {
  /** The chunks that differ, could not be read, or were not reached before the scan stopped. */
  plan: Plan;
  /** Bytes found equal on both sides (read from DST, and from SRC, once each). */
  bytesEqual: number;
  /** Bytes read from DST (and from SRC): the chunks compared, equal or not. */
  bytesCompared: number;
  /** Bytes of the plan scanned. */
  bytesTotal: number;
  /** Chunks the worker threads compared (the main thread compared the rest). */
  chunksByWorkers: number;
  /** Ranges hashed side by side on the thread pool (0: the scan hashed on its threads, or not at all). */
  poolLanes: number;
  /** Errors of worker threads that failed (a bug: the main thread compared what they left). */
  workerErrors: string[];
  /**
   * With `hash`: the hex digest of SRC's bytes of each range, in the order given; undefined
   * for a range SRC could not be read whole in (the pipeline reports why when it reads it).
   */
  digests?: (string | undefined)[];
  /** With `hash`: SHA-256 of SRC's bytes of each differing chunk, by its offset. */
  rereads?: Map<number, Buffer>;
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
  return (
    differing >= DENSE_MIN_CHUNKS &&
    differing * DENSE_FRACTION > Atomics.load(counters, CHUNKS_DONE)
  );
}

/** Worker threads by default: none on one core or under `ulimit -v` (io/address-space.ts). */
function defaultWorkers(bytes: number): number {
  if (bytes < WORKER_MIN_BYTES || addressSpaceLimited()) return 0;
  return Math.max(0, Math.min(MAX_WORKERS, availableParallelism() - 1));
}

/** The units of work: each range of `hash` (largest first), or else each chunk of the plan. */
function unitsOf(
  plan: Plan,
  chunkSize: number,
  hash: EqualScanOptions['hash'],
): { chunks: { offset: number; length: number }[]; unitFirst: number[]; order: number[] } {
  if (hash === undefined) {
    const chunks = [...chunksOf(plan, chunkSize)];
    return { chunks, unitFirst: chunks.map((_, i) => i).concat(chunks.length), order: [] };
  }
  const order = hash.ranges.map((_, i) => i);
  order.sort((x, y) => {
    const rx = hash.ranges[x]!;
    const ry = hash.ranges[y]!;
    return ry.end - ry.start - (rx.end - rx.start) || rx.start - ry.start;
  });
  const chunks: { offset: number; length: number }[] = [];
  const unitFirst: number[] = [];
  for (const r of order) {
    unitFirst.push(chunks.length);
    // one by one: a range of a terabyte is a million chunks, too many to spread as arguments
    for (const c of chunksOf({ imageSize: plan.imageSize, ranges: [hash.ranges[r]!] }, chunkSize)) {
      chunks.push(c);
    }
  }
  unitFirst.push(chunks.length);
  return { chunks, unitFirst, order };
}

/** Why a scan stopped before its end, if it did. */
type Stopped = 'interrupted' | 'mostly differing' | 'failed' | undefined;

/** What the two ways of scanning take besides the shared memory. */
interface ScanContext extends EqualScanOptions {
  /** Reports progress (the bytes found equal so far). */
  report: () => void;
  /** SHA-256 of a chunk (with `hash`: kept for each differing chunk, for RereadCheck). */
  digestOf: ((data: Buffer) => Buffer) | undefined;
}

/** Whether to stop now, and why. */
function stopNow(signal: AbortSignal | undefined, counters: Int32Array): Stopped {
  if (signal?.aborted === true) return 'interrupted';
  return mostlyDiffering(counters) ? 'mostly differing' : undefined;
}

/**
 * The scan on threads: the main thread and workers each claim a unit, read both sides of its
 * chunks, compare them, and (with `hash`) hash SRC's bytes as they go.
 */
async function scanOnThreads(
  shared: Shared,
  unitFirst: readonly number[],
  chunkSize: number,
  bytesTotal: number,
  context: ScanContext,
): Promise<{ stopped: Stopped; workers: ScanWorker[] }> {
  const { signal, hash, digestOf } = context;
  const { counters } = shared;
  const unitCount = unitFirst.length - 1;
  // workers started ahead first, then new ones; ahead or not, one is not used with one unit
  const spare = [...(context.prestarted ?? [])];
  const wanted = unitCount > 1 ? (context.workers ?? defaultWorkers(bytesTotal)) : 0;
  const workers: ScanWorker[] = [];
  while (workers.length < wanted) {
    let worker = spare.shift();
    if (worker === undefined) {
      try {
        worker = new ScanWorker();
      } catch {
        break; // no worker threads here: the main thread compares alone
      }
    }
    worker.run({ ...shared, chunkSize });
    workers.push(worker);
  }
  for (const worker of spare) worker.release();

  const [a, b] = alignedBuffers(chunkSize, 2);
  let stopped: Stopped;
  // units handed out: all of them, unless the handing out was stopped
  let claimed = unitCount;
  // the main thread's unit: its next chunk, its end, its hash, whether SRC was read whole
  let unit = -1;
  let next = 0;
  let end = 0;
  let unitHash: ReturnType<typeof createHash> | undefined;
  let whole = true;
  for (;;) {
    let done = false;
    for (let k = 0; k < CHUNKS_PER_TURN; k++) {
      if (next >= end) {
        if (unit >= 0) finishUnit(shared, unit, unitHash, whole);
        unit = Atomics.add(counters, NEXT, 1);
        if (unit >= unitCount) {
          done = true;
          break;
        }
        next = unitFirst[unit]!;
        end = unitFirst[unit + 1]!;
        unitHash = hash !== undefined ? createHash(hash.algorithm) : undefined;
        whole = true;
        if (next >= end) continue;
      }
      if (!scanChunk(readSync, shared, a!, b!, next, unitHash, digestOf)) whole = false;
      next++;
    }
    if (done) break;
    context.report();
    // a turn of the event loop: signals, timers and the progress bar run
    await new Promise((resolve) => setImmediate(resolve));
    if (signal?.aborted === true) stopped = 'interrupted';
    else if (mostlyDiffering(counters)) stopped = 'mostly differing';
    if (stopped !== undefined) {
      // the workers stop at their next claim (with `hash`, at their next chunk: their unit is
      // worthless now); what no one reached stays in the plan
      claimed = Math.min(unitCount, Atomics.exchange(counters, NEXT, unitCount));
      if (hash !== undefined) Atomics.store(counters, STOP, 1);
      if (unit >= 0 && unit < unitCount) {
        // the main thread's own unit, left part-way: its remaining chunks are not compared
        finishUnit(shared, unit, undefined, false);
      }
      break;
    }
  }
  // the units the workers still scan
  for (;;) {
    const done = Atomics.load(counters, UNITS_DONE);
    if (done >= claimed) break;
    // Ctrl-C, or too much differing, while a worker is still in a large range: it stops there
    if (stopped === undefined) {
      if (signal?.aborted === true) stopped = 'interrupted';
      else if (mostlyDiffering(counters)) stopped = 'mostly differing';
      if (stopped !== undefined) {
        claimed = Math.min(claimed, Atomics.exchange(counters, NEXT, unitCount));
        Atomics.store(counters, STOP, 1);
      }
    }
    // a worker that died left its unit not done: its chunks not compared count as differing
    if (workers.every((w) => w.exited)) break;
    // the timer, not the wait, keeps the event loop alive: a pending Atomics.waitAsync does not,
    // and with the workers unref'd an empty loop would end the process here
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      waitAsync(counters, UNITS_DONE, done, WAIT_MS).value,
      new Promise((resolve) => (timer = setTimeout(resolve, WAIT_MS))),
    ]);
    clearTimeout(timer);
  }
  return { stopped, workers };
}

/**
 * Whether a scan hashing `ranges` does so on the thread pool: when the functions can be had
 * (io/pool-digest.ts) and ranges of POOL_MIN_CHUNKS chunks or more hold most of the bytes.
 * Thousands of short ranges (a fragmented image, 512-byte bmap blocks) would cost the pool a
 * round trip each, two to three times the threads' time, which hash them in line.
 */
export function hashesOnPool(ranges: readonly Range[], chunkSize: number): boolean {
  let total = 0;
  let long = 0;
  for (const r of ranges) {
    total += r.end - r.start;
    if (r.end - r.start >= POOL_MIN_CHUNKS * chunkSize) long += r.end - r.start;
  }
  return long >= POOL_MIN_SHARE * total && poolDigestsAvailable();
}

/** Reads `length` bytes at `position` of `fd` into `buf` on the thread pool: false if it cannot (never throws). */
function readWhole(fd: number, buf: Buffer, length: number, position: number): Promise<boolean> {
  return new Promise((resolve) => {
    const more = (got: number): void => {
      if (got >= length) {
        resolve(true);
        return;
      }
      try {
        read(fd, buf, got, length - got, position + got, (err, n) => {
          if (err !== null || n === 0) resolve(false);
          else more(got + n);
        });
      } catch {
        resolve(false); // arguments fs refuses (a position past 2^53): the pipeline reports it
      }
    };
    more(0);
  });
}

/**
 * The scan with `hash` on libuv's thread pool (io/pool-digest.ts), without worker threads.
 * Each lane takes one unit (a range) at a time, the largest first: the pool reads its SRC
 * chunks ahead into the lane's slabs and hashes them in order, while the main thread reads
 * DST's side of each chunk and compares. SRC's bytes are copied and hashed by pool threads,
 * DST's copied and compared by the main thread, so the work spreads over the cores with no
 * worker thread to start. A slab is read again only once its hash is done, and each lane
 * waits for its reads and hashes before it finishes (or abandons) its unit: the pool reads
 * and writes the slabs in place.
 */
async function hashOnPool(
  shared: Shared,
  unitFirst: readonly number[],
  lanes: number,
  algorithm: string,
  chunkSize: number,
  context: ScanContext & { digestOf: (data: Buffer) => Buffer },
): Promise<Stopped> {
  const { signal, digestOf } = context;
  const { counters, chunks, srcFd } = shared;
  const unitCount = unitFirst.length - 1;
  const slabs = alignedBuffers(chunkSize, SLABS_PER_LANE * lanes);
  // DST's side of a chunk: compared at once, so one buffer serves every lane
  const [b] = alignedBuffers(chunkSize, 1);
  let stopped: Stopped;

  const lane = async (own: Buffer[]): Promise<void> => {
    // chunks compared since the last turn of the event loop (in short ranges)
    let sinceTurn = 0;
    for (;;) {
      const u = Atomics.add(counters, NEXT, 1);
      if (u >= unitCount) return;
      const first = unitFirst[u]!;
      const end = unitFirst[u + 1]!;
      if (end - first < POOL_MIN_CHUNKS) {
        // a short range: read, hashed and compared here, as on the threads
        const hash = createHash(algorithm);
        let whole = true;
        let i = first;
        for (; i < end && stopped === undefined; i++) {
          if (!scanChunk(readSync, shared, own[0]!, b!, i, hash, digestOf)) whole = false;
          if (++sinceTurn >= CHUNKS_PER_TURN) {
            sinceTurn = 0;
            await new Promise((resolve) => setImmediate(resolve));
            context.report();
            stopped ??= stopNow(signal, counters);
          }
        }
        finishUnit(shared, u, i < end ? undefined : hash, whole && i === end);
        if (i < end) return;
        continue;
      }
      const digest = poolDigest(algorithm);
      // false once SRC could not be read whole in the unit, or the pool failed to hash it
      let whole = digest !== undefined;
      // the unit's hashes, one after another; free[j] settles once slab j may be read into
      let chain: Promise<void> = Promise.resolve();
      const free: Promise<unknown>[] = own.map(() => chain);
      const reads: Promise<boolean>[] = [];
      const readAhead = (i: number): void => {
        const j = (i - first) % own.length;
        reads[j] = free[j]!.then(() =>
          stopped !== undefined
            ? false
            : readWhole(srcFd, own[j]!, chunks[2 * i + 1]!, chunks[2 * i]!),
        );
      };
      for (let i = first; i < Math.min(end, first + own.length); i++) readAhead(i);
      let i = first;
      for (; i < end && stopped === undefined; i++) {
        const j = (i - first) % own.length;
        const srcRead = await reads[j]!;
        if (stopped !== undefined) break;
        scanChunk(readSync, shared, own[j]!, b!, i, undefined, digestOf, srcRead);
        if (!srcRead) whole = false;
        if (whole) {
          const data = own[j]!.subarray(0, chunks[2 * i + 1]);
          chain = chain.then(() => digest!.update(data));
        }
        free[j] = chain.catch(() => undefined);
        if (i + own.length < end) readAhead(i + own.length);
        context.report();
        stopped ??= stopNow(signal, counters);
      }
      // nothing of the pool's may still use the slabs or the digest
      await Promise.all(reads);
      try {
        await chain;
      } catch {
        whole = false; // the pool could not hash it: the digest is left undefined
      }
      if (i < end) {
        // stopped part-way: the unit's digest is worthless, its chunks not compared stay
        digest?.free();
        finishUnit(shared, u, undefined, false);
        return;
      }
      finishUnit(shared, u, whole ? { digest: () => digest!.digest() } : undefined, whole);
      digest?.free();
    }
  };
  const running: Promise<void>[] = [];
  for (let l = 0; l < lanes; l++) {
    const own = slabs.slice(l * SLABS_PER_LANE, (l + 1) * SLABS_PER_LANE);
    // a lane that fails (a progress listener that throws) stops the others, which end their
    // reads and hashes before the error goes on: nothing of the scan runs after it returned
    running.push(
      lane(own).catch((err: unknown) => {
        stopped = 'failed';
        throw err;
      }),
    );
  }
  const ends = await Promise.allSettled(running);
  const failure = ends.find((e) => e.status === 'rejected');
  if (failure !== undefined) throw failure.reason;
  if (stopped !== undefined) Atomics.exchange(counters, NEXT, unitCount);
  return stopped;
}

/**
 * Compares SRC and DST (open descriptors of local files or devices, both at least the plan's
 * image long as far as the plan goes) chunk by chunk, in the chunks the pipeline walks
 * `plan` in, and returns the plan of those that differ. With `hash`, undefined when the scan
 * stopped before its end.
 */
export async function narrowToDiffering(
  plan: Plan,
  srcFd: number,
  dstFd: number,
  options: EqualScanOptions & { hash?: undefined },
): Promise<EqualScanResult>;
export async function narrowToDiffering(
  plan: Plan,
  srcFd: number,
  dstFd: number,
  options: EqualScanOptions,
): Promise<EqualScanResult | undefined>;
export async function narrowToDiffering(
  plan: Plan,
  srcFd: number,
  dstFd: number,
  options: EqualScanOptions,
): Promise<EqualScanResult | undefined> {
  const { chunkSize, hash } = options;
  trace('equal scan started');
  const units = unitsOf(plan, chunkSize, hash);
  const count = units.chunks.length;
  const unitCount = units.unitFirst.length - 1;
  const bytesTotal = units.chunks.reduce((n, c) => n + c.length, 0);
  const chunks = new Float64Array(new SharedArrayBuffer(Math.max(1, count) * 16));
  units.chunks.forEach((c, i) => {
    chunks[2 * i] = c.offset;
    chunks[2 * i + 1] = c.length;
  });
  const shared: Shared = {
    srcFd,
    dstFd,
    chunks,
    unitFirst: new Int32Array(new SharedArrayBuffer(4 * (unitCount + 1))),
    state: new Uint8Array(new SharedArrayBuffer(Math.max(1, count))),
    counters: new Int32Array(new SharedArrayBuffer(4 * COUNTERS)),
    equalBytes: new BigInt64Array(new SharedArrayBuffer(8)),
    digests: new Uint8Array(
      new SharedArrayBuffer(hash !== undefined ? Math.max(1, unitCount) * DIGEST_CHARS : 1),
    ),
    algorithm: hash?.algorithm ?? '',
    chunkDigests: new Uint8Array(
      new SharedArrayBuffer(hash !== undefined ? Math.max(1, count) * 32 : 1),
    ),
  };
  const digestOf =
    hash !== undefined ? (data: Buffer) => oneShot('sha256', data, 'buffer') : undefined;
  shared.unitFirst.set(units.unitFirst);
  const { state, counters } = shared;

  // only what was found equal counts as scanned: the pipeline goes on from there
  const report = (): void =>
    options.onProgress?.({
      bytesScanned: Number(Atomics.load(shared.equalBytes, 0)),
      bytesTotal,
      bytesDiffering: 0,
      bytesWritten: 0,
    });
  const pooled =
    hash !== undefined &&
    options.hashOn !== 'threads' &&
    (options.hashOn === 'pool' ? poolDigestsAvailable() : hashesOnPool(hash.ranges, chunkSize));
  let stopped: Stopped;
  let workers: ScanWorker[] = [];
  let lanes = 0;
  if (pooled) {
    for (const worker of options.prestarted ?? []) worker.release();
    lanes = Math.max(1, Math.min(unitCount, MAX_LANES, availableParallelism()));
    stopped = await hashOnPool(shared, units.unitFirst, lanes, hash.algorithm, chunkSize, {
      ...options,
      report,
      digestOf: digestOf!,
    });
  } else {
    ({ stopped, workers } = await scanOnThreads(shared, units.unitFirst, chunkSize, bytesTotal, {
      ...options,
      report,
      digestOf,
    }));
  }
  report();
  const bytesEqual = Number(Atomics.load(shared.equalBytes, 0));
  trace(
    `equal scan: ${bytesEqual} of ${bytesTotal} bytes equal, ` +
      (lanes > 0
        ? `hashed on the thread pool, ${lanes} range${lanes > 1 ? 's' : ''} at a time`
        : workers.length === 0
          ? 'the main thread alone'
          : `${1 + workers.length} threads (${Atomics.load(counters, BY_WORKERS)} chunks by workers)`) +
      (stopped !== undefined ? `, stopped: ${stopped}` : ''),
  );
  if (stopped !== undefined && hash !== undefined) return undefined;

  const differing: number[] = [];
  let bytesCompared = 0;
  for (let i = 0; i < count; i++) {
    if (state[i] !== NOT_COMPARED) bytesCompared += chunks[2 * i + 1]!;
    if (state[i] !== EQUAL) differing.push(i);
  }
  // in the order of the image (units may have gone out largest first)
  differing.sort((x, y) => chunks[2 * x]! - chunks[2 * y]!);
  const ranges: Range[] = [];
  // with `hash`, each chunk its own range: the pipeline then reads each as one chunk, whose
  // digest is known (RereadCheck); neighbours in two ranges could be one chunk otherwise
  const rereads = hash !== undefined ? new Map<number, Buffer>() : undefined;
  for (const i of differing) {
    const offset = chunks[2 * i]!;
    const last = ranges[ranges.length - 1];
    if (last !== undefined && last.end === offset && rereads === undefined) {
      last.end = offset + chunks[2 * i + 1]!;
    } else ranges.push({ start: offset, end: offset + chunks[2 * i + 1]! });
    rereads?.set(offset, Buffer.from(shared.chunkDigests.subarray(i * 32, i * 32 + 32)));
  }
  let digests: (string | undefined)[] | undefined;
  if (hash !== undefined) {
    digests = hash.ranges.map(() => undefined);
    units.order.forEach((r, u) => {
      const room = shared.digests.subarray(u * DIGEST_CHARS, (u + 1) * DIGEST_CHARS);
      const len = room.indexOf(0) < 0 ? DIGEST_CHARS : room.indexOf(0);
      if (len > 0) digests![r] = Buffer.from(room.subarray(0, len)).toString('latin1');
    });
  }
  return {
    plan: { imageSize: plan.imageSize, ranges },
    bytesEqual,
    bytesCompared,
    bytesTotal,
    chunksByWorkers: Atomics.load(counters, BY_WORKERS),
    poolLanes: lanes,
    workerErrors: workers.flatMap((w) => w.errors),
    ...(digests !== undefined ? { digests } : {}),
    ...(rereads !== undefined ? { rereads } : {}),
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

/**
 * The source of a copy after a scan that verified a bmap's checksums: SRC read as it is, each
 * chunk read again checked against the SHA-256 the scan took of it, so what is written is
 * what was verified even if another program wrote SRC in between (a device, whose writes no
 * SourceWatch sees). The pipeline reads exactly the scan's differing chunks (its plan).
 */
export class RereadCheck implements Source {
  readonly size: number;
  readonly #inner: Source;
  readonly #digests: Map<number, Buffer>;
  readonly #path: string;

  constructor(inner: Source, digests: Map<number, Buffer>, path: string) {
    this.#inner = inner;
    this.#digests = digests;
    this.#path = path;
    this.size = inner.size;
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const got = await this.#inner.read(buf, offset, length);
    if (got < length) return got; // short: the pipeline reports it
    const expected = this.#digests.get(offset);
    if (
      expected === undefined ||
      !oneShot('sha256', buf.subarray(0, got), 'buffer').equals(expected)
    ) {
      throw new BlksyncError(
        'ESRC_CHANGED',
        `${this.#path} changed after its bmap checksums were verified (bytes ${offset}-${offset + length - 1} read again differ from what was checked); nothing of them was written. Rerun when nothing else writes to it`,
        { path: this.#path },
      );
    }
    return got;
  }

  close(): Promise<void> {
    return this.#inner.close();
  }
}
