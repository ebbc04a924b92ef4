/**
 * A Source that checks a bmap's range checksums on the way from the source to the sinks.
 *
 * It wraps the real Source, so the pipeline, the target knowledge and the sinks stay as they
 * are. The pipeline asks for chunks in ascending order and each chunk lies inside one plan
 * range (the bmap's ranges), so the wrapper knows which range a read belongs to:
 *
 *   range ≤ MAX_VERIFY_IN_MEMORY_BYTES:  on its first chunk, read the whole range, hash it,
 *                                         compare; only then hand out chunks (copied from the
 *                                         range's buffer). A bad range fails before any of its
 *                                         bytes reaches a sink: nothing bad is written.
 *   larger range, source read by offset,  read once: each chunk goes to the pipeline and, in
 *   writes held (`holdWrites`, a local    order, to a worker's incremental hash; the sinks'
 *   copy)                                 wrapper (held-writes.ts) holds the range's writes
 *                                         until the read of its last chunk checked the
 *                                         checksum. Nothing bad is written.
 *   larger range, source read by offset,  on its first chunk, read the whole range once in
 *   writes not held (`rereadable`)        pieces and hash it; only then pass its chunks through
 *                                         (read a second time, usually from the page cache).
 *                                         Nothing bad is written either. Also a held range
 *                                         whose reads skip part of it (an index's plan).
 *   larger range of a stream:             pass chunks through, hashing them in order (a read
 *                                         resolves only after the chunks before it were
 *                                         hashed), and fail on the range's last chunk, naming
 *                                         the range, which was then already partly written.
 *
 * A short source is not a checksum error: the short read is passed on and the pipeline
 * reports ESRC_SHORT.
 *
 * Whole ranges are hashed on a worker thread when the copy is large (`workerThread`), so
 * hashing (the costliest step, ~1.4 GB/s) runs beside the main thread's compares and copies;
 * range buffers are SharedArrayBuffers the worker reads in place, reused from range to range.
 */

import { createHash, hash, type Hash } from 'node:crypto';
import { Worker } from 'node:worker_threads';
import { BlksyncError } from '../errors.js';
import type { Sink, Source } from '../types.js';
import { HeldWritesSink, type HeldState } from './held-writes.js';

/** Largest range read whole and verified before any of it is handed on. */
export const MAX_VERIFY_IN_MEMORY_BYTES = 32 * 1024 * 1024;
/** With writes held (holdWrites): largest range read whole; larger ones are gated. */
const MAX_HELD_IN_MEMORY_BYTES = 4 * 1024 * 1024;
/** Range buffers kept for reuse (the current range, those read ahead, a spare). */
const MAX_FREE_BUFFERS = 4;
/** Bytes of a large range read but not yet hashed by its worker: reads wait beyond this. */
const MAX_HASH_BACKLOG_BYTES = 16 * 1024 * 1024;

