/**
 * The SHA-256 of each of DST's chunks, as the published image's chunks lie: what a copy from
 * a published image compares with the published hashes to know what to fetch. Holes of a
 * sparse DST are not read; chunks of zeros are recognised by memcmp (~10x cheaper than
 * SHA-256); with enough data, a worker thread hashes every other piece while this thread
 * reads and hashes the rest (SHA-256 of DST is most of such a copy's CPU time).
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
/** Data bytes of DST from which a worker thread helps: below, its start-up costs more. */
export const WORKER_MIN_BYTES = 64 * 1024 * 1024;

/**
 * The worker: hashes the chunks of a piece in shared memory, zeros by memcmp. Plain
 * JavaScript run with `eval`, so that it needs no file of its own beside the CLI bundle.
 */
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
let zeros = Buffer.alloc(0);
parentPort.on('message', (m) => {
  const buf = Buffer.from(m.memory, 0, m.length);
  const out = Buffer.alloc(m.lens.length * 32);
  const zero = [];
  let at = 0;
  for (let k = 0; k < m.lens.length; k++) {
    const len = m.lens[k];
    if (zeros.length < len) zeros = Buffer.alloc(len);
    if (buf.compare(zeros, 0, len, at, at + len) === 0) zero.push(k);
    else createHash('sha256').update(buf.subarray(at, at + len)).digest().copy(out, k * 32);
    at += len;
  }
  parentPort.postMessage({ out, zero });
});
`;

interface Piece {
  first: number;
  lens: number[];
}

/** One worker thread hashing one piece at a time. */
class HashWorker {
  readonly #worker = new Worker(WORKER_SOURCE, { eval: true });
  readonly memory = new SharedArrayBuffer(READ_BYTES);
  #failed: Error | undefined;

  constructor() {
    this.#worker.on('error', (err) => (this.#failed = err));
  }

  hash(length: number, lens: number[]): Promise<{ out: Uint8Array; zero: number[] }> {
    if (this.#failed !== undefined) return Promise.reject(this.#failed);
    return new Promise((resolve, reject) => {
      const onError = (err: Error): void => reject(err);
      this.#worker.once('error', onError);
      this.#worker.once('message', (m: { out: Uint8Array; zero: number[] }) => {
        this.#worker.off('error', onError);
        resolve(m);
      });
      this.#worker.postMessage({ memory: this.memory, length, lens });
    });
  }

  async stop(): Promise<void> {
    await this.#worker.terminate();
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
  const out = Buffer.alloc(chunks * HASH_BYTES);
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
  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    if (isSystemError(err) && err.code === 'ENOENT') return allZero();
    throw fromSystemError('EDEST_OPEN', 'cannot open destination', path, err);
  }
  let worker: HashWorker | undefined;
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
    const dataBytes = mapped.reduce((n, r) => n + Math.min(r.end, known) - r.start, 0);
    if (dataBytes >= workerMinBytes && availableParallelism() > 1) worker = new HashWorker();

    const own = Buffer.allocUnsafe(READ_BYTES);
    const shared = worker !== undefined ? Buffer.from(worker.memory) : undefined;
    let inWorker: Promise<void> | undefined;
    const read = async (buf: Buffer, p: Piece): Promise<number> => {
      const start = p.first * h.chunkSize;
      const len = p.lens.reduce((a, b) => a + b, 0);
      let got: number;
      try {
        got = await readFully(fh, buf, 0, len, start);
      } catch (err) {
        throw fromSystemError('EREAD', 'cannot read', path, err);
      }
      if (got < len) {
        throw new BlksyncError(
          'EDEST_SHORT',
          `${path} ended at ${start + got} bytes while being read; rerun`,
          { path },
        );
      }
      return len;
    };
    const hashHere = (p: Piece): void => {
      let at = 0;
      p.lens.forEach((len, k) => {
        const i = p.first + k;
        if (own.compare(zeros, 0, len, at, at + len) === 0) fillZero(i);
        else sha256(own, at, at + len).copy(out, i * HASH_BYTES);
        at += len;
      });
    };
    let toWorker = false;
    let r = 0;
    for (let i = 0; i < chunks;) {
      if (signal?.aborted === true) {
        throw new BlksyncError('EINTERRUPTED', 'interrupted; nothing was written');
      }
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
      // this chunk and the following mapped ones, up to READ_BYTES
      const end = Math.min(known, mapped[r]!.end, start + READ_BYTES);
      const n = Math.max(1, Math.floor((end - start) / h.chunkSize));
      const piece: Piece = { first: i, lens: [] };
      for (let k = 0; k < n && i < chunks; k++, i++) piece.lens.push(chunkLength(h, i));
      if (worker !== undefined && toWorker) {
        await inWorker;
        const length = await read(shared!, piece);
        inWorker = worker.hash(length, piece.lens).then(({ out: hashes, zero }) => {
          Buffer.from(hashes).copy(out, piece.first * HASH_BYTES);
          for (const k of zero) fillZero(piece.first + k);
        });
        // a failure is seen at the next await of it; keep it from being unhandled meanwhile
        inWorker.catch(() => {});
      } else {
        await read(own, piece);
        hashHere(piece);
      }
      toWorker = !toWorker;
    }
    await inWorker;
    return out;
  } finally {
    await worker?.stop();
    await fh.close();
  }
}
