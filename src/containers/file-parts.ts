/**
 * Reading part of a file SRC: a Source over a slice of it (a stored zip entry, a tar entry, a
 * fixed VHD's data) and a forward cursor that skips without reading (for walking tar headers).
 */

import type { FileHandle } from 'node:fs/promises';
import { BlksyncError, fromSystemError } from '../errors.js';
import { readFully } from '../io/read-fully.js';
import type { Source } from '../types.js';
import type { Cursor } from './tar.js';

/** Bytes [start, start + size) of a file, read by offset. */
export class SliceSource implements Source {
  readonly size: number;
  readonly #fh: FileHandle;
  readonly #start: number;
  readonly #name: string;

  constructor(fh: FileHandle, start: number, size: number, name: string) {
    this.#fh = fh;
    this.#start = start;
    this.size = size;
    this.#name = name;
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const n = Math.max(0, Math.min(length, this.size - offset));
    try {
      return await readFully(this.#fh, buf, 0, n, this.#start + offset);
    } catch (err) {
      throw fromSystemError('EREAD', 'cannot read', this.#name, err);
    }
  }

  async close(): Promise<void> {}
}

/** Walks a file forward by positioned reads; skipping reads nothing. */
export class FileCursor implements Cursor {
  position = 0;
  readonly #fh: FileHandle;
  readonly #size: number;
  readonly #name: string;

  constructor(fh: FileHandle, size: number, name: string) {
    this.#fh = fh;
    this.#size = size;
    this.#name = name;
  }

  async upTo(n: number): Promise<Buffer> {
    const want = Math.max(0, Math.min(n, this.#size - this.position));
    const buf = Buffer.alloc(want);
    const got = await readFully(this.#fh, buf, 0, want, this.position);
    this.position += got;
    return buf.subarray(0, got);
  }

  async exact(n: number, what: string): Promise<Buffer> {
    const b = await this.upTo(n);
    if (b.length < n) throw this.#short(what);
    return b;
  }

  skip(n: number, what: string): Promise<void> {
    if (this.position + n > this.#size) return Promise.reject(this.#short(what));
    this.position += n;
    return Promise.resolve();
  }

  #short(what: string): BlksyncError {
    return new BlksyncError(
      'ESRC_SHORT',
      `${this.#name} ends inside ${what}; the file is truncated: download or copy it again`,
      { path: this.#name },
    );
  }
}