// CommonJS evaluated in the worker, so the same code runs from src/ (tsx) and from dist/
const DIGEST_WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { hash, createHash } = require('node:crypto');
// streams: one incremental hash per large range, fed its chunks in order
const streams = new Map();
parentPort.on('message', (m) => {
  if (m === 'close') return parentPort.close(); // nothing left to do: the thread ends
  try {
    let hex = '';
    if (m.op === 'update') {
      let h = streams.get(m.stream);
      if (h === undefined) streams.set(m.stream, (h = createHash(m.algorithm)));
      h.update(Buffer.from(m.sab, m.offset, m.length));
    } else if (m.op === 'final') {
      const h = streams.get(m.stream) ?? createHash(m.algorithm);
      streams.delete(m.stream);
      hex = h.digest('hex');
    } else {
      hex = hash(m.algorithm, Buffer.from(m.sab, m.offset, m.length), 'hex');
    }
    parentPort.postMessage({ id: m.id, hex });
  } catch (err) {
    parentPort.postMessage({ id: m.id, error: String(err) });
  }
});
`;

/**
 * One worker thread computing digests of shared buffers. It keeps the process alive until
 * close(), which lets it end on its own: terminate() would block the main thread for tens of
 * milliseconds while the thread is torn down, and unref'd it could be left pending.
 */
class DigestWorker {
  readonly #worker: Worker;
  #adopted = true;
  readonly #pending = new Map<
    number,
    { resolve: (hex: string) => void; reject: (e: Error) => void }
  >();
  #nextId = 0;

  /** `idle`: started ahead of use, it does not keep the process alive until adopted. */
  constructor(idle = false) {
    this.#worker = new Worker(DIGEST_WORKER_SOURCE, { eval: true });
    this.#worker.on('message', (m: { id: number; hex?: string; error?: string }) => {
      const p = this.#pending.get(m.id);
      this.#pending.delete(m.id);
      if (m.hex !== undefined) p?.resolve(m.hex);
      else p?.reject(new Error(m.error ?? 'digest worker failed'));
    });
    this.#worker.on('error', (err) => {
      for (const p of this.#pending.values()) p.reject(err);
      this.#pending.clear();
    });
    if (idle) {
      // after the listeners: adding a 'message' listener refs the worker's port again
      this.#adopted = false;
      this.#worker.unref();
    }
  }

  /** Takes a worker started ahead into use: it keeps the process alive until close(). */
  adopt(): this {
    if (!this.#adopted) {
      this.#adopted = true;
      this.#worker.ref();
    }
    return this;
  }

  digest(algorithm: string, data: Buffer): Promise<string> {
    return this.#send({
      algorithm,
      sab: data.buffer,
      offset: data.byteOffset,
      length: data.length,
    });
  }

  /** Feeds `data` to the incremental hash `stream`; resolves once it was hashed. */
  update(stream: number, algorithm: string, data: Buffer): Promise<string> {
    return this.#send({
      op: 'update',
      stream,
      algorithm,
      sab: data.buffer,
      offset: data.byteOffset,
      length: data.length,
    });
  }

  /** The digest of everything fed to `stream` (after the updates posted before). */
  final(stream: number, algorithm: string): Promise<string> {
    return this.#send({ op: 'final', stream, algorithm });
  }

  #send(message: Record<string, unknown>): Promise<string> {
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject });
      this.#worker.postMessage({ ...message, id });
    });
  }

  close(): void {
    this.#worker.postMessage('close');
    this.#worker.unref();
  }
}

/** Workers started ahead of a copy (prestartDigestWorkers), not yet taken by a VerifyingSource. */
const idleWorkers: DigestWorker[] = [];

/**
 * Starts `count` digest workers now, for a VerifyingSource made later to take: a worker
 * takes ~30 ms to boot, which then overlaps reading and parsing the bmap instead of delaying
 * the first range's checksum. Unused ones are stopped by stopIdleDigestWorkers().
 */
export function prestartDigestWorkers(count: number): void {
  while (idleWorkers.length < count) idleWorkers.push(new DigestWorker(true));
}

/** Stops the prestarted workers no VerifyingSource took. */
export function stopIdleDigestWorkers(): void {
  for (const w of idleWorkers.splice(0)) w.close();
}

/** A range's checksum did not match: `beforeWriting` when nothing of it was written. */
export function checksumError(
  image: string,
  range: VerifiedRange,
  algorithm: string,
  computed: string,
  beforeWriting: boolean,
): BlksyncError {
  return new BlksyncError(
    'EBMAP_CHECKSUM',
    `${image}: ${range.label} (bytes ${range.start}-${range.end - 1}) do not match the bmap's ` +
      `${algorithm} checksum (computed ${computed}, expected ${range.checksum}); ` +
      (beforeWriting
        ? 'nothing of this range was written. The image is damaged or the bmap belongs to another image'
        : 'the range was too large to check before writing and is written but bad: get a good image and rerun'),
    { path: image },
  );
}

export interface VerifiedRange {
  /** Byte span [start, end) in the image. */
  start: number;
  end: number;
  /** Expected lower-case hex digest. */
  checksum: string;
  /** For messages: "blocks 3-7". */
  label: string;
}

interface Buffered {
  kind: 'buffered';
  range: VerifiedRange;
  data: Promise<{ buf: Buffer; got: number }>;
  /** Bytes handed out; at `got` the buffer goes back to the pool. */
  served: number;
}

