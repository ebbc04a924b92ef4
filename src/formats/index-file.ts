/**
 * The index file: one hash per block of an image, plus what identifies the target it
 * describes and whether a copy onto that target was interrupted. docs/formats/index.md is
 * the reference; this is the layout (all integers little-endian):
 *
 *   offset  size  field
 *   ------  ----  -----------------------------------------------------------------
 *        0     8  magic "BLKSIDX\0"
 *        8     2  major version (1); readers refuse any other major
 *       10     2  minor version (2); a newer minor only appends header or identity fields
 *       12     4  header bytes H (72 in 1.0; readers skip fields they do not know)
 *       16     4  block size in bytes (a power of two, 512 .. 64 MiB)
 *       20     1  hash algorithm (1 = SHA-256)
 *       21     1  hash bytes (32 for SHA-256)
 *       22     1  state: 0 clean, 1 in progress (a copy onto the target was running)
 *       23     1  reserved, 0
 *       24     8  image size in bytes (the bytes the hashes cover)
 *       32     8  block count = ceil(image size / block size)
 *       40     8  possibly dirty range start (bytes; 0 when clean)
 *       48     8  possibly dirty range end (exclusive; 0 when clean)
 *       56     8  written at, milliseconds since the epoch
 *       64     4  identity bytes L (at most MAX_IDENTITY_BYTES)
 *       68     4  reserved, 0
 *        H     L  target identity, UTF-8 JSON (see io/identity.ts)
 *                 zero padding to a multiple of 8
 *        P   N×h  the hashes, block 0 first (N = block count, h = hash bytes)
 *     P+N×h   32  SHA-256 of every byte before it
 *
 * A reader checks, in this order and before allocating anything sized by the file: the
 * file's length against MAX_INDEX_FILE_BYTES, the magic, the major version, each header field
 * against its limits, that the block count matches the image size, and that the file's
 * length is exactly what the header declares; then the checksum; then the identity.
 */

import { open, type FileHandle } from 'node:fs/promises';
import { BlksyncError, fromSystemError } from '../errors.js';
import { HASH_ALGORITHM, HASH_BYTES, sha256, sha256Stream } from '../hash.js';
import { indexFileMode } from '../io/cache-dir.js';
import type { TargetIdentity } from '../io/identity.js';
import { writeOutputFile } from '../io/output-file.js';
import { readFully } from '../io/read-fully.js';
import type { Range } from '../ranges.js';

export const INDEX_MAGIC = Buffer.from('BLKSIDX\0', 'latin1');
export const INDEX_VERSION_MAJOR = 1;
/**
 * 1.1 records in the identity what vouches that the target has not changed since the index
 * was written (a file's ctime, a device's write counter and boot id). A 1.0 index lacks them:
 * it is read, but nothing vouches for it (engine/index-policy.ts). 1.2 adds to a device's stamp
 * its discarded sectors, a partition's whole disk's counts and a loop device's backing file,
 * and a file's ctime is kept continuous through the copy that writes it; an older index is
 * read, but nothing vouches for it.
 */
export const INDEX_VERSION_MINOR = 2;
/** Header bytes written by this version. */
export const INDEX_HEADER_BYTES = 72;
/** Largest header a reader accepts (a future minor version may append fields). */
export const MAX_INDEX_HEADER_BYTES = 4096;
/** Largest identity record accepted. */
export const MAX_IDENTITY_BYTES = 4096;
/** Most blocks an index may hold: 2 TiB at 64 KiB blocks, 1 GiB of SHA-256 hashes. */
export const MAX_INDEX_BLOCKS = 2 ** 25;
export const MIN_INDEX_BLOCK_SIZE = 512;
export const MAX_INDEX_BLOCK_SIZE = 64 * 1024 * 1024;
const CHECKSUM_BYTES = 32;
/** Largest file a reader will open. */
export const MAX_INDEX_FILE_BYTES =
  MAX_INDEX_HEADER_BYTES + MAX_IDENTITY_BYTES + 8 + MAX_INDEX_BLOCKS * HASH_BYTES + CHECKSUM_BYTES;

