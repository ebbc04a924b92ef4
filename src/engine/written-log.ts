/**
 * `--verify` for a copy with a remote end: the ranges a run wrote and digests of their bytes.
 * Such a copy does not read all of SRC (only what differs crosses the link), so it verifies
 * what it wrote: the writer's side hashes the bytes as they go out, DST's side records where
 * they went and, after the fsync, reads those ranges back past the page cache (read-back.ts)
 * and hashes them the same way; the two lists must be equal.
 *
 * The image is cut into segments of VERIFY_SEGMENT_BYTES. A segment's digest is SHA-256 of the
 * bytes written inside it, in ascending offset order, back to back; it carries the first
 * written offset, the end of the last write and the byte count, so a mismatch names a range:
 *
 *   image:    |------- segment 0 -------|------- segment 1 -------|---
 *   written:     [aa]    [bbbb] [c         c]  [dd]
 *   digest 0: sha256(aa ‖ bbbb ‖ c…)   start = a's, end = 64 MiB, bytes = |aa|+|bbbb|+|c…|
 *   digest 1: sha256(…c ‖ dd)          start = 64 MiB, end = d's end
 *
 * The recording side keeps each separate written range (two numbers: 16 bytes of memory per
 * range, so a million scattered writes cost 16 MB); the hashing side keeps one digest per
 * segment written to.
 */

import { createHash, type Hash } from 'node:crypto';
import { BlksyncError } from '../errors.js';
import type { Sink } from '../types.js';
import {
  readBack,
  VERIFY_SEGMENT_BYTES,
  type AlignedAllocator,
  type ReadBackUnit,
} from './read-back.js';

/** The digest of what was written inside one segment. */
export interface WrittenDigest {
  /** First byte written in the segment, and the end of the last write there. */
  start: number;
  end: number;
  /** Bytes written in the segment. */
  bytes: number;
  /** Lower-case hex SHA-256 of those bytes, back to back. */
  sha256: string;
}

const segmentOf = (offset: number): number => Math.floor(offset / VERIFY_SEGMENT_BYTES);

/** The writer's side: digests of the bytes written, which must come in ascending order. */
export class WrittenDigests {
  readonly #done: WrittenDigest[] = [];
  #segment = -1;
  #hash: Hash | undefined;
  #start = 0;
  #end = 0;
  #bytes = 0;

  /** Adds `data` written at `offset` (not before the end of the previous write). */
  add(offset: number, data: Buffer): void {
    if (offset < this.#end) throw new Error(`--verify: write at ${offset} out of order`);
    for (let at = 0; at < data.length;) {
      const pos = offset + at;
      const seg = segmentOf(pos);
      const to = Math.min(data.length, (seg + 1) * VERIFY_SEGMENT_BYTES - offset);
      if (seg !== this.#segment) {
        this.#close();
        this.#segment = seg;
        this.#hash = createHash('sha256');
        this.#start = pos;
        this.#bytes = 0;
      }
      this.#hash!.update(data.subarray(at, to));
      this.#bytes += to - at;
      this.#end = offset + to;
      at = to;
    }
  }

  /** The digests, one per segment written to, ascending. */
  digests(): WrittenDigest[] {
    this.#close();
    return this.#done;
  }

  #close(): void {
    if (this.#hash === undefined) return;
    const d = this.#hash.digest('hex');
    this.#hash = undefined;
    this.#done.push({ start: this.#start, end: this.#end, bytes: this.#bytes, sha256: d });
  }
}

/** DST's side: the ranges written, in any order (merged when read back). */
export class WrittenRanges {
  /** start, end pairs; touching or overlapping neighbours merged as they come. */
  #pairs: number[] = [];
  #sorted = true;

  add(offset: number, length: number): void {
    if (length <= 0) return;
    const p = this.#pairs;
    const n = p.length;
    const end = offset + length;
    if (n > 0 && offset >= p[n - 2]! && offset <= p[n - 1]!) {
      p[n - 1] = Math.max(p[n - 1]!, end);
      return;
    }
    if (n > 0 && offset < p[n - 2]!) this.#sorted = false;
    p.push(offset, end);
  }