interface Prechecked {
  kind: 'prechecked';
  range: VerifiedRange;
  /** Settles once the whole range was read and its checksum passed (or the source was short). */
  ready: Promise<void>;
}

/**
 * A large range read once (holdWrites): each chunk is hashed on a worker as it goes to the
 * pipeline, in place when the pipeline's buffer is shared memory (the read resolves once it
 * was hashed, so the pipeline reuses the buffer only then), else from a copy in shared memory
 * (without workers, hashed here from the pipeline's buffer); the writes into the range are
 * held until its last chunk's read has checked the checksum.
 */
interface Gated {
  kind: 'gated';
  range: VerifiedRange;
  /** Where the next read must start for the hash to follow the range; else `fallback`. */
  next: number;
  stream: number;
  worker: DigestWorker | undefined;
  /** Without a worker: the main thread's incremental hash. */
  hash: Hash;
  /** Settles when every chunk handed out so far was fed to the hash (posted, on a worker). */
  chain: Promise<void>;
  /** Reads that skip part of the range (an index plan): the range is read whole first. */
  fallback: Promise<void> | undefined;
}

interface Streamed {
  kind: 'streamed';
  range: VerifiedRange;
  hash: Hash;
  /** Settles when every chunk handed out so far has been hashed. */
  chain: Promise<void>;
  hashed: number;
}

export class VerifyingSource implements Source {
  readonly size: number;
  readonly #inner: Source;
  readonly #ranges: readonly VerifiedRange[];
  readonly #algorithm: string;
  readonly #image: string;
  #maxInMemory: number;
  #next = 0;
  #current: Buffered | Prechecked | Streamed | Gated | undefined;
  readonly #rereadable: boolean;
  /** The next ranges, already being read and hashed while the current one is written. */
  #ahead: Buffered[] = [];
  /** Ranges read ahead (0: none). */
  readonly #lookahead: number;
  readonly #workers: DigestWorker[];
  #nextWorker = 0;
  readonly #free: Buffer[] = [];
  /** Ranges whose checksum passed. */
  verified = 0;
  /** holdWrites() was called: large ranges are read once, their writes held. */
  #holding = false;
  #reading = false;
  /** Large ranges checked so far (holdWrites): passed or not. */
  readonly #outcome = new Map<VerifiedRange, boolean>();
  #nextStream = 0;
  /** Shared buffers for large ranges' chunks on their way to a worker. */
  readonly #staging: Buffer[] = [];
  #stagedBytes = 0;
  #stageTurn: Promise<void> = Promise.resolve();
  readonly #stageWaiters: (() => void)[] = [];

