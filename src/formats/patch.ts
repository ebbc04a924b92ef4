/**
 * The blksync patch format, version 2: the blocks of NEW that differ from BASE, each with
 * a hash of the content it replaces and a hash of the unchanged blocks before it, so that
 * apply refuses a TARGET that is not BASE, where the patch changes it and everywhere else.
 * Full description with the reasons in docs/formats/patch.md. All integers little-endian.
 *
 *   header (64 bytes)
 *   ┌──────────┬─────────┬────────┬───────┬──────────┬───────────┬───────────┬───────────┬───────┐
 *   │ magic  8 │ version │ hdrlen │ flags │ blocksz  │ compress  │ base size │ result sz │ crc32 │
 *   │"BLKSPTCH"│  u16=2  │ u16=64 │  u32  │   u32    │ u8 + 3 pad│    u64    │    u64    │ of 0-59│
 *   └──────────┴─────────┴────────┴───────┴──────────┴───────────┴───────────┴───────────┴───────┘
 *    0          8         10       12      16         20          24          32    40-59 0  60
 *
 *   record, repeated (136-byte header, then payloads)
 *   ┌──────┬───────┬────────┬────────┬───────────┬───────────┬──────┬──────┬──────────┬──────────┬──────────┬───────┐
 *   │"REC1"│ flags │ offset │ length │ new bytes │ old bytes │ head │ tail │ old hash │ new hash │ gap hash │ crc32 │
 *   │      │  u32  │  u64   │  u32   │ stored u32│ stored u32│ u32  │ u32  │  32      │  32      │  32      │of 0-131│
 *   └──────┴───────┴────────┴────────┴───────────┴───────────┴──────┴──────┴──────────┴──────────┴──────────┴───────┘
 *    0      4       8        16       20          24          28     32     36         68         100        132
 *   then the new payload (stored length), then the old payload (reversible patches only)
 *
 *   trailer (80 bytes)
 *   ┌──────┬──────┬──────────────┬──────────┬─────────────────────────────────────────────┐
 *   │"END1"│  0   │ record count │ gap hash │ SHA-256 of every byte of the file before it  │
 *   └──────┴──────┴──────────────┴──────────┴─────────────────────────────────────────────┘
 *    0      4      8              16         48                                            80
 *
 * A record covers [offset, offset + length) of the image. Its new content is the result's
 * bytes there, clipped to the result size; its old content the base's bytes, clipped to the
 * base size. The first `head` and last `tail` bytes of a record are the same in both (the
 * blocks are whole, the change inside them is not), so the payloads leave them out and
 * apply takes them from TARGET, whose content it checks anyway: a patch is the changed bytes,
 * not the changed blocks. A content hash is a hash list: SHA-256 over the SHA-256 of each
 * block (aligned to the image, the last one short), so an index of per-block hashes can
 * stand in for reading BASE. A gap hash is the hash list of the bytes base and result share
 * between the previous record's end (or 0) and this record's offset; the trailer's, of
 * those from the last record's end to the smaller of the two sizes.
 *
 * Version 1 (still read) has no gap hashes: 104-byte record headers (CRC at 100) and a
 * 48-byte trailer; apply then checks TARGET only inside the records.
 */

import { crc32 } from 'node:zlib';
import { BlksyncError } from '../errors.js';
import { HASH_BYTES, sha256 } from '../hash.js';

export const PATCH_MAGIC = Buffer.from('BLKSPTCH', 'latin1');
/** The version writers make; readers also read version 1 (no gap hashes). */
export const PATCH_VERSION = 2;
export const HEADER_BYTES = 64;
/** Record header and trailer sizes of version 2 (version 1: 104 and 48, without gap hashes). */
export const RECORD_HEADER_BYTES = 136;
export const TRAILER_BYTES = 80;
const V1_RECORD_HEADER_BYTES = 104;
const V1_TRAILER_BYTES = 48;
export const RECORD_TAG = Buffer.from('REC1', 'latin1');
export const TRAILER_TAG = Buffer.from('END1', 'latin1');

/** Header flag: each record also stores the old content, so the patch can be undone. */
export const FLAG_REVERSIBLE = 1;
/** Record flags: the payload is compressed with the header's compression. */
export const RECORD_NEW_COMPRESSED = 1;
export const RECORD_OLD_COMPRESSED = 2;