/** Hash algorithms by their id in the file. */
const ALGORITHMS = new Map<number, { name: string; bytes: number }>([
  [1, { name: 'sha256', bytes: HASH_BYTES }],
]);

export type IndexState = { kind: 'clean' } | { kind: 'in-progress'; dirty: Range };

export interface IndexFile {
  versionMajor: number;
  versionMinor: number;
  blockSize: number;
  /** Bytes the hashes cover. */
  imageSize: number;
  /** "sha256" */
  algorithm: string;
  hashBytes: number;
  blockCount: number;
  state: IndexState;
  /** Milliseconds since the epoch. */
  writtenAt: number;
  identity: TargetIdentity;
  /** blockCount × hashBytes bytes, block 0 first. */
  hashes: Buffer;
}

function formatError(path: string, what: string): BlksyncError {
  return new BlksyncError(
    'EINDEX_FORMAT',
    // never "delete it": the path may name the user's image, given as an index by mistake
    `${path} is not a usable blksync index: ${what}; if it is an index, rebuild it (blksync index, or copy --rebuild-index); if not, give the path of an index`,
    { path },
  );
}

/** Block count of an image: the last block may be short. */
export function blockCountFor(imageSize: number, blockSize: number): number {
  return Math.ceil(imageSize / blockSize);
}

function validBlockSize(n: number): boolean {
  return n >= MIN_INDEX_BLOCK_SIZE && n <= MAX_INDEX_BLOCK_SIZE && (n & (n - 1)) === 0;
}

function padTo8(n: number): number {
  return (n + 7) & ~7;
}

/** The bytes of an index, in pieces (the hashes are not copied) and the checksum last. */
export function serializeIndexParts(index: IndexFile): Buffer[] {
  const algo = [...ALGORITHMS].find(([, a]) => a.name === index.algorithm);
  if (algo === undefined) throw new Error(`unknown hash algorithm ${index.algorithm}`);
  if (index.hashes.length !== index.blockCount * index.hashBytes) {
    throw new Error('index hashes do not match the block count');
  }
  const identity = Buffer.from(JSON.stringify(index.identity), 'utf8');
  if (identity.length > MAX_IDENTITY_BYTES) throw new Error('identity too long');
  const head = Buffer.alloc(padTo8(INDEX_HEADER_BYTES + identity.length));
  INDEX_MAGIC.copy(head, 0);
  head.writeUInt16LE(INDEX_VERSION_MAJOR, 8);
  head.writeUInt16LE(INDEX_VERSION_MINOR, 10);
  head.writeUInt32LE(INDEX_HEADER_BYTES, 12);
  head.writeUInt32LE(index.blockSize, 16);
  head.writeUInt8(algo[0], 20);
  head.writeUInt8(index.hashBytes, 21);
  const dirty = index.state.kind === 'in-progress' ? index.state.dirty : { start: 0, end: 0 };
  head.writeUInt8(index.state.kind === 'in-progress' ? 1 : 0, 22);
  head.writeBigUInt64LE(BigInt(index.imageSize), 24);
  head.writeBigUInt64LE(BigInt(index.blockCount), 32);
  head.writeBigUInt64LE(BigInt(dirty.start), 40);
  head.writeBigUInt64LE(BigInt(dirty.end), 48);
  head.writeBigUInt64LE(BigInt(Math.round(index.writtenAt)), 56);
  head.writeUInt32LE(identity.length, 64);
  identity.copy(head, INDEX_HEADER_BYTES);
  const sum = sha256Stream().update(head).update(index.hashes).digest();
  return [head, index.hashes, sum];
}

/** The bytes of an index as one buffer (tests, small indexes). */
export function serializeIndex(index: IndexFile): Buffer {
  return Buffer.concat(serializeIndexParts(index));
}

function u64(buf: Buffer, offset: number, path: string, what: string): number {
  const v = buf.readBigUInt64LE(offset);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw formatError(path, `${what} is too large`);
  return Number(v);
}

