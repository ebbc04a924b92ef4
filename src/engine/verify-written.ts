/**
 * `copy --verify`: after the copy (and its fsync), read back what DST holds and compare
 * checksums, so a device that silently drops or corrupts writes is caught.
 *
 * The read bypasses the page cache: DST is reopened (through /proc/self/fd, so it is the
 * same file even if its path changed) with O_DIRECT, which needs offsets, lengths and the
 * buffer's address aligned to the device's logical block size; everything here is aligned to
 * ALIGN_BYTES (4096, a multiple of every logical block size Linux uses), and the buffer is
 * carved out of a larger ArrayBuffer at an offset that makes its address aligned (Node cannot
 * allocate aligned memory, so the address is asked of libc through koffi). File systems
 * without O_DIRECT (tmpfs) refuse it at open; DST is then read through the page cache after
 * the fsync, and the report says so (`direct: false`).
 *
 * What is compared ("units", ascending, not overlapping):
 *   with a bmap whose range checksums were verified while copying: each range against its
 *   checksum in the bmap;
 *   otherwise: SHA-256 of each piece of the source (at most VERIFY_SEGMENT_BYTES, aligned
 *   to multiples of it), taken from the pipeline's chunks as they were copied (`SourceDigests`).
 *
 *   DST:   |--unit--|   |-unit-|--unit--|            |--unit--|
 *   reads: [ aligned window ...         ]            [  window ]
 *   windows cover the units, rounded out to ALIGN_BYTES; units closer than MAX_GAP_BYTES
 *   share windows, and a window is at most READ_BYTES long.
 */

import { createHash, type Hash } from 'node:crypto';
import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import koffi from 'koffi';
import { BlksyncError, fromSystemError, isSystemError } from '../errors.js';
import { readFully } from '../io/read-fully.js';
import type { Range } from '../ranges.js';

/** Alignment of O_DIRECT offsets, lengths and buffers. */
export const ALIGN_BYTES = 4096;
/** Bytes read at a time. */
export const READ_BYTES = 8 * 1024 * 1024;
/** Units closer than this are read in one window (reading the gap costs less than a seek). */
export const MAX_GAP_BYTES = 256 * 1024;
/** Source bytes per digest when there are no bmap checksums to compare with. */
export const VERIFY_SEGMENT_BYTES = 64 * 1024 * 1024;

/** One span of DST and the digest it must have. */
export interface VerifyUnit {
  start: number;
  end: number;
  /** Lower-case hex digest. */
  checksum: string;
  /** For messages: "blocks 3-7", "bytes 0-67108863". */
  label: string;
}

/** What `--verify` did, for the copy's report. */
export interface VerifyReport {
  /** Bytes of DST read back and found equal to what was meant to be written. */
  bytesVerified: number;
  /** Units (bmap ranges or source segments) compared. */
  ranges: number;
  /** What the read-back was compared with. */
  against: 'bmap' | 'source';
  algorithm: string;
  /** True when the page cache was bypassed (O_DIRECT); false: read after fsync through it. */
  direct: boolean;
  seconds: number;
}

const alignDown = (n: number): number => Math.floor(n / ALIGN_BYTES) * ALIGN_BYTES;
const alignUp = (n: number): number => Math.ceil(n / ALIGN_BYTES) * ALIGN_BYTES;

let addressOf: ((buf: Buffer) => number) | null | undefined;

/** The address of a buffer's first byte (memset with length 0 returns its argument). */
function bufferAddress(buf: Buffer): number | undefined {
  if (addressOf === undefined) {
    try {
      const memset = koffi.load('libc.so.6').func('uintptr_t memset(void *, int, size_t)') as (
        b: Buffer,
        c: number,
        n: number,
      ) => number | bigint;
      addressOf = (b) => Number(memset(b, 0, 0));
    } catch {
      addressOf = null;
    }
  }
  return addressOf === null ? undefined : addressOf(buf);
}

/** A buffer of `length` bytes whose address is a multiple of ALIGN_BYTES, or undefined. */
export function alignedBuffer(length: number): Buffer | undefined {
  const backing = Buffer.from(new ArrayBuffer(length + ALIGN_BYTES));
  const address = bufferAddress(backing);
  if (address === undefined) return undefined;
  const skip = (ALIGN_BYTES - (address % ALIGN_BYTES)) % ALIGN_BYTES;
  return backing.subarray(skip, skip + length);
}