/** Largest record span a reader accepts (writers make records of at most WRITE_RECORD_BYTES). */
export const MAX_RECORD_BYTES = 64 * 1024 * 1024;
/** Span at which the writer starts a new record: bounds memory and the grain of the base check. */
export const WRITE_RECORD_BYTES = 1024 * 1024;
/** Largest image size accepted (2^53 - 1 bytes: what a JS number holds exactly). */
export const MAX_IMAGE_BYTES = Number.MAX_SAFE_INTEGER;
/** Block sizes: a power of two from 512 B to 64 MiB, as for copy. */
export const MIN_BLOCK_BYTES = 512;
/**
 * Gap unit of a patch made from BASE's bytes (at least the block size): SHA-256 of 64 KiB
 * pieces costs ~1.7x less CPU than of 4 KiB blocks (1.44 against 0.8 GB per CPU-second,
 * measured). From an index, the index's block size: its hashes are the pieces'.
 */
export const GAP_UNIT_BYTES = 64 * 1024;
export const MAX_BLOCK_BYTES = 64 * 1024 * 1024;

export type Compression = 'none' | 'gzip' | 'zstd';
const COMPRESSION_IDS: readonly Compression[] = ['none', 'gzip', 'zstd'];

export interface PatchHeader {
  version: number;
  blockSize: number;
  /**
   * The pieces gap hashes are made of (version 2): a power of two, a multiple of the block
   * size; the block size in version 1 (which has no gap hashes).
   */
  gapUnit: number;
  baseSize: number;
  resultSize: number;
  reversible: boolean;
  compression: Compression;
}

export interface RecordHeader {
  offset: number;
  length: number;
  flags: number;
  /** Bytes of each payload as stored in the file (compressed or not). */
  newStored: number;
  oldStored: number;
  /** Leading and trailing bytes of the record that old and new content share, not stored. */
  head: number;
  tail: number;
  oldHash: Buffer;
  newHash: Buffer;
  /**
   * Hash list of the bytes base and result share from the previous record's end (or 0) to
   * `offset`; undefined in version 1 patches, which have none.
   */
  gapHash: Buffer | undefined;
}

/** Bytes of a record header and of the trailer (with its SHA-256) in a patch of `version`. */
export function recordHeaderBytes(version: number): number {
  return version === 1 ? V1_RECORD_HEADER_BYTES : RECORD_HEADER_BYTES;
}

export function trailerBytes(version: number): number {
  return version === 1 ? V1_TRAILER_BYTES : TRAILER_BYTES;
}

/** Where the unchanged bytes end: gaps lie before the smaller of the base and result sizes. */
export function sharedEnd(h: PatchHeader): number {
  return Math.min(h.baseSize, h.resultSize);
}

function formatError(message: string): BlksyncError {
  return new BlksyncError('EPATCH_FORMAT', `not a valid blksync patch: ${message}`);
}

function checksumError(message: string): BlksyncError {
  return new BlksyncError(
    'EPATCH_CHECKSUM',
    `the patch is corrupted: ${message}; make it again or copy it again`,
  );
}

/** Bytes of [offset, offset + length) that lie before `size`. */
export function clipped(offset: number, length: number, size: number): number {
  return Math.max(0, Math.min(offset + length, size) - offset);
}

/** The hash list of `data` (whose first byte is block-aligned): SHA-256 of the blocks' SHA-256s. */
export function contentHash(data: Buffer, blockSize: number): Buffer {
  const list = Buffer.allocUnsafe(Math.ceil(data.length / blockSize) * HASH_BYTES);
  for (let s = 0, i = 0; s < data.length; s += blockSize, i += HASH_BYTES) {
    sha256(data, s, Math.min(s + blockSize, data.length)).copy(list, i);
  }
  return sha256(list);
}

function isBlockSize(n: number): boolean {
  return n >= MIN_BLOCK_BYTES && n <= MAX_BLOCK_BYTES && (n & (n - 1)) === 0;
}

function readU64(buf: Buffer, at: number, what: string): number {
  const v = buf.readBigUInt64LE(at);
  if (v > BigInt(MAX_IMAGE_BYTES)) throw formatError(`${what} ${v} is too large`);
  return Number(v);
}

export function encodeHeader(h: PatchHeader): Buffer {
  const buf = Buffer.alloc(HEADER_BYTES);
  PATCH_MAGIC.copy(buf, 0);
  buf.writeUInt16LE(h.version, 8);
  buf.writeUInt16LE(HEADER_BYTES, 10);
  buf.writeUInt32LE(h.reversible ? FLAG_REVERSIBLE : 0, 12);
  buf.writeUInt32LE(h.blockSize, 16);
  buf.writeUInt8(COMPRESSION_IDS.indexOf(h.compression), 20);
  buf.writeBigUInt64LE(BigInt(h.baseSize), 24);
  buf.writeBigUInt64LE(BigInt(h.resultSize), 32);
  if (h.version > 1) buf.writeUInt32LE(h.gapUnit, 40);
  buf.writeUInt32LE(crc32(buf.subarray(0, 60)), 60);
  return buf;
}

