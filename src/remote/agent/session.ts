/**
 * What one agent session holds between frames: the file it opened (after HELLO), the counts
 * and digest of what it sent or wrote, the index it keeps, a --direct copy, and the ordered
 * output. The request handlers (open-end.ts, requests.ts, done.ts, top-hashes.ts) each take
 * the session and one frame's payload.
 */

import { once } from 'node:events';
import { createHash, type Hash } from 'node:crypto';
import type { FileHandle } from 'node:fs/promises';
import { BlksyncError } from '../../errors.js';
import type { WrittenRanges } from '../../engine/written-log.js';
import type { FileSink } from '../../io/file-sink.js';
import type { AgentIndex } from '../agent-index.js';
import type { Compressor } from '../compress.js';
import {
  frame,
  FrameType,
  jsonFrame,
  MAX_REQUEST_BYTES,
  ProtocolError,
  type DirectReport,
  type Frame,
  wireHash,
  type TopHasher,
  type WireError,
} from '../protocol.js';
import type { DirectCopy } from './direct-copy.js';
import type { KeptSourceIndex } from './kept-source-index.js';

/** The file the session works on, as HELLO opened it. */
export interface Opened {
  path: string;
  /** Undefined only in a dry run onto a missing file, which reads as zeros. */
  fh: FileHandle | undefined;
  /** Bytes the protocol may touch: the image size (target) or the file size (source). */
  limit: number;
  role: 'target' | 'source';
  sink: FileSink | undefined;
  compressor: Compressor;
  encoding: string;
  /** Report the identity after DONE (blksync keeps an index of this target). */
  identity: boolean;
  kind: 'file' | 'block-device';
  /** The file's or device's size when opened. */
  fileSize: number;
}

export class AgentSession {
  readonly #output: NodeJS.WritableStream;
  /** The agent bundle as the bootstrap received it (for --direct, which sends it on). */
  readonly payload: Buffer | undefined;
  /** Frames received and not yet handled; dropped on a failure. */
  readonly queue: Frame[] = [];
  /** Set by HELLO. */
  opened: Opened | undefined;
  failed = false;
  done = false;
  /** Bytes of the file read, sent (DATA) or written, DATA frames, and their digest. */
  bytesRead = 0;
  bytes = 0;
  frames = 0;
  readonly digest: Hash = createHash('sha256');
  direct: DirectCopy | undefined;
  directRun: Promise<DirectReport> | undefined;
  index: AgentIndex | undefined;
  /** A source's index of SRC (--src-index), kept on SRC's host. */
  sourceIndex: KeptSourceIndex | undefined;
  /** --verify: where this session wrote, read back at DONE. */
  written: WrittenRanges | undefined;
  #sendChain: Promise<void> = Promise.resolve();
  /** Frames queued and not yet written (a KEEPALIVE waits behind none); HELLO's timer. */
  #sending = 0;
  #keepalive: NodeJS.Timeout | undefined;

  /** The TOP_HASHES stream while it runs (DONE lets it finish before closing the file). */
  topStream: Promise<void> | undefined;
  /** The hash of HASHES replies: truncated SHA-256, or GMAC when HELLO's `reqHash` asks. */
  unitHash: TopHasher = wireHash;
  /** Where trace lines go if HELLO asks for a trace. */
  readonly traceOut: ((line: string) => void) | undefined;

  constructor(
    output: NodeJS.WritableStream,
    payload: Buffer | undefined,
    traceOut?: (line: string) => void,
  ) {
    this.#output = output;
    this.payload = payload;
    this.traceOut = traceOut;
  }

  /** Queues a frame for output, in order; after a failure only the ERROR frame goes out. */
  send(buf: Buffer): Promise<void> {
    this.#sending++;
    this.#sendChain = this.#sendChain.then(async () => {
      try {
        if (this.failed && buf[4] !== FrameType.ERROR) return;
        if (!this.#output.write(buf)) await once(this.#output, 'drain');
      } finally {
        this.#sending--;
      }
    });
    return this.#sendChain;
  }

  /**
   * HELLO's `keepalive`: blksync times out a link silent while it waits, so a KEEPALIVE goes
   * out every `seconds` when nothing else is on its way (a long fsync, hashing a large range,
   * reading back).
   */
  startKeepalive(seconds: number | undefined): void {
    if (seconds === undefined || seconds <= 0) return;
    this.#keepalive = setInterval(
      () => {
        if (this.#sending === 0 && !this.failed) void this.send(frame(FrameType.KEEPALIVE));
      },
      Math.max(10, seconds * 1000),
    );
  }

  stopKeepalive(): void {
    clearInterval(this.#keepalive);
  }

  /** Ends the session with an ERROR frame (the first failure only). */
  async fail(err: unknown): Promise<void> {
    if (this.failed) return;
    this.failed = true;
    this.queue.length = 0;
    const e: WireError =
      err instanceof BlksyncError
        ? { code: err.code, message: err.message, ...(err.path ? { path: err.path } : {}) }
        : err instanceof ProtocolError
          ? { code: 'EREMOTE_PROTOCOL', message: `protocol error: ${err.message}` }
          : { code: 'EREMOTE', message: `agent error: ${String(err)}` };
    await this.send(jsonFrame(FrameType.ERROR, e)).catch(() => {});
  }

  /** The request's offset, once [offset, offset + length) is known to lie inside the file. */
  checkRange(offset: number | undefined, length: number): number {
    if (offset === undefined || length < 1 || length > MAX_REQUEST_BYTES) {
      throw new ProtocolError('range out of bounds');
    }
    if (offset + length > this.opened!.limit) {
      throw new ProtocolError(`range ${offset}+${length} passes the end (${this.opened!.limit})`);
    }
    return offset;
  }

  /** Waits until every queued frame has been written out. */
  async flushed(): Promise<void> {
    await this.#sendChain.catch(() => {});
  }
}

/** Reads exactly `length` bytes at `offset`; a file that ended early is ESRC_SHORT/EDEST_SHORT. */
export async function readFully(
  o: Opened,
  fh: FileHandle,
  buf: Buffer,
  length: number,
  offset: number,
): Promise<void> {
  let got = 0;
  while (got < length) {
    const { bytesRead } = await fh.read(buf, got, length - got, offset + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  if (got < length) {
    throw new BlksyncError(
      o.role === 'source' ? 'ESRC_SHORT' : 'EDEST_SHORT',
      `${o.path} ended at ${offset + got} bytes while being read; did it shrink? Rerun the command.`,
      { path: o.path },
    );
  }
}
