/**
 * Writes an Android sparse image (the format containers/simg.ts reads, what fastboot flashes
 * and simg2img expands) of some blocks of an image: `blksync diff --format simg BASE NEW`.
 *
 * Blocks are added in increasing order; the gaps between them become DONT_CARE chunks (so
 * flashing the image onto a device holding BASE leaves those blocks as they are), a span that
 * is one 32-bit value repeated becomes a FILL chunk, any other a RAW chunk. The file header's
 * chunk count is known only at the end: it is written as 0 first and completed by finish(),
 * at offset 0 of the output, which must therefore be a regular file (written through a
 * temporary, io/output-file.ts); a FIFO or stdout cannot be rewound.
 */

import type { OutputFile } from '../io/output-file.js';
import { CHUNK_HEADER_BYTES, DONT_CARE, FILE_HEADER_BYTES, FILL, RAW, SIMG_MAGIC } from './simg.js';

/** The format's counts are u32. */
const U32_MAX = 0xffffffff;

export interface SimgWriteStats {
  chunks: number;
  rawChunks: number;
  fillChunks: number;
  dontCareChunks: number;
  /** Bytes of the whole sparse image. */
  fileBytes: number;
}

export class SimgWriter {
  readonly #out: OutputFile;
  readonly #blockSize: number;
  readonly #blocks: number;
  /** The next block not yet covered by a chunk. */
  #next = 0;
  #started = false;
  readonly stats: SimgWriteStats = {
    chunks: 0,
    rawChunks: 0,
    fillChunks: 0,
    dontCareChunks: 0,
    fileBytes: 0,
  };

  /** `imageSize` must be a multiple of `blockSize` (itself a multiple of 4); callers check. */
  constructor(out: OutputFile, blockSize: number, imageSize: number) {
    if (blockSize % 4 !== 0 || imageSize % blockSize !== 0 || imageSize / blockSize > U32_MAX) {
      throw new Error(`SimgWriter: image size ${imageSize} / block size ${blockSize}`);
    }
    this.#out = out;
    this.#blockSize = blockSize;
    this.#blocks = imageSize / blockSize;
  }

  #header(chunks: number): Buffer {
    const h = Buffer.alloc(FILE_HEADER_BYTES);
    h.writeUInt32LE(SIMG_MAGIC, 0);
    h.writeUInt16LE(1, 4); // major
    h.writeUInt16LE(0, 6); // minor
    h.writeUInt16LE(FILE_HEADER_BYTES, 8);
    h.writeUInt16LE(CHUNK_HEADER_BYTES, 10);
    h.writeUInt32LE(this.#blockSize, 12);
    h.writeUInt32LE(this.#blocks, 16);
    h.writeUInt32LE(chunks, 20);
    h.writeUInt32LE(0, 24); // image checksum: not used
    return h;
  }

  async #start(): Promise<void> {
    if (this.#started) return;
    this.#started = true;
    await this.#put(this.#header(0));
  }

  async #put(data: Buffer): Promise<void> {
    await this.#out.write(data);
    this.stats.fileBytes += data.length;
  }

  async #chunk(type: number, blocks: number, data: Buffer | undefined): Promise<void> {
    const c = Buffer.alloc(CHUNK_HEADER_BYTES);
    c.writeUInt16LE(type, 0);
    c.writeUInt32LE(blocks, 4);
    c.writeUInt32LE(CHUNK_HEADER_BYTES + (data?.length ?? 0), 8);
    await this.#put(c);
    if (data !== undefined) await this.#put(data);
    this.stats.chunks++;
  }

  /** Don't-care chunks up to block `to` (each at most U32_MAX blocks). */
  async #skipTo(to: number): Promise<void> {
    while (this.#next < to) {
      const n = Math.min(to - this.#next, U32_MAX);
      await this.#chunk(DONT_CARE, n, undefined);
      this.stats.dontCareChunks++;
      this.#next += n;
    }
  }

  /** Adds `data` as the image's bytes at `offset` (both whole blocks, after what was added). */
  async add(offset: number, data: Buffer): Promise<void> {
    const bs = this.#blockSize;
    if (offset % bs !== 0 || data.length % bs !== 0 || offset / bs < this.#next) {
      throw new Error(`SimgWriter.add: ${data.length} bytes at ${offset} out of order`);
    }
    if (data.length === 0) return;
    await this.#start();
    await this.#skipTo(offset / bs);
    const blocks = data.length / bs;
    // one 32-bit value repeated: each byte equals the one 4 before it
    if (data.compare(data, 0, data.length - 4, 4, data.length) === 0) {
      await this.#chunk(FILL, blocks, Buffer.from(data.subarray(0, 4)));
      this.stats.fillChunks++;
    } else {
      await this.#chunk(RAW, blocks, data);
      this.stats.rawChunks++;
    }
    this.#next += blocks;
  }

  /** Covers the rest of the image with don't-care and writes the header's chunk count. */
  async finish(): Promise<void> {
    await this.#start();
    await this.#skipTo(this.#blocks);
    await this.#out.writeAt(this.#header(this.stats.chunks), 0);
  }
}
