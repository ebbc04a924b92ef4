/**
 * Android sparse images ("simg", what img2simg writes and fastboot flashes), decoded natively.
 *
 *   file header (28 bytes, little-endian)      chunk header (12 bytes)
 *   0  u32 magic 0xED26FF3A                    0  u16 type: 0xCAC1 raw, 0xCAC2 fill,
 *   4  u16 major 1, u16 minor                             0xCAC3 don't care, 0xCAC4 crc32
 *   8  u16 file header size (>= 28)            2  u16 reserved
 *  10  u16 chunk header size (>= 12)           4  u32 blocks this chunk covers
 *  12  u32 block size (a multiple of 4)        8  u32 bytes of the chunk, header included
 *  16  u32 blocks in the image                 then: raw  blocks × block size of data
 *  20  u32 chunks                                    fill 4 bytes, repeated over the blocks
 *  24  u32 image checksum (unused)                   crc  4 bytes, covering no blocks
 *
 * Don't-care chunks are what the image does not define, as a bmap's unmapped ranges are: a
 * file SRC's plan leaves them out (not read, not written; --full writes them as zeros). A
 * streamed SRC (stdin, a URL, a decompressor) cannot know them before the pipeline starts,
 * so there they read as zeros and are compared like any content. Fill chunks are made from
 * one reused buffer, never materialised whole. CRC32 chunks are checked for their size; their
 * value is not verified (img2simg does not write them).
 */

import type { FileHandle } from 'node:fs/promises';
import { BlksyncError } from '../errors.js';
import { readFully } from '../io/read-fully.js';
import type { Range } from '../ranges.js';
import type { Source } from '../types.js';
import type { ByteReader } from './byte-reader.js';

export const SIMG_MAGIC = 0xed26ff3a;
export const FILE_HEADER_BYTES = 28;
export const CHUNK_HEADER_BYTES = 12;
export const RAW = 0xcac1;
export const FILL = 0xcac2;
export const DONT_CARE = 0xcac3;
const CRC32 = 0xcac4;
/** Largest block size accepted (the format's are 4 KiB; a lying header must not cost memory). */
const MAX_BLOCK_BYTES = 64 * 1024 * 1024;
/** Bytes handed out at a time for fill and don't-care chunks. */
const PIECE_BYTES = 1024 * 1024;
const ZEROS = Buffer.alloc(PIECE_BYTES);

export interface SimgHeader {
  blockSize: number;
  blocks: number;
  chunks: number;
  headerBytes: number;
  chunkHeaderBytes: number;
  /** The decoded image's size. */
  size: number;
}

type ChunkType = 'raw' | 'fill' | 'dontcare';

/** A chunk of a file SRC: where its blocks go and where its data is. */
interface Chunk {
  /** Byte offsets in the image. */
  start: number;
  end: number;
  type: ChunkType;
  /** raw: where the data starts in the file. */
  dataAt: number;
  /** fill: the 4-byte pattern. */
  fill: Buffer | undefined;
}

function corrupt(name: string, detail: string): BlksyncError {
  return new BlksyncError(
    'ESRC_CORRUPT',
    `${name}: the Android sparse image is damaged (${detail}); get a good copy of the image (or --raw to write it as it is)`,
    { path: name },
  );
}

export function parseSimgHeader(h: Buffer, name: string): SimgHeader {
  if (h.length < FILE_HEADER_BYTES || h.readUInt32LE(0) !== SIMG_MAGIC) {
    throw corrupt(name, 'no sparse header');
  }
  const major = h.readUInt16LE(4);
  if (major !== 1) {
    throw new BlksyncError(
      'ESRC_CONTAINER',
      `${name} is an Android sparse image of version ${major}, which blksync does not read (only 1.x)`,
      { path: name },
    );
  }
  const headerBytes = h.readUInt16LE(8);
  const chunkHeaderBytes = h.readUInt16LE(10);
  const blockSize = h.readUInt32LE(12);
  const blocks = h.readUInt32LE(16);
  const chunks = h.readUInt32LE(20);
  if (headerBytes < FILE_HEADER_BYTES || chunkHeaderBytes < CHUNK_HEADER_BYTES) {
    throw corrupt(name, `header sizes ${headerBytes}/${chunkHeaderBytes}`);
  }
  if (blockSize === 0 || blockSize % 4 !== 0 || blockSize > MAX_BLOCK_BYTES) {
    throw corrupt(name, `block size ${blockSize}`);
  }
  return { blockSize, blocks, chunks, headerBytes, chunkHeaderBytes, size: blocks * blockSize };
}