  /**
   * `ranges`: the ranges with a checksum, ascending; reads outside them pass through.
   * `image` names the source in errors. `prefetch`: read and hash the next range while the
   * current one is handed out; only when every plan range is in `ranges`, since the inner
   * source must still see its reads in ascending order. `workerThreads`: hash whole ranges
   * on this many worker threads (worth their start-up for large copies), as many ranges
   * read ahead. `rereadable`: the inner source reads by offset in any order (a file), so a
   * range too large to buffer is read twice, verified before any of it is handed on.
   */
  constructor(
    inner: Source,
    ranges: readonly VerifiedRange[],
    algorithm: string,
    image: string,
    options: {
      maxInMemory?: number;
      prefetch?: boolean;
      workerThreads?: number;
      rereadable?: boolean;
    } = {},
  ) {
    this.#inner = inner;
    this.size = inner.size;
    this.#ranges = ranges;
    this.#algorithm = algorithm;
    this.#image = image;
    // a file can be read again: a range over 4 MiB is hashed first and read twice (from the
    // page cache) rather than held in fresh memory (~4 ms a MiB on a VM here)
    this.#maxInMemory =
      options.maxInMemory ??
      (options.rereadable === true ? MAX_HELD_IN_MEMORY_BYTES : MAX_VERIFY_IN_MEMORY_BYTES);
    const threads = options.workerThreads ?? 0;
    this.#workers = Array.from(
      { length: threads },
      () => idleWorkers.shift()?.adopt() ?? new DigestWorker(),
    );
    this.#lookahead = options.prefetch === true ? Math.max(1, threads) : 0;
    this.#rereadable = options.rereadable === true;
  }

  /**
   * Lets a large range be read once: the compare and the checksum take the same read, and
   * the returned wrapper holds the writes into the range until its checksum passed. Every
   * sink fed from this source must be wrapped. Only before the first read, and only for a
   * source read by offset (the held writes beyond MAX_HELD_BYTES are read again); otherwise
   * the sink is returned as it is and a large range is verified before it is handed on.
   */
  holdWrites(maxHeld?: number): (sink: Sink) => Sink {
    if (this.#reading || !this.#rereadable) return (sink) => sink;
    this.#holding = true;
    // a range held is read once, hashed in the pipeline's own buffers: only small ones are
    // worth buffering whole (fresh memory costs page faults: ~4 ms per MiB on a VM here)
    this.#maxInMemory = Math.min(this.#maxInMemory, MAX_HELD_IN_MEMORY_BYTES);
    const gate = {
      stateAt: (offset: number) => this.#stateAt(offset),
      reread: (buf: Buffer, offset: number, length: number) =>
        this.#inner.read(buf, offset, length),
    };
    return (sink) => new HeldWritesSink(sink, gate, maxHeld);
  }

  #stateAt(offset: number): HeldState {
    let lo = 0;
    let hi = this.#ranges.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.#ranges[mid]!.end <= offset) lo = mid + 1;
      else hi = mid;
    }
    const range = this.#ranges[lo];
    if (range === undefined || range.start > offset) return 'free';
    if (range.end - range.start <= this.#maxInMemory) return 'free'; // verified before handed out
    const outcome = this.#outcome.get(range);
    return outcome === undefined ? 'pending' : outcome ? 'ok' : 'failed';
  }

  read(buf: Buffer, offset: number, length: number): Promise<number> {
    this.#reading = true;
    // find the range of this read; reads come in ascending order, so the cursor only advances
    while (this.#next < this.#ranges.length && this.#ranges[this.#next]!.end <= offset) {
      this.#next++;
    }
    const range = this.#ranges[this.#next];
    if (range === undefined || range.start > offset) return this.#inner.read(buf, offset, length);
    if (offset + length > range.end) {
      return Promise.reject(
        new Error(`read [${offset}, ${offset + length}) crosses the end of ${range.label}`),
      );
    }
    if (this.#current?.range !== range) {
      const first = this.#ahead[0];
      if (first?.range === range) this.#current = this.#ahead.shift();
      else {
        this.#ahead = [];
        this.#current = this.#begin(range);
      }
      // a gated range's chunks are read by offset, so the next ranges may be read meanwhile
      if (this.#current!.kind === 'buffered' || this.#current!.kind === 'gated') this.#readAhead();
    }
    const cur = this.#current!;
    if (cur.kind === 'prechecked') {
      return cur.ready.then(() => this.#inner.read(buf, offset, length));
    }
    if (cur.kind === 'gated') return this.#gatedRead(cur, buf, offset, length);
    return cur.kind === 'buffered'
      ? this.#fromBuffer(cur, buf, offset, length)
      : this.#streamThrough(cur, buf, offset, length);
  }

  /**
   * Begins the ranges after the current one, in order (the inner source sees ascending reads),
   * up to the look-ahead, stopping before one too large to buffer.
   */
  #readAhead(): void {
    let bytes = 0;
    for (const a of this.#ahead) bytes += a.range.end - a.range.start;
    while (this.#ahead.length < this.#lookahead) {
      const r = this.#ranges[this.#next + 1 + this.#ahead.length];
      if (r === undefined) return;
      const length = r.end - r.start;
      if (length > this.#maxInMemory || bytes + length > this.#maxInMemory * 2) return;
      this.#ahead.push(this.#begin(r) as Buffered);
      bytes += length;
    }
  }

  #begin(range: VerifiedRange): Buffered | Prechecked | Streamed | Gated {
    const length = range.end - range.start;
    if (length > this.#maxInMemory && this.#holding) {
      return {
        kind: 'gated',
        range,
        next: range.start,
        stream: this.#nextStream++,
        worker: this.#workers[this.#nextWorker++ % Math.max(1, this.#workers.length)],
        hash: createHash(this.#algorithm),
        chain: Promise.resolve(),
        fallback: undefined,
      };
    }
    if (length > this.#maxInMemory && this.#rereadable) {
      const ready = this.#precheck(range);
      ready.catch(() => {}); // reported through each read of the range
      return { kind: 'prechecked', range, ready };
    }
    if (length > this.#maxInMemory) {
      return {
        kind: 'streamed',
        range,
        hash: createHash(this.#algorithm),
        chain: Promise.resolve(),
        hashed: 0,
      };
    }
    const data = (async () => {
      const buf = this.#buffer(length);
      const got = await this.#inner.read(buf, range.start, length);
      if (got === length) {
        const worker = this.#workers[this.#nextWorker++ % Math.max(1, this.#workers.length)];
        const computed =
          worker !== undefined
            ? await worker.digest(this.#algorithm, buf)
            : hash(this.#algorithm, buf, 'hex');
        this.#check(range, computed, true);
      }
      return { buf, got };
    })();
    data.catch(() => {}); // reported through each read of the range
    return { kind: 'buffered', range, data, served: 0 };
  }

  #gatedRead(cur: Gated, buf: Buffer, offset: number, length: number): Promise<number> {
    if (cur.fallback === undefined && offset !== cur.next) {
      // the hash cannot follow reads that skip part of the range: read it whole first
      cur.fallback = this.#precheck(cur.range).then(
        () => void this.#outcome.set(cur.range, true),
        (err: unknown) => {
          if (err instanceof BlksyncError) this.#outcome.set(cur.range, false);
          throw err;
        },
      );
      cur.fallback.catch(() => {}); // reported through each read of the range
    }
    if (cur.fallback !== undefined) {
      return cur.fallback.then(() => this.#inner.read(buf, offset, length));
    }
    cur.next = offset + length;
    const before = cur.chain;
    if (cur.worker !== undefined && buf.buffer instanceof SharedArrayBuffer) {
      return this.#gatedInPlace(cur, cur.worker, before, buf, offset, length);
    }
    const mine = (async () => {
      if (cur.worker === undefined) {
        // hashed here, from the pipeline's own buffer: no copy into shared memory
        const got = await this.#inner.read(buf, offset, length);
        await before; // the hash takes the chunks in order
        if (got < length) return got; // short source: the pipeline reports it
        cur.hash.update(buf.subarray(0, got));
        if (offset + length === cur.range.end) {
          const computed = cur.hash.digest('hex');
          this.#outcome.set(cur.range, computed === cur.range.checksum);
          this.#check(cur.range, computed, true);
        }
        return got;
      }
      const slot = await this.#stage(length);
      let fed = false;
      try {
        const got = await this.#inner.read(slot, offset, length);
        slot.copy(buf, 0, 0, got);
        await before; // the hash takes the chunks in order
        if (got < length) return got; // short source: the pipeline reports it
        const worker = cur.worker;
        void worker
          .update(cur.stream, this.#algorithm, slot)
          .catch(() => {}) // a dead worker fails the range's final digest
          .finally(() => this.#unstage(slot));
        fed = true;
        if (offset + length === cur.range.end) await this.#checkGated(cur, worker);
        return got;
      } finally {
        if (!fed) this.#unstage(slot);
      }
    })();
    cur.chain = mine.then(
      () => {},
      () => {},
    );
    return mine;
  }

  /** After a range's last chunk was posted to `worker`: the range's checksum, checked. */
  async #checkGated(cur: Gated, worker: DigestWorker): Promise<void> {
    const computed = await worker.final(cur.stream, this.#algorithm);
    this.#outcome.set(cur.range, computed === cur.range.checksum);
    this.#check(cur.range, computed, true);
  }

  /**
   * A gated read into the pipeline's own shared buffer, hashed there by the worker: no copy,
   * no staging memory. The chain moves on once this chunk is posted, in the range's order; the
   * read resolves once it was hashed, as the pipeline may then reuse the buffer.
   */
  #gatedInPlace(
    cur: Gated,
    worker: DigestWorker,
    before: Promise<void>,
    buf: Buffer,
    offset: number,
    length: number,
  ): Promise<number> {
    let posted!: () => void;
    cur.chain = new Promise((resolve) => (posted = resolve));
    return (async () => {
      let hashed: Promise<unknown> | undefined;
      try {
        const got = await this.#inner.read(buf, offset, length);
        await before; // the hash takes the chunks in order
        if (got < length) return got; // short source: the pipeline reports it
        // a dead worker fails the range's final digest
        hashed = worker.update(cur.stream, this.#algorithm, buf.subarray(0, got)).catch(() => {});
        posted();
        if (offset + length === cur.range.end) await this.#checkGated(cur, worker);
        return got;
      } finally {
        posted();
        await hashed;
      }
    })();
  }

  /**
   * A shared buffer for a large range's chunk, once the chunks not yet hashed leave room:
   * taken in the order of the reads, so a read waits only for chunks before it.
   */
  #stage(length: number): Promise<Buffer> {
    const turn = this.#stageTurn.then(async () => {
      while (this.#stagedBytes > 0 && this.#stagedBytes + length > MAX_HASH_BACKLOG_BYTES) {
        await new Promise<void>((resolve) => this.#stageWaiters.push(resolve));
      }
      this.#stagedBytes += length;
    });
    this.#stageTurn = turn;
    return turn.then(() => {
      const i = this.#staging.findIndex((b) => b.length === length);
      return i >= 0 ? this.#staging.splice(i, 1)[0]! : Buffer.from(new SharedArrayBuffer(length));
    });
  }

  #unstage(slot: Buffer): void {
    this.#stagedBytes -= slot.length;
    if (this.#staging.length < 2 * (MAX_HASH_BACKLOG_BYTES / slot.length)) this.#staging.push(slot);
    for (const wake of this.#stageWaiters.splice(0)) wake();
  }

  /** Reads a large range once, in pieces, and checks its checksum. */
  async #precheck(range: VerifiedRange): Promise<void> {
    const piece = this.#buffer(this.#maxInMemory);
    const h = createHash(this.#algorithm);
    try {
      for (let at = range.start; at < range.end;) {
        const n = Math.min(piece.length, range.end - at);
        const got = await this.#inner.read(piece, at, n);
        if (got < n) return; // short source: the pass-through reads report it
        h.update(piece.subarray(0, n));
        at += n;
      }
    } finally {
      if (this.#free.length < MAX_FREE_BUFFERS) this.#free.push(piece);
    }
    this.#check(range, h.digest('hex'), true);
  }

  /** A shared buffer of `length` bytes, reused when one is free. */
  #buffer(length: number): Buffer {
    const i = this.#free.findIndex((b) => b.buffer.byteLength >= length);
    const found = i >= 0 ? this.#free.splice(i, 1)[0] : undefined;
    const base =
      found !== undefined ? Buffer.from(found.buffer) : Buffer.from(new SharedArrayBuffer(length));
    return base.subarray(0, length);
  }

  async #fromBuffer(cur: Buffered, buf: Buffer, offset: number, length: number): Promise<number> {
    const { buf: data, got } = await cur.data;
    const at = offset - cur.range.start;
    const n = Math.max(0, Math.min(length, got - at));
    data.copy(buf, 0, at, at + n);
    cur.served += n;
    if (cur.served >= got && this.#free.length < MAX_FREE_BUFFERS) this.#free.push(data);
    return n;
  }

  async #streamThrough(
    cur: Streamed,
    buf: Buffer,
    offset: number,
    length: number,
  ): Promise<number> {
    const before = cur.chain;
    const mine = (async () => {
      const got = await this.#inner.read(buf, offset, length);
      await before;
      if (got < length) return got; // short source: the pipeline reports it
      cur.hash.update(buf.subarray(0, got));
      cur.hashed += got;
      if (offset + length === cur.range.end) {
        this.#check(cur.range, cur.hash.digest('hex'), false);
      }
      return got;
    })();
    cur.chain = mine.then(
      () => {},
      () => {},
    );
    return mine;
  }

  #check(range: VerifiedRange, computed: string, beforeWriting: boolean): void {
    if (computed === range.checksum) {
      this.verified++;
      return;
    }
    throw checksumError(this.#image, range, this.#algorithm, computed, beforeWriting);
  }

  async close(): Promise<void> {
    for (const w of this.#workers) w.close();
    await this.#inner.close();
  }
}
