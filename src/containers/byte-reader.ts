/**
 * Reads a byte stream forward in exact amounts, for the container parsers that walk a stream
 * (a tar or zip from stdin or a decompressor, an Android sparse image from a URL). A stream
 * that ends inside a structure is ESRC_SHORT: a truncated archive is never a short image.
 */

import { BlksyncError, fromSystemError } from '../errors.js';

export class ByteReader {
  readonly #it: AsyncIterator<Buffer | string>;
  readonly #name: string;
  #pending: Buffer | undefined;
  #ended = false;
  /** Bytes consumed so far. */
  position = 0;

  constructor(stream: AsyncIterable<Buffer | string>, name: string) {
    this.#it = stream[Symbol.asyncIterator]();
    this.#name = name;
  }

  /** The next piece of at most `max` bytes, or undefined at the end of the stream. */
  async next(max: number): Promise<Buffer | undefined> {
    let chunk = this.#pending;
    this.#pending = undefined;
    while (chunk === undefined || chunk.length === 0) {
      if (this.#ended) return undefined;
      let r: IteratorResult<Buffer | string>;
      try {
        r = await this.#it.next();
      } catch (err) {
        throw err instanceof BlksyncError
          ? err
          : fromSystemError('EREAD', 'cannot read', this.#name, err);
      }
      if (r.done === true) {
        this.#ended = true;
        return undefined;
      }
      chunk = typeof r.value === 'string' ? Buffer.from(r.value) : r.value;
    }
    if (chunk.length > max) {
      this.#pending = chunk.subarray(max);
      chunk = chunk.subarray(0, max);
    }
    this.position += chunk.length;
    return chunk;
  }

  /** Exactly `n` bytes (`what` names them in the error when the stream ends first). */
  async exact(n: number, what: string): Promise<Buffer> {
    const first = await this.next(n);
    if (first !== undefined && first.length === n) return first;
    const out = Buffer.alloc(n);
    let got = 0;
    if (first !== undefined) got += first.copy(out, 0);
    while (got < n) {
      const piece = await this.next(n - got);
      if (piece === undefined) throw this.short(what);
      got += piece.copy(out, got);
    }
    return out;
  }

  /** Up to `n` bytes or fewer at the end: for an optional trailer. */
  async upTo(n: number): Promise<Buffer> {
    const pieces: Buffer[] = [];
    let got = 0;
    while (got < n) {
      const piece = await this.next(n - got);
      if (piece === undefined) break;
      pieces.push(piece);
      got += piece.length;
    }
    return Buffer.concat(pieces, got);
  }

  /** Drops `n` bytes. */
  async skip(n: number, what: string): Promise<void> {
    let left = n;
    while (left > 0) {
      const piece = await this.next(Math.min(left, Number.MAX_SAFE_INTEGER));
      if (piece === undefined) throw this.short(what);
      left -= piece.length;
    }
  }

  /** Yields exactly `n` bytes in pieces as they come. */
  async *take(n: number, what: string): AsyncGenerator<Buffer> {
    let left = n;
    while (left > 0) {
      const piece = await this.next(left);
      if (piece === undefined) throw this.short(what);
      left -= piece.length;
      yield piece;
    }
  }

  /** Gives back bytes read too far (they are read again next). */
  unread(bytes: Buffer): void {
    if (bytes.length === 0) return;
    this.#pending = this.#pending === undefined ? bytes : Buffer.concat([bytes, this.#pending]);
    this.position -= bytes.length;
  }

  short(what: string): BlksyncError {
    return new BlksyncError(
      'ESRC_SHORT',
      `${this.#name} ends inside ${what}; the file is truncated: download or copy it again`,
      { path: this.#name },
    );
  }

  async close(): Promise<void> {
    try {
      await this.#it.return?.();
    } catch {
      // the stream failed already; that error was reported by a read
    }
  }
}

/** The first `n` bytes of `src` (fewer if it is shorter), and all of it again from the start. */
export async function peekBytes(
  src: AsyncIterable<Buffer>,
  n: number,
): Promise<{ head: Buffer; all: AsyncIterable<Buffer> }> {
  const it = src[Symbol.asyncIterator]();
  const seen: Buffer[] = [];
  let have = 0;
  let done = false;
  while (have < n) {
    const r = await it.next();
    if (r.done === true) {
      done = true;
      break;
    }
    seen.push(r.value);
    have += r.value.length;
  }
  async function* all(): AsyncGenerator<Buffer> {
    try {
      yield* seen;
      while (!done) {
        const r = await it.next();
        if (r.done === true) return;
        yield r.value;
      }
    } finally {
      await it.return?.();
    }
  }
  return { head: Buffer.concat(seen).subarray(0, n), all: all() };
}
