/**
 * The published index (`IMG.blkpub`): what an HTTP client needs to update a copy of IMG by
 * fetching only the chunks that differ from `IMG.blkpub.data`. Documented in
 * docs/formats/published.md; all integers little-endian.
 *
 *   IMG.blkpub
 *   0        ┌──────────────────────────────────────────────────────────────┐
 *            │ header (HEADER_BYTES = 128)                                    │
 *            │   magic "BLKPUB\r\n", version, image size, chunk size,         │
 *            │   chunks per group, codec, data file size, root, image SHA-256 │
 *   128      ├──────────────────────────────────────────────────────────────┤
 *            │ top level: one SHA-256 per group of chunks                     │
 *            │   top[g] = SHA-256(hash of chunk g·G ‖ … ‖ hash of its last)   │
 *            │   root   = SHA-256(top level)            (in the header)       │
 *   128+32·groups ├─────────────────────────────────────────────────────────┤
 *            │ leaf records, LEAF_BYTES = 48 per chunk, in chunk order:       │
 *            │   SHA-256 of the chunk's content (32) │ data offset (8)        │
 *            │   stored length (4) │ kind (4): 0 zeros, 1 compressed, 2 raw   │
 *            └──────────────────────────────────────────────────────────────┘
 *
 *   IMG.blkpub.data: the stored chunks back to back, each independently decompressible;
 *   all-zero chunks are not stored at all.
 *
 * The root is the image's digest: it covers every chunk's content, so a client that knows
 * the hashes of what DST holds checks it without reading DST again. The leaf records' offsets
 * and lengths are not covered by it: a wrong one can only yield bytes whose hash fails.
 */

import { BlksyncError } from '../errors.js';
import { HASH_BYTES, sha256 } from '../hash.js';

export const MAGIC = Buffer.from('BLKPUB\r\n', 'latin1');
export const VERSION = 1;
export const HEADER_BYTES = 128;
export const LEAF_BYTES = 48;

/** The suffix of the index beside IMG, and of the data file beside that. */
export const INDEX_SUFFIX = '.blkpub';
export const DATA_SUFFIX = '.blkpub.data';

export const CODEC_DEFLATE = 1;
export const CODEC_BROTLI = 2;
export type Codec = typeof CODEC_DEFLATE | typeof CODEC_BROTLI;

export const KIND_ZERO = 0;
export const KIND_COMPRESSED = 1;
export const KIND_RAW = 2;

export const MIN_CHUNK_SIZE = 4096;
export const MAX_CHUNK_SIZE = 4 * 1024 * 1024;
/** Most chunks an index may describe: a client keeps 32 bytes per chunk of DST (128 MiB). */
export const MAX_CHUNKS = 4 * 1024 * 1024;
export const MAX_GROUP_CHUNKS = 65536;
/** Groups the publisher aims for: the top level, always fetched, stays within 8 KiB. */
export const TARGET_GROUPS = 256;
/** Largest image size a header may declare (2^53: exact in a JavaScript number). */
export const MAX_IMAGE_SIZE = Number.MAX_SAFE_INTEGER;

export interface PublishedHeader {
  imageSize: number;
  chunkSize: number;
  groupChunks: number;
  codec: Codec;
  dataSize: number;
  /** SHA-256 of the top level: the digest of the whole image by its chunks. */
  root: Buffer;
  /** SHA-256 of the image's bytes, as sha256sum prints it (for people; not checked by copy). */
  imageSha256: Buffer;
}

export interface Leaf {
  hash: Buffer;
  offset: number;
  length: number;
  kind: number;
}

export function chunkCount(h: Pick<PublishedHeader, 'imageSize' | 'chunkSize'>): number {
  return Math.ceil(h.imageSize / h.chunkSize);
}

export function groupCount(h: Pick<PublishedHeader, 'imageSize' | 'chunkSize' | 'groupChunks'>) {
  return Math.ceil(chunkCount(h) / h.groupChunks);
}

/** Bytes of chunk `i`'s content (the last one may be short). */
export function chunkLength(h: Pick<PublishedHeader, 'imageSize' | 'chunkSize'>, i: number) {
  return Math.min(h.chunkSize, h.imageSize - i * h.chunkSize);
}

export function topBytes(h: PublishedHeader): number {
  return groupCount(h) * HASH_BYTES;
}

