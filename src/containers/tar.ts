/**
 * tar archives (ustar, GNU, pax), decoded natively: tar is a run of 512-byte headers, each
 * followed by its file's data padded to 512 bytes, ended by a zero block. Written here rather
 * than taken from npm: no tar parser is installed with blksync, and walking headers is ~150
 * lines where a library would bring a stream framework around the same.
 *
 *   header   0 name[100]  100 mode  108 uid  116 gid  124 size[12] (octal, or base-256 when
 *            the first byte has 0x80)  136 mtime  148 checksum[8]  156 type  157 linkname[100]
 *            257 "ustar"  345 prefix[155] (POSIX: the name's directory)
 *   types    '0' / NUL / '7' a file; 'x' pax attributes for the next entry (path, size);
 *            'g' global pax attributes; 'L' GNU long name of the next entry; 'K' long link
 *            name; 'S' and pax GNU.sparse 1.0: sparse files (tar-sparse.ts); older pax
 *            sparse versions are listed, and refused when chosen
 *
 * One walker serves a file (positioned reads; data skipped without reading) and a stream
 * (stdin, a decompressor's output: data read and dropped).
 */

import { BlksyncError } from '../errors.js';
import { isTarHeader } from './detect.js';
import type { ArchiveEntry } from './entries.js';
import { checkSparseMap, gnuSparseMap, paxSparseMap, type SparseRegion } from './tar-sparse.js';

const BLOCK = 512;
/** Largest pax or GNU long-name record accepted (a lying size must not cost memory). */
const MAX_META_BYTES = 1024 * 1024;

/** Reads forward: ByteReader over a stream, or a cursor over a file. */
export interface Cursor {
  position: number;
  exact(n: number, what: string): Promise<Buffer>;
  skip(n: number, what: string): Promise<void>;
  /** Up to n bytes, fewer at the end (for the end of the archive). */
  upTo(n: number): Promise<Buffer>;
}

export interface TarEntry extends ArchiveEntry {
  size: number;
  /** Where the file's data starts in the archive (a sparse entry's: after its map). */
  dataAt: number;
  /** A GNU sparse entry: where its stored regions go (size is the file's real size). */
  sparse: SparseRegion[] | undefined;
  /** A sparse entry of a pax version that is not decoded (0.x): refused when chosen. */
  oldSparse: boolean;
}

function corrupt(name: string, detail: string): BlksyncError {
  return new BlksyncError(
    'ESRC_CORRUPT',
    `${name}: the tar archive is damaged (${detail}); get a good copy of it (or --raw to write it as it is)`,
    { path: name },
  );
}

function cString(b: Buffer, from: number, to: number): string {
  const s = b.subarray(from, to);
  const nul = s.indexOf(0);
  return s.toString('utf8', 0, nul < 0 ? s.length : nul);
}

function parseSize(h: Buffer, name: string): number {
  const field = h.subarray(124, 136);
  if ((field[0]! & 0x80) !== 0) {
    // base-256, big-endian, for sizes of 8 GiB and more
    let v = field[0]! & 0x7f;
    for (let i = 1; i < field.length; i++) v = v * 256 + field[i]!;
    if (!Number.isSafeInteger(v)) throw corrupt(name, 'a size past 2^53');
    return v;
  }
  const text = field
    .toString('latin1')
    .replace(/[\0 ]+$/, '')
    .trim();
  if (!/^[0-7]*$/.test(text)) throw corrupt(name, `a size field ${JSON.stringify(text)}`);
  return text === '' ? 0 : parseInt(text, 8);
}

/** pax records "LEN key=value\n". */
function parsePax(data: Buffer, name: string): Map<string, string> {
  const out = new Map<string, string>();
  let at = 0;
  while (at < data.length) {
    const space = data.indexOf(0x20, at);
    if (space < 0) throw corrupt(name, 'a pax record without a length');
    const len = Number(data.toString('latin1', at, space));
    if (!Number.isInteger(len) || len <= space - at || at + len > data.length) {
      throw corrupt(name, 'a pax record of a wrong length');
    }
    const rec = data.toString('utf8', space + 1, at + len - 1);
    const eq = rec.indexOf('=');
    if (eq > 0) out.set(rec.slice(0, eq), rec.slice(eq + 1));
    at += len;
  }
  return out;
}

function padded(n: number): number {
  return Math.ceil(n / BLOCK) * BLOCK;
}