/** True when `buf` starts with the patch magic (for `blksync info` to tell formats apart). */
export function isPatch(buf: Buffer): boolean {
  return (
    buf.length >= PATCH_MAGIC.length && buf.subarray(0, PATCH_MAGIC.length).equals(PATCH_MAGIC)
  );
}

export function decodeHeader(buf: Buffer): PatchHeader {
  if (!isPatch(buf)) throw formatError('bad magic (expected "BLKSPTCH")');
  const version = buf.readUInt16LE(8);
  if (version !== 1 && version !== PATCH_VERSION) {
    throw new BlksyncError(
      'EPATCH_FORMAT',
      `patch format version ${version} is not supported (this blksync reads versions 1 and ${PATCH_VERSION}); upgrade blksync`,
    );
  }
  if (buf.readUInt32LE(60) !== crc32(buf.subarray(0, 60)))
    throw checksumError('header CRC mismatch');
  if (buf.readUInt16LE(10) !== HEADER_BYTES) throw formatError('bad header length');
  const flags = buf.readUInt32LE(12);
  if ((flags & ~FLAG_REVERSIBLE) !== 0)
    throw formatError(`unknown header flags 0x${flags.toString(16)}`);
  const blockSize = buf.readUInt32LE(16);
  if (!isBlockSize(blockSize)) throw formatError(`bad block size ${blockSize}`);
  const compression = COMPRESSION_IDS[buf.readUInt8(20)];
  if (compression === undefined) throw formatError(`unknown compression ${buf.readUInt8(20)}`);
  for (let i = 21; i < 24; i++) if (buf[i] !== 0) throw formatError('reserved header bytes set');
  const gapUnit = version > 1 ? buf.readUInt32LE(40) : blockSize;
  if (!isBlockSize(gapUnit) || gapUnit < blockSize)
    throw formatError(`bad gap unit ${gapUnit} (block size ${blockSize})`);
  for (let i = version > 1 ? 44 : 40; i < 60; i++)
    if (buf[i] !== 0) throw formatError('reserved header bytes set');
  return {
    version,
    blockSize,
    gapUnit,
    baseSize: readU64(buf, 24, 'base size'),
    resultSize: readU64(buf, 32, 'result size'),
    reversible: (flags & FLAG_REVERSIBLE) !== 0,
    compression,
  };
}

export function encodeRecordHeader(r: RecordHeader): Buffer {
  const buf = Buffer.alloc(RECORD_HEADER_BYTES);
  if (r.gapHash?.length !== HASH_BYTES) throw new Error('encodeRecordHeader: no gap hash');
  RECORD_TAG.copy(buf, 0);
  buf.writeUInt32LE(r.flags, 4);
  buf.writeBigUInt64LE(BigInt(r.offset), 8);
  buf.writeUInt32LE(r.length, 16);
  buf.writeUInt32LE(r.newStored, 20);
  buf.writeUInt32LE(r.oldStored, 24);
  buf.writeUInt32LE(r.head, 28);
  buf.writeUInt32LE(r.tail, 32);
  r.oldHash.copy(buf, 36);
  r.newHash.copy(buf, 68);
  r.gapHash.copy(buf, 100);
  buf.writeUInt32LE(crc32(buf.subarray(0, 132)), 132);
  return buf;
}

/**
 * Decodes and bounds-checks a record header against the patch header and the end of the
 * previous record (`prevEnd`): records are block-aligned, ascending, non-overlapping, inside
 * the image, and their stored payloads no larger than their content.
 */
