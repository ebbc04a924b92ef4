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
 * among them; a stored entry is read by offset). A stream (stdin, a URL, a decompressor)
 * is walked by its local headers: the entry named with --entry, or the first file named
 * like an image.
 */

import type { FileHandle } from 'node:fs/promises';
import { createReadStream } from 'node:fs';
import { crc32, createInflateRaw } from 'node:zlib';
import { BlksyncError } from '../errors.js';
import { readFully } from '../io/read-fully.js';
import type { ByteReader } from './byte-reader.js';
import type { ArchiveEntry } from './entries.js';

const LOCAL_SIG = 0x04034b50;
const CENTRAL_SIG = 0x02014b50;
const END_SIG = 0x06054b50;
const END64_SIG = 0x06064b50;
const LOCATOR64_SIG = 0x07064b50;
const DESCRIPTOR_SIG = 0x08074b50;
const LOCAL_BYTES = 30;
const CENTRAL_BYTES = 46;
const END_BYTES = 22;
const MAX_COMMENT = 0xffff;
/** Largest central directory read (a lying size must not cost memory). */
const MAX_DIRECTORY_BYTES = 64 * 1024 * 1024;
const U32 = 0xffffffff;

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

function corrupt(name: string, detail: string): BlksyncError {
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
function zip64(
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

/** A file SRC's entries, from its central directory. */
export async function zipDirectory(
  fh: FileHandle,
  fileSize: number,
  name: string,
): Promise<ZipEntry[]> {
  const tailBytes = Math.min(fileSize, END_BYTES + MAX_COMMENT + 20);
  const tail = Buffer.alloc(tailBytes);
  await readFully(fh, tail, 0, tailBytes, fileSize - tailBytes);
  let endAt = -1;
  for (let i = tailBytes - END_BYTES; i >= 0; i--) {
    if (
      tail.readUInt32LE(i) === END_SIG &&
      i + END_BYTES + tail.readUInt16LE(i + 20) <= tailBytes
    ) {
      endAt = i;
      break;
    }
  }
  if (endAt < 0) {
    throw new BlksyncError(
      'ESRC_SHORT',
      `${name}: the zip archive has no end record (its directory); the file is truncated: download or copy it again`,
      { path: name },
    );
  }
  let count = tail.readUInt16LE(endAt + 10);
  let dirBytes = tail.readUInt32LE(endAt + 12);
  let dirAt = tail.readUInt32LE(endAt + 16);
  if (endAt >= 20 && tail.readUInt32LE(endAt - 20) === LOCATOR64_SIG) {
    const end64At = u64(tail, endAt - 20 + 8, name);
    const e = Buffer.alloc(56);
    if (end64At + 56 > fileSize || (await readFully(fh, e, 0, 56, end64At)) < 56) {
      throw corrupt(name, 'the zip64 end record is past the end of the file');
    }
    if (e.readUInt32LE(0) !== END64_SIG) throw corrupt(name, 'no zip64 end record');
    count = u64(e, 32, name);
    dirBytes = u64(e, 40, name);
    dirAt = u64(e, 48, name);
  }
  if (dirAt + dirBytes > fileSize || dirBytes > MAX_DIRECTORY_BYTES) {
    throw corrupt(name, 'the central directory is past the end of the file');
  }
  const dir = Buffer.alloc(dirBytes);
  await readFully(fh, dir, 0, dirBytes, dirAt);
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

/** A deflated file entry's bytes, read from `dataAt`; checked to be exactly `size` long. */
export function inflateFileEntry(
  path: string,
  dataAt: number,
  e: ZipEntry,
  name: string,
): AsyncIterable<Buffer> {
  const raw = createReadStream(path, {
    start: dataAt,
    end: dataAt + e.compressedSize! - 1,
    highWaterMark: 1024 * 1024,
  });
  return exactly(inflate(raw, name), e.size!, e.name, name, e.crc);
}

function inflate(input: AsyncIterable<Buffer>, name: string): AsyncIterable<Buffer> {
  const z = createInflateRaw({ chunkSize: 256 * 1024 });
  const feed = async (): Promise<void> => {
    try {
      for await (const piece of input) {
        if (!z.write(piece)) await new Promise((r) => z.once('drain', r));
        if (z.destroyed || z.writableEnded) break;
      }
      z.end();
    } catch (err) {
      z.destroy(err as Error);
    }
  };
  void feed();
  return (async function* () {
    try {
      for await (const out of z) yield out as Buffer;
    } catch (err) {
      if (err instanceof BlksyncError) throw err;
      throw corrupt(name, `deflate: ${(err as Error).message}`);
    } finally {
      z.destroy();
    }
  })();
}

/**
 * Passes `input` through, failing when it is not exactly `size` bytes (a lying size, a bomb)
 * or its CRC-32 is not `crc`. The last piece is held back until the input has ended, so a
 * stream longer than its size, or a bad checksum, fails before that piece is written.
 */
async function* exactly(
  input: AsyncIterable<Buffer>,
  size: number,
  entry: string,
  name: string,
  crc?: number,
): AsyncGenerator<Buffer> {
  let n = 0;
  let sum = 0;
  let held: Buffer | undefined;
  for await (const piece of input) {
    if (piece.length === 0) continue;
    n += piece.length;
    if (n > size) throw corrupt(name, `${entry} holds more than the ${size} bytes its header says`);
    if (crc !== undefined) sum = crc32(piece, sum);
    if (held !== undefined) yield held;
    held = piece;
  }
  if (n !== size) throw corrupt(name, `${entry} holds ${n} bytes, its header says ${size}`);
  if (crc !== undefined && sum >>> 0 !== crc >>> 0) {
    throw corrupt(name, `${entry}'s CRC-32 does not match: the archive is damaged`);
  }
  if (held !== undefined) yield held;
}

/**
 * A streamed zip: walks local headers to the chosen entry (`wanted`, or the first file
 * `looksLikeImage`) and returns its bytes. Entries passed over must carry their sizes.
 */
export async function openZipStream(
  reader: ByteReader,
  name: string,
  pick: (entryName: string) => boolean,
  seen: ZipEntry[],
): Promise<{ entry: ZipEntry; bytes: AsyncIterable<Buffer> } | undefined> {
  for (;;) {
    const sigBytes = await reader.upTo(4);
    if (sigBytes.length < 4) throw reader.short('the zip archive');
    let sig = sigBytes.readUInt32LE(0);
    if (sig === DESCRIPTOR_SIG && reader.position === 4) {
      sig = (await reader.exact(4, 'the zip archive')).readUInt32LE(0); // spanned-archive marker
    }
    if (sig === CENTRAL_SIG || sig === END_SIG) return undefined;
    if (sig !== LOCAL_SIG) throw corrupt(name, `no local header at byte ${reader.position - 4}`);
    const h = await reader.exact(LOCAL_BYTES - 4, 'a zip local header');
    const flags = h.readUInt16LE(2);
    const method = h.readUInt16LE(4);
    const entryName = (await reader.exact(h.readUInt16LE(22), 'a zip local header')).toString();
    const extra = await reader.exact(h.readUInt16LE(24), 'a zip local header');
    const z = zip64(extra, { size: h.readUInt32LE(18), compressed: h.readUInt32LE(14) }, name);
    const described = (flags & 8) !== 0;
    const entry: ZipEntry = {
      name: entryName,
      file: !entryName.endsWith('/'),
      size: described && z.size === 0 ? undefined : z.size,
      compressedSize: described && z.compressed === 0 ? undefined : z.compressed,
      method,
      flags,
      localAt: reader.position,
      crc: described ? undefined : h.readUInt32LE(10),
    };
    seen.push(entry);
    if (entry.file && pick(entryName)) {
      checkZipEntry(entry, name);
      if (entry.compressedSize === undefined && method === 0) throw undescribed(name, entryName);
      // with its size in a descriptor, the deflate stream ends itself; what follows is dropped
      const raw =
        entry.compressedSize !== undefined
          ? reader.take(entry.compressedSize, `${entryName} in the zip`)
          : rest(reader);
      const data = method === 0 ? raw : inflate(raw, name);
      return {
        entry,
        bytes:
          entry.size !== undefined ? exactly(data, entry.size, entryName, name, entry.crc) : data,
      };
    }
    if (entry.compressedSize === undefined) throw undescribed(name, entryName);
    await reader.skip(entry.compressedSize, `${entryName} in the zip`);
    if (described) {
      // the descriptor: optional signature, crc, then 4- or 8-byte sizes
      const d = await reader.exact(4, 'a zip data descriptor');
      const zip64Sizes = z.size === U32 || extra.length > 0;
      await reader.skip(
        (d.readUInt32LE(0) === DESCRIPTOR_SIG ? 4 : 0) + (zip64Sizes ? 16 : 8),
        'a zip data descriptor',
      );
    }
  }
}

async function* rest(reader: ByteReader): AsyncGenerator<Buffer> {
  for (;;) {
    const piece = await reader.next(Number.MAX_SAFE_INTEGER);
    if (piece === undefined) return;
    yield piece;
  }
}

function undescribed(name: string, entry: string): BlksyncError {
  return new BlksyncError(
    'ESRC_CONTAINER',
    `${name}: ${entry} in the zip gives its size only after its data, which a stream cannot skip; save the zip to a file and copy from that (or name the image with --entry)`,
    { path: name },
  );
}