function sparseRefusal(archive: string, entry: string): BlksyncError {
  return new BlksyncError(
    'ESRC_CONTAINER',
    `${archive}: ${entry} is a sparse tar entry of an old pax format (GNU sparse 0.x), which blksync does not decode; unpack it with tar (tar -xSf) and copy the file`,
    { path: archive },
  );
}

/**
 * The archive's entries in order. An entry's data is skipped when the walk goes on: the
 * caller reading it instead stops the walk.
 */
export async function* tarEntries(cur: Cursor, archive: string): AsyncGenerator<TarEntry> {
  let longName: string | undefined;
  let pax = new Map<string, string>();
  for (;;) {
    const h = await cur.upTo(BLOCK);
    if (h.length === 0) return; // no end blocks: tolerated, as GNU tar does
    if (h.length < BLOCK) throw shortTar(archive);
    if (h.every((b) => b === 0)) return;
    if (!isTarHeader(h)) throw corrupt(archive, `no valid header at byte ${cur.position - BLOCK}`);
    const type = String.fromCharCode(h[156]!);
    let size = parseSize(h, archive);
    const dataAt = cur.position;
    if (type === 'x' || type === 'g' || type === 'L' || type === 'K') {
      if (size > MAX_META_BYTES) throw corrupt(archive, `a ${size}-byte ${type} record`);
      const data = await cur.exact(size, 'a tar header record');
      await cur.skip(padded(size) - size, 'a tar header record');
      if (type === 'x') pax = parsePax(data, archive);
      else if (type === 'L') longName = cString(data, 0, data.length);
      continue;
    }
    let name = cString(h, 0, 100);
    const prefix = h.toString('latin1', 257, 263) === 'ustar\0' ? cString(h, 345, 500) : '';
    if (prefix !== '') name = `${prefix}/${name}`;
    name = pax.get('path') ?? longName ?? name;
    const paxSize = pax.get('size');
    if (paxSize !== undefined) {
      if (!/^\d+$/.test(paxSize) || !Number.isSafeInteger(Number(paxSize))) {
        throw corrupt(archive, `a pax size ${paxSize}`);
      }
      size = Number(paxSize);
    }
    const file = type === '0' || type === '\0' || type === '7' || type === 'S';
    // links and directories carry no data, whatever their size field says
    const dataBytes = file ? size : type === '1' || type === '2' || type === '5' ? 0 : size;
    let sparse: SparseRegion[] | undefined;
    let realSize = size;
    // where the entry's data ends: an old GNU map's extension blocks come before the data and
    // are not counted in its size; a pax map is part of the data
    let end = dataAt + padded(dataBytes);
    const paxSparse = pax.get('GNU.sparse.major');
    const oldSparse =
      paxSparse === undefined
        ? [...pax.keys()].some((k) => k.startsWith('GNU.sparse.'))
        : paxSparse !== '1' || pax.get('GNU.sparse.minor') !== '0';
    if (type === 'S') {
      const g = await gnuSparseMap(h, cur, archive);
      realSize = g.realSize;
      sparse = checkSparseMap(g.map, realSize, size, archive);
      end = cur.position + padded(size);
    } else if (file && paxSparse !== undefined && !oldSparse) {
      const real = pax.get('GNU.sparse.realsize') ?? '';
      if (!/^\d{1,16}$/.test(real)) throw corrupt(archive, `a sparse real size ${real}`);
      realSize = Number(real);
      name = pax.get('GNU.sparse.name') ?? name;
      const map = await paxSparseMap(cur, archive);
      const mapBytes = cur.position - dataAt;
      if (mapBytes > size) throw corrupt(archive, `${name}'s sparse map is longer than its data`);
      sparse = checkSparseMap(map, realSize, size - mapBytes, archive);
    }
    pax = new Map();
    longName = undefined;
    yield { name, size: realSize, file, dataAt: cur.position, sparse, oldSparse };
    await cur.skip(end - cur.position, `${name} in the tar archive`);
  }
}

/** Refuses an entry that is not decoded (an old pax sparse version). */
export function checkTarEntry(e: TarEntry, archive: string): void {
  if (e.oldSparse) throw sparseRefusal(archive, e.name);
}

function shortTar(archive: string): BlksyncError {
  return new BlksyncError(
    'ESRC_SHORT',
    `${archive} ends inside a tar header; the file is truncated: download or copy it again`,
    { path: archive },
  );
}
