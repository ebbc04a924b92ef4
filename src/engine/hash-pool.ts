/**
 * Block hashing spread over worker threads. With an index, SHA-256 of every source block is
 * the bottleneck: one core hashes 64 KiB blocks at ~1.8 GiB/s while the page cache delivers
 * ~5 GiB/s (docs/formats/index.md, "Speed"). Each chunk is split between the workers, which
 * read it straight from shared memory (the pipeline's buffers come from SharedBufferPool) and
 * send back only the hashes, 32 bytes per block.
 *
 * The worker is a few lines of CommonJS run with `eval: true` rather than a module file, so
 * the same code runs from src/ under tsx and from dist/ without resolving a worker path.
 */

import { hash } from 'node:crypto';
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { HASH_BYTES } from '../hash.js';
import { addressSpaceLimited } from '../io/address-space.js';

/** Worker threads used for hashing by default: one per core, at most four. */
export const DEFAULT_HASH_THREADS = Math.max(1, Math.min(4, availableParallelism()));

const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { hash } = require('node:crypto');
parentPort.on('message', (m) => {
  try {
    const data = Buffer.from(m.sab, m.byteOffset, m.length);
    const n = Math.ceil(m.length / m.blockSize);
    const out = Buffer.from(new ArrayBuffer(n * ${HASH_BYTES}));
    for (let i = 0, s = 0; i < n; i++, s += m.blockSize) {
      hash('sha256', data.subarray(s, Math.min(s + m.blockSize, m.length)), 'buffer').copy(out, i * ${HASH_BYTES});
    }
    parentPort.postMessage({ id: m.id, out: out.buffer }, [out.buffer]);
  } catch (err) {
    parentPort.postMessage({ id: m.id, error: String(err && err.stack || err) });
  }
});
`;

interface Pending {
  resolve: (out: ArrayBuffer) => void;
  reject: (err: Error) => void;
}

/** Hashes blocks on the main thread: hashes of data[start, end) into out from outOffset. */
export function hashBlocksSync(
  data: Buffer,
  start: number,
  end: number,
  blockSize: number,
  out: Buffer,
  outOffset: number,
): void {
  // crypto.hash cannot write into a caller's buffer, so each block costs a view and a result
  for (let s = start, o = outOffset; s < end; s += blockSize, o += HASH_BYTES) {
    hash('sha256', data.subarray(s, Math.min(s + blockSize, end)), 'buffer').copy(out, o);
  }
}

export class HashPool {
  #threads: number;
  readonly #workers: Worker[] = [];
  readonly #pending = new Map<number, Pending>();
  #nextId = 0;
  #failed: Error | undefined;
  /** Bytes hashed so far, on any thread. */
  bytesHashed = 0;

  /**
   * `threads` 0 hashes on the main thread; so does any number under `ulimit -v`, where a
   * worker's start could abort the process (io/address-space.ts).
   */
  constructor(threads = DEFAULT_HASH_THREADS) {
    this.#threads = addressSpaceLimited() ? 0 : Math.max(0, Math.floor(threads));
  }

  /** Worker threads hashing (0: the main thread). */
  get threads(): number {
    return this.#threads;
  }

  /**
   * Hashes on the main thread from now on, when there is too little to hash to be worth a
   * worker's start-up (tens of ms each). Only before any worker started.
   */
  inline(): void {
    if (this.#workers.length === 0) this.#threads = 0;
  }

  /** Starts the workers now (they take tens of ms to boot), e.g. while an index is read. */
  prestart(): void {
    this.#start();
  }

  #start(): void {
    for (let i = this.#workers.length; i < this.#threads; i++) {
      // no execArgv: the worker is plain CommonJS, whatever loader or input type the main
      // thread was started with (tsx, --input-type=module)
      const w = new Worker(WORKER_SOURCE, { eval: true, execArgv: [] });
      w.unref();
      w.on('message', (m: { id: number; out?: ArrayBuffer; error?: string }) => {
        const p = this.#pending.get(m.id);
        if (p === undefined) return;
        this.#pending.delete(m.id);
        if (m.out !== undefined) p.resolve(m.out);
        else p.reject(new Error(`hash worker failed: ${m.error ?? 'unknown error'}`));
      });
      w.on('error', (err) => this.#fail(err));
      w.on('exit', (code) => {
        if (code !== 0) this.#fail(new Error(`hash worker exited with ${code}`));
      });
      this.#workers.push(w);
    }
  }

  #fail(err: Error): void {
    this.#failed ??= err;
    for (const p of this.#pending.values()) p.reject(err);
    this.#pending.clear();
  }

  #post(worker: Worker, data: Buffer, start: number, end: number, blockSize: number) {
    return new Promise<ArrayBuffer>((resolve, reject) => {
      const id = this.#nextId++;
      this.#pending.set(id, { resolve, reject });
      worker.postMessage({
        id,
        sab: data.buffer,
        byteOffset: data.byteOffset + start,
        length: end - start,
        blockSize,
      });
    });
  }

  /**
   * Writes the hashes of the blocks of data[start, end) (start block-aligned) into `out` at
   * `outOffset`. Off the main thread when data lives in shared memory and threads > 0.
   */
  async hashBlocks(
    data: Buffer,
    start: number,
    end: number,
    blockSize: number,
    out: Buffer,
    outOffset: number,
  ): Promise<void> {
    this.bytesHashed += end - start;
    if (this.threads === 0 || !(data.buffer instanceof SharedArrayBuffer) || end <= start) {
      hashBlocksSync(data, start, end, blockSize, out, outOffset);
      return;
    }
    if (this.#failed !== undefined) throw this.#failed;
    this.#start();
    const blocks = Math.ceil((end - start) / blockSize);
    const perWorker = Math.ceil(blocks / this.threads);
    const parts: Promise<void>[] = [];
    for (let w = 0; w < this.threads; w++) {
      const first = w * perWorker;
      if (first >= blocks) break;
      const s = start + first * blockSize;
      const e = Math.min(end, s + perWorker * blockSize);
      const at = outOffset + first * HASH_BYTES;
      parts.push(
        this.#post(this.#workers[w]!, data, s, e, blockSize).then((ab) => {
          Buffer.from(ab).copy(out, at);
        }),
      );
    }
    await Promise.all(parts);
  }

  async close(): Promise<void> {
    const workers = this.#workers.splice(0);
    await Promise.all(workers.map((w) => w.terminate()));
  }
}