export function decodeRecordHeader(buf: Buffer, h: PatchHeader, prevEnd: number): RecordHeader {
  const crcAt = recordHeaderBytes(h.version) - 4;
  if (buf.readUInt32LE(crcAt) !== crc32(buf.subarray(0, crcAt)))
    throw checksumError('record header CRC mismatch');
  const flags = buf.readUInt32LE(4);
  const offset = readU64(buf, 8, 'record offset');
  const length = buf.readUInt32LE(16);
  const newStored = buf.readUInt32LE(20);
  const oldStored = buf.readUInt32LE(24);
  const at = `record at offset ${offset}`;
  const imageEnd = Math.max(h.baseSize, h.resultSize);
  const allowed = RECORD_NEW_COMPRESSED | (h.reversible ? RECORD_OLD_COMPRESSED : 0);
  if ((flags & ~allowed) !== 0) throw formatError(`${at}: unknown flags 0x${flags.toString(16)}`);
  if (h.compression === 'none' && flags !== 0)
    throw formatError(`${at}: compressed in an uncompressed patch`);
  const head = buf.readUInt32LE(28);
  const tail = buf.readUInt32LE(32);
  if (offset % h.blockSize !== 0) throw formatError(`${at}: not aligned to the block size`);
  if (offset < prevEnd) throw formatError(`${at}: overlaps or precedes the previous record`);
  // unchanged bytes are bytes both images have: a gap past the smaller one's end is not
  if (h.version > 1 && offset > prevEnd && offset > sharedEnd(h))
    throw formatError(`${at}: leaves unchanged bytes past the end of the smaller image`);
  if (length === 0 || length > MAX_RECORD_BYTES) throw formatError(`${at}: bad length ${length}`);
  if (offset + length > imageEnd)
    throw formatError(`${at}: passes the end of the image (${imageEnd})`);
  const end = offset + length;
  if (length % h.blockSize !== 0 && end !== h.resultSize && end !== h.baseSize) {
    throw formatError(`${at}: length ${length} is not whole blocks`);
  }
  const newBytes = clipped(offset, length, h.resultSize);
  const oldBytes = clipped(offset, length, h.baseSize);
  // the shared edges lie inside both contents; a shared tail only when they end together
  if (head + tail > Math.min(newBytes, oldBytes) || (tail > 0 && newBytes !== oldBytes)) {
    throw formatError(`${at}: shared head ${head} and tail ${tail} do not fit the record`);
  }
  const check = (stored: number, raw: number, compressed: boolean, what: string): void => {
    if (compressed ? stored > raw || (stored === 0 && raw > 0) : stored !== raw) {
      throw formatError(`${at}: ${what} payload of ${stored} bytes for ${raw} bytes of content`);
    }
  };
  check(newStored, newBytes - head - tail, (flags & RECORD_NEW_COMPRESSED) !== 0, 'new');
  const oldPayload = h.reversible ? oldBytes - head - tail : 0;
  check(oldStored, oldPayload, (flags & RECORD_OLD_COMPRESSED) !== 0, 'old');
  return {
    offset,
    length,
    flags,
    newStored,
    oldStored,
    head,
    tail,
    oldHash: Buffer.from(buf.subarray(36, 68)),
    newHash: Buffer.from(buf.subarray(68, 100)),
    gapHash: h.version === 1 ? undefined : Buffer.from(buf.subarray(100, 132)),
  };
}

/** The trailer without its SHA-256: tag, record count, and the last gap's hash. */
export function encodeTrailer(count: number, gapHash: Buffer): Buffer {
  const buf = Buffer.alloc(TRAILER_BYTES - HASH_BYTES);
  TRAILER_TAG.copy(buf, 0);
  buf.writeBigUInt64LE(BigInt(count), 8);
  gapHash.copy(buf, 16);
  return buf;
}

/**
 * Decodes the trailer without its SHA-256 (16 bytes in version 1, 48 in version 2) and
 * checks the record count; returns the last gap's hash (undefined in version 1).
 */
export function decodeTrailer(buf: Buffer, records: number, version: number): Buffer | undefined {
  if (buf.readUInt32LE(4) !== 0) throw formatError('reserved trailer bytes set');
  const count = buf.readBigUInt64LE(8);
  if (count !== BigInt(records)) {
    throw checksumError(`the trailer counts ${count} records but the patch holds ${records}`);
  }
  return version === 1 ? undefined : Buffer.from(buf.subarray(16, 48));
}

/** The bytes a record's new and old content take, and its payloads unpacked. */
export function recordSizes(
  r: RecordHeader,
  h: PatchHeader,
): { newBytes: number; oldBytes: number; newPayload: number; oldPayload: number } {
  const newBytes = clipped(r.offset, r.length, h.resultSize);
  const oldBytes = clipped(r.offset, r.length, h.baseSize);
  return {
    newBytes,
    oldBytes,
    newPayload: newBytes - r.head - r.tail,
    oldPayload: h.reversible ? oldBytes - r.head - r.tail : 0,
  };
}

/**
 * A record's full content from its payload and the shared edges, which `edges` holds at
 * the same places (TARGET's bytes of the record). Returns a new buffer of `bytes` bytes.
 */
export function withEdges(
  payload: Buffer,
  edges: Buffer,
  head: number,
  tail: number,
  bytes: number,
): Buffer {
  if (head === 0 && tail === 0) return payload;
  const out = Buffer.allocUnsafe(bytes);
  edges.copy(out, 0, 0, head);
  payload.copy(out, head);
  edges.copy(out, bytes - tail, bytes - tail, bytes);
  return out;
}
