/**
 * The TOP_HASHES stream of a remote copy's session (see link.ts): hashes the agent sends
 * ahead of the copy, kept in a bounded ring until the copy takes them.
 */

import { WIRE_HASH_BYTES } from './protocol.js';

/** A promise's two ends, kept until the answer comes. */
export interface Deferred<T> {
  resolve: (v: T) => void;
  reject: (e: unknown) => void;
}

/**
 * TOP_HASHES received and not yet taken by the copy, at most (16 bytes each: 16 MiB; 4 TiB
 * of image ahead at 4 MiB units). An agent further ahead is refused, not buffered.
 */
export const TOP_WINDOW_UNITS = 1 << 20;

/**
 * The TOP_HASHES stream the HELLO asked for: `count` units of `unit` bytes, arriving in order
 * and taken by the copy in any order (each once). Kept in a ring of at most `window` hashes
 * between the oldest not yet taken and the newest received. Exported for its tests.
 */
export class TopStream {
  readonly #unit: number;
  readonly #count: number;
  readonly #window: number;
  readonly #ring: Buffer;
  readonly #taken: Uint8Array;
  /** Index of the oldest unit not yet taken; of the next unit to arrive. */
  #base = 0;
  #received = 0;
  readonly #waiters = new Map<number, Deferred<Buffer>>();

  constructor(unit: number, limit: number, window: number) {
    this.#unit = unit;
    this.#count = Math.ceil(limit / unit);
    this.#window = Math.max(1, Math.min(window, this.#count));
    this.#ring = Buffer.alloc(this.#window * WIRE_HASH_BYTES);
    this.#taken = new Uint8Array(this.#window);
  }

  /** Takes in one TOP_HASHES frame; returns what is wrong with it, if anything. */
  accept(offset: number, unit: number, hashes: Buffer): string | undefined {
    const n = hashes.length / WIRE_HASH_BYTES;
    if (unit !== this.#unit) return `TOP_HASHES of unit ${unit}, asked for ${this.#unit}`;
    if (n === 0) return 'empty TOP_HASHES';
    if (offset !== this.#received * this.#unit) {
      return `TOP_HASHES at ${offset}, expected ${this.#received * this.#unit}`;
    }
    if (this.#received + n > this.#count) return 'TOP_HASHES past the end of the image';
    if (this.#received + n - this.#base > this.#window) {
      return `TOP_HASHES ran more than ${this.#window} units ahead of the copy`;
    }
    for (let k = 0; k < n; k++) {
      const i = this.#received + k;
      const h = hashes.subarray(k * WIRE_HASH_BYTES, (k + 1) * WIRE_HASH_BYTES);
      const w = this.#waiters.get(i);
      if (w !== undefined) {
        this.#waiters.delete(i);
        this.#take(i);
        w.resolve(Buffer.from(h));
      } else h.copy(this.#ring, (i % this.#window) * WIRE_HASH_BYTES);
    }
    this.#received += n;
    return undefined;
  }

  /** The hash of the unit at `offset`: each is asked for once. */
  get(offset: number): Promise<Buffer> {
    const i = offset / this.#unit;
    if (!Number.isInteger(i) || i < 0 || i >= this.#count || this.#isTaken(i)) {
      return Promise.reject(new Error(`top hash at ${offset} asked for twice or out of range`));
    }
    if (i < this.#received) {
      this.#take(i);
      const at = (i % this.#window) * WIRE_HASH_BYTES;
      return Promise.resolve(Buffer.from(this.#ring.subarray(at, at + WIRE_HASH_BYTES)));
    }
    return new Promise((resolve, reject) => this.#waiters.set(i, { resolve, reject }));
  }

  /** Every unit's hash has arrived. */
  get complete(): boolean {
    return this.#received === this.#count;
  }

  get waiting(): boolean {
    return this.#waiters.size > 0;
  }

  fail(err: unknown): void {
    for (const w of this.#waiters.values()) w.reject(err);
    this.#waiters.clear();
  }

  #isTaken(i: number): boolean {
    return i < this.#base || (i < this.#base + this.#window && this.#taken[i % this.#window] === 1);
  }

  #take(i: number): void {
    this.#taken[i % this.#window] = 1;
    while (this.#base < this.#count && this.#taken[this.#base % this.#window] === 1) {
      this.#taken[this.#base % this.#window] = 0;
      this.#base++;
    }
  }
}
