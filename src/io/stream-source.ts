/**
 * A sequential reader over a byte stream (stdin, a pipe, fs.createReadStream): read exactly
 * n bytes at a time, in order, with no seeking. Patch files are parsed through it whether
 * they come from a file or from stdin, so both take the same checks.
 */

import { createReadStream } from 'node:fs';
import type { Readable } from 'node:stream';
import { fromSystemError } from '../errors.js';

/** Read-ahead of a patch file opened by path. */
const FILE_HIGH_WATER_BYTES = 1024 * 1024;

export class SequentialReader {
  readonly path: string;
  readonly #it: AsyncIterator<Buffer | string>;
  readonly #stream: Readable | undefined;
  #pending: Buffer[] = [];
  #pendingBytes = 0;
  #ended = false;
  /** Bytes handed out so far. */
  position = 0;

  constructor(stream: AsyncIterable<Buffer | string>, path: string) {
    this.path = path;
    this.#it = stream[Symbol.asyncIterator]();
    this.#stream = 'destroy' in stream ? (stream as Readable) : undefined;
  }

  /** A reader over the file at `path`. */
  static fromFile(path: string): SequentialReader {
    return new SequentialReader(
      createReadStream(path, { highWaterMark: FILE_HIGH_WATER_BYTES }),
      path,
    );
  }

  /** Returns the next `n` bytes, or fewer when the stream ends first. */
  async read(n: number): Promise<Buffer> {
    while (this.#pendingBytes < n && !this.#ended) {
      let next: IteratorResult<Buffer | string>;
      try {
        next = await this.#it.next();
      } catch (err) {
        throw fromSystemError('EREAD', 'cannot read', this.path, err);
      }
      if (next.done === true) {
        this.#ended = true;
        break;
      }
      const chunk = typeof next.value === 'string' ? Buffer.from(next.value) : next.value;
      if (chunk.length === 0) continue;
      this.#pending.push(chunk);
      this.#pendingBytes += chunk.length;
    }
    const take = Math.min(n, this.#pendingBytes);
    let out: Buffer;
    const first = this.#pending[0];
    if (first !== undefined && first.length >= take) {
      out = first.subarray(0, take);
      if (first.length === take) this.#pending.shift();
      else this.#pending[0] = first.subarray(take);
    } else {
      out = Buffer.allocUnsafe(take);
      let at = 0;
      while (at < take) {
        const c = this.#pending[0]!;
        const k = Math.min(c.length, take - at);
        c.copy(out, at, 0, k);
        at += k;
        if (k === c.length) this.#pending.shift();
        else this.#pending[0] = c.subarray(k);
      }
    }
    this.#pendingBytes -= take;
    this.position += take;
    return out;
  }

  /** True when no byte is left (reads ahead to find out). */
  async atEnd(): Promise<boolean> {
    if (this.#pendingBytes > 0) return false;
    const peek = await this.read(1);
    if (peek.length === 0) return true;
    this.#pending.unshift(peek);
    this.#pendingBytes += 1;
    this.position -= 1;
    return false;
  }

  /** Stops reading and releases the stream. */
  close(): void {
    this.#stream?.destroy();
  }
}
