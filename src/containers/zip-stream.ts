/**
 * A zip read as a stream (stdin, a URL, a decompressor's output): its local headers are walked
 * to the chosen entry (the one named with --entry, or the first file named like an image),
 * whose bytes are passed on; then the rest of the stream is read to its central directory,
 * which lists every entry, before the entry's last piece is handed on (stream-end.ts):
 *
 *   [local header, data, (descriptor)] ... chosen entry ... [more entries] central dir, end
 *                                          ^ streamed       ^ read and dropped; its last
 *                                                             DIRECTORY_WINDOW_BYTES kept
 *
 * The directory's record of the entry (found by its local header's offset) must agree with
 * the bytes streamed (size, CRC-32: an entry whose sizes come in a data descriptor is checked
 * only here), and no other entry may have its name: extracting would give the last one.
 */

import { BlksyncError } from '../errors.js';
import type { ByteReader } from './byte-reader.js';
import { checkStreamChoice } from './entries.js';
import { holdBack } from './stream-end.js';
import {
  CENTRAL_SIG,
  checkZipEntry,
  corrupt,
  DESCRIPTOR_SIG,
  END_BYTES,
  END_SIG,
  endRecord,
  exactly,
  findEndRecord,
  inflate,
  LOCAL_BYTES,
  LOCAL_SIG,
  MAX_COMMENT,
  parseDirectory,
  U32,
  zip64,
  zip64EndAt,
  zip64EndRecord,
  zipCrcMismatch,
  type Counted,
  type ZipEntry,
} from './zip.js';

/**
 * The stream's last bytes kept while it is read to its end, where the central directory is:
 * a directory larger than this (some 100,000 entries) is refused from a stream.
 */
const DIRECTORY_WINDOW_BYTES = 16 * 1024 * 1024 + MAX_COMMENT + 1024;

/** The last bytes read from a stream (at least `limit` of them, in the pieces they came in). */
class TailWindow {
  readonly #pieces: Buffer[] = [];
  #bytes = 0;
  /** The stream's position after the last byte kept. */
  end = 0;
  /** Bytes were dropped from the front. */
  trimmed = false;
  readonly #limit: number;

  constructor(limit: number) {
    this.#limit = limit;
  }

  push(piece: Buffer, end: number): void {
    this.#pieces.push(piece);
    this.#bytes += piece.length;
    this.end = end;
    while (this.#pieces.length > 1 && this.#bytes - this.#pieces[0]!.length >= this.#limit) {
      this.#bytes -= this.#pieces.shift()!.length;
      this.trimmed = true;
    }
  }

