/**
 * Reading part of a file SRC: a Source over a slice of it (a tar entry, a fixed VHD's data; a
 * stored zip entry, its CRC-32 checked) and a forward cursor that skips without reading (for
 * walking tar headers).
 */

import type { FileHandle } from 'node:fs/promises';
import { crc32 } from 'node:zlib';
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

/** Bytes summed at a time where a read left a gap (a bmap's unmapped range). */
const GAP_PIECE_BYTES = 1024 * 1024;

/**
 * A SliceSource whose CRC-32 is checked (a stored zip entry): each read's bytes are summed in
 * offset order (a read waits for the reads before it to be summed, while its I/O runs beside
 * theirs), what the reads skip is read and summed here, and the read that reaches the end
 * waits for `atEnd(crc)`, which throws on a wrong sum: that read fails before its bytes are
 * written, so a damaged entry never ends a copy with exit 0.
 */
export class CheckedSliceSource implements Source {
  readonly size: number;
  readonly #slice: SliceSource;
  readonly #atEnd: (crc: number) => void;
  /** Summed up to here: bytes [0, #summed) of the slice. */
  #summed = 0;
  #crc = 0;
  #chain: Promise<unknown> = Promise.resolve();

  constructor(slice: SliceSource, atEnd: (crc: number) => void) {
    this.#slice = slice;
    this.size = slice.size;
    this.#atEnd = atEnd;
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const io = this.#slice.read(buf, offset, length);
    const step = this.#chain.then(async () => {
      const n = await io;
      await this.#sumTo(offset);
      const from = Math.max(offset, this.#summed);
      if (from < offset + n) {
        this.#crc = crc32(buf.subarray(from - offset, n), this.#crc);
        this.#summed = offset + n;
      }
      if (offset + n >= this.size || (length === 0 && offset >= this.size)) {
        await this.#sumTo(this.size);
        this.#atEnd(this.#crc >>> 0);
      }
      return n;
    });
    // a failed step fails its read, and every read after it
    this.#chain = step;
    return step;
  }

  /** Reads and sums what no read covered, up to `end`. */
  async #sumTo(end: number): Promise<void> {
    if (this.#summed >= end) return;
    const piece = Buffer.allocUnsafe(Math.min(GAP_PIECE_BYTES, end - this.#summed));
    while (this.#summed < end) {
      const want = Math.min(piece.length, end - this.#summed);
      const n = await this.#slice.read(piece, this.#summed, want);
      if (n === 0) return; // past the slice: the end check fails on the sum
      this.#crc = crc32(piece.subarray(0, n), this.#crc);
      this.#summed += n;
    }
  }

  close(): Promise<void> {
    return this.#slice.close();
  }
}
