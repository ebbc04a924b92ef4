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
export const MAX_HELD_BYTES = 8 * 1024 * 1024;
/** Neighbouring held writes read again from SRC are read and written in pieces of this size. */
const REREAD_BYTES = 4 * 1024 * 1024;

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
  /** Two buffers for rereads: one written while the next piece is read. */
  #rereadBuffers: Buffer[] = [];

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
    // a piece read again from SRC is written while the next one is read
    let writing: Promise<void> = Promise.resolve();
    try {
      for (;;) {
        const h = this.#held[0];
        if (h === undefined) return;
        const state = this.#gate.stateAt(h.offset);
        if (state === 'pending') return;
        this.#held.shift();
        if (h.data !== undefined) this.#heldBytes -= h.length;
        if (state === 'failed') continue;
        if (h.data !== undefined) {
          await writing;
          writing = this.#inner.write(h.data, h.offset);
          continue;
        }
        // neighbours not kept, in a range that passed: one read of up to REREAD_BYTES
        let end = h.offset + h.length;
        for (;;) {
          const n = this.#held[0];
          if (
            n === undefined ||
            n.data !== undefined ||
            n.offset !== end ||
            end - h.offset + n.length > REREAD_BYTES ||
            this.#gate.stateAt(n.offset) !== 'ok'
          ) {
            break;
          }
          this.#held.shift();
          end += n.length;
        }
        const piece = await this.#reread(h.offset, end - h.offset);
        await writing;
        writing = this.#inner.write(piece, h.offset);
      }
    } finally {
      await writing;
    }
  }

  /** Reads SRC[offset, offset + length) again, into one of two buffers used in turn. */
  async #reread(offset: number, length: number): Promise<Buffer> {
    while (this.#rereadBuffers.length < 2)
      this.#rereadBuffers.push(Buffer.allocUnsafe(REREAD_BYTES));
    let buf = this.#rereadBuffers.shift()!;
    if (buf.length < length) buf = Buffer.allocUnsafe(length);
    this.#rereadBuffers.push(buf); // reused two reads later, once its write is done
    const piece = buf.subarray(0, length);
    const got = await this.#gate.reread(piece, offset, length);
    if (got < length) {
      throw new BlksyncError(
        'ESRC_SHORT',
        `source ended at ${offset + got} bytes while being copied; was it truncated? Rerun the copy`,
      );
    }
    return piece;
  }

  async finish(): Promise<void> {
    await this.#flush();
    // what is left was never verified (an interrupted run): a rerun writes it
    this.#held.length = 0;
    this.#heldBytes = 0;
    await this.#inner.finish();
  }
}