interface ChunkHeader {
  type: ChunkType | 'crc';
  blocks: number;
  /** Bytes of data after the chunk header. */
  dataBytes: number;
}

function parseChunkHeader(c: Buffer, header: SimgHeader, index: number, name: string): ChunkHeader {
  const type = c.readUInt16LE(0);
  const blocks = c.readUInt32LE(4);
  const total = c.readUInt32LE(8);
  const dataBytes = total - header.chunkHeaderBytes;
  const expect = (want: number, t: ChunkHeader['type']): ChunkHeader => {
    if (dataBytes !== want) {
      throw corrupt(
        name,
        `chunk ${index} says ${total} bytes, its type needs ${want + header.chunkHeaderBytes}`,
      );
    }
    return { type: t, blocks, dataBytes };
  };
  switch (type) {
    case RAW:
      return expect(blocks * header.blockSize, 'raw');
    case FILL:
      return expect(4, 'fill');
    case DONT_CARE:
      return expect(0, 'dontcare');
    case CRC32:
      if (blocks !== 0) throw corrupt(name, `CRC32 chunk ${index} covers ${blocks} blocks`);
      return expect(4, 'crc');
    default:
      throw corrupt(name, `chunk ${index} has unknown type 0x${type.toString(16)}`);
  }
}

function checkCovers(header: SimgHeader, blocks: number, index: number, name: string): void {
  if (blocks > header.blocks) {
    throw corrupt(name, `chunk ${index} runs past the ${header.blocks} blocks the header declares`);
  }
}

/** A file SRC's chunks, found by reading their headers only. */
async function scanChunks(
  fh: FileHandle,
  header: SimgHeader,
  base: number,
  fileSize: number,
  name: string,
): Promise<Chunk[]> {
  const chunks: Chunk[] = [];
  const ch = Buffer.alloc(header.chunkHeaderBytes);
  let at = base + header.headerBytes;
  let block = 0;
  for (let i = 0; i < header.chunks; i++) {
    if (at + header.chunkHeaderBytes > fileSize) throw shortFile(name, i);
    await readFully(fh, ch, 0, ch.length, at);
    const c = parseChunkHeader(ch, header, i, name);
    const dataAt = at + header.chunkHeaderBytes;
    if (dataAt + c.dataBytes > fileSize) throw shortFile(name, i);
    let fill: Buffer | undefined;
    if (c.type === 'fill') {
      fill = Buffer.alloc(4);
      await readFully(fh, fill, 0, 4, dataAt);
    }
    if (c.type !== 'crc' && c.blocks > 0) {
      checkCovers(header, block + c.blocks, i, name);
      chunks.push({
        start: block * header.blockSize,
        end: (block + c.blocks) * header.blockSize,
        type: c.type,
        dataAt,
        fill,
      });
      block += c.blocks;
    }
    at = dataAt + c.dataBytes;
  }
  if (block !== header.blocks) {
    throw corrupt(name, `its chunks cover ${block} blocks, the header declares ${header.blocks}`);
  }
  return chunks;
}

function shortFile(name: string, chunk: number): BlksyncError {
  return new BlksyncError(
    'ESRC_SHORT',
    `${name} ends inside chunk ${chunk} of the Android sparse image; the file is truncated: download or copy it again`,
    { path: name },
  );
}

/** Fills buf[from, to) with `pattern` repeated, phased as if it started at `phase`. */
function fillPattern(buf: Buffer, pattern: Buffer, from: number, to: number, phase: number): void {
  const shift = phase % 4;
  const p =
    shift === 0 ? pattern : Buffer.concat([pattern.subarray(shift), pattern.subarray(0, shift)]);
  buf.fill(p, from, to);
}

