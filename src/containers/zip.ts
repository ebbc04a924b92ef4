/**
 * zip archives, decoded natively (stored and deflated entries, zip64, data descriptors).
 * Written here rather than taken from npm: no zip reader is installed with blksync; the
 * parts needed are the directory records below and node:zlib's raw inflate.
 *
 *   local header   "PK\3\4" ver u16, flags u16 (bit 0 encrypted, bit 3 sizes follow the
 *                  data in a descriptor), method u16 (0 stored, 8 deflate), time, date,
 *                  crc u32, compressed u32, size u32, name len u16, extra len u16, name, extra
 *   data, then a descriptor when flag bit 3: ["PK\7\8"] crc, compressed, size (8 bytes each
 *                  in zip64)
 *   central dir    "PK\1\2" one record per entry (sizes, local header offset), then
 *   end record     "PK\5\6" (22 bytes + comment; zip64: "PK\6\6" record and "PK\6\7" locator)
 *   zip64 extra    id 0x0001: size, compressed, offset — those whose 32-bit field is 0xFFFFFFFF
 *
 * A file SRC is read through its central directory (all entries known, the image chosen
 * among them), its entry read from its offset (stored: by offset) and checked against the
 * directory's size and CRC-32 at its end. A stream (stdin, a URL, a decompressor) is walked by its local headers
 * (zip-stream.ts).
 */

import type { FileHandle } from 'node:fs/promises';
import { createReadStream } from 'node:fs';
import { crc32, createInflateRaw } from 'node:zlib';
import { BlksyncError } from '../errors.js';
import { readFully } from '../io/read-fully.js';
import type { ArchiveEntry } from './entries.js';
import { holdBack } from './stream-end.js';

export const LOCAL_SIG = 0x04034b50;
export const CENTRAL_SIG = 0x02014b50;
export const END_SIG = 0x06054b50;
const END64_SIG = 0x06064b50;
const LOCATOR64_SIG = 0x07064b50;
export const DESCRIPTOR_SIG = 0x08074b50;
export const LOCAL_BYTES = 30;
const CENTRAL_BYTES = 46;
export const END_BYTES = 22;
const END64_BYTES = 56;
const LOCATOR64_BYTES = 20;
export const MAX_COMMENT = 0xffff;
/** Largest central directory read (a lying size must not cost memory). */
const MAX_DIRECTORY_BYTES = 64 * 1024 * 1024;
export const U32 = 0xffffffff;

export interface ZipEntry extends ArchiveEntry {
  size: number | undefined;
  compressedSize: number | undefined;
  method: number;
  flags: number;
  /** Where its local header starts. */
  localAt: number;
  /** The CRC-32 of the entry's bytes, when known before them (not in a data descriptor). */
  crc?: number | undefined;
}

export function corrupt(name: string, detail: string): BlksyncError {
  return new BlksyncError(
    'ESRC_CORRUPT',
    `${name}: the zip archive is damaged (${detail}); get a good copy of it (or --raw to write it as it is)`,
    { path: name },
  );
}

function u64(b: Buffer, at: number, name: string): number {
  const v = Number(b.readBigUInt64LE(at));
  if (!Number.isSafeInteger(v)) throw corrupt(name, 'a zip64 field past 2^53');
  return v;
}

/** An entry's bytes do not add up to its CRC-32. */
export function zipCrcMismatch(name: string, entry: string): BlksyncError {
  return corrupt(name, `${entry}'s CRC-32 does not match: the archive is damaged`);
}

/** Refuses what is not decoded: encryption, methods other than stored and deflate. */
export function checkZipEntry(e: ZipEntry, archive: string): void {
  if ((e.flags & 1) !== 0) {
    throw new BlksyncError(
      'ESRC_CONTAINER',
      `${archive}: ${e.name} is encrypted in the zip; unpack it with unzip and copy the file`,
      { path: archive },
    );
  }
  if (e.method !== 0 && e.method !== 8) {
    const names: Record<number, string> = {
      9: 'deflate64',
      12: 'bzip2',
      14: 'lzma',
      93: 'zstd',
      95: 'xz',
    };
    throw new BlksyncError(
      'ESRC_CONTAINER',
      `${archive}: ${e.name} is compressed in the zip with method ${names[e.method] ?? e.method}, which blksync does not decode (stored and deflate only); unpack it with unzip or 7z and copy the file`,
      { path: archive },
    );
  }
}

/** Applies a zip64 extra field to the 32-bit values that overflowed. */
export function zip64(
  extra: Buffer,
  fields: { size: number; compressed: number; offset?: number },
  name: string,
): { size: number; compressed: number; offset: number | undefined } {
  let { size, compressed } = fields;
  let offset = fields.offset;
  for (let at = 0; at + 4 <= extra.length;) {
    const id = extra.readUInt16LE(at);
    const len = extra.readUInt16LE(at + 2);
    if (at + 4 + len > extra.length) throw corrupt(name, 'an extra field past its record');
    if (id === 1) {
      let p = at + 4;
      const take = (): number => {
        if (p + 8 > at + 4 + len) throw corrupt(name, 'a short zip64 field');
        const v = u64(extra, p, name);
        p += 8;
        return v;
      };
      if (size === U32) size = take();
      if (compressed === U32) compressed = take();
      if (offset === U32) offset = take();
    }
    at += 4 + len;
  }
  return { size, compressed, offset };
}

