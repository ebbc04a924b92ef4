/**
 * Exact reads from a stream: `read(n)` gives n bytes or fails, `line()` a CRLF-ended line of
 * bounded length. What the multipart/byteranges parser needs, without buffering the body.
 */

import type { Readable } from 'node:stream';
import { BlksyncError } from '../errors.js';

/** Longest header or boundary line accepted in a multipart body. */
export const MAX_LINE_BYTES = 8192;

export class ByteReader {
  readonly #it: AsyncIterator<Buffer>;
  readonly #url: string;
  #buf: Buffer = Buffer.alloc(0);
  #ended = false;
  /** Bytes taken from the stream so far. */
  received = 0;

  constructor(stream: Readable, url: string) {
    this.#it = stream[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
    this.#url = url;
  }

  /** The stream's next piece, undefined at its end. */
  async #next(): Promise<Buffer | undefined> {
    if (this.#ended) return undefined;
    const r = await this.#it.next();
    if (r.done === true) {
      this.#ended = true;
      return undefined;
    }
    this.received += r.value.length;
    return r.value;
  }

  async #more(): Promise<boolean> {
    const next = await this.#next();
    if (next === undefined) return false;
    this.#buf = this.#buf.length === 0 ? next : Buffer.concat([this.#buf, next]);
    return true;
  }

  #short(what: string): BlksyncError {
    return new BlksyncError(
      'ESRC_SHORT',
      `${this.#url}: the answer ended early, in ${what}; rerun to try again`,
      { path: this.#url },
    );
  }

  /** Exactly `n` bytes. */
  async read(n: number, what: string): Promise<Buffer> {
    if (this.#buf.length < n) {
      // joined once: joining per piece copied a large read over and over (quadratic)
      const parts = [this.#buf];
      let have = this.#buf.length;
      while (have < n) {
        const next = await this.#next();
        if (next === undefined) throw this.#short(what);
        parts.push(next);
        have += next.length;
      }
      this.#buf = Buffer.concat(parts, have);
    }
    const out = this.#buf.subarray(0, n);
    this.#buf = this.#buf.subarray(n);
    return out;
  }

  /** Drops `n` bytes without keeping them. */
  async skip(n: number, what: string): Promise<void> {
    let left = n;
    for (;;) {
      const take = Math.min(left, this.#buf.length);
      this.#buf = this.#buf.subarray(take);
      left -= take;
      if (left === 0) return;
      if (!(await this.#more())) throw this.#short(what);
    }
  }

  /** The next line without its CRLF (a bare LF is accepted too). */
  async line(what: string): Promise<string> {
    for (;;) {
      const nl = this.#buf.indexOf(10);
      if (nl >= 0) {
        if (nl > MAX_LINE_BYTES) break;
        const end = nl > 0 && this.#buf[nl - 1] === 13 ? nl - 1 : nl;
        const text = this.#buf.toString('latin1', 0, end);
        this.#buf = this.#buf.subarray(nl + 1);
        return text;
      }
      if (this.#buf.length > MAX_LINE_BYTES) break;
      if (!(await this.#more())) throw this.#short(what);
    }
    throw new BlksyncError(
      'ESRC_RANGE',
      `${this.#url}: a line of the multipart answer is longer than ${MAX_LINE_BYTES} bytes; the server's answer is not multipart/byteranges`,
      { path: this.#url },
    );
  }

  /** Whatever is left, up to `max` bytes (the epilogue), then true at the end. */
  async drain(max: number): Promise<boolean> {
    let seen = this.#buf.length;
    this.#buf = Buffer.alloc(0);
    while (seen <= max) {
      if (!(await this.#more())) return true;
      seen += this.#buf.length;
      this.#buf = Buffer.alloc(0);
    }
    return false;
  }
}
