/**
 * A sink that holds back the writes into a range whose checksum is still being computed,
 * so a large bmap range can be read once (compared and hashed from the same read) and yet
 * nothing of it reaches DST before its checksum passed.
 *
 *   write into a range  pending  → held (a copy of the data, or only its place once
 *                                   MAX_HELD_BYTES are held: read again from SRC then)
 *                       ok       → the held writes before it first, then this one
 *                       failed   → never written
 *   finish()                     → held writes of passed ranges written; the rest (a run
 *                                   interrupted or failed inside the range) dropped
 *
 * Writes come in ascending order and ranges are verified in order, so the held writes are
 * a queue flushed from its head.
 */

import { BlksyncError } from '../errors.js';
import type { Sink } from '../types.js';

/** Bytes of held data kept in memory; beyond it, held writes are read again from SRC. */
export const MAX_HELD_BYTES = 32 * 1024 * 1024;

/** `free`: outside any range whose writes are held. */
export type HeldState = 'free' | 'pending' | 'ok' | 'failed';

export interface WriteGate {
  stateAt(offset: number): HeldState;
  /** Reads SRC again, for held writes whose data was not kept. */
  reread(buf: Buffer, offset: number, length: number): Promise<number>;
}

interface Held {
  offset: number;
  length: number;
  data: Buffer | undefined;
}

export class HeldWritesSink implements Sink {
  readonly #inner: Sink;
  readonly #gate: WriteGate;
  readonly #maxHeld: number;
  readonly #held: Held[] = [];
  #heldBytes = 0;

  constructor(inner: Sink, gate: WriteGate, maxHeld = MAX_HELD_BYTES) {
    this.#inner = inner;
    this.#gate = gate;
    this.#maxHeld = maxHeld;
  }

  async write(data: Buffer, offset: number): Promise<void> {
    const state = this.#gate.stateAt(offset);
    if (state === 'pending' || state === 'failed') {
      // the pipeline reuses its buffer: keep a copy, while memory allows
      const keep = this.#heldBytes + data.length <= this.#maxHeld;
      this.#held.push({
        offset,
        length: data.length,
        data: keep ? Buffer.from(data) : undefined,
      });
      if (keep) this.#heldBytes += data.length;
      return;
    }
    await this.#flush();
    await this.#inner.write(data, offset);
  }

  async #flush(): Promise<void> {
    for (;;) {
      const h = this.#held[0];
      if (h === undefined) return;
      const state = this.#gate.stateAt(h.offset);
      if (state === 'pending') return;
      this.#held.shift();
      if (h.data !== undefined) this.#heldBytes -= h.length;
      if (state === 'failed') continue;
      let data = h.data;
      if (data === undefined) {
        data = Buffer.allocUnsafe(h.length);
        const got = await this.#gate.reread(data, h.offset, h.length);
        if (got < h.length) {
          throw new BlksyncError(
            'ESRC_SHORT',
            `source ended at ${h.offset + got} bytes while being copied; was it truncated? Rerun the copy`,
          );
        }
      }
      await this.#inner.write(data, h.offset);
    }
  }

  async finish(): Promise<void> {
    await this.#flush();
    // what is left was never verified (an interrupted run): a rerun writes it
    this.#held.length = 0;
    this.#heldBytes = 0;
    await this.#inner.finish();
  }
}
