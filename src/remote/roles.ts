/**
 * The remote implementations of the pipeline's roles (docs/architecture.md, "Remote ends"),
 * shared by the copies in remote/copy/ and agent/direct-copy.ts (inside an agent, for --direct):
 *
 *   PushSource    SRC re-read only where the Refiner found spans     ─┐
 *   FetchedSource the Refiner's fetched spans at their places         ├─► RefinedTarget ─► sink
 *   RemoteSink    DATA frames to a target agent                       ─┘   (the SpanBook)
 *
 * Nothing here may import what the agent bundle cannot carry (decoders, HTTP, bmaps).
 */

import { randomBytes } from 'node:crypto';
import { BlksyncError } from '../errors.js';
import { BufferPool } from '../io/buffer-pool.js';
import type { ChunkKnowledge, Sink, Source, TargetKnowledge } from '../types.js';
import type { FileSource } from '../io/file-source.js';
import { HashDiffer } from './hash-differ.js';
import type { AgentLink } from './link.js';
import {
  GMAC_KEY_BYTES,
  skippingZeros,
  TOP_HASH_GMAC,
  topHasher,
  zeroHasher,
  type TopHasher,
} from './protocol.js';
import { Refiner, type Found } from './refiner.js';
import type { HashScanner } from './scanner.js';

/** Bytes per chunk: the top level of the hash tree. */
export const REMOTE_CHUNK_BYTES = 4 * 1024 * 1024;
/** Chunks in flight: their refinement round trips overlap. */
export const REMOTE_DEPTH = 8;

/** Spans per chunk offset, found while reading and reported by the knowledge. */
export class SpanBook {
  readonly #spans = new Map<number, number[]>();
  set(offset: number, spans: number[]): void {
    this.#spans.set(offset, spans);
  }
  take(offset: number): number[] {
    const s = this.#spans.get(offset) ?? [];
    this.#spans.delete(offset);
    return s;
  }
}

/** The knowledge of DST gained while the chunk was read: the spans the hashes found. */
export class RefinedTarget implements TargetKnowledge {
  readonly #book: SpanBook;
  readonly #bytesRead: () => number;
  readonly #reached: ((offset: number) => void) | undefined;

  /** `reached(offset)`: called when the pipeline diffs the chunk, in order, before its writes. */
  constructor(book: SpanBook, bytesRead: () => number, reached?: (offset: number) => void) {
    this.#book = book;
    this.#bytesRead = bytesRead;
    this.#reached = reached;
  }

  get bytesRead(): number {
    return this.#bytesRead();
  }

  load(offset: number): Promise<ChunkKnowledge> {
    return Promise.resolve({
      diff: (_data, _length, _blockSize, out) => {
        this.#reached?.(offset);
        for (const x of this.#book.take(offset)) out.push(x);
      },
      release: () => {},
    });
  }

  async close(): Promise<void> {}
}

/**
 * Push: the refiner found the spans; a chunk is read again (into the pipeline's buffer) only
 * when it has some.
 */
export class PushSource implements Source {
  readonly size: number;
  readonly #file: FileSource;
  readonly #refiner: Refiner;
  readonly #book: SpanBook;

  constructor(file: FileSource, refiner: Refiner, book: SpanBook) {
    this.size = file.size;
    this.#file = file;
    this.#refiner = refiner;
    this.#book = book;
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const { spans } = await this.#refiner.get(offset);
    this.#book.set(offset, spans);
    if (spans.length === 0) return length;
    return this.#file.read(buf, offset, length);
  }

  close(): Promise<void> {
    return this.#file.close();
  }
}

/** The agent as a Sink: DATA frames, written there in order. */
export class RemoteSink implements Sink {
  readonly #link: AgentLink;
  constructor(link: AgentLink) {
    this.#link = link;
  }
  write(data: Buffer, offset: number): Promise<void> {
    return this.#link.sendData(data, offset);
  }
  async finish(): Promise<void> {}
}

/**
 * Pull and relay: the new bytes are on a remote. The refiner fetched the differing spans'
 * bytes (or, with --full, every chunk is fetched here); a chunk hands them to the pipeline at
 * their places, so only they are written. What the buffer holds elsewhere is never written.
 */
export class FetchedSource implements Source {
  readonly size: number;
  readonly #refiner: Refiner | undefined;
  readonly #link: AgentLink;
  readonly #book: SpanBook;
  readonly #fetchAll: boolean;

