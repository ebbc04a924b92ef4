/**
 * Reading DST back past the page cache, for `--verify`: here (verify-written.ts, and a pull's
 * written ranges) and in the agent on DST's host (a push's). Nothing here needs native code,
 * so the agent bundle carries it.
 *
 * DST is reopened (through /proc/self/fd, so it is the very file written) with O_DIRECT, which
 * needs offsets, lengths and the buffer's address aligned to the device's logical block size;
 * everything is aligned to ALIGN_BYTES (4096, a multiple of every logical block size Linux
 * uses). File systems without O_DIRECT (tmpfs) refuse it at open; DST is then read through the
 * page cache after the fsync, and the caller reports it (`direct: false`).
 *
 * Units are ascending, non-overlapping spans of DST; consecutive units of one `group` are
 * hashed as one stream (their bytes back to back), and each group's digest is handed over as
 * soon as its last unit is read:
 *
 *   DST:     |-unit g0-|   |-g1-|-g1-|            |--unit g2--|
 *   reads:   [ aligned window ...         ]       [  window   ]
 *   windows cover the units, rounded out to ALIGN_BYTES; units closer than MAX_GAP_BYTES
 *   share windows, and a window is at most READ_BYTES long.
 */

import { createHash, type Hash } from 'node:crypto';
import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { BlksyncError, fromSystemError, isSystemError } from '../errors.js';
import { readFully } from '../io/read-fully.js';
import type { Range } from '../ranges.js';

/** Alignment of O_DIRECT offsets, lengths and buffers. */
export const ALIGN_BYTES = 4096;
/** Bytes read at a time. */
export const READ_BYTES = 8 * 1024 * 1024;
/** Units closer than this are read in one window (reading the gap costs less than a seek). */
export const MAX_GAP_BYTES = 256 * 1024;
/** Bytes per digest: of the source without bmap checksums, or of what a remote copy wrote. */
export const VERIFY_SEGMENT_BYTES = 64 * 1024 * 1024;
/** Bytes of WebAssembly memory per page: V8 reserves it page-aligned. */
const WASM_PAGE_BYTES = 64 * 1024;

/** One span of DST to read back; `label` names it in messages ("blocks 3-7"). */
export interface ReadBackUnit extends Range {
  group: number;
  label: string;
}

/** Allocates `length` bytes at an address aligned to ALIGN_BYTES, or undefined if it cannot. */
export type AlignedAllocator = (length: number) => Buffer | undefined;

/**
 * An aligned buffer without native code: WebAssembly memory, which V8 reserves in whole
 * 64 KiB pages from a page-aligned address. (A Buffer's own memory comes from malloc, 16-byte
 * aligned at best.) Should an engine ever place it otherwise, the O_DIRECT read fails with
 * EINVAL and readBack reads through the page cache instead, as on tmpfs.
 */
export function pageAlignedBuffer(length: number): Buffer | undefined {
  try {
    const pages = Math.max(1, Math.ceil(length / WASM_PAGE_BYTES));
    return Buffer.from(new WebAssembly.Memory({ initial: pages }).buffer, 0, length);
  } catch {
    return undefined;
  }
}

const alignDown = (n: number): number => Math.floor(n / ALIGN_BYTES) * ALIGN_BYTES;
const alignUp = (n: number): number => Math.ceil(n / ALIGN_BYTES) * ALIGN_BYTES;

/**
 * Opens DST again for reading, bypassing the page cache when it can. `fd`: DST's open
 * descriptor, reopened through /proc so it is the very file written.
 */
async function openForReadBack(
  path: string,
  fd: number | undefined,
  tryDirect: boolean,
): Promise<{ fh: FileHandle; direct: boolean }> {
  const at = fd !== undefined ? `/proc/self/fd/${fd}` : path;
  const direct = constants.O_DIRECT;
  if (direct !== undefined && tryDirect) {
    try {
      return { fh: await open(at, constants.O_RDONLY | direct), direct: true };
    } catch (err) {
      // EINVAL: this file system has no O_DIRECT (tmpfs); read after the fsync instead
      if (!isSystemError(err) || err.code !== 'EINVAL') {
        throw fromSystemError('EREAD', 'cannot open for verifying', path, err);
      }
    }
  }
  try {
    return { fh: await open(at, constants.O_RDONLY), direct: false };
  } catch (err) {
    throw fromSystemError('EREAD', 'cannot open for verifying', path, err);
  }
}