/**
 * Opens DST again for reading, bypassing the page cache when it can. `fd`: DST's open
 * descriptor, reopened through /proc so it is the very file written.
 */
async function openForReadBack(
  path: string,
  fd: number | undefined,
): Promise<{ fh: FileHandle; direct: boolean }> {
  const at = fd !== undefined ? `/proc/self/fd/${fd}` : path;
  const direct = constants.O_DIRECT;
  if (direct !== undefined && alignedBuffer(ALIGN_BYTES) !== undefined) {
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

/**
 * Reads `units` of the file or device at `path` back and compares each with its checksum.
 * Throws EVERIFY naming the first unit that differs (or that DST cannot supply).
 */
export async function verifyWritten(
  path: string,
  units: readonly VerifyUnit[],
  algorithm: string,
  options: { fd?: number | undefined; signal?: AbortSignal | undefined } = {},
): Promise<{ bytesVerified: number; ranges: number; direct: boolean }> {
  const { fh, direct } = await openForReadBack(path, options.fd);
  try {
    const buf = (direct ? alignedBuffer(READ_BYTES) : undefined) ?? Buffer.alloc(READ_BYTES);
    let next = 0;
    let hash: Hash | undefined;
    let bytesVerified = 0;
    for (const w of windowsOver(units)) {
      if (options.signal?.aborted === true) {
        throw new BlksyncError(
          'EINTERRUPTED',
          `interrupted while verifying ${path}; the copy itself had finished`,
        );
      }
      const got = await readWindow(fh, buf, w, direct, path);
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
        const computed = hash.digest('hex');
        hash = undefined;
        if (computed !== u.checksum) {
          throw new BlksyncError(
            'EVERIFY',
            `${path}: ${u.label} (bytes ${u.start}-${u.end - 1}) read back ${direct ? 'from the device' : 'after fsync'} ` +
              `do not match what was written (${algorithm} ${computed}, expected ${u.checksum}); ` +
              'the destination did not store the data: check the medium (dmesg), then copy again',
            { path },
          );
        }
        bytesVerified += u.end - u.start;
        next++;
      }
    }
    return { bytesVerified, ranges: units.length, direct };
  } finally {
    await fh.close();
  }
}

/**
 * SHA-256 digests of the source as the pipeline copies it, one per segment of each plan
 * range (segments end at multiples of VERIFY_SEGMENT_BYTES): the expected values for a
 * read-back when there are no bmap checksums. Chunks arrive in ascending order.
 */
export class SourceDigests {
  readonly algorithm = 'sha256';
  readonly #segments: { start: number; end: number }[] = [];
  readonly #sums: string[] = [];
  #hash: Hash | undefined;
  #at = 0;

  constructor(ranges: readonly Range[], segmentBytes = VERIFY_SEGMENT_BYTES) {
    for (const r of ranges) {
      for (let s = r.start; s < r.end;) {
        const e = Math.min(r.end, (Math.floor(s / segmentBytes) + 1) * segmentBytes);
        this.#segments.push({ start: s, end: e });
        s = e;
      }
    }
  }

  /** The pipeline's onChunk hook: hashes one chunk of source data. */
  readonly onChunk = (offset: number, data: Buffer, length: number): void => {
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const seg = this.#segments[this.#sums.length];
      if (seg === undefined || pos < seg.start || pos !== Math.max(seg.start, this.#at)) {
        throw new Error(`source chunk at ${pos} out of order for --verify`);
      }
      const to = Math.min(end, seg.end);
      this.#hash ??= createHash(this.algorithm);
      this.#hash.update(data.subarray(pos - offset, to - offset));
      this.#at = to;
      pos = to;
      if (to === seg.end) {
        this.#sums.push(this.#hash.digest('hex'));
        this.#hash = undefined;
      }
    }
  };

  /** The units to read back; every segment must have been hashed. */
  units(): VerifyUnit[] {
    if (this.#sums.length !== this.#segments.length) {
      throw new Error('--verify: the source was not read completely');
    }
    return this.#segments.map((s, i) => ({
      ...s,
      checksum: this.#sums[i]!,
      label: 'the data',
    }));
  }
}