/** Where group `g`'s leaf records lie in the index: [start, end). */
export function groupLeafRange(h: PublishedHeader, g: number): { start: number; end: number } {
  const first = g * h.groupChunks;
  const last = Math.min(chunkCount(h), first + h.groupChunks);
  const base = HEADER_BYTES + topBytes(h);
  return { start: base + first * LEAF_BYTES, end: base + last * LEAF_BYTES };
}

export function indexBytes(h: PublishedHeader): number {
  return HEADER_BYTES + topBytes(h) + chunkCount(h) * LEAF_BYTES;
}

/** The chunks per group a publisher uses: a power of two, TARGET_GROUPS groups or fewer. */
export function groupChunksFor(chunks: number): number {
  let g = 16;
  while (g < MAX_GROUP_CHUNKS && Math.ceil(chunks / g) > TARGET_GROUPS) g *= 2;
  return g;
}

/** The largest stored length a chunk of `length` bytes may have (raw is stored when larger). */
export function maxStoredLength(length: number): number {
  return length;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

function bad(path: string, what: string): BlksyncError {
  return new BlksyncError(
    'EPUB_FORMAT',
    `${path} is not a usable published index: ${what}; publish the image again (blksync publish)`,
    { path },
  );
}

export function encodeHeader(h: PublishedHeader): Buffer {
  const b = Buffer.alloc(HEADER_BYTES);
  MAGIC.copy(b, 0);
  b.writeUInt32LE(VERSION, 8);
  b.writeUInt32LE(HEADER_BYTES, 12);
  b.writeBigUInt64LE(BigInt(h.imageSize), 16);
  b.writeUInt32LE(h.chunkSize, 24);
  b.writeUInt32LE(h.groupChunks, 28);
  b.writeUInt32LE(h.codec, 32);
  b.writeBigUInt64LE(BigInt(h.dataSize), 40);
  h.root.copy(b, 48);
  h.imageSha256.copy(b, 80);
  return b;
}

/** True when `head` starts as a published index does (a "not found" page does not). */
export function looksPublished(head: Buffer): boolean {
  return head.length >= MAGIC.length && head.subarray(0, MAGIC.length).equals(MAGIC);
}

function u64(b: Buffer, at: number, path: string, what: string): number {
  const v = b.readBigUInt64LE(at);
  if (v > BigInt(MAX_IMAGE_SIZE)) throw bad(path, `${what} ${v} is absurd`);
  return Number(v);
}

/** Parses and checks the header; every size is bounded before anything is allocated from it. */
export function parseHeader(b: Buffer, path: string): PublishedHeader {
  if (b.length < HEADER_BYTES) throw bad(path, `it is ${b.length} bytes, shorter than a header`);
  if (!looksPublished(b)) throw bad(path, 'wrong magic');
  const version = b.readUInt32LE(8);
  if (version !== VERSION) {
    throw new BlksyncError(
      'EPUB_FORMAT',
      `${path} is a published index of version ${version}; this blksync reads version ${VERSION}: upgrade blksync`,
      { path },
    );
  }
  if (b.readUInt32LE(12) !== HEADER_BYTES) throw bad(path, 'wrong header size');
  const imageSize = u64(b, 16, path, 'image size');
  const chunkSize = b.readUInt32LE(24);
  const groupChunks = b.readUInt32LE(28);
  const codec = b.readUInt32LE(32);
  const dataSize = u64(b, 40, path, 'data size');
  if (!isPowerOfTwo(chunkSize) || chunkSize < MIN_CHUNK_SIZE || chunkSize > MAX_CHUNK_SIZE) {
    throw bad(path, `chunk size ${chunkSize} is not a power of two from 4 KiB to 16 MiB`);
  }
  if (!isPowerOfTwo(groupChunks) || groupChunks > MAX_GROUP_CHUNKS) {
    throw bad(path, `${groupChunks} chunks per group is not a power of two up to 65536`);
  }
  if (codec !== CODEC_DEFLATE && codec !== CODEC_BROTLI) throw bad(path, `unknown codec ${codec}`);
  if (b.readUInt32LE(36) !== 0 || !b.subarray(112, HEADER_BYTES).equals(Buffer.alloc(16))) {
    throw bad(path, 'reserved bytes are not zero');
  }
  const h: PublishedHeader = {
    imageSize,
    chunkSize,
    groupChunks,
    codec,
    dataSize,
    root: Buffer.from(b.subarray(48, 80)),
    imageSha256: Buffer.from(b.subarray(80, 112)),
  };
  if (chunkCount(h) > MAX_CHUNKS) {
    throw bad(path, `${chunkCount(h)} chunks is more than ${MAX_CHUNKS}`);
  }
  // stored chunks are never larger than their content
  if (dataSize > imageSize) throw bad(path, `data size ${dataSize} exceeds the image size`);
  return h;
}

/** The top level, checked against the header's root. */
export function checkTop(h: PublishedHeader, top: Buffer, path: string): void {
  if (top.length !== topBytes(h)) throw bad(path, 'the top level is cut short');
  if (!sha256(top).equals(h.root)) {
    throw new BlksyncError(
      'EPUB_CHECKSUM',
      `${path}: the top level of hashes does not match the index's root; the index is damaged or was changed while being read: rerun, or publish again`,
      { path },
    );
  }
}

export function encodeLeaf(leaf: Leaf, out: Buffer, at: number): void {
  leaf.hash.copy(out, at);
  out.writeBigUInt64LE(BigInt(leaf.offset), at + 32);
  out.writeUInt32LE(leaf.length, at + 40);
  out.writeUInt32LE(leaf.kind, at + 44);
}

/**
 * Group `g`'s leaf records from `bytes` (exactly its records), checked: their hashes against
 * the top level, and each offset, length and kind against the header.
 */
export function parseGroup(
  h: PublishedHeader,
  top: Buffer,
  g: number,
  bytes: Buffer,
  path: string,
): Leaf[] {
  const records = checkGroup(h, top, g, bytes, path);
  return Array.from({ length: records.length / LEAF_BYTES }, (_, k) => leafAt(records, k));
}

/**
 * Leaf record `k` of `records` (checked by checkGroup): its hash a view into them, not a copy.
 */
export function leafAt(records: Buffer, k: number): Leaf {
  const at = k * LEAF_BYTES;
  return {
    hash: records.subarray(at, at + HASH_BYTES),
    offset: Number(records.readBigUInt64LE(at + 32)),
    length: records.readUInt32LE(at + 40),
    kind: records.readUInt32LE(at + 44),
  };
}

/**
 * Checks group `g`'s leaf records as parseGroup does and returns a copy of them, 48 bytes a
 * chunk (a client keeps these, not an object per chunk: a few hundred bytes each).
 */
export function checkGroup(
  h: PublishedHeader,
  top: Buffer,
  g: number,
  bytes: Buffer,
  path: string,
): Buffer {
  const { start, end } = groupLeafRange(h, g);
  if (bytes.length !== end - start) throw bad(path, `group ${g}'s leaf records are cut short`);
  const n = bytes.length / LEAF_BYTES;
  const hashes = Buffer.allocUnsafe(n * HASH_BYTES);
  for (let k = 0; k < n; k++) {
    const at = k * LEAF_BYTES;
    bytes.copy(hashes, k * HASH_BYTES, at, at + HASH_BYTES);
    const i = g * h.groupChunks + k;
    const offset = u64(bytes, at + 32, path, `chunk ${i}'s offset`);
    const length = bytes.readUInt32LE(at + 40);
    const kind = bytes.readUInt32LE(at + 44);
    const content = chunkLength(h, i);
    if (kind === KIND_ZERO) {
      if (offset !== 0 || length !== 0) throw bad(path, `zero chunk ${i} has stored bytes`);
    } else if (kind === KIND_COMPRESSED || kind === KIND_RAW) {
      if (length === 0 || length > maxStoredLength(content))
        throw bad(path, `chunk ${i}'s stored length ${length} is absurd for ${content} bytes`);
      if (kind === KIND_RAW && length !== content)
        throw bad(path, `raw chunk ${i} is ${length} bytes, not ${content}`);
      if (offset + length > h.dataSize)
        throw bad(path, `chunk ${i} lies past the end of the data file`);
    } else {
      throw bad(path, `chunk ${i} has unknown kind ${kind}`);
    }
  }
  if (!sha256(hashes).equals(top.subarray(g * HASH_BYTES, (g + 1) * HASH_BYTES))) {
    throw new BlksyncError(
      'EPUB_CHECKSUM',
      `${path}: group ${g}'s chunk hashes do not match the top level; the index is damaged or was changed while being read: rerun, or publish again`,
      { path },
    );
  }
  return Buffer.from(bytes);
}
