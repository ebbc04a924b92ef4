/**
 * The SHA-256 of each of DST's chunks, as the published image's chunks lie: what a copy from
 * a published image compares with the published hashes to know what to fetch. Holes of a
 * sparse DST are not read; chunks of zeros are recognised by memcmp (~10x cheaper than
 * SHA-256); with enough data, one worker thread per core (two at most) reads and hashes the
 * pieces, each taking the next from a shared counter (SHA-256 of DST is most of such a
 * copy's CPU time).
 */

import { open, type FileHandle } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { BlksyncError, fromSystemError, isSystemError } from '../errors.js';
import { chunkCount, chunkLength, type PublishedHeader } from '../formats/published.js';
import { HASH_BYTES, sha256 } from '../hash.js';
import { readFully } from '../io/read-fully.js';
import type { Range } from '../ranges.js';

/** DST is read in pieces of this size. */
const READ_BYTES = 4 * 1024 * 1024;
/** Data bytes of DST from which worker threads hash it: below, their start-up costs more. */
export const WORKER_MIN_BYTES = 64 * 1024 * 1024;

/**
 * A worker: takes the next piece from a counter shared with the others (Atomics), reads it
 * with its own buffer from the file descriptor all threads share, and writes each chunk's
 * hash (or a zero flag, found by memcmp) into shared memory; so every core reads and hashes
 * without waiting for another thread. Plain JavaScript run with `eval`, so that it needs no
 * file of its own beside the CLI bundle. next[1] set means stop (interrupted).
 */
const WORKER_SOURCE = `
const { workerData: w, parentPort } = require('node:worker_threads');
const { readSync } = require('node:fs');
const { createHash } = require('node:crypto');
const pieces = new Float64Array(w.pieces);
const next = new Int32Array(w.next);
const out = Buffer.from(w.out);
const zero = new Uint8Array(w.zero);
const buf = Buffer.allocUnsafe(w.readBytes);
const zeros = Buffer.alloc(w.chunkSize);
function hashPieces() {
  for (let k = Atomics.add(next, 0, 1); 3 * k < pieces.length; k = Atomics.add(next, 0, 1)) {
    if (Atomics.load(next, 1) !== 0) break;
    const start = pieces[3 * k];
    const len = pieces[3 * k + 1];
    let got = 0;
    while (got < len) {
      const n = readSync(w.fd, buf, got, len - got, start + got);
      if (n === 0) break;
      got += n;
    }
    if (got < len) return { shortAt: start + got };
    let i = pieces[3 * k + 2];
    for (let at = 0; at < len; at += w.chunkSize, i++) {
      const l = Math.min(w.chunkSize, len - at);
      if (buf.compare(zeros, 0, l, at, at + l) === 0) zero[i] = 1;
      else createHash('sha256').update(buf.subarray(at, at + l)).digest().copy(out, i * 32);
    }
  }
  return {};
}
try {
  parentPort.postMessage(hashPieces());
} catch (err) {
  parentPort.postMessage({ error: String(err && err.message), code: err && err.code });
}
`;

/** Consecutive mapped chunks of DST read at once: [start, length) holds chunks first, first+1, ... */
interface Piece {
  start: number;
  length: number;
  first: number;
}

interface WorkerEnd {
  shortAt?: number;
  error?: string;
  code?: string;
}

/** Runs `threads` workers over `pieces`, hashes into `out`, zero chunks flagged in `zero`. */
async function hashInWorkers(
  fd: number,
  pieces: Piece[],
  chunkSize: number,
  out: Buffer,
  zero: Uint8Array,
  threads: number,
  signal: AbortSignal | undefined,
): Promise<WorkerEnd[]> {
  const shared = new Float64Array(new SharedArrayBuffer(pieces.length * 3 * 8));
  pieces.forEach((p, k) => shared.set([p.start, p.length, p.first], 3 * k));
  const next = new Int32Array(new SharedArrayBuffer(8));
  const stop = (): void => {
    Atomics.store(next, 1, 1);
  };
  if (signal?.aborted === true) stop();
  signal?.addEventListener('abort', stop, { once: true });
  try {
    const workerData = {
      fd,
      pieces: shared.buffer,
      next: next.buffer,
      out: out.buffer,
      zero: zero.buffer,
      chunkSize,
      readBytes: READ_BYTES,
    };
    const ends = Array.from({ length: threads }, async (): Promise<WorkerEnd> => {
      const worker = new Worker(WORKER_SOURCE, { eval: true, workerData });
      try {
        return await new Promise<WorkerEnd>((resolve, reject) => {
          worker.once('error', reject);
          worker.once('message', resolve);
          worker.once('exit', () => reject(new Error('the hashing thread ended early')));
        });
      } catch (err) {
        // one thread failing stops the others at their next piece
        stop();
        throw err;
      } finally {
        await worker.terminate();
      }
    });
    return await Promise.all(ends);
  } finally {
    signal?.removeEventListener('abort', stop);
  }
}