interface Header {
  versionMajor: number;
  versionMinor: number;
  headerBytes: number;
  blockSize: number;
  algorithm: string;
  hashBytes: number;
  state: IndexState;
  imageSize: number;
  blockCount: number;
  writtenAt: number;
  identityBytes: number;
  /** Offset of the hashes. */
  hashesAt: number;
  /** Exact file length the header declares. */
  fileBytes: number;
}

/** Validates the fixed header; `head` holds at least its first INDEX_HEADER_BYTES. */
/** The header's fields as an IndexFile carries them. */
function headerFields(h: Header): Omit<IndexFile, 'identity' | 'hashes'> {
  return {
    versionMajor: h.versionMajor,
    versionMinor: h.versionMinor,
    blockSize: h.blockSize,
    imageSize: h.imageSize,
    algorithm: h.algorithm,
    hashBytes: h.hashBytes,
    blockCount: h.blockCount,
    state: h.state,
    writtenAt: h.writtenAt,
  };
}

function parseHeader(head: Buffer, path: string): Header {
  if (head.length < INDEX_HEADER_BYTES || !head.subarray(0, 8).equals(INDEX_MAGIC)) {
    throw formatError(path, 'no index magic (is it an index file?)');
  }
  const versionMajor = head.readUInt16LE(8);
  const versionMinor = head.readUInt16LE(10);
  if (versionMajor !== INDEX_VERSION_MAJOR) {
    throw formatError(
      path,
      `version ${versionMajor}.${versionMinor} is not supported (this blksync reads ${INDEX_VERSION_MAJOR}.x)`,
    );
  }
  const headerBytes = head.readUInt32LE(12);
  if (headerBytes < INDEX_HEADER_BYTES || headerBytes > MAX_INDEX_HEADER_BYTES) {
    throw formatError(path, `header size ${headerBytes} is out of range`);
  }
  const blockSize = head.readUInt32LE(16);
  if (!validBlockSize(blockSize)) throw formatError(path, `block size ${blockSize} is invalid`);
  const algo = ALGORITHMS.get(head.readUInt8(20));
  if (algo === undefined)
    throw formatError(path, `hash algorithm ${head.readUInt8(20)} is unknown`);
  const hashBytes = head.readUInt8(21);
  if (hashBytes !== algo.bytes) throw formatError(path, `hash size ${hashBytes} is wrong`);
  const stateByte = head.readUInt8(22);
  if (stateByte > 1) throw formatError(path, `state ${stateByte} is unknown`);
  const imageSize = u64(head, 24, path, 'image size');
  const blockCount = u64(head, 32, path, 'block count');
  if (blockCount > MAX_INDEX_BLOCKS) {
    throw formatError(path, `${blockCount} blocks is more than the ${MAX_INDEX_BLOCKS} allowed`);
  }
  if (blockCount !== blockCountFor(imageSize, blockSize)) {
    throw formatError(path, `block count ${blockCount} does not match the image size ${imageSize}`);
  }
  const start = u64(head, 40, path, 'dirty range start');
  const end = u64(head, 48, path, 'dirty range end');
  let state: IndexState;
  if (stateByte === 0) {
    if (start !== 0 || end !== 0) throw formatError(path, 'a clean index has a dirty range');
    state = { kind: 'clean' };
  } else {
    if (start > end || end > imageSize) throw formatError(path, 'the dirty range is out of bounds');
    state = { kind: 'in-progress', dirty: { start, end } };
  }
  const writtenAt = u64(head, 56, path, 'write time');
  const identityBytes = head.readUInt32LE(64);
  if (identityBytes > MAX_IDENTITY_BYTES) throw formatError(path, 'the identity is too long');
  const hashesAt = padTo8(headerBytes + identityBytes);
  return {
    versionMajor,
    versionMinor,
    headerBytes,
    blockSize,
    algorithm: algo.name,
    hashBytes,
    state,
    imageSize,
    blockCount,
    writtenAt,
    identityBytes,
    hashesAt,
    fileBytes: hashesAt + blockCount * hashBytes + CHECKSUM_BYTES,
  };
}

function isString(v: unknown): v is string {
  return typeof v === 'string' && v.length <= MAX_IDENTITY_BYTES;
}

