/**
 * Which parts of a file hold data: lseek(SEEK_DATA / SEEK_HOLE) through koffi, since Node
 * has no binding for either, and the file system's block size through ioctl(FIGETBSZ).
 *
 * Ranges are widened to whole blocks (a data run starting or ending inside a block maps that
 * block), which is what bmaptool's block map records.
 */

import type { FileHandle } from 'node:fs/promises';
import { BlksyncError } from '../errors.js';
import type { Range } from '../ranges.js';
import { loadKoffi } from './koffi.js';

const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const ENXIO = 6;
const EINVAL = 22;
const EOPNOTSUPP = 95;
/** ioctl(fd, FIGETBSZ, int *): the file system's block size. */
const FIGETBSZ = 2;

/** fallocate mode: deallocate, keep the file size. */
const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;

/** koffi (io/koffi.ts) is loaded on first use: a copy to a new file never needs it. */
const koffi = loadKoffi;

interface Libc {
  lseek: (fd: number, offset: bigint | number, whence: number) => bigint | number;
  ioctl: (fd: number, request: number, arg: Int32Array) => number;
  fallocate: (fd: number, mode: number, offset: number, length: number) => number;
  posix_fadvise: (fd: number, offset: number, length: number, advice: number) => number;
}

let libc: Libc | undefined;

function load(): Libc {
  if (libc === undefined) {
    const lib = koffi().load('libc.so.6');
    libc = {
      lseek: lib.func('int64_t lseek(int, int64_t, int)') as Libc['lseek'],
      ioctl: lib.func('int ioctl(int, unsigned long, _Out_ int *)') as Libc['ioctl'],
      fallocate: lib.func('int fallocate(int, int, int64_t, int64_t)') as Libc['fallocate'],
      posix_fadvise: lib.func(
        'int posix_fadvise(int, int64_t, int64_t, int)',
      ) as Libc['posix_fadvise'],
    };
  }
  return libc;
}

/**
 * lseek with SEEK_DATA or SEEK_HOLE; -1 when there is no more data (ENXIO). The calls are
 * synchronous: each is a short syscall with no I/O, as cheap as a libuv round trip.
 */
function seek(fd: number, offset: number, whence: number, path: string): number {
  const r = Number(load().lseek(fd, offset, whence));
  if (r >= 0) return r;
  const errno = koffi().errno();
  if (errno === ENXIO) return -1;
  if (errno === EINVAL) {
    throw new BlksyncError(
      'ESRC_KIND',
      `${path}: the file system does not report holes (SEEK_DATA/SEEK_HOLE unsupported)`,
      { path, syscall: 'lseek' },
    );
  }
  throw new BlksyncError('EREAD', `${path}: lseek failed (errno ${errno})`, {
    path,
    syscall: 'lseek',
  });
}

/** The file system's block size for this file (FIGETBSZ), or st_blksize when that fails. */
export async function fsBlockSize(fh: FileHandle): Promise<number> {
  try {
    const out = new Int32Array(1);
    if (load().ioctl(fh.fd, FIGETBSZ, out) === 0 && (out[0] ?? 0) > 0) return out[0] ?? 0;
  } catch {
    // koffi could not load libc: fall back below
  }
  return (await fh.stat()).blksize;
}

/**
 * The block-aligned ranges of the file's first `size` bytes that hold data (are not holes),
 * ascending and merged. `blockSize` aligns them; the last one ends at `size`.
 */
export function mappedRanges(
  fh: FileHandle,
  size: number,
  blockSize: number,
  path: string,
): Range[] {
  const ranges: Range[] = [];
  let pos = 0;
  while (pos < size) {
    const data = seek(fh.fd, pos, SEEK_DATA, path);
    if (data < 0 || data >= size) break;
    let hole = seek(fh.fd, data, SEEK_HOLE, path);
    if (hole < 0 || hole > size) hole = size;
    const start = Math.floor(data / blockSize) * blockSize;
    const end = Math.min(size, Math.ceil(hole / blockSize) * blockSize);
    const last = ranges[ranges.length - 1];
    if (last !== undefined && start <= last.end) last.end = Math.max(last.end, end);
    else ranges.push({ start, end });
    pos = Math.max(end, hole);
  }
  return ranges;
}

/** posix_fadvise advice: reads come in no order the kernel can predict. */
const POSIX_FADV_RANDOM = 1;
/** posix_fadvise advice: drop the clean cached pages. */
const POSIX_FADV_DONTNEED = 4;

/**
 * Turns off the kernel's readahead on `fd` (for this open file only). A bmap copy reads DST
 * only in the mapped ranges, in 1 MiB chunks; readahead would also read the gaps after each
 * range (2.5 MiB a time on a loop device here), which on a slow stick costs as much as the
 * ranges themselves. Best effort: a failure changes only speed.
 */
export function adviseNoReadahead(fd: number): void {
  try {
    load().posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
  } catch {
    // koffi could not load libc: readahead stays on
  }
}

/**
 * Drops `fd`'s clean pages from the page cache (dirty ones stay until written back). For a
 * block device being flashed, after each sync: the kernel drops a device's cache at its last
 * close anyway, which after writing 300 MiB took ~50 ms of the copy's end, and the user's
 * files are not pushed out of the cache by the image. Best effort, like adviseNoReadahead.
 */
export function dropCachedPages(fd: number): void {
  try {
    load().posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  } catch {
    // koffi could not load libc: the kernel drops them at close
  }
}

/**
 * Deallocates [start, end) of each range (fallocate PUNCH_HOLE, size kept): the ranges then
 * read as zeros and take no space. Returns false when the file system cannot punch holes.
 * Synchronous calls: punching is a metadata update, and errno is only readable this way.
 */
export function punchHoles(fh: FileHandle, ranges: readonly Range[], path: string): boolean {
  const fallocate = load().fallocate;
  for (const r of ranges) {
    if (r.end <= r.start) continue;
    if (
      fallocate(fh.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, r.start, r.end - r.start) === 0
    ) {
      continue;
    }
    const errno = koffi().errno();
    if (errno === EOPNOTSUPP) return false;
    throw new BlksyncError('EWRITE', `${path}: cannot punch holes (fallocate errno ${errno})`, {
      path,
      syscall: 'fallocate',
    });
  }
  return true;
}
