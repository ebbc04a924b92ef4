/**
 * Hashes the local file's top-level units ahead of everything else. It starts as the HELLO
 * goes out, while ssh logs in (started sooner, its reads filled libuv's thread pool ahead of
 * the file operations that get the HELLO ready), and keeps only 16 bytes per unit, so it can
 * run as far ahead as it likes; the copy then reads a chunk again only when its hash differs
 * from the agent's (a few chunks in a mostly unchanged image), and the local and remote scans
 * run side by side.
 *
 * A unit the file system reports as all hole (SEEK_DATA, io/sparse-map.ts) reads as zeros:
 * it gets the hash of zeros without being read (three quarters of an OS image). A file system
 * or device that reports no holes is read whole, as before.
 */

import { fromSystemError } from '../errors.js';
import type { Range } from '../ranges.js';
import { trace } from '../trace.js';
import type { Source } from '../types.js';
import { zeroHasher, type TopHasher } from './protocol.js';

/** Reads in flight while scanning: 2, as the agent's (agent/top-hashes.ts TOP_READ_AHEAD). */
const SCAN_READ_AHEAD = 2;
/** Stands for a unit that was not read: all hole. */
const HOLE = Buffer.alloc(0);

/** Where a file holds data, ascending; undefined when it cannot tell (every unit is read). */
type DataMap = readonly Range[] | undefined;

/** A unit's hash and the bytes it covers (short at the end of the file). */
export type UnitHash = [hash: Buffer, length: number];

interface Waiter {
  resolve: (h: UnitHash) => void;
  reject: (e: unknown) => void;
}

export class HashScanner {
  readonly #file: Pick<Source, 'read'>;
  readonly #path: string;
  #size: number;
  readonly #unit: number;
  readonly #hasher: TopHasher;
  readonly #hashes = new Map<number, UnitHash>();
  readonly #waiters = new Map<number, Waiter>();
  #error: Error | undefined;
  #stopped = false;
  #done: Promise<void> | undefined;
  readonly #dataMap: (() => DataMap | Promise<DataMap>) | undefined;
  bytesRead = 0;

  /**
   * `file` is read by offset, in any order (a FileSource). `dataMap`: where the file holds
   * data (engine/sparse-plan.ts `dataRangesOf`; undefined: it cannot tell), for a regular
   * file whose holes may be skipped; kept out of this file, which the agent bundle carries.
   */
  constructor(
    file: Pick<Source, 'read'>,
    path: string,
    size: number,
    unit: number,
    hasher: TopHasher,
    dataMap?: () => DataMap | Promise<DataMap>,
  ) {
    this.#dataMap = dataMap;
    this.#hasher = hasher;
    this.#file = file;
    this.#path = path;
    this.#size = size;
    this.#unit = unit;
  }

  /** Starts scanning [0, size) in units (the last may be short). */
  start(): this {
    this.#done = this.#scan().catch((err: unknown) => {
      this.#error = fromSystemError('EREAD', 'cannot read', this.#path, err);
      for (const w of this.#waiters.values()) w.reject(this.#error);
      this.#waiters.clear();
    });
    return this;
  }

  /** Scans no unit starting at or past `size` (units already read keep their length). */
  truncate(size: number): void {
    this.#size = Math.min(this.#size, size);
  }

  /** The hash of the unit at `offset` (taken: each is asked for once). */
  hash(offset: number): Promise<UnitHash> {
    const h = this.#hashes.get(offset);
    if (h !== undefined) {
      this.#hashes.delete(offset);
      return Promise.resolve(h);
    }
    if (this.#error !== undefined) return Promise.reject(this.#error);
    return new Promise((resolve, reject) => this.#waiters.set(offset, { resolve, reject }));
  }

  /** Stops reading (the hashes are not needed after all, or the run ends). */
  async stop(): Promise<void> {
    this.#stopped = true;
    await this.#done;
    const err = new Error('hash scanner stopped');
    for (const w of this.#waiters.values()) w.reject(err);
    this.#waiters.clear();
  }

  async #scan(): Promise<void> {
    // let ssh start first: mapping the holes loads koffi (~10 ms) on this thread
    await new Promise((resolve) => setImmediate(resolve));
    const data = await this.#dataMap?.();
    const zero = zeroHasher(this.#hasher);
    let d = 0;
    /** Whether [offset, end) is all hole (data ranges ascend, and so do the units asked). */
    const hole = (offset: number, end: number): boolean => {
      if (data === undefined) return false;
      while (d < data.length && data[d]!.end <= offset) d++;
      return d >= data.length || data[d]!.start >= end;
    };
    const free: Buffer[] = [];
    const reads: Promise<[Buffer, number, number]>[] = [];
    let next = 0;
    const start = (): void => {
      if (next >= this.#size || this.#stopped) return;
      const offset = next;
      const length = Math.min(this.#unit, this.#size - offset);
      next += length;
      if (hole(offset, offset + length)) {
        reads.push(Promise.resolve([HOLE, offset, length]));
        return;
      }
      const buf = free.pop() ?? Buffer.allocUnsafe(this.#unit);
      const p = this.#read(buf, offset, length).then((): [Buffer, number, number] => [
        buf,
        offset,
        length,
      ]);
      p.catch(() => {});
      reads.push(p);
    };
    for (let i = 0; i < SCAN_READ_AHEAD; i++) start();
    for (let r = reads.shift(); r !== undefined; r = reads.shift()) {
      const [buf, offset, length] = await r;
      start();
      if (buf === HOLE) {
        this.#publish(offset, [zero(length), length]);
        continue;
      }
      const h: UnitHash = [this.#hasher(buf.subarray(0, length)), length];
      free.push(buf);
      this.#publish(offset, h);
    }
    trace(`${this.#path}: scan done (${this.bytesRead} bytes read)`);
  }

  #publish(offset: number, h: UnitHash): void {
    const w = this.#waiters.get(offset);
    if (w !== undefined) {
      this.#waiters.delete(offset);
      w.resolve(h);
    } else this.#hashes.set(offset, h);
  }

  async #read(buf: Buffer, offset: number, length: number): Promise<void> {
    const got = await this.#file.read(buf, offset, length);
    if (got < length) throw new Error(`${this.#path} ended at ${offset + got} bytes`);
    this.bytesRead += got;
  }
}