/** Where the end record is in `tail` (the archive's last bytes), or -1. */
export function findEndRecord(tail: Buffer): number {
  for (let i = tail.length - END_BYTES; i >= 0; i--) {
    if (
      tail.readUInt32LE(i) === END_SIG &&
      i + END_BYTES + tail.readUInt16LE(i + 20) <= tail.length
    ) {
      return i;
    }
  }
  return -1;
}

interface EndRecord {
  count: number;
  dirBytes: number;
  dirAt: number;
}

/** The end record's entry count and central directory (32-bit fields). */
export function endRecord(tail: Buffer, endAt: number): EndRecord {
  return {
    count: tail.readUInt16LE(endAt + 10),
    dirBytes: tail.readUInt32LE(endAt + 12),
    dirAt: tail.readUInt32LE(endAt + 16),
  };
}

/** Where the zip64 end record is in the archive, when a zip64 locator precedes the end record. */
export function zip64EndAt(tail: Buffer, endAt: number, name: string): number | undefined {
  if (endAt < LOCATOR64_BYTES || tail.readUInt32LE(endAt - LOCATOR64_BYTES) !== LOCATOR64_SIG) {
    return undefined;
  }
  return u64(tail, endAt - LOCATOR64_BYTES + 8, name);
}

/** The zip64 end record's entry count and central directory (its first END64_BYTES). */
export function zip64EndRecord(e: Buffer, name: string): EndRecord {
  if (e.length < END64_BYTES || e.readUInt32LE(0) !== END64_SIG) {
    throw corrupt(name, 'no zip64 end record');
  }
  return { count: u64(e, 32, name), dirBytes: u64(e, 40, name), dirAt: u64(e, 48, name) };
}

/** A file SRC's entries, from its central directory. */
export async function zipDirectory(
  fh: FileHandle,
  fileSize: number,
  name: string,
): Promise<ZipEntry[]> {
  const tailBytes = Math.min(fileSize, END_BYTES + MAX_COMMENT + 20);
  const tail = Buffer.alloc(tailBytes);
  await readFully(fh, tail, 0, tailBytes, fileSize - tailBytes);
  const endAt = findEndRecord(tail);
  if (endAt < 0) {
    throw new BlksyncError(
      'ESRC_SHORT',
      `${name}: the zip archive has no end record (its directory); the file is truncated: download or copy it again`,
      { path: name },
    );
  }
  let { count, dirBytes, dirAt } = endRecord(tail, endAt);
  const end64At = zip64EndAt(tail, endAt, name);
  if (end64At !== undefined) {
    const e = Buffer.alloc(END64_BYTES);
    if (
      end64At + END64_BYTES > fileSize ||
      (await readFully(fh, e, 0, END64_BYTES, end64At)) < END64_BYTES
    ) {
      throw corrupt(name, 'the zip64 end record is past the end of the file');
    }
    ({ count, dirBytes, dirAt } = zip64EndRecord(e, name));
  }
  if (dirAt + dirBytes > fileSize || dirBytes > MAX_DIRECTORY_BYTES) {
    throw corrupt(name, 'the central directory is past the end of the file');
  }
  const dir = Buffer.alloc(dirBytes);
  await readFully(fh, dir, 0, dirBytes, dirAt);
  return parseDirectory(dir, count, name);
}

/** The central directory's records (`count` of them in `dir`) as entries. */
export function parseDirectory(dir: Buffer, count: number, name: string): ZipEntry[] {
  const dirBytes = dir.length;
  const entries: ZipEntry[] = [];
  let at = 0;
  for (let i = 0; i < count; i++) {
    if (at + CENTRAL_BYTES > dirBytes || dir.readUInt32LE(at) !== CENTRAL_SIG) {
      throw corrupt(name, `central directory record ${i} is missing`);
    }
    const nameLen = dir.readUInt16LE(at + 28);
    const extraLen = dir.readUInt16LE(at + 30);
    const commentLen = dir.readUInt16LE(at + 32);
    const next = at + CENTRAL_BYTES + nameLen + extraLen + commentLen;
    if (next > dirBytes)
      throw corrupt(name, `central directory record ${i} runs past the directory`);
    const entryName = dir.toString('utf8', at + CENTRAL_BYTES, at + CENTRAL_BYTES + nameLen);
    const z = zip64(
      dir.subarray(at + CENTRAL_BYTES + nameLen, at + CENTRAL_BYTES + nameLen + extraLen),
      {
        size: dir.readUInt32LE(at + 24),
        compressed: dir.readUInt32LE(at + 20),
        offset: dir.readUInt32LE(at + 42),
      },
      name,
    );
    entries.push({
      name: entryName,
      file: !entryName.endsWith('/'),
      size: z.size,
      compressedSize: z.compressed,
      method: dir.readUInt16LE(at + 10),
      flags: dir.readUInt16LE(at + 8),
      localAt: z.offset!,
      crc: dir.readUInt32LE(at + 16),
    });
    at = next;
  }
  return entries;
}

