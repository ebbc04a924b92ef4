/**
 * `copy --verify`: after the copy (and its fsync), read back what DST holds and compare
 * checksums, so a device that silently drops or corrupts writes is caught.
 *
 * The read bypasses the page cache (read-back.ts: O_DIRECT, aligned windows); here the
 * aligned buffer is carved out of a larger ArrayBuffer at an offset that makes its address
 * aligned, the address asked of libc through koffi. File systems without O_DIRECT (tmpfs)
 * refuse it at open; DST is then read through the page cache after the fsync, and the report
 * says so (`direct: false`).
 *
 * What is compared ("units", ascending, not overlapping):
 *   with a bmap whose range checksums were verified while copying: each range against its
 *   checksum in the bmap;
 *   otherwise: SHA-256 of each piece of the source (at most VERIFY_SEGMENT_BYTES, aligned
 *   to multiples of it), taken from the pipeline's chunks as they were copied (`SourceDigests`).
 */

import { createHash, type Hash } from 'node:crypto';
import koffi from 'koffi';
import { BlksyncError } from '../errors.js';
import type { Range } from '../ranges.js';
import { ALIGN_BYTES, readBack, VERIFY_SEGMENT_BYTES } from './read-back.js';

export { ALIGN_BYTES, MAX_GAP_BYTES, READ_BYTES, VERIFY_SEGMENT_BYTES } from './read-back.js';

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
  /** Units (bmap ranges, source segments, or segments of what was written) compared. */
  ranges: number;
  /**
   * What the read-back was compared with: the bmap's checksums, the source's digests, or
   * (`written`, a copy with a remote end) the digests of the bytes this run wrote.
   */
  against: 'bmap' | 'source' | 'written';
  algorithm: string;
  /** True when the page cache was bypassed (O_DIRECT); false: read after fsync through it. */
  direct: boolean;
  seconds: number;
}

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
 * Reads `units` of the file or device at `path` back (read-back.ts) and compares each with
 * its checksum. Throws EVERIFY naming the units that differ (or that DST cannot supply); when
 * `explain` is given it is asked first, and the error it returns (one that can say which
 * blocks differ, and why) is thrown instead.
 */
export async function verifyWritten(
  path: string,
  units: readonly VerifyUnit[],
  algorithm: string,
  options: {
    fd?: number | undefined;
    signal?: AbortSignal | undefined;
    explain?: ((bad: readonly VerifyUnit[]) => Promise<BlksyncError | undefined>) | undefined;
  } = {},
): Promise<{ bytesVerified: number; ranges: number; direct: boolean }> {
  let bytesVerified = 0;
  const bad: { unit: VerifyUnit; computed: string }[] = [];
  const { direct } = await readBack(
    path,
    units.map((u, i) => ({ ...u, group: i })),
    algorithm,
    (i, computed) => {
      const u = units[i]!;
      if (computed !== u.checksum) bad.push({ unit: u, computed });
      else bytesVerified += u.end - u.start;
    },
    { fd: options.fd, signal: options.signal, alignedBuffer },
  );
  if (bad.length > 0) {
    const explained = await options.explain?.(bad.map((b) => b.unit));
    if (explained !== undefined) throw explained;
    const first = bad[0]!;
    const u = first.unit;
    const more = bad.length > 1 ? ` and ${bad.length - 1} more range(s)` : '';
    throw new BlksyncError(
      'EVERIFY',
      `${path}: ${u.label} (bytes ${u.start}-${u.end - 1})${more} read back ${direct ? 'from the device' : 'after fsync'} ` +
        `do not match what was written (${algorithm} ${first.computed}, expected ${u.checksum}); ` +
        'the destination did not store the data: check the medium (dmesg), then copy again',
      { path },
    );
  }
  return { bytesVerified, ranges: units.length, direct };
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