function parseIdentity(bytes: Buffer, path: string): TargetIdentity {
  let v: unknown;
  try {
    v = JSON.parse(bytes.toString('utf8'));
  } catch {
    throw formatError(path, 'the identity record is not valid JSON');
  }
  const o = v as Record<string, unknown>;
  if (
    typeof v !== 'object' ||
    v === null ||
    (o.kind !== 'file' && o.kind !== 'block-device') ||
    typeof o.size !== 'number' ||
    !Number.isSafeInteger(o.size) ||
    o.size < 0 ||
    !isString(o.key) ||
    typeof o.weak !== 'boolean' ||
    (o.mtimeNs !== undefined && !isString(o.mtimeNs)) ||
    (o.ctimeNs !== undefined && !isString(o.ctimeNs)) ||
    (o.bootId !== undefined && !isString(o.bootId)) ||
    (o.sectorsWritten !== undefined && !isString(o.sectorsWritten)) ||
    (o.sectorsDiscarded !== undefined && !isString(o.sectorsDiscarded)) ||
    (o.diskSectorsWritten !== undefined && !isString(o.diskSectorsWritten)) ||
    (o.diskSectorsDiscarded !== undefined && !isString(o.diskSectorsDiscarded)) ||
    (o.backingFile !== undefined && !isString(o.backingFile)) ||
    (o.diskSeq !== undefined && !isString(o.diskSeq)) ||
    (o.stackedOn !== undefined && !isString(o.stackedOn)) ||
    (o.model !== undefined && !isString(o.model)) ||
    (o.path !== undefined && !isString(o.path))
  ) {
    throw formatError(path, 'the identity record is malformed');
  }
  const id: TargetIdentity = { kind: o.kind, size: o.size, key: o.key, weak: o.weak };
  if (o.mtimeNs !== undefined) id.mtimeNs = o.mtimeNs;
  if (o.ctimeNs !== undefined) id.ctimeNs = o.ctimeNs;
  if (o.bootId !== undefined) id.bootId = o.bootId;
  if (o.sectorsWritten !== undefined) id.sectorsWritten = o.sectorsWritten;
  if (o.sectorsDiscarded !== undefined) id.sectorsDiscarded = o.sectorsDiscarded;
  if (o.diskSectorsWritten !== undefined) id.diskSectorsWritten = o.diskSectorsWritten;
  if (o.diskSectorsDiscarded !== undefined) id.diskSectorsDiscarded = o.diskSectorsDiscarded;
  if (o.backingFile !== undefined) id.backingFile = o.backingFile;
  if (o.diskSeq !== undefined) id.diskSeq = o.diskSeq;
  if (o.stackedOn !== undefined) id.stackedOn = o.stackedOn;
  if (o.model !== undefined) id.model = o.model;
  if (o.path !== undefined) id.path = o.path;
  return id;
}

/** Parses and validates a whole index file held in memory. */
export function parseIndex(buf: Buffer, path = 'index'): IndexFile {
  if (buf.length > MAX_INDEX_FILE_BYTES) throw formatError(path, 'the file is too large');
  const h = parseHeader(buf, path);
  if (buf.length !== h.fileBytes) {
    throw formatError(
      path,
      `its length is ${buf.length} bytes but its header declares ${h.fileBytes} (truncated or padded?)`,
    );
  }
  const body = buf.subarray(0, buf.length - CHECKSUM_BYTES);
  if (!sha256(body).equals(buf.subarray(buf.length - CHECKSUM_BYTES))) {
    throw formatError(path, 'its checksum does not match (the file is damaged)');
  }
  const identity = parseIdentity(
    buf.subarray(h.headerBytes, h.headerBytes + h.identityBytes),
    path,
  );
  return {
    ...headerFields(h),
    identity,
    hashes: buf.subarray(h.hashesAt, h.hashesAt + h.blockCount * h.hashBytes),
  };
}

async function readExactly(fh: FileHandle, length: number, position: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  return buf.subarray(0, await readFully(fh, buf, 0, length, position));
}

/**
 * Reads and validates an index file. The header is checked against the file's length before
 * the rest is read, so a hostile header cannot make blksync allocate more than the file holds.
 */
