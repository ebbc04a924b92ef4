/**
 * The SHA-256 of each of DST's chunks, as the published image's chunks lie: what a copy from
 * a published image compares with the published hashes to know what to fetch. Holes of a
 * sparse DST are not read; chunks of zeros are recognised by memcmp (~10x cheaper than
 * SHA-256). The pieces to read are listed in shared memory; this thread and, with enough
 * data and a second core, one worker thread each take the next piece from a shared counter,
 * read it and hash it (SHA-256 of DST is most of such a copy's CPU time), so both cores hash
 * from the start and neither waits for the other.
 */

import { constants, readSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { availableParallelism } from 'node:os';
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import { Worker } from 'node:worker_threads';
import { BlksyncError, fromSystemError, isSystemError } from '../errors.js';
import { chunkCount, chunkLength, type PublishedHeader } from '../formats/published.js';
import { HASH_BYTES, sha256 } from '../hash.js';
import { type Range, rangesBytes } from '../ranges.js';
import { trace } from '../trace.js';
import { addressSpaceLimited } from '../io/address-space.js';
import { sectorsWritten } from '../io/write-counter.js';

/**
 * DST is read in pieces of this size, into one buffer per thread: 1 MiB, as 4 MiB cost each
 * thread 3 MiB more fresh memory (page faults: ~4 ms per MiB on a VM here) for no speed.
 */
const READ_BYTES = 1024 * 1024;
/** Data bytes of DST from which a worker thread helps: below, its start-up costs more. */
export const WORKER_MIN_BYTES = 64 * 1024 * 1024;

/**
 * The work shared by the threads, all in shared memory: `pieces` holds [start, length, first
 * chunk] triples of DST's mapped runs, `next[0]` the next piece to take, `next[1]` set means
 * stop; `out` gets each chunk's hash, `zero` a 1 for a chunk of zeros.
 */
interface Job {
  fd: number;
  pieces: SharedArrayBuffer;
  next: SharedArrayBuffer;
  out: SharedArrayBuffer;
  zero: SharedArrayBuffer;
  chunkSize: number;
}

/** How a thread's share ended: all taken, DST shorter than listed, or a read failed. */
interface ShareEnd {
  done: boolean;
  shortAt?: number;
  error?: string;
  code?: string;
}

/**
 * Takes up to `most` pieces of `job` and hashes them. Self-contained (no module scope, its
 * helpers passed in): the worker runs its source text, so both threads run the same code.
 */
function hashShare(
  job: Job,
  buf: Buffer,
  zeros: Buffer,
  most: number,
  read: typeof readSync,
  hash: typeof createHash,
): ShareEnd {
  const pieces = new Float64Array(job.pieces);
  const next = new Int32Array(job.next);
  const out = Buffer.from(job.out);
  const zero = new Uint8Array(job.zero);
  const size = job.chunkSize;
  try {
    for (let taken = 0; taken < most; taken++) {
      if (Atomics.load(next, 1) !== 0) return { done: true };
      const k = Atomics.add(next, 0, 1);
      if (3 * k >= pieces.length) return { done: true };
      const start = pieces[3 * k]!;
      const len = pieces[3 * k + 1]!;
      let got = 0;
      while (got < len) {
        const n = read(job.fd, buf, got, len - got, start + got);
        if (n === 0) break;
        got += n;
      }
      if (got < len) return { done: true, shortAt: start + got };
      let i = pieces[3 * k + 2]!;
      for (let at = 0; at < len; at += size, i++) {
        const l = Math.min(size, len - at);
        if (buf.compare(zeros, 0, l, at, at + l) === 0) zero[i] = 1;
        else
          hash('sha256')
            .update(buf.subarray(at, at + l))
            .digest()
            .copy(out, i * 32);
      }
    }
    return { done: false };
  } catch (err) {
    const e = err as { message?: string; code?: string };
    return { done: true, error: String(e.message), code: e.code };
  }
}

/** The worker: waits for its job, then takes its share of it as one call of hashShare. */
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { readSync } = require('node:fs');
const { createHash } = require('node:crypto');
const hashShare = ${hashShare.toString()};
parentPort.once('message', (job) =>
  parentPort.postMessage(
    hashShare(job, Buffer.allocUnsafe(${READ_BYTES}), Buffer.alloc(job.chunkSize), Infinity, readSync, createHash),
  ),
);
`;

/**
 * A worker thread started before its job is known (a thread takes ~17 ms to start: started
 * while the published index is fetched, it hashes from the first piece); `give` hands it
 * the job, `end` is its share's end (an error is a read error).
 */
function startWorker(): {
  give(job: Job): Promise<ShareEnd>;
  stop(): Promise<void>;
} {
  const worker = new Worker(WORKER_SOURCE, { eval: true });
  const end = new Promise<ShareEnd>((resolve) => {
    const failed = (err: Error): void => resolve({ done: true, error: err.message });
    worker.once('error', failed);
    worker.once('message', resolve);
    worker.once('exit', () => failed(new Error('the hashing thread ended early')));
  });
  end.catch(() => {});
  return {
    give: (job) => {
      worker.postMessage(job);
      return end;
    },
    stop: async () => void (await worker.terminate()),
  };
}

/**
 * What DST was when it was hashed, to be found the same when the copy opens it: its file (or
 * device node), a regular file's ctime (a device node's does not move on writes), and a block
 * device's count of sectors written (its own, a partition's, as io/source-watch.ts reads it).
 */
export interface DestinationIdentity {
  dev: number;
  ino: number;
  ctimeMs: number | undefined;
  sectorsWritten: bigint | undefined;
}

/**
 * DST opened, its size and data ranges known, a worker started when there is enough data:
 * what hashing DST needs before the published header is known, so it can be done while the
 * header is fetched. `hash` hashes DST's chunks as the header lays them out; `close` frees
 * it (after `hash`, or instead of it when the image turns out not to be published).
 */
export interface PreparedDestination {
  hash(
    h: PublishedHeader,
    signal: AbortSignal | undefined,
    onHashed?: (done: number, total: number) => void,
  ): Promise<Buffer>;
  close(): Promise<void>;
  /**
   * The file or device opened (undefined: DST was missing), to be found the same at the copy;
   * a regular file's ctime too (undefined for a device, whose node's ctime writes do not move).
   */
  identity: DestinationIdentity | undefined;
}

/** Opens DST for hashing (a missing DST, or one that is no file or device, holds zeros). */
export async function prepareDestination(
  path: string,
  workerMinBytes = WORKER_MIN_BYTES,
): Promise<PreparedDestination> {
  // started first: the thread starts while DST is opened and mapped and the index fetched;
  // stopped again when DST holds too little data for it to pay
  let worker =
    workerMinBytes < Infinity && availableParallelism() > 1 && !addressSpaceLimited()
      ? startWorker()
      : undefined;
  let fh: FileHandle;
  try {
    // O_NONBLOCK: a FIFO (or a tty) opens at once instead of waiting for a writer, to be
    // found no file below; regular files and block devices read as without it
    fh = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (err) {
    await worker?.stop();
    if (isSystemError(err) && err.code === 'ENOENT') return zerosOnly(undefined);
    throw fromSystemError('EDEST_OPEN', 'cannot open destination', path, err);
  }
  try {
    const st = await fh.stat();
    const identity: DestinationIdentity = {
      dev: st.dev,
      ino: st.ino,
      ctimeMs: st.isFile() ? st.ctimeMs : undefined,
      sectorsWritten: st.isBlockDevice() ? await sectorsWritten(st.rdev) : undefined,
    };
    // not a destination at all: the copy refuses it with its own error (EDEST_KIND);
    // an empty DST is made at full size by the copy: zeros
    if ((!st.isFile() && !st.isBlockDevice()) || (st.isFile() && st.size === 0)) {
      await worker?.stop();
      await fh.close();
      return zerosOnly(identity);
    }
    let size = st.size;
    let mapped: Range[];
    if (st.isBlockDevice()) {
      const { blockDeviceSize } = await import('../io/block-device.js');
      size = await blockDeviceSize(st.rdev);
      mapped = [{ start: 0, end: size }];
    } else {
      const { mappedRanges } = await import('../io/sparse-map.js');
      mapped = mappedRanges(fh, size, 4096, path);
    }
    if (size === 0) {
      await worker?.stop();
      await fh.close();
      return zerosOnly(identity);
    }
    const dataBytes = rangesBytes(mapped);
    if (dataBytes < workerMinBytes) {
      await worker?.stop();
      worker = undefined;
    }
    return {
      hash: (h, signal, onHashed) =>
        hashPrepared(path, fh, size, mapped, worker, h, signal, onHashed),
      close: async () => {
        await worker?.stop();
        await fh.close();
      },
      identity,
    };
  } catch (err) {
    await worker?.stop();
    await fh.close();
    throw err;
  }
}

/** A DST that holds only zeros: missing, empty, or no file at all. */
function zerosOnly(identity: PreparedDestination['identity']): PreparedDestination {
  return {
    hash: (h) => Promise.resolve(zeroHashes(h).all()),
    close: () => Promise.resolve(),
    identity,
  };
}

/** The hashes of `h`'s chunks, in shared memory, and a way to fill one with zeros' hash. */
function zeroHashes(h: PublishedHeader): {
  out: Buffer;
  fill: (i: number) => void;
  all: () => Buffer;
} {
  const chunks = chunkCount(h);
  // shared memory: a worker thread writes hashes in place
  const out = Buffer.from(new SharedArrayBuffer(chunks * HASH_BYTES));
  const zeroHash = sha256(Buffer.alloc(h.chunkSize));
  const lastZeroHash = sha256(Buffer.alloc(chunkLength(h, chunks - 1)));
  const fill = (i: number): void => {
    (i === chunks - 1 ? lastZeroHash : zeroHash).copy(out, i * HASH_BYTES);
  };
  return {
    out,
    fill,
    all: () => {
      for (let i = 0; i < chunks; i++) fill(i);
      return out;
    },
  };
}

/** DST's chunk hashes, read once (see the module's comment). */
export async function hashDestination(
  path: string,
  h: PublishedHeader,
  signal: AbortSignal | undefined,
  workerMinBytes = WORKER_MIN_BYTES,
  onHashed?: (done: number, total: number) => void,
): Promise<Buffer> {
  const dst = await prepareDestination(path, workerMinBytes);
  try {
    return await dst.hash(h, signal, onHashed);
  } finally {
    await dst.close();
  }
}

async function hashPrepared(
  path: string,
  fh: FileHandle,
  size: number,
  mapped: Range[],
  worker: ReturnType<typeof startWorker> | undefined,
  h: PublishedHeader,
  signal: AbortSignal | undefined,
  onHashed?: (done: number, total: number) => void,
): Promise<Buffer> {
  const chunks = chunkCount(h);
  const { out, fill: fillZero } = zeroHashes(h);
  const zeros = Buffer.alloc(h.chunkSize);
  const job: Job = {
    fd: fh.fd,
    pieces: new SharedArrayBuffer(0),
    next: new SharedArrayBuffer(8),
    out: out.buffer as SharedArrayBuffer,
    zero: new SharedArrayBuffer(chunks),
    chunkSize: h.chunkSize,
  };
  const next = new Int32Array(job.next);
  let workerEnd: Promise<ShareEnd> | undefined;
  try {
    // past DST's end a chunk never matches
    const known = Math.min(size, h.imageSize);

    // the pieces to read: runs of mapped chunks up to READ_BYTES; holes are zeros unread
    const pieces: number[] = [];
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
      const first = i;
      let length = 0;
      for (let k = 0; k < n && i < chunks; k++, i++) length += chunkLength(h, i);
      pieces.push(start, length, first);
      dataBytes += length;
    }
    job.pieces = new SharedArrayBuffer(pieces.length * 8);
    new Float64Array(job.pieces).set(pieces);
    trace(`DST: ${dataBytes} bytes of data to hash in ${pieces.length / 3} pieces`);

    workerEnd = worker?.give(job);
    // this thread's share, a piece at a time, letting the event loop run between pieces
    const buf = Buffer.allocUnsafe(READ_BYTES);
    let hashedBytes = 0;
    let mine: ShareEnd;
    const taken = new Float64Array(job.pieces);
    let told = 0;
    do {
      if (signal?.aborted === true) break;
      if (onHashed !== undefined) {
        // the pieces taken so far, by either thread (the ones being hashed counted as done)
        const k = Math.min(Atomics.load(next, 0), pieces.length / 3);
        for (; told < k; told++) hashedBytes += taken[3 * told + 1]!;
        onHashed(hashedBytes, dataBytes);
      }
      mine = hashShare(job, buf, zeros, 1, readSync, createHash);
      if (!mine.done) await yieldToLoop();
    } while (!mine.done);
    onHashed?.(dataBytes, dataBytes);
    trace(`DST: this thread's share hashed`);
    // interrupted: the worker stops at its next piece
    if (signal?.aborted === true) Atomics.store(next, 1, 1);
    const ends = [mine!, ...(workerEnd !== undefined ? [await workerEnd] : [])];
    if (signal?.aborted === true) {
      throw new BlksyncError('EINTERRUPTED', 'interrupted; nothing was written');
    }
    for (const e of ends) {
      if (e.shortAt !== undefined) {
        throw new BlksyncError(
          'EDEST_SHORT',
          `${path} ended at ${e.shortAt} bytes while being read; rerun`,
          { path },
        );
      }
      if (e.error !== undefined) {
        const err = Object.assign(new Error(e.error), { code: e.code });
        throw fromSystemError('EREAD', 'cannot read', path, err);
      }
    }
    const zero = new Uint8Array(job.zero);
    for (let i = 0; i < chunks; i++) if (zero[i] === 1) fillZero(i);
    return out;
  } finally {
    // a failure of this thread's share stops the worker too
    Atomics.store(next, 1, 1);
    if (workerEnd !== undefined) await workerEnd;
  }
}
