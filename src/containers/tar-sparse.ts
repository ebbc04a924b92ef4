/**
 * GNU sparse tar entries (`tar -S`): only the file's data regions are stored, one after the
 * other; a map says where each goes, the rest of the file is zeros (holes are content: they
 * are compared and written like any zeros).
 *
 *   old GNU ('S', GNU tar's default format)   pax, GNU sparse 1.0 (--format=posix)
 *   header 386: 4 × {offset[12], size[12]}    pax: GNU.sparse.major=1, minor=0,
 *          482: more maps follow (1 byte)          GNU.sparse.name, GNU.sparse.realsize
 *          483: real size[12]                 data starts with the map in decimal lines:
 *   then extension blocks: 21 × {offset,size}    "count\n" then "offset\nsize\n" × count,
 *          and byte 504: more follow             padded to 512; then the regions
 *
 * Sizes are octal (or base-256) in the old format. Older pax sparse versions (0.0, 0.1) are
 * refused. The map is checked: ascending, inside the real size, its regions adding up to the
 * stored bytes.
 */

import type { FileHandle } from 'node:fs/promises';
import { BlksyncError } from '../errors.js';
import { readFully } from '../io/read-fully.js';
import type { Source } from '../types.js';
import type { ByteReader } from './byte-reader.js';

export interface SparseRegion {
  offset: number;
  length: number;
}

/** Regions accepted in one map (a lying map must not cost memory: 16 bytes each). */
const MAX_REGIONS = 1 << 20;
const BLOCK = 512;
const ZEROS = Buffer.alloc(1024 * 1024);

/** Reads forward (ByteReader, or tar.ts's file cursor). */
interface Forward {
  position: number;
  exact(n: number, what: string): Promise<Buffer>;
}

function corrupt(name: string, detail: string): BlksyncError {
  return new BlksyncError(
    'ESRC_CORRUPT',
    `${name}: a sparse tar entry is damaged (${detail}); get a good copy of the archive`,
    { path: name },
  );
}

function octal(field: Buffer, archive: string): number | undefined {
  if (field[0] === 0) return undefined;
  if ((field[0]! & 0x80) !== 0) {
    let v = field[0]! & 0x7f;
    for (let i = 1; i < field.length; i++) v = v * 256 + field[i]!;
    if (!Number.isSafeInteger(v)) throw corrupt(archive, 'a number past 2^53');
    return v;
  }
  const text = field
    .toString('latin1')
    .replace(/[\0 ]+$/, '')
    .trim();
  if (!/^[0-7]+$/.test(text)) throw corrupt(archive, `a map field ${JSON.stringify(text)}`);
  return parseInt(text, 8);
}

function readPairs(
  b: Buffer,
  from: number,
  count: number,
  out: SparseRegion[],
  archive: string,
): void {
  for (let i = 0; i < count; i++) {
    const at = from + i * 24;
    const offset = octal(b.subarray(at, at + 12), archive);
    const length = octal(b.subarray(at + 12, at + 24), archive);
    if (offset === undefined || length === undefined) return;
    if (out.length >= MAX_REGIONS) throw corrupt(archive, `more than ${MAX_REGIONS} regions`);
    out.push({ offset, length });
  }
}

/** An old GNU 'S' entry's map: from its header, then its extension blocks (read here). */
export async function gnuSparseMap(
  header: Buffer,
  cur: Forward,
  archive: string,
): Promise<{ map: SparseRegion[]; realSize: number }> {
  const map: SparseRegion[] = [];
  readPairs(header, 386, 4, map, archive);
  const realSize = octal(header.subarray(483, 495), archive) ?? 0;
  let more = header[482] !== 0;
  while (more) {
    const ext = await cur.exact(BLOCK, 'a sparse tar map');
    readPairs(ext, 0, 21, map, archive);
    more = ext[504] !== 0;
  }
  return { map, realSize };
}

