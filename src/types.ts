/**
 * The four roles of the pipeline (see docs/architecture.md):
 *
 *   plan (which ranges) × source (new bytes) × target knowledge (what DST holds) → sink(s)
 *
 * The engine knows only these interfaces; files, devices, stdin, indexes and remote agents
 * are implementations of them.
 */

import type { Range } from './ranges.js';

/** Which byte ranges of the image to consider, ascending and non-overlapping. */
export interface Plan {
  /** Total size of the image in bytes (ranges never pass it). */
  readonly imageSize: number;
  readonly ranges: readonly Range[];
}

/** The new bytes. Reads arrive in ascending offset order; several may be in flight at once. */
export interface Source {
  readonly size: number;
  /** Reads `length` bytes at `offset` into `buf`; returns fewer only at the end of the source. */
  read(buf: Buffer, offset: number, length: number): Promise<number>;
  close(): Promise<void>;
}

/** What DST holds now, one chunk at a time. */
export interface TargetKnowledge {
  /** Starts learning what DST holds in [offset, offset + length); called in ascending order. */
  load(offset: number, length: number): Promise<ChunkKnowledge>;
  /** Bytes of DST read so far to gain the knowledge. */
  readonly bytesRead: number;
  close(): Promise<void>;
}

export interface ChunkKnowledge {
  /**
   * Appends to `out`, as [start, end) pairs relative to the chunk, the block-aligned spans of
   * `data` that DST does not already hold. Blocks are aligned to the image, so the last one
   * may be short. May return a promise when the knowledge hashes off the main thread.
   */
  diff(data: Buffer, length: number, blockSize: number, out: number[]): void | Promise<void>;
  /** DST's bytes of this chunk, when the knowledge read them (compare refines ranges with it). */
  readonly held?: Buffer;
  /**
   * The SHA-256 of each of DST's blocks in [start, end) of the chunk, concatenated (blocks
   * aligned to the image, the last one clipped to DST's size). Knowledges that know DST by
   * hashes rather than bytes (an index) provide this instead of `held`, so that `diff` can
   * record a hash of the content each patch record replaces. Optional: only diff asks.
   */
  heldHashes?(start: number, end: number): Buffer;
  /** Returns the chunk's buffers to the pool. */
  release(): void;
}

/** Where the differing bytes go. */
export interface Sink {
  write(data: Buffer, offset: number): Promise<void>;
  /** Makes what was written durable (fsync) and closes. Called after success or interruption. */
  finish(): Promise<void>;
}

/** Emitted after each chunk. */
export interface Progress {
  bytesScanned: number;
  bytesTotal: number;
  bytesDiffering: number;
  bytesWritten: number;
  /** Bytes sent and received on the ssh channel, when an end is remote. */
  channelBytesSent?: number;
  channelBytesReceived?: number;
  /**
   * Set while DST is read to learn what it holds before the copy proper (an update from a
   * published image hashes DST's chunks): bytesScanned/bytesTotal count DST's data hashed.
   */
  phase?: 'hashing DST' | 'checking TARGET';
  /** Bytes received from a web server so far (a published SRC fetched by ranges). */
  bytesFetched?: number;
}

export type ProgressListener = (progress: Progress) => void;