  /** The bytes kept and the stream position of the first. */
  /** Nothing kept yet: the stream is at `position`. */
  at(position: number): void {
    if (this.#pieces.length === 0) this.end = position;
  }

  contents(): { bytes: Buffer; start: number } {
    const bytes = Buffer.concat(this.#pieces, this.#bytes);
    return { bytes, start: this.end - bytes.length };
  }
}

/**
 * Walks local headers to the chosen entry (`pick`) and returns its bytes, checked as the file
 * header says; `seen` gets the entries walked. Entries passed over must carry their sizes.
 */
export async function openZipStream(
  reader: ByteReader,
  name: string,
  pick: (entryName: string) => boolean,
  wanted: string | undefined,
  seen: ZipEntry[],
): Promise<{ entry: ZipEntry; bytes: AsyncIterable<Buffer> } | undefined> {
  for (;;) {
    const sigBytes = await reader.upTo(4);
    if (sigBytes.length < 4) throw reader.short('the zip archive');
    let sig = sigBytes.readUInt32LE(0);
    if (sig === DESCRIPTOR_SIG && reader.position === 4) {
      sig = (await reader.exact(4, 'the zip archive')).readUInt32LE(0); // spanned-archive marker
    }
    const headerAt = reader.position - 4;
    if (sig === CENTRAL_SIG || sig === END_SIG) return undefined;
    if (sig !== LOCAL_SIG) throw corrupt(name, `no local header at byte ${headerAt}`);
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
      localAt: headerAt,
      crc: described ? undefined : h.readUInt32LE(10),
    };
    seen.push(entry);
    if (entry.file && pick(entryName)) {
      checkZipEntry(entry, name);
      if (entry.compressedSize === undefined && method === 0)
        throw undescribed(name, entryName, true);
      return { entry, bytes: entryBytes(reader, entry, wanted, name) };
    }
    if (entry.compressedSize === undefined) throw undescribed(name, entryName, false);
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

/** The chosen entry's bytes; its last piece waits for the central directory's check. */
function entryBytes(
  reader: ByteReader,
  entry: ZipEntry,
  wanted: string | undefined,
  name: string,
): AsyncIterable<Buffer> {
  const window = new TailWindow(DIRECTORY_WINDOW_BYTES);
  // with its size in a descriptor, the deflate stream ends itself, inside a piece read: the
  // pieces are kept from the data's start so the directory after them is found all the same
  const raw =
    entry.compressedSize !== undefined
      ? reader.take(entry.compressedSize, `${entry.name} in the zip`)
      : kept(reader, window);
  let fed: Promise<void> = Promise.resolve();
  let data: AsyncIterable<Buffer> = raw;
  if (entry.method !== 0) ({ bytes: data, fed } = inflate(raw, name));
  const counted: Counted = { bytes: 0, crc: 0 };
  return holdBack(exactly(data, entry.size, entry.name, name, entry.crc, counted), async () => {
    await fed;
    window.at(reader.position);
    for (;;) {
      const piece = await reader.next(Number.MAX_SAFE_INTEGER);
      if (piece === undefined) break;
      window.push(piece, reader.position);
    }
    checkDirectory(window, entry, counted, wanted, name);
  });
}

async function* kept(reader: ByteReader, window: TailWindow): AsyncGenerator<Buffer> {
  for (;;) {
    const piece = await reader.next(Number.MAX_SAFE_INTEGER);
    if (piece === undefined) return;
    window.push(piece, reader.position);
    yield piece;
  }
}

/** The central directory in the stream's last bytes agrees with the entry streamed. */
function checkDirectory(
  window: TailWindow,
  entry: ZipEntry,
  counted: Counted,
  wanted: string | undefined,
  name: string,
): void {
  const { bytes, start } = window.contents();
  const from = Math.max(0, bytes.length - END_BYTES - MAX_COMMENT);
  const endAt = findEndRecord(bytes.subarray(from));
  if (endAt < 0) {
    throw new BlksyncError(
      'ESRC_SHORT',
      `${name}: the zip archive ends without its central directory after ${entry.name}; it is truncated: download or copy it again`,
      { path: name },
    );
  }
  const end = from + endAt;
  let { count, dirBytes, dirAt } = endRecord(bytes, end);
  const end64At = zip64EndAt(bytes, end, name);
  if (end64At !== undefined) {
    const at = end64At - start;
    if (at < 0 || at > end)
      throw corrupt(name, 'the zip64 end record is not before the end record');
    ({ count, dirBytes, dirAt } = zip64EndRecord(bytes.subarray(at, end), name));
  }
  const dirStart = dirAt - start;
  if (dirStart < 0 && window.trimmed) {
    throw new BlksyncError(
      'ESRC_CONTAINER',
      `${name}: the zip archive's central directory (${dirBytes} bytes) is too large to check from a stream; save the zip to a file and copy from that`,
      { path: name },
    );
  }
  if (dirStart < 0 || dirStart + dirBytes > end) {
    throw corrupt(name, 'the central directory is not where the end record says');
  }
  const entries = parseDirectory(bytes.subarray(dirStart, dirStart + dirBytes), count, name);
  const listed = entries.find((e) => e.localAt === entry.localAt);
  if (listed === undefined) {
    throw corrupt(name, `the central directory does not list ${entry.name}`);
  }
  if (listed.size !== counted.bytes) {
    throw corrupt(
      name,
      `${entry.name} holds ${counted.bytes} bytes, the directory says ${listed.size}`,
    );
  }
  if (listed.crc !== undefined && listed.crc >>> 0 !== counted.crc >>> 0) {
    throw zipCrcMismatch(name, entry.name);
  }
  checkStreamChoice(entries, entry.name, wanted, name, 'zip');
}

/**
 * An entry whose size comes after its data: skipped, or the chosen one stored (not deflated,
 * so nothing marks its end). --entry helps only the first: that entry may be the image.
 */
function undescribed(name: string, entry: string, chosen: boolean): BlksyncError {
  return new BlksyncError(
    'ESRC_CONTAINER',
    `${name}: ${entry} in the zip gives its size only after its data, which a stream cannot ${chosen ? 'find the end of (it is stored, not deflated)' : 'skip'}; save the zip to a file and copy from that${chosen ? '' : ` (or, if ${entry} is the image, name it with --entry)`}`,
    { path: name },
  );
}