/** Where a file SRC's entry's data starts (after its local header), bounds-checked. */
export async function zipDataAt(
  fh: FileHandle,
  e: ZipEntry,
  fileSize: number,
  name: string,
): Promise<number> {
  const h = Buffer.alloc(LOCAL_BYTES);
  if (e.localAt + LOCAL_BYTES > fileSize) throw corrupt(name, `${e.name}'s header is past the end`);
  await readFully(fh, h, 0, LOCAL_BYTES, e.localAt);
  if (h.readUInt32LE(0) !== LOCAL_SIG) throw corrupt(name, `no local header for ${e.name}`);
  const dataAt = e.localAt + LOCAL_BYTES + h.readUInt16LE(26) + h.readUInt16LE(28);
  if (dataAt + e.compressedSize! > fileSize) {
    throw new BlksyncError(
      'ESRC_SHORT',
      `${name}: ${e.name}'s data runs past the end of the zip; the file is truncated: download or copy it again`,
      { path: name },
    );
  }
  return dataAt;
}

/**
 * A file SRC's deflated entry's bytes, inflated from `dataAt`, checked to be exactly its size
 * with its CRC-32; the last piece is held back until then (stream-end.ts), so a damaged entry
 * never ends a copy with exit 0. (A stored entry is read by offset: CheckedSliceSource.)
 */
export function inflateFileEntry(
  path: string,
  dataAt: number,
  e: ZipEntry,
  name: string,
): AsyncIterable<Buffer> {
  const raw =
    e.compressedSize === 0
      ? nothing()
      : createReadStream(path, {
          start: dataAt,
          end: dataAt + e.compressedSize! - 1,
          highWaterMark: 1024 * 1024,
        });
  return holdBack(exactly(inflate(raw, name).bytes, e.size, e.name, name, e.crc), () => {});
}

async function* nothing(): AsyncGenerator<Buffer> {}

/**
 * Raw deflate of `input`. `fed` settles once nothing more is taken from `input` (the
 * inflater stops at the deflate stream's end, which a streamed entry with a data descriptor
 * does not announce): only then may the caller read on from where `input` comes.
 */
export function inflate(
  input: AsyncIterable<Buffer>,
  name: string,
): { bytes: AsyncIterable<Buffer>; fed: Promise<void> } {
  const z = createInflateRaw({ chunkSize: 256 * 1024 });
  const feed = async (): Promise<void> => {
    try {
      for await (const piece of input) {
        if (z.destroyed || z.writableEnded) break;
        if (!z.write(piece) && !z.destroyed) {
          // an inflater destroyed meanwhile never drains: its close ends the wait (and the
          // listener not called is removed, or one would pile up per wait)
          await new Promise<void>((r) => {
            const done = (): void => {
              z.off('drain', done);
              z.off('close', done);
              r();
            };
            z.once('drain', done);
            z.once('close', done);
          });
        }
      }
      if (!z.destroyed) z.end();
    } catch (err) {
      z.destroy(err as Error);
    }
  };
  const fed = feed();
  const bytes = (async function* () {
    try {
      for await (const out of z) yield out as Buffer;
    } catch (err) {
      if (err instanceof BlksyncError) throw err;
      throw corrupt(name, `deflate: ${(err as Error).message}`);
    } finally {
      z.destroy();
    }
  })();
  return { bytes, fed };
}

/** What `exactly` counted: the bytes and their CRC-32. */
export interface Counted {
  bytes: number;
  crc: number;
}

/**
 * Passes `input` through, failing as soon as it runs past `size` (a lying size, a bomb) and,
 * at its end, when it is not exactly `size` bytes or its CRC-32 is not `crc` (each checked
 * when known). `counted` gets the bytes and CRC-32 seen. The caller holds the last piece back
 * (stream-end.ts) so that these failures come before it is written.
 */
export async function* exactly(
  input: AsyncIterable<Buffer>,
  size: number | undefined,
  entry: string,
  name: string,
  crc?: number,
  counted: Counted = { bytes: 0, crc: 0 },
): AsyncGenerator<Buffer> {
  for await (const piece of input) {
    if (piece.length === 0) continue;
    counted.bytes += piece.length;
    if (size !== undefined && counted.bytes > size) {
      throw corrupt(name, `${entry} holds more than the ${size} bytes its header says`);
    }
    counted.crc = crc32(piece, counted.crc);
    yield piece;
  }
  if (size !== undefined && counted.bytes !== size) {
    throw corrupt(name, `${entry} holds ${counted.bytes} bytes, its header says ${size}`);
  }
  if (crc !== undefined && counted.crc >>> 0 !== crc >>> 0) {
    throw zipCrcMismatch(name, entry);
  }
}
