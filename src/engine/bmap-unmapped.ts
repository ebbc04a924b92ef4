/**
 * A bmap's unmapped areas are the image's holes: they read as zeros. A bmap made before its
 * image last changed (or made for another image) can call unmapped what now holds data, and
 * its range checksums cannot tell, since they cover only the mapped ranges: the copy would
 * silently skip that data. So the unmapped areas of the image are checked to read as zeros:
 *
 *   a file SRC read by offset:  before anything is written, the data its file system reports
 *                               there (SEEK_DATA; holes cost nothing) is read and compared
 *                               with zeros (`refuseDataInUnmapped`)
 *   a stream (pipe, compressed, URL): the gaps between mapped ranges are read and dropped
 *                               anyway; each is compared with zeros as it passes
 *                               (`gapMustBeZero`, given to SequentialSource)
 */

import type { FileHandle } from 'node:fs/promises';
import { BlksyncError } from '../errors.js';
import { intersectRanges, type Range } from '../ranges.js';

/** Bytes of SRC read at a time to compare with zeros. */
const CHECK_CHUNK_BYTES = 1024 * 1024;
const ZEROS = Buffer.alloc(CHECK_CHUNK_BYTES);

/** The areas of an image of `imageSize` bytes that `mapped` (ascending) leaves out. */
export function unmappedOf(mapped: readonly Range[], imageSize: number): Range[] {
  const out: Range[] = [];
  let at = 0;
  for (const r of mapped) {
    if (r.start > at) out.push({ start: at, end: r.start });
    at = Math.max(at, r.end);
  }
  if (at < imageSize) out.push({ start: at, end: imageSize });
  return out;
}

/** Where a non-zero byte is in `data` (undefined: all zeros). */
function firstNonZero(data: Buffer): number | undefined {
  for (let at = 0; at < data.length; at += CHECK_CHUNK_BYTES) {
    const part = data.subarray(at, at + CHECK_CHUNK_BYTES);
    if (part.equals(ZEROS.subarray(0, part.length))) continue;
    for (let i = 0; i < part.length; i++) if (part[i] !== 0) return at + i;
  }
  return undefined;
}

function staleBmap(bmapPath: string, image: string, offset: number): BlksyncError {
  return new BlksyncError(
    'EBMAP_MISMATCH',
    `${bmapPath} marks byte ${offset} of ${image} as unmapped (a hole), but it holds data: the bmap ` +
      `is stale (made before ${image} last changed) or belongs to another image; make a new one ` +
      `(blksync bmap create), pass the right one with --bmap, or copy everything with --no-bmap`,
    { path: bmapPath },
  );
}

/**
 * Reads what `fh` holds in `unmapped` (only where its file system reports data, `data`) and
 * refuses (EBMAP_MISMATCH) a non-zero byte. Returns the bytes read.
 */
export async function refuseDataInUnmapped(
  fh: FileHandle,
  unmapped: readonly Range[],
  data: readonly Range[],
  names: { image: string; bmap: string },
  signal?: AbortSignal,
): Promise<number> {
  const buf = Buffer.allocUnsafe(CHECK_CHUNK_BYTES);
  let checked = 0;
  for (const r of intersectRanges(unmapped, data)) {
    for (let at = r.start; at < r.end;) {
      signal?.throwIfAborted();
      const want = Math.min(CHECK_CHUNK_BYTES, r.end - at);
      const { bytesRead } = await fh.read(buf, 0, want, at);
      if (bytesRead === 0) return checked; // shorter than the bmap says: the copy finds that
      const bad = firstNonZero(buf.subarray(0, bytesRead));
      if (bad !== undefined) throw staleBmap(names.bmap, names.image, at + bad);
      at += bytesRead;
      checked += bytesRead;
    }
  }
  return checked;
}

/** For SequentialSource: a gap between mapped ranges, skipped at `offset`, must read as zeros. */
export function gapMustBeZero(names: {
  image: string;
  bmap: string;
}): (data: Buffer, offset: number) => void {
  return (data, offset) => {
    const bad = firstNonZero(data);
    if (bad !== undefined) throw staleBmap(names.bmap, names.image, offset + bad);
  };
}