/** Windows (aligned, ascending) covering every unit. */
function* windowsOver(units: readonly Range[]): Generator<Range> {
  let i = 0;
  while (i < units.length) {
    const start = alignDown(units[i]!.start);
    let end = alignUp(units[i]!.end);
    i++;
    while (i < units.length && units[i]!.start - end <= MAX_GAP_BYTES) {
      end = Math.max(end, alignUp(units[i]!.end));
      i++;
    }
    for (let at = start; at < end; at += READ_BYTES) {
      yield { start: at, end: Math.min(end, at + READ_BYTES) };
    }
  }
}

/**
 * Reads one window; fewer bytes only at the end of DST. With O_DIRECT a read that ends off
 * the alignment is the end of the file: reading on from there would be refused (EINVAL).
 */
async function readWindow(
  fh: FileHandle,
  buf: Buffer,
  w: Range,
  direct: boolean,
  path: string,
): Promise<number> {
  if (!direct) {
    try {
      return await readFully(fh, buf, 0, w.end - w.start, w.start);
    } catch (err) {
      throw fromSystemError('EREAD', 'cannot read back', path, err);
    }
  }
  let got = 0;
  while (got < w.end - w.start) {
    let n: number;
    try {
      ({ bytesRead: n } = await fh.read(buf, got, w.end - w.start - got, w.start + got));
    } catch (err) {
      throw fromSystemError('EREAD', 'cannot read back', path, err);
    }
    got += n;
    if (n === 0 || got % ALIGN_BYTES !== 0) break;
  }
  return got;
}

class MisalignedError extends Error {}

/**
 * Reads `units` of the file or device at `path` back and hands each group's digest to
 * `onGroup` (which may throw to stop). Throws EVERIFY when DST ends before a unit does.
 */
export async function readBack(
  path: string,
  units: readonly ReadBackUnit[],
  algorithm: string,
  onGroup: (group: number, digest: string, direct: boolean) => void,
  options: {
    fd?: number | undefined;
    signal?: AbortSignal | undefined;
    alignedBuffer?: AlignedAllocator;
  } = {},
): Promise<{ bytesRead: number; direct: boolean }> {
  const aligned = options.alignedBuffer ?? pageAlignedBuffer;
  const buf = aligned(READ_BYTES);
  try {
    return await readBackWith(path, units, algorithm, onGroup, options, buf);
  } catch (err) {
    // the buffer was not aligned after all (EINVAL on the first read): through the cache
    if (!(err instanceof MisalignedError)) throw err;
    return readBackWith(path, units, algorithm, onGroup, options, undefined);
  }
}

async function readBackWith(
  path: string,
  units: readonly ReadBackUnit[],
  algorithm: string,
  onGroup: (group: number, digest: string, direct: boolean) => void,
  options: { fd?: number | undefined; signal?: AbortSignal | undefined },
  alignedBuf: Buffer | undefined,
): Promise<{ bytesRead: number; direct: boolean }> {
  const { fh, direct } = await openForReadBack(path, options.fd, alignedBuf !== undefined);
  try {
    const buf = direct ? alignedBuf! : Buffer.allocUnsafe(READ_BYTES);
    let next = 0;
    let hash: Hash | undefined;
    let bytesRead = 0;
    let first = true;
    for (const w of windowsOver(units)) {
      if (options.signal?.aborted === true) {
        throw new BlksyncError(
          'EINTERRUPTED',
          `interrupted while verifying ${path}; the copy itself had finished`,
        );
      }
      let got: number;
      try {
        got = await readWindow(fh, buf, w, direct, path);
      } catch (err) {
        const cause = err instanceof Error ? err.cause : undefined;
        if (first && direct && isSystemError(cause) && cause.code === 'EINVAL') {
          throw new MisalignedError();
        }
        throw err;
      }
      first = false;
      bytesRead += got;
      const have = w.start + got;
      while (next < units.length && units[next]!.start < w.end) {
        const u = units[next]!;
        const from = Math.max(u.start, w.start);
        const to = Math.min(u.end, w.end);
        if (have < to) {
          throw new BlksyncError(
            'EVERIFY',
            `${path}: reading back ${u.label} (bytes ${u.start}-${u.end - 1}) ended at byte ${have}; ` +
              'the destination is shorter than what was written to it',
            { path },
          );
        }
        hash ??= createHash(algorithm);
        hash.update(buf.subarray(from - w.start, to - w.start));
        if (u.end > w.end) break; // continues in the next window
        next++;
        if (units[next]?.group !== u.group) {
          const digest = hash.digest('hex');
          hash = undefined;
          onGroup(u.group, digest, direct);
        }
      }
    }
    return { bytesRead, direct };
  } finally {
    await fh.close();
  }
}