/** A file SRC decoded by offset: any read, any order, several at once. */
class SimgFileSource implements Source {
  readonly size: number;
  readonly #fh: FileHandle;
  readonly #chunks: Chunk[];
  readonly #name: string;

  constructor(fh: FileHandle, chunks: Chunk[], size: number, name: string) {
    this.#fh = fh;
    this.#chunks = chunks;
    this.size = size;
    this.#name = name;
  }

  #find(offset: number): number {
    let lo = 0;
    let hi = this.#chunks.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.#chunks[mid]!.start <= offset) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const end = Math.min(offset + length, this.size);
    let pos = offset;
    for (let i = this.#find(offset); pos < end && i < this.#chunks.length; i++) {
      const c = this.#chunks[i]!;
      const to = Math.min(end, c.end);
      const into = pos - offset;
      if (c.type === 'raw') {
        const got = await readFully(this.#fh, buf, into, to - pos, c.dataAt + (pos - c.start));
        if (got !== to - pos) throw shortFile(this.#name, i);
      } else if (c.type === 'fill') {
        fillPattern(buf, c.fill!, into, into + to - pos, pos - c.start);
      } else {
        buf.fill(0, into, into + to - pos);
      }
      pos = to;
    }
    return Math.max(0, end - offset);
  }

  async close(): Promise<void> {}
}

/** A file SRC: its size, a Source by offset, and the ranges it defines (not don't-care). */
export async function openSimgFile(
  fh: FileHandle,
  name: string,
  fileSize: number,
): Promise<{ size: number; source: Source; defined: Range[] }> {
  const head = Buffer.alloc(FILE_HEADER_BYTES);
  if ((await readFully(fh, head, 0, FILE_HEADER_BYTES, 0)) < FILE_HEADER_BYTES) {
    throw shortFile(name, 0);
  }
  const header = parseSimgHeader(head, name);
  const chunks = await scanChunks(fh, header, 0, fileSize, name);
  const defined: Range[] = [];
  for (const c of chunks) {
    if (c.type === 'dontcare') continue;
    const last = defined[defined.length - 1];
    if (last !== undefined && last.end === c.start) last.end = c.end;
    else defined.push({ start: c.start, end: c.end });
  }
  return { size: header.size, source: new SimgFileSource(fh, chunks, header.size, name), defined };
}

/** Reads a streamed SRC's header: the image size, known before the chunks. */
export async function readSimgHeader(reader: ByteReader, name: string): Promise<SimgHeader> {
  const h = await reader.exact(FILE_HEADER_BYTES, 'the Android sparse header');
  const header = parseSimgHeader(h, name);
  await reader.skip(header.headerBytes - FILE_HEADER_BYTES, 'the Android sparse header');
  return header;
}

/** A streamed SRC's decoded bytes, after readSimgHeader; don't-care chunks read as zeros. */
export async function* simgStream(
  reader: ByteReader,
  header: SimgHeader,
  name: string,
): AsyncGenerator<Buffer> {
  const fillBuf = Buffer.alloc(PIECE_BYTES);
  let block = 0;
  for (let i = 0; i < header.chunks; i++) {
    const ch = await reader.exact(header.chunkHeaderBytes, `chunk ${i}'s header`);
    const c = parseChunkHeader(ch, header, i, name);
    if (c.type !== 'crc') checkCovers(header, block + c.blocks, i, name);
    const bytes = c.blocks * header.blockSize;
    if (c.type === 'raw') {
      yield* reader.take(bytes, `chunk ${i}`);
    } else if (c.type === 'crc') {
      await reader.skip(4, `chunk ${i}`);
    } else {
      let src = ZEROS;
      if (c.type === 'fill') {
        // a multiple of 4 long, so each piece starts in phase
        fillBuf.fill(await reader.exact(4, `chunk ${i}`));
        src = fillBuf;
      }
      for (let left = bytes; left > 0; left -= PIECE_BYTES) {
        yield src.subarray(0, Math.min(left, PIECE_BYTES));
      }
    }
    block += c.blocks;
  }
  if (block !== header.blocks) {
    throw corrupt(name, `its chunks cover ${block} blocks, the header declares ${header.blocks}`);
  }
}