  /** `refiner` undefined: --full, fetch every chunk whole (unless `fetchAll` is false: dry run). */
  constructor(
    size: number,
    link: AgentLink,
    refiner: Refiner | undefined,
    book: SpanBook,
    fetchAll: boolean,
  ) {
    this.size = size;
    this.#link = link;
    this.#refiner = refiner;
    this.#book = book;
    this.#fetchAll = fetchAll;
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    if (this.#refiner === undefined) {
      this.#book.set(offset, [0, length]);
      if (this.#fetchAll) await this.#link.fetch(offset, length, buf, 0);
      return length;
    }
    const { spans, data, whole } = await this.#refiner.get(offset);
    this.#book.set(offset, spans);
    if (whole !== undefined) whole.copy(buf, 0, 0, length);
    else if (data !== undefined) {
      for (let i = 0, at = 0; i < spans.length; i += 2) {
        const s = spans[i]!;
        const e = spans[i + 1]!;
        data.copy(buf, s, at, at + e - s);
        at += e - s;
      }
    }
    return length;
  }

  async close(): Promise<void> {}
}

/** Fetches `spans` of the chunk at `offset` from `link` into one buffer, back to back. */
export async function fetchSpans(
  link: AgentLink,
  offset: number,
  spans: number[],
): Promise<Buffer> {
  let total = 0;
  for (let i = 0; i < spans.length; i += 2) total += spans[i + 1]! - spans[i]!;
  const data = Buffer.allocUnsafe(total);
  const fetches: Promise<void>[] = [];
  for (let i = 0, at = 0; i < spans.length; i += 2) {
    const s = spans[i]!;
    const len = spans[i + 1]! - s;
    fetches.push(link.fetch(offset + s, len, data, at));
    at += len;
  }
  await Promise.all(fetches);
  return data;
}

/** Writes `spans`' bytes (`data`, back to back, as fetchSpans gives them) into `buf`. */
export function patchSpans(buf: Buffer, spans: number[], data: Buffer): void {
  for (let i = 0, at = 0; i < spans.length; i += 2) {
    const len = spans[i + 1]! - spans[i]!;
    data.copy(buf, spans[i], at, at + len);
    at += len;
  }
}

/** Reads [offset, offset + length) of a local file into `buf`, all of it or EDEST_SHORT. */
export async function readChunk(
  file: FileSource,
  path: string,
  buf: Buffer,
  offset: number,
  length: number,
): Promise<void> {
  const got = await file.read(buf, offset, length);
  if (got < length) {
    throw new BlksyncError(
      'EDEST_SHORT',
      `${path} ended at ${offset + got} bytes while being read; did it shrink? Rerun the command.`,
      { path },
    );
  }
}

/** Counts what a sink wrote, for the message when the link drops. */
export class CountingSink implements Sink {
  written = 0;
  readonly #inner: Sink;
  constructor(inner: Sink) {
    this.#inner = inner;
  }
  async write(data: Buffer, offset: number): Promise<void> {
    await this.#inner.write(data, offset);
    this.written += data.length;
  }
  finish(): Promise<void> {
    return this.#inner.finish();
  }
}

/** The top-level hash of one session: GMAC under a fresh random key (protocol.ts). */
export interface TopHashing {
  /** The HELLO fields that choose it: topHash, and key or topBlock. */
  hello: { topHash: string; key?: string; topBlock?: number };
  hash: TopHasher;
  zero: (length: number) => Buffer;
}

export function topHashing(): TopHashing {
  const key = randomBytes(GMAC_KEY_BYTES);
  const hash = skippingZeros(topHasher(key));
  return {
    hello: { topHash: TOP_HASH_GMAC, key: key.toString('hex') },
    hash,
    zero: zeroHasher(hash),
  };
}

/**
 * Push from a plain file hashed ahead (`scanner`): a Refiner compares each chunk's top hash
 * with the agent's stream and refines the chunks that differ; the PushSource re-reads them.
 */
export function hashAheadPush(
  file: FileSource,
  path: string,
  size: number,
  chunkSize: number,
  blockSize: number,
  scanner: HashScanner,
  link: AgentLink,
  book: SpanBook,
  reqHash?: TopHasher,
): { refiner: Refiner; input: PushSource } {
  const differ = new HashDiffer(link, chunkSize, blockSize, reqHash);
  const pool = new BufferPool(chunkSize);
  const refiner = new Refiner(
    size,
    chunkSize,
    async (offset) => {
      const [[mine], theirs] = await Promise.all([scanner.hash(offset), link.topHash(offset)]);
      return mine.equals(theirs);
    },
    async (offset, length): Promise<Found> => {
      const buf = pool.get();
      try {
        await readChunk(file, path, buf, offset, length);
        const spans: number[] = [];
        await differ.refine(offset, buf, length, false, spans);
        return { spans };
      } finally {
        pool.put(buf);
      }
    },
  );
  return { refiner, input: new PushSource(file, refiner, book) };
}