export async function readIndexFile(path: string): Promise<IndexFile> {
  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    throw fromSystemError('EINDEX_OPEN', 'cannot open index', path, err);
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw formatError(path, 'it is not a regular file');
    if (st.size > MAX_INDEX_FILE_BYTES) throw formatError(path, 'the file is too large');
    const head = await readExactly(fh, Math.min(st.size, INDEX_HEADER_BYTES), 0);
    const h = parseHeader(head, path);
    if (st.size !== h.fileBytes) {
      throw formatError(
        path,
        `its length is ${st.size} bytes but its header declares ${h.fileBytes} (truncated or padded?)`,
      );
    }
    const all = await readExactly(fh, h.fileBytes, 0);
    return parseIndex(all, path);
  } catch (err) {
    throw fromSystemError('EINDEX_OPEN', 'cannot read index', path, err);
  } finally {
    await fh.close();
  }
}

/** Reads only an index's header and identity (for listings); the checksum is not verified. */
export async function readIndexSummary(
  path: string,
): Promise<Omit<IndexFile, 'hashes'> & { fileBytes: number }> {
  const fh = await open(path, 'r').catch((err: unknown) => {
    throw fromSystemError('EINDEX_OPEN', 'cannot open index', path, err);
  });
  try {
    const st = await fh.stat();
    const head = await readExactly(fh, Math.min(st.size, MAX_INDEX_HEADER_BYTES), 0);
    const h = parseHeader(head, path);
    if (st.size !== h.fileBytes) throw formatError(path, 'its length does not match its header');
    const idBytes = await readExactly(fh, h.identityBytes, h.headerBytes);
    return {
      ...headerFields(h),
      identity: parseIdentity(idBytes, path),
      fileBytes: h.fileBytes,
    };
  } finally {
    await fh.close();
  }
}

/** An index of this version, SHA-256, written now: what every writer of an index fills in. */
/** What a writer of an index chooses; the rest newIndex() fills in. */
export interface NewIndexFields {
  blockSize: number;
  imageSize: number;
  state: IndexState;
  identity: TargetIdentity;
  hashes: Buffer;
}

export function newIndex(fields: NewIndexFields): IndexFile {
  return {
    versionMajor: INDEX_VERSION_MAJOR,
    versionMinor: INDEX_VERSION_MINOR,
    algorithm: HASH_ALGORITHM,
    hashBytes: HASH_BYTES,
    blockCount: blockCountFor(fields.imageSize, fields.blockSize),
    writtenAt: Date.now(),
    ...fields,
  };
}

/**
 * Writes an index so that `path` always holds either the old file or the new one, whole:
 * through io/output-file.ts (a random O_EXCL temporary beside it, fsync, rename, fsync of
 * the directory; a device or FIFO written in place, a link refused), 0600 in the cache.
 */
export async function writeIndexFile(path: string, index: IndexFile): Promise<void> {
  await writeOutputFile(path, serializeIndexParts(index), {
    what: 'index',
    code: 'EINDEX_WRITE',
    mode: indexFileMode(path),
  });
}

/** newIndex(fields), written atomically at `path` (writeIndexFile); returns what was written. */
export async function writeNewIndex(path: string, fields: NewIndexFields): Promise<IndexFile> {
  const index = newIndex(fields);
  await writeIndexFile(path, index);
  return index;
}

/**
 * Reads the index at `path` if there is one: 'absent' when there is no file; `unreadable`
 * with the error when it is not a usable index (damaged, another major version) — the index
 * policy decides whether that is replaced or refused. Other failures (permissions) throw.
 */
export async function readIndexIfAny(
  path: string,
): Promise<IndexFile | 'absent' | { unreadable: BlksyncError }> {
  try {
    return await readIndexFile(path);
  } catch (err) {
    if (!(err instanceof BlksyncError)) throw err;
    const cause = err.cause as { code?: unknown } | undefined;
    if (cause?.code === 'ENOENT') return 'absent';
    if (err.code === 'EINDEX_FORMAT') return { unreadable: err };
    throw err;
  }
}
