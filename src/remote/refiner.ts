/**
 * Finds each chunk's differing spans as early as possible, ahead of the pipeline: a chunk is
 * compared as soon as both of its top-level hashes are known, and a chunk that differs is
 * refined (finer hashes, then the blocks' bytes when they come from an agent) at once,
 * several at a time. The pipeline then meets finished results instead of waiting out each
 * chunk's round trips in turn, which is what made a copy with scattered changes crawl when
 * the link or the machine was slow.
 *
 *   top hashes ─► compare ─► equal: no spans
 *                         └► differs: refine (≤ REFINE_CONCURRENCY at once) ─► spans (+ bytes)
 */

import { trace } from '../trace.js';

/** What the refiner found for one chunk. */
export interface Found {
  /** [start, end) pairs relative to the chunk. */
  spans: number[];
  /** The spans' new bytes, back to back, when they were fetched from an agent. */
  data?: Buffer;
  /** The chunk's whole new content, when a hook needs every byte (an index being made). */
  whole?: Buffer;
}

/** Chunks refined at once (each may hold a chunk-sized buffer while it does). */
export const REFINE_CONCURRENCY = 8;

const NOTHING: Found = { spans: [] };

export class Refiner {
  readonly #results = new Map<number, Promise<Found>>();
  readonly #waiters = new Map<number, (p: Promise<Found>) => void>();
  #stopped = false;
  #running = 0;
  readonly #inFlight = new Set<Promise<Found>>();
  #slot: (() => void) | undefined;
  /** The comparison failed at this chunk: it and every later one fail with `#error`. */
  #failedAt = Infinity;
  #error: Error | undefined;

  /**
   * `same(offset, length)` tells whether the chunk's top hashes are equal (awaited in chunk
   * order); `refine(offset, length)` finds the spans of a chunk that differs.
   */
  constructor(
    size: number,
    chunkSize: number,
    same: (offset: number, length: number) => Promise<boolean>,
    refine: (offset: number, length: number) => Promise<Found>,
  ) {
    void this.#run(size, chunkSize, same, refine);
  }

  /** The result for the chunk at `offset` (taken: each is asked for once). */
  get(offset: number): Promise<Found> {
    const p = this.#results.get(offset);
    if (p !== undefined) {
      this.#results.delete(offset);
      return p;
    }
    if (offset >= this.#failedAt) return Promise.reject(this.#error!);
    if (this.#stopped) return Promise.reject(new Error('refiner stopped'));
    return new Promise<Promise<Found>>((resolve) => this.#waiters.set(offset, resolve)).then(
      (q) => q,
    );
  }

  /**
   * Stops starting work and waits for the refinements under way, so that no request follows
   * the session's DONE (the run ended, was interrupted, or failed).
   */
  async stop(): Promise<void> {
    this.#stopped = true;
    this.#slot?.();
    const err = new Error('refiner stopped');
    for (const w of this.#waiters.values()) w(Promise.reject(err));
    this.#waiters.clear();
    await Promise.allSettled([...this.#inFlight]);
  }

  #publish(offset: number, p: Promise<Found>): void {
    p.catch(() => {}); // reported to whoever takes it
    const w = this.#waiters.get(offset);
    if (w !== undefined) {
      this.#waiters.delete(offset);
      w(p);
    } else this.#results.set(offset, p);
  }

  async #run(
    size: number,
    chunkSize: number,
    same: (offset: number, length: number) => Promise<boolean>,
    refine: (offset: number, length: number) => Promise<Found>,
  ): Promise<void> {
    for (let offset = 0; offset < size && !this.#stopped; offset += chunkSize) {
      const length = Math.min(chunkSize, size - offset);
      let equal: boolean;
      try {
        equal = await same(offset, length);
      } catch (err) {
        // this chunk and every later one fail with it: one record, not one per chunk (a
        // peer's claimed size would set how many)
        this.#error = err instanceof Error ? err : new Error(String(err));
        this.#failedAt = offset;
        for (const [o, w] of this.#waiters) {
          if (o < offset) continue;
          this.#waiters.delete(o);
          w(Promise.reject(this.#error));
        }
        return;
      }
      if (equal) {
        this.#publish(offset, Promise.resolve(NOTHING));
        continue;
      }
      while (this.#running >= REFINE_CONCURRENCY && !this.#stopped) {
        await new Promise<void>((resolve) => (this.#slot = resolve));
      }
      // stopped while comparing or waiting for a slot: a request now would follow the DONE
      if (this.#stopped) return;
      this.#running++;
      const p = refine(offset, length).finally(() => {
        this.#inFlight.delete(p);
        this.#running--;
        const slot = this.#slot;
        this.#slot = undefined;
        slot?.();
      });
      this.#inFlight.add(p);
      this.#publish(offset, p);
    }
    if (!this.#stopped) trace('top hashes compared (refinements under way)');
  }
}
