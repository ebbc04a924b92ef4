/**
 * The target knowledges that need nothing but DST itself:
 *   - ReadTarget: read DST and compare bytes (memcmp speed; the default);
 *   - ZeroTarget: DST is known to be all zeros (a file just created), so only non-zero
 *     blocks are written and the rest stay holes;
 *   - NoTarget: know nothing, write everything (--full, dd behaviour).
 */

import type { FileHandle } from 'node:fs/promises';
import { BlksyncError, fromSystemError, type ErrorCode } from '../errors.js';
import { BufferPool } from '../io/buffer-pool.js';
import { readFully } from '../io/read-fully.js';
import type { ChunkKnowledge, TargetKnowledge } from '../types.js';

/** Appends the spans of blocks where a and b differ. Compares whole chunks first (memcmp). */
export function diffBuffers(
  a: Buffer,
  b: Buffer,
  length: number,
  blockSize: number,
  out: number[],
): void {
  if (a.compare(b, 0, length, 0, length) === 0) return;
  let runStart = -1;
  for (let s = 0; s < length; s += blockSize) {
    const e = Math.min(s + blockSize, length);
    const differs = a.compare(b, s, e, s, e) !== 0;
    if (differs && runStart < 0) runStart = s;
    else if (!differs && runStart >= 0) {
      out.push(runStart, s);
      runStart = -1;
    }
  }
  if (runStart >= 0) out.push(runStart, length);
}

export interface ReadTargetOptions {
  /**
   * DST's size when it may be shorter than the image (diff's BASE): past it every block
   * counts as differing. Without it, DST must hold every byte asked for.
   */
  size?: number;
  /** The code when DST ends early (default EDEST_SHORT). */
  shortCode?: ErrorCode;
}

export class ReadTarget implements TargetKnowledge {
  readonly #fh: FileHandle;
  readonly #path: string;
  readonly #pool: BufferPool;
  readonly #size: number;
  readonly #shortCode: ErrorCode;
  bytesRead = 0;

  constructor(fh: FileHandle, path: string, chunkSize: number, options: ReadTargetOptions = {}) {
    this.#fh = fh;
    this.#path = path;
    this.#pool = new BufferPool(chunkSize);
    this.#size = options.size ?? Infinity;
    this.#shortCode = options.shortCode ?? 'EDEST_SHORT';
  }

  async load(offset: number, length: number): Promise<ChunkKnowledge> {
    const buf = this.#pool.get();
    const want = Math.max(0, Math.min(offset + length, this.#size) - offset);
    let got: number;
    try {
      got = await readFully(this.#fh, buf, 0, want, offset);
    } catch (err) {
      this.#pool.put(buf);
      throw fromSystemError('EREAD', 'cannot read', this.#path, err);
    }
    this.bytesRead += got;
    if (got < want) {
      this.#pool.put(buf);
      // where it ends now: a file that shrank below this chunk ends before the chunk's offset
      let end = offset + got;
      try {
        const st = await this.#fh.stat();
        if (st.isFile()) end = Math.min(end, st.size);
      } catch {
        // the offset reached is what is known
      }
      throw new BlksyncError(
        this.#shortCode,
        `${this.#path} ended at ${end} bytes while being read; did it shrink? Rerun the command.`,
        { path: this.#path },
      );
    }
    return {
      diff: (data, len, blockSize, out) => {
        if (want >= len) return diffBuffers(data, buf, len, blockSize, out);
        // blocks that DST holds only in part (or not at all) differ
        const inDst = Math.floor(want / blockSize) * blockSize;
        diffBuffers(data, buf, inDst, blockSize, out);
        if (out.length > 0 && out[out.length - 1] === inDst) out[out.length - 1] = len;
        else out.push(inDst, len);
      },
      held: buf,
      release: () => this.#pool.put(buf),
    };
  }

  async close(): Promise<void> {
    // the handle belongs to the caller, who also writes through it
  }
}

let zeros = Buffer.alloc(0);

function zeroBuffer(length: number): Buffer {
  if (zeros.length < length) zeros = Buffer.alloc(length);
  return zeros;
}

const ZERO_CHUNK: ChunkKnowledge = {
  diff: (data, length, blockSize, out) =>
    diffBuffers(data, zeroBuffer(length), length, blockSize, out),
  release: () => {},
};

export class ZeroTarget implements TargetKnowledge {
  readonly bytesRead = 0;
  load(): Promise<ChunkKnowledge> {
    return Promise.resolve(ZERO_CHUNK);
  }
  async close(): Promise<void> {}
}

const ALL_CHUNK: ChunkKnowledge = {
  diff: (_data, length, _blockSize, out) => {
    if (length > 0) out.push(0, length);
  },
  release: () => {},
};

export class NoTarget implements TargetKnowledge {
  readonly bytesRead = 0;
  load(): Promise<ChunkKnowledge> {
    return Promise.resolve(ALL_CHUNK);
  }
  async close(): Promise<void> {}
}
