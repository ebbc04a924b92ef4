/**
 * One read of SRC shared by several pipelines (`copy SRC DST1 DST2 …`).
 *
 *                    ┌───────────── ring: at most RING_CHUNKS pieces ─────────────┐
 *   SRC ─► reader ─► │ piece k │ piece k+1 │ …                                    │
 *                    └─────────────────────────────────────────────────────────────┘
 *                         ▲ view 1 reads here    ▲ view 2 reads here    (one per DST)
 *
 * The reader walks the plan in chunks, each read once into a piece of the ring. Each
 * destination's pipeline reads through its own `view` (a `Source`), which copies what it asks
 * for out of the pieces. A piece is reused only when every open view has read past it, so the
 * slowest destination paces the reader and memory stays at RING_CHUNKS × chunkSize: SRC is
 * never read a second time. A view that is closed (its destination done, refused or failed)
 * no longer holds the ring back.
 */

import { BlksyncError } from '../errors.js';
import { chunksOf } from '../engine/pipeline.js';
import type { Plan, Source } from '../types.js';

/**
 * Pieces the ring holds (each one chunk: 1 MiB by default, 4 MiB with an index): 8 MiB,
 * whatever the number of destinations.
 */
export const RING_CHUNKS = 8;

interface Piece {
  offset: number;
  /** Bytes the source gave (fewer than asked only at its end). */
  got: number;
  buf: Buffer;
}

export class Broadcast {
  readonly #source: Source;
  readonly #plan: Plan;
  readonly #chunkSize: number;
  readonly #capacity: number;
  readonly #signal: AbortSignal | undefined;
  /** The pieces read and not yet reused, ascending. */
  readonly #pieces: Piece[] = [];
  readonly #free: Buffer[] = [];
  /** Per view: the offset below which it reads no more; undefined once it is closed. */
  readonly #cursors: (number | undefined)[];
  #error: Error | undefined;
  #ended = false;
  #wake: () => void = () => {};
  #changed: Promise<void>;
  #reading: Promise<void> | undefined;
  /** Bytes of SRC read. */
  bytesRead = 0;

  /**
   * `pieces`: chunks the ring holds (RING_CHUNKS, more when a view reads larger pieces than
   * `chunkSize`: it needs a whole read's worth at once). `views`: how many destinations read
   * through it; each must be closed when done.
   */
  constructor(
    source: Source,
    plan: Plan,
    chunkSize: number,
    pieces: number,
    views: number,
    signal?: AbortSignal,
  ) {
    this.#source = source;
    this.#plan = plan;
    this.#chunkSize = chunkSize;
    this.#capacity = pieces;
    this.#signal = signal;
    this.#cursors = new Array<number | undefined>(views).fill(0);
    this.#changed = this.#nextChange();
    signal?.addEventListener('abort', () => this.#notify(), { once: true });
  }

  #nextChange(): Promise<void> {
    return new Promise((resolve) => (this.#wake = resolve));
  }

  #notify(): void {
    const wake = this.#wake;
    this.#changed = this.#nextChange();
    wake();
  }

  /** The Source destination `i` reads through. */
  view(i: number): Source & { close(): Promise<void> } {
    this.#reading ??= this.#run();
    let queue: Promise<unknown> = Promise.resolve();
    return {
      size: this.#source.size,
      read: (buf, offset, length) => {
        // the pipeline keeps several reads in flight; they are served in the order asked
        const result = queue.then(() => this.#readAt(i, buf, offset, length));
        queue = result.catch(() => {});
        return result;
      },
      close: () => {
        this.#cursors[i] = undefined;
        this.#notify();
        return Promise.resolve();
      },
    };
  }

  #aborted(): boolean {
    return this.#signal?.aborted === true;
  }

  #open(): boolean {
    return this.#cursors.some((c) => c !== undefined);
  }

  async #run(): Promise<void> {
    try {
      for (const chunk of chunksOf(this.#plan, this.#chunkSize)) {
        for (;;) {
          this.#recycle();
          if (!this.#open() || this.#aborted()) return;
          if (this.#pieces.length < this.#capacity) break;
          await this.#changed;
        }
        const buf = this.#free.pop() ?? Buffer.allocUnsafe(this.#chunkSize);
        const got = await this.#source.read(buf, chunk.offset, chunk.length);
        this.bytesRead += got;
        this.#pieces.push({ offset: chunk.offset, got, buf });
        this.#notify();
        if (got < chunk.length) return; // the source ended early: the views report it
      }
    } catch (err) {
      this.#error = err instanceof Error ? err : new Error(String(err));
    } finally {
      this.#ended = true;
      this.#notify();
    }
  }

  /** Hands the pieces every open view has read past back to the free list. */
  #recycle(): void {
    let low = Infinity;
    for (const c of this.#cursors) if (c !== undefined && c < low) low = c;
    while (this.#pieces.length > 0) {
      const p = this.#pieces[0]!;
      if (p.offset + p.got > low) break;
      this.#pieces.shift();
      this.#free.push(p.buf);
    }
  }

  async #readAt(i: number, buf: Buffer, offset: number, length: number): Promise<number> {
    const closed = (): BlksyncError =>
      new BlksyncError('EREAD', 'read from a fan-out view after it was closed');
    if (this.#cursors[i] === undefined) throw closed();
    // everything before this read is done with: the reader may reuse it
    this.#cursors[i] = offset;
    this.#notify();
    let copied = 0;
    while (copied < length) {
      const pos = offset + copied;
      const piece = this.#pieces.find((p) => p.offset <= pos && pos < p.offset + p.got);
      if (piece !== undefined) {
        const from = pos - piece.offset;
        const n = Math.min(length - copied, piece.got - from);
        piece.buf.copy(buf, copied, from, from + n);
        copied += n;
        continue;
      }
      if (this.#error !== undefined) throw this.#error;
      if (this.#aborted()) {
        throw new BlksyncError('EINTERRUPTED', 'interrupted; rerun the same command to finish');
      }
      if (this.#cursors[i] === undefined) throw closed();
      const last = this.#pieces[this.#pieces.length - 1];
      if (last !== undefined && last.offset + last.got > pos) {
        // the reader is past this offset without having read it: outside the shared plan
        throw new BlksyncError('EREAD', `fan-out: offset ${pos} is not in the plan being read`);
      }
      if (this.#ended) break; // SRC ended: a short read, reported by the pipeline
      await this.#changed;
    }
    this.#cursors[i] = offset + copied;
    this.#notify();
    return copied;
  }

  /** Waits for the reader to stop (every view closed, the end, or an error). */
  async close(): Promise<void> {
    for (let i = 0; i < this.#cursors.length; i++) this.#cursors[i] = undefined;
    this.#notify();
    await this.#reading;
  }
}