  get empty(): boolean {
    return this.#pairs.length === 0;
  }

  /** The written ranges cut at segment boundaries, each segment one group. */
  units(): ReadBackUnit[] {
    this.#normalize();
    const units: ReadBackUnit[] = [];
    const p = this.#pairs;
    for (let i = 0; i < p.length; i += 2) {
      for (let s = p[i]!; s < p[i + 1]!;) {
        const seg = segmentOf(s);
        const e = Math.min(p[i + 1]!, (seg + 1) * VERIFY_SEGMENT_BYTES);
        units.push({ start: s, end: e, group: seg, label: 'the bytes written' });
        s = e;
      }
    }
    return units;
  }

  #normalize(): void {
    if (this.#sorted) return;
    const pairs: [number, number][] = [];
    for (let i = 0; i < this.#pairs.length; i += 2)
      pairs.push([this.#pairs[i]!, this.#pairs[i + 1]!]);
    pairs.sort((a, b) => a[0] - b[0]);
    this.#pairs = [];
    this.#sorted = true;
    for (const [s, e] of pairs) this.add(s, e - s);
  }
}

/**
 * Reads the ranges in `written` back from the file or device at `path` (O_DIRECT where it
 * can) and digests them per segment, as WrittenDigests does for the bytes sent.
 */
export async function readBackWritten(
  path: string,
  written: WrittenRanges,
  options: {
    fd?: number | undefined;
    signal?: AbortSignal | undefined;
    alignedBuffer?: AlignedAllocator;
  } = {},
): Promise<{ digests: WrittenDigest[]; direct: boolean; bytesRead: number }> {
  const units = written.units();
  const digests: WrittenDigest[] = [];
  let u = 0;
  const { direct, bytesRead } = await readBack(
    path,
    units,
    'sha256',
    (group, sha256) => {
      const first = units[u]!;
      let bytes = 0;
      let end = first.end;
      for (; u < units.length && units[u]!.group === group; u++) {
        bytes += units[u]!.end - units[u]!.start;
        end = units[u]!.end;
      }
      digests.push({ start: first.start, end, bytes, sha256 });
    },
    options,
  );
  return { digests, direct, bytesRead };
}

/**
 * Compares the digests of what was sent with those of what DST read back; EVERIFY names the
 * first segment that differs. Returns the bytes and segments found equal.
 */
export function compareWritten(
  sent: readonly WrittenDigest[],
  readBack: readonly WrittenDigest[],
  dst: string,
  direct: boolean,
): { bytesVerified: number; ranges: number } {
  let bytesVerified = 0;
  for (let i = 0; i < Math.max(sent.length, readBack.length); i++) {
    const a = sent[i];
    const b = readBack[i];
    if (
      a === undefined ||
      b === undefined ||
      a.start !== b.start ||
      a.end !== b.end ||
      a.bytes !== b.bytes ||
      a.sha256 !== b.sha256
    ) {
      const r = a ?? b!;
      throw new BlksyncError(
        'EVERIFY',
        `${dst}: the ${formatCount(r.bytes)} written in bytes ${r.start}-${r.end - 1} read back ` +
          `${direct ? 'from the device' : 'after fsync'} do not match what was written ` +
          `(sha256 ${b?.sha256 ?? 'none'}, expected ${a?.sha256 ?? 'none'}); ` +
          'the destination did not store the data: check the medium (dmesg), then copy again',
        { path: dst },
      );
    }
    bytesVerified += a.bytes;
  }
  return { bytesVerified, ranges: sent.length };
}

function formatCount(bytes: number): string {
  return bytes === 1 ? '1 byte' : `${bytes} bytes`;
}

/** A sink that records what it writes (ranges and digests) for a local read-back. */
export class WrittenSink implements Sink {
  readonly ranges = new WrittenRanges();
  readonly digests = new WrittenDigests();
  readonly #inner: Sink;

  constructor(inner: Sink) {
    this.#inner = inner;
  }

  write(data: Buffer, offset: number): Promise<void> {
    this.digests.add(offset, data);
    this.ranges.add(offset, data.length);
    return this.#inner.write(data, offset);
  }

  finish(): Promise<void> {
    return this.#inner.finish();
  }
}