/** See the file header. `workerMinBytes` (tests) overrides WORKER_MIN_BYTES. */
export async function hashDestination(
  path: string,
  h: PublishedHeader,
  signal: AbortSignal | undefined,
  workerMinBytes = WORKER_MIN_BYTES,
): Promise<Buffer> {
  const chunks = chunkCount(h);
  // shared memory: worker threads write the hashes in place
  const out = Buffer.from(new SharedArrayBuffer(chunks * HASH_BYTES));
  const zeros = Buffer.alloc(h.chunkSize);
  const zeroHash = sha256(zeros);
  const lastZeroHash = sha256(Buffer.alloc(chunkLength(h, chunks - 1)));
  const fillZero = (i: number): void => {
    (i === chunks - 1 ? lastZeroHash : zeroHash).copy(out, i * HASH_BYTES);
  };
  const allZero = (): Buffer => {
    for (let i = 0; i < chunks; i++) fillZero(i);
    return out;
  };
  const interrupted = (): BlksyncError =>
    new BlksyncError('EINTERRUPTED', 'interrupted; nothing was written');
  const short = (at: number): BlksyncError =>
    new BlksyncError('EDEST_SHORT', `${path} ended at ${at} bytes while being read; rerun`, {
      path,
    });
  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    if (isSystemError(err) && err.code === 'ENOENT') return allZero();
    throw fromSystemError('EDEST_OPEN', 'cannot open destination', path, err);
  }
  try {
    const st = await fh.stat();
    // not a destination at all: the copy refuses it with its own error (EDEST_KIND)
    if (!st.isFile() && !st.isBlockDevice()) return allZero();
    let size = st.size;
    let mapped: Range[] = [{ start: 0, end: h.imageSize }];
    if (st.isBlockDevice()) {
      const { blockDeviceSize } = await import('../io/block-device.js');
      size = await blockDeviceSize(st.rdev);
    } else {
      const { mappedRanges } = await import('../io/sparse-map.js');
      mapped = mappedRanges(fh, Math.min(size, h.imageSize), h.chunkSize, path);
    }
    // an empty DST is made at full size by the copy: zeros
    if (size === 0) return allZero();
    // past DST's end a chunk never matches
    const known = Math.min(size, h.imageSize);

    // the pieces to read: runs of mapped chunks up to READ_BYTES; holes are zeros unread
    const pieces: Piece[] = [];
    let dataBytes = 0;
    let r = 0;
    for (let i = 0; i < chunks;) {
      const start = i * h.chunkSize;
      if (start + chunkLength(h, i) > known) {
        out.fill(0xff, i * HASH_BYTES, (i + 1) * HASH_BYTES);
        i++;
        continue;
      }
      while (r < mapped.length && mapped[r]!.end <= start) r++;
      if (r >= mapped.length || mapped[r]!.start >= start + chunkLength(h, i)) {
        fillZero(i);
        i++;
        continue;
      }
      const end = Math.min(known, mapped[r]!.end, start + READ_BYTES);
      const n = Math.max(1, Math.floor((end - start) / h.chunkSize));
      const piece: Piece = { start, length: 0, first: i };
      for (let k = 0; k < n && i < chunks; k++, i++) piece.length += chunkLength(h, i);
      pieces.push(piece);
      dataBytes += piece.length;
    }

    const threads = Math.min(2, availableParallelism());
    if (dataBytes >= workerMinBytes && threads > 1) {
      const zero = new Uint8Array(new SharedArrayBuffer(chunks));
      const ends = await hashInWorkers(fh.fd, pieces, h.chunkSize, out, zero, threads, signal);
      if (signal?.aborted === true) throw interrupted();
      for (const end of ends) {
        if (end.shortAt !== undefined) throw short(end.shortAt);
        if (end.error !== undefined) {
          const err = Object.assign(new Error(end.error), { code: end.code });
          throw fromSystemError('EREAD', 'cannot read', path, err);
        }
      }
      for (let i = 0; i < chunks; i++) if (zero[i] === 1) fillZero(i);
      return out;
    }

    const buf = Buffer.allocUnsafe(READ_BYTES);
    for (const p of pieces) {
      if (signal?.aborted === true) throw interrupted();
      let got: number;
      try {
        got = await readFully(fh, buf, 0, p.length, p.start);
      } catch (err) {
        throw fromSystemError('EREAD', 'cannot read', path, err);
      }
      if (got < p.length) throw short(p.start + got);
      for (let at = 0, i = p.first; at < p.length; at += h.chunkSize, i++) {
        const len = Math.min(h.chunkSize, p.length - at);
        if (buf.compare(zeros, 0, len, at, at + len) === 0) fillZero(i);
        else sha256(buf, at, at + len).copy(out, i * HASH_BYTES);
      }
    }
    return out;
  } finally {
    await fh.close();
  }
}