/** A pax GNU sparse 1.0 entry's map, at the start of its data (read here, with its padding). */
export async function paxSparseMap(cur: Forward, archive: string): Promise<SparseRegion[]> {
  let text = '';
  const numbers: number[] = [];
  let want = Infinity;
  while (numbers.length < want) {
    text += (await cur.exact(BLOCK, 'a sparse tar map')).toString('latin1');
    const lines = text.split('\n');
    text = lines.pop()!; // an unfinished number waits for the next block
    for (const line of lines) {
      if (numbers.length >= want) break;
      if (!/^\d{1,16}$/.test(line))
        throw corrupt(archive, `a map line ${JSON.stringify(line.slice(0, 20))}`);
      numbers.push(Number(line));
      if (numbers.length === 1) {
        if (numbers[0]! > MAX_REGIONS) throw corrupt(archive, `${numbers[0]} regions`);
        want = 1 + 2 * numbers[0]!;
      }
    }
    if (numbers.length < want && text.length > 32) throw corrupt(archive, 'a map line too long');
  }
  const map: SparseRegion[] = [];
  for (let i = 1; i < numbers.length; i += 2)
    map.push({ offset: numbers[i]!, length: numbers[i + 1]! });
  return map;
}

/** Checks a map against the real size and the bytes stored; drops empty regions. */
export function checkSparseMap(
  map: SparseRegion[],
  realSize: number,
  stored: number,
  archive: string,
): SparseRegion[] {
  let end = 0;
  let sum = 0;
  const out: SparseRegion[] = [];
  for (const r of map) {
    if (r.offset < end || r.offset + r.length > realSize) {
      throw corrupt(
        archive,
        `a region at ${r.offset} out of order or past the ${realSize}-byte file`,
      );
    }
    end = r.offset + r.length;
    sum += r.length;
    if (r.length > 0) out.push(r);
  }
  if (sum !== stored) throw corrupt(archive, `its regions hold ${sum} bytes, ${stored} are stored`);
  return out;
}

/** A sparse entry of a file SRC, read by offset: regions from the archive, zeros between. */
export class SparseEntrySource implements Source {
  readonly size: number;
  readonly #fh: FileHandle;
  readonly #dataAt: number;
  readonly #map: SparseRegion[];
  /** Where each region's bytes are, relative to the stored data. */
  readonly #storedAt: number[];
  readonly #name: string;

  constructor(fh: FileHandle, dataAt: number, map: SparseRegion[], size: number, name: string) {
    this.#fh = fh;
    this.#dataAt = dataAt;
    this.#map = map;
    this.size = size;
    this.#name = name;
    let at = 0;
    this.#storedAt = map.map((r) => {
      const here = at;
      at += r.length;
      return here;
    });
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const end = Math.min(offset + length, this.size);
    if (end <= offset) return 0;
    buf.fill(0, 0, end - offset);
    // the first region that ends after offset
    let lo = 0;
    let hi = this.#map.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const r = this.#map[mid]!;
      if (r.offset + r.length <= offset) lo = mid + 1;
      else hi = mid;
    }
    for (let i = lo; i < this.#map.length && this.#map[i]!.offset < end; i++) {
      const r = this.#map[i]!;
      const from = Math.max(offset, r.offset);
      const to = Math.min(end, r.offset + r.length);
      const at = this.#dataAt + this.#storedAt[i]! + (from - r.offset);
      if ((await readFully(this.#fh, buf, from - offset, to - from, at)) !== to - from) {
        throw new BlksyncError(
          'ESRC_SHORT',
          `${this.#name} ends inside a sparse tar entry; the file is truncated`,
          {
            path: this.#name,
          },
        );
      }
    }
    return end - offset;
  }

  async close(): Promise<void> {}
}

/** A streamed sparse entry's bytes: each region read in turn, zeros between. */
export async function* sparseEntryStream(
  reader: ByteReader,
  map: SparseRegion[],
  size: number,
  entry: string,
): AsyncGenerator<Buffer> {
  let pos = 0;
  const zeros = function* (n: number): Generator<Buffer> {
    for (let left = n; left > 0; left -= ZEROS.length)
      yield ZEROS.subarray(0, Math.min(left, ZEROS.length));
  };
  for (const r of map) {
    yield* zeros(r.offset - pos);
    yield* reader.take(r.length, `${entry} in the tar archive`);
    pos = r.offset + r.length;
  }
  yield* zeros(size - pos);
}
