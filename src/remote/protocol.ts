/**
 * The wire protocol between blksync and its agent (docs/protocol.md has the whole story).
 * Every message is one frame:
 *
 *   0        4      5                              5 + n - 1
 *   +--------+------+-------------------------------+
 *   | length | type | payload (length - 1 bytes)    |
 *   +--------+------+-------------------------------+
 *    u32 BE   u8
 *
 * `length` counts the type byte and the payload and never exceeds MAX_FRAME_BYTES; a reader
 * checks it before buffering anything. Offsets are u64 BE (written as two u32, high first,
 * and refused above 2^53). This file is shared by both ends, so it imports node built-ins
 * only and runs on Node 18 (the agent's floor).
 */

import { createCipheriv, createHash } from 'node:crypto';
import * as crypto from 'node:crypto';
import type { TargetIdentity } from '../io/identity.js';
import type { Range } from '../ranges.js';
import type { IndexReport } from '../engine/index-target.js';
import type { SourceIndexReport } from '../engine/source-index.js';
import type { WrittenDigest } from '../engine/written-log.js';

/**
 * Version 2 added KEEPALIVE (and HELLO's `keepalive`): a client that times out idle links.
 * Version 3 added HELLO's `reqHash`: HASHES as GMAC tags instead of truncated SHA-256.
 */
export const PROTOCOL_VERSION = 3;
/** Bytes of the frame header: length (4) and type (1). */
export const FRAME_HEADER_BYTES = 5;
/** Largest DATA payload; larger spans go as several frames. */
export const MAX_DATA_BYTES = 1024 * 1024;
/** Largest frame accepted (type + payload): a DATA frame of MAX_DATA_BYTES plus its header. */
export const MAX_FRAME_BYTES = MAX_DATA_BYTES + 64;
/** Bytes of each hash on the wire: SHA-256 truncated to 128 bits. */
export const WIRE_HASH_BYTES = 16;
/** Largest range one HASH_REQ or DATA_REQ may cover. */
export const MAX_REQUEST_BYTES = 64 * 1024 * 1024;
/** Most hashes one HASHES reply may carry (keeps it under MAX_FRAME_BYTES). */
export const MAX_HASHES_PER_REPLY = 16384;
/** Smallest hash unit the agent accepts. */
export const MIN_HASH_UNIT = 512;

export const FrameType = {
  /** c→a: u16 version, JSON Hello. */
  HELLO: 0x01,
  /** a→c: JSON Ready. */
  READY: 0x02,
  /** a→c: JSON WireError; the agent exits after it. */
  ERROR: 0x03,
  /** a→c, unasked: u64 offset, u32 unit, hashes of consecutive units of the whole image. */
  TOP_HASHES: 0x10,
  /** c→a: u64 offset, u32 length, u32 unit: hash each unit of the range. */
  HASH_REQ: 0x11,
  /** a→c: the reply to one HASH_REQ, same layout as TOP_HASHES. */
  HASHES: 0x12,
  /** both ways: u64 offset, u32 raw length, u8 encoding, bytes. */
  DATA: 0x20,
  /** c→a: u64 offset, u32 length: send these bytes (pull). */
  DATA_REQ: 0x21,
  /** a→c: u64 bytes written so far (push), after each DATA frame. */
  WRITTEN: 0x22,
  /** c→a: no payload: finish (fsync) and report. */
  DONE: 0x30,
  /** a→c: JSON Summary. */
  SUMMARY: 0x31,
  /** a→c, unasked, only from an agent running a direct copy: JSON Progress (src/types.ts). */
  PROGRESS: 0x32,
  /**
   * a→c, after DONE and before SUMMARY, only from a target asked to `verify`: the digests of
   * what it wrote as read back from DST, READ_BACK_RECORD_BYTES each.
   */
  READ_BACK: 0x33,
  /**
   * a→c, empty: the agent is alive and working (a long fsync, hashing a large range); sent
   * every HELLO `keepalive` seconds while nothing else was, so blksync's --timeout, which
   * counts time with nothing received, spares a slow but live agent.
   */
  KEEPALIVE: 0x34,
} as const;
export type FrameType = (typeof FrameType)[keyof typeof FrameType];

export const Encoding = {
  RAW: 0,
  DEFLATE_RAW: 1,
} as const;
export type Encoding = (typeof Encoding)[keyof typeof Encoding];

export type Role = 'target' | 'source';

/** What blksync asks of the agent. */
export interface Hello {
  /** target: write the image at `path` (push); source: read it (pull). */
  role: Role;
  path: string;
  /** target: bytes of the image that will be written (SRC's size). */
  size?: number;
  dryRun?: boolean;
  /** Stream TOP_HASHES of this unit (0: none, as for --full). */
  topUnit: number;
  /** Encodings blksync can read and write besides raw, in order of preference. */
  encodings: string[];
  /**
   * The TOP_HASHES function: TOP_HASH_GMAC with `key`, TOP_HASH_BLOCKS with `topBlock` (a
   * unit's block digest, which an index of the other side knows), or (absent) truncated
   * SHA-256.
   */
  topHash?: string;
  /** TOP_HASH_BLOCKS: the block size of the digest (a power of two dividing topUnit). */
  topBlock?: number;
  /** Hex AES-128 key for TOP_HASH_GMAC, random per session, never stored. */
  key?: string;
  /**
   * source (--raw): send `path` as it is even when it is a container (zip, qcow2, ...), which
   * is otherwise refused; a compressed file is refused all the same.
   */
  raw?: boolean;
  /**
   * TOP_HASH_GMAC (with `key`): HASHES carry GMAC tags under `key`, as TOP_HASHES do, instead
   * of truncated SHA-256: ~6× less CPU on both ends where whole ranges are compared by
   * HASH_REQ (a bmap's mapped pieces). Not with `index`, whose tables hold SHA-256.
   */
  reqHash?: string;
  /**
   * target: report the file's identity in READY and, after DONE has synced all of it (not
   * only this run's writes), in SUMMARY: blksync keeps an index of it (--index).
   */
  identity?: boolean;
  /**
   * source: copy `path` straight to another host (--direct). The agent starts a target agent
   * there over ssh itself, runs the copy as a push would, and reports PROGRESS and, after
   * DONE, the outcome in SUMMARY's `direct`. No DATA passes through blksync.
   */
  direct?: DirectHello;
  /**
   * target: keep an index of `path` beside it (--index host:FILE, or the remote's cache for
   * "auto"); see agent-index.ts. READY says whether it is used; SUMMARY reports it.
   */
  index?: IndexHello;
  /**
   * source (--src-index): keep an index of `path` (the file SRC) on its host, in `topBlock`
   * blocks (TOP_HASH_BLOCKS only), trusted as a local copy trusts an index of SRC
   * (engine/source-index.ts). Used, it answers TOP_HASHES and HASH_REQ in its blocks without
   * reading SRC; absent or stale, it is made from the TOP_HASHES scan and written at DONE.
   */
  sourceIndex?: SourceIndexHello;
  /**
   * target (--verify): record the ranges written; at DONE, after the fsync, read them back
   * bypassing the page cache and send their digests (READ_BACK) before SUMMARY.
   */
  verify?: boolean;
  /**
   * Seconds between KEEPALIVE frames while the agent has nothing else to send (blksync asks
   * for a fraction of its --timeout); absent: none.
   */
  keepalive?: number;
  /**
   * Write a timeline (trace.ts) on stderr, which blksync puts on its own (BLKSYNC_TRACE=1);
   * a debugging aid with no effect on the copy.
   */
  trace?: boolean;
}

/** An index of SRC the source agent keeps (--src-index host:FILE or auto). */
export interface SourceIndexHello {
  /** The index file on SRC's host, or "auto": its cache, keyed by SRC's identity. */
  path: string;
  /** --rebuild-index: an explicit FILE made for another file, or unreadable, is replaced. */
  rebuild: boolean;
  /** Blocks of SRC checked against the index before trusting it. */
  verifySample: number;
}

/** An index the target agent keeps of its file. */
export interface IndexHello {
  /** The index file on the agent's host, or "auto": its cache, keyed by the file's identity. */
  path: string;
  /** Block size of an index made now; one being used keeps its own. */
  blockSize: number;
  /** -b was given: an index of another block size is refused (or rebuilt). */
  blockSizeGiven: boolean;
  /** The chunk blksync compares in (the top unit); the index's blocks must divide it. */
  chunkSize: number;
  rebuild: boolean;
  /** --trust-index: the user vouches for the index although nothing else does. */
  trust?: boolean;
  /** Blocks of the file checked against the index before trusting it. */
  verifySample: number;
  full: boolean;
  /**
   * When the index is used, stream TOP_HASHES (of `topUnit`) as block digests (blockDigest)
   * from the index instead of not at all: one hash per unit, not one per block, on the wire.
   */
  topDigest?: boolean;
}

/** What a target agent did with its index (the fields of a local copy's IndexReport). */
export type IndexWireReport = IndexReport;

/** What a source agent needs to copy its file straight to another host. */
export interface DirectHello {
  /** ssh's destination for the other host (`host` or `user@host`), as blksync was given it. */
  destination: string;
  path: string;
  /** blksync's --ssh, --remote-node and --sudo, used from the source host. */
  ssh?: string;
  remoteNode?: string;
  sudo?: boolean;
  blockSize: number;
  /** The top unit and pipeline chunk; a multiple of blockSize. */
  chunkSize: number;
  dryRun?: boolean;
  full?: boolean;
  /** --verify: the target agent reads back what it wrote; the source agent compares. */
  verify?: boolean;
  /** --index host:FILE or auto: the target agent keeps an index of its file (IndexHello). */
  index?: IndexHello;
  /** blksync's --timeout, for the source agent's own link to the target agent. */
  timeout?: number;
}

/** What a direct copy did, reported by the source agent in SUMMARY. */
export interface DirectReport {
  /** The copy was stopped before the end (blksync went away). */
  interrupted: boolean;
  bytesScanned: number;
  blocksDiffering: number;
  bytesDiffering: number;
  rangesWritten: number;
  /** The first ranges written (or that would be, in a dry run). */
  ranges: Range[];
  /** Bytes of SRC the source agent read. */
  bytesReadSource: number;
  /** The target agent's own summary (bytes written, DST bytes read, CPU). */
  target: Summary;
  /** The ssh channel between the two hosts, as the source agent counted it. */
  bytesSent: number;
  bytesReceived: number;
  /** --verify: what the target agent read back and the source agent found equal. */
  verify?: { bytesVerified: number; ranges: number; direct: boolean; seconds: number };
}

export interface Ready {
  version: number;
  /** Size of the remote file or device. */
  size: number;
  kind: 'file' | 'block-device';
  /** target: the file did not exist (it was created, or would be in a dry run). */
  created: boolean;
  /** target: the image range reads as zeros (just created or was empty); no TOP_HASHES. */
  zero: boolean;
  /** Chosen encoding ('' for raw only). */
  encoding: string;
  node: string;
  /** target with `identity` asked for, when the file exists: what an index is keyed by. */
  identity?: TargetIdentity;
  /** source with `direct`: the READY of the target agent it started on the other host. */
  target?: Ready;
  /**
   * target with `index`: whether it is used (HASH_REQ in its blocks is then answered from it
   * and no TOP_HASHES are sent) or made, its path (resolved for "auto") and block size.
   */
  index?: {
    mode: IndexReport['mode'];
    path: string;
    blockSize: number;
    /** TOP_HASHES are block digests in `blockSize` blocks (asked with topDigest, index used). */
    digests?: boolean;
  };
  /** source with `sourceIndex`: what the agent does with SRC's index (used, created, rebuilt). */
  sourceIndex?: SourceIndexReport;
}

export interface WireError {
  code: string;
  message: string;
  path?: string;
}

export interface Summary {
  /** Raw bytes of DATA written (target) or sent (source). */
  bytes: number;
  frames: number;
  /** Hex SHA-256 over every DATA frame in stream order: offset u64 ‖ length u32 ‖ raw bytes. */
  digest: string;
  /** Bytes the agent read from its file. */
  bytesRead: number;
  /** CPU seconds (user + system) the agent has used. */
  cpuSeconds?: number;
  /** target with `identity` asked for: the file's identity after the final sync. */
  identity?: TargetIdentity;
  /** source with `direct`: what the direct copy did. */
  direct?: DirectReport;
  /** target with `index`: what was done with it. */
  index?: IndexWireReport;
  /** target with `verify`: how the written ranges were read back (READ_BACK has the digests). */
  verify?: { direct: boolean; bytesRead: number; seconds: number };
  /** source with `sourceIndex`: why the index READY said it would make was not written. */
  sourceIndexNotWritten?: string;
}

/** Bytes of one READ_BACK record: u64 start, u64 end, u64 bytes, SHA-256. */
export const READ_BACK_RECORD_BYTES = 56;
/** Records per READ_BACK frame (under MAX_FRAME_BYTES). */
export const READ_BACK_RECORDS_PER_FRAME = 16384;

/** READ_BACK frames carrying `digests`, at most READ_BACK_RECORDS_PER_FRAME each. */
export function readBackFrames(digests: readonly WrittenDigest[]): Buffer[] {
  const frames: Buffer[] = [];
  for (let i = 0; i < digests.length; i += READ_BACK_RECORDS_PER_FRAME) {
    const batch = digests.slice(i, i + READ_BACK_RECORDS_PER_FRAME);
    const body = Buffer.allocUnsafe(batch.length * READ_BACK_RECORD_BYTES);
    batch.forEach((d, k) => {
      const at = k * READ_BACK_RECORD_BYTES;
      writeU64(body, d.start, at);
      writeU64(body, d.end, at + 8);
      writeU64(body, d.bytes, at + 16);
      Buffer.from(d.sha256, 'hex').copy(body, at + 24);
    });
    frames.push(frame(FrameType.READ_BACK, body));
  }
  return frames;
}

/** The records of one READ_BACK payload; undefined if it is malformed. */
export function parseReadBack(p: Buffer): WrittenDigest[] | undefined {
  if (p.length === 0 || p.length % READ_BACK_RECORD_BYTES !== 0) return undefined;
  const out: WrittenDigest[] = [];
  for (let at = 0; at < p.length; at += READ_BACK_RECORD_BYTES) {
    const start = readU64(p, at);
    const end = readU64(p, at + 8);
    const bytes = readU64(p, at + 16);
    if (start === undefined || end === undefined || bytes === undefined) return undefined;
    out.push({ start, end, bytes, sha256: p.toString('hex', at + 24, at + 56) });
  }
  return out;
}

const nodeHash = (crypto as { hash?: (alg: string, data: Buffer, enc: 'buffer') => Buffer }).hash;

/** SHA-256 truncated to WIRE_HASH_BYTES; crypto.hash where it exists (Node >= 20.12), else createHash. */
export function wireHash(data: Buffer): Buffer {
  const full =
    nodeHash !== undefined
      ? nodeHash('sha256', data, 'buffer')
      : createHash('sha256').update(data).digest();
  return full.subarray(0, WIRE_HASH_BYTES);
}

/**
 * A unit's block digest: the wire hash of its blocks' wire hashes, back to back (as
 * unitHashes lays them out). An index knows it without the blocks' bytes, so a used index
 * can answer for a whole chunk with 16 bytes.
 */
export function blockDigest(blockHashes: Buffer): Buffer {
  return wireHash(blockHashes);
}

/**
 * Hashes each `unit` of `data[0, length)` into one buffer (the last unit may be short), with
 * `hash` (the wire hash unless HELLO's `reqHash` chose another).
 */
export function unitHashes(
  data: Buffer,
  length: number,
  unit: number,
  hash: TopHasher = wireHash,
): Buffer {
  const n = Math.ceil(length / unit);
  const out = Buffer.allocUnsafe(n * WIRE_HASH_BYTES);
  for (let i = 0; i < n; i++) {
    hash(data.subarray(i * unit, Math.min((i + 1) * unit, length))).copy(out, i * WIRE_HASH_BYTES);
  }
  return out;
}

/**
 * The top level's hash: GMAC (AES-128-GCM over the data as associated data, fixed IV) under a
 * key blksync draws at random for each session and sends only inside the ssh channel. Two
 * different inputs of n 16-byte blocks get the same tag only if the secret GHASH key is a
 * root of their difference polynomial: probability ≤ n / 2^128 (≤ 2^-110 for 4 MiB) for any
 * contents not chosen with knowledge of the key. It runs ~4× faster than SHA-256 with AES-NI
 * and PCLMUL, and the top level hashes every byte of both sides, so it sets the pace.
 */
export const TOP_HASH_GMAC = 'gmac-aes128';
/** Bytes of a TOP_HASH_GMAC key. */
export const GMAC_KEY_BYTES = 16;
const GMAC_IV = Buffer.alloc(12);

/** TOP_HASHES as block digests (blockDigest) in `topBlock` blocks: for a pull with an index. */
export const TOP_HASH_BLOCKS = 'sha256-blocks';

export type TopHasher = (data: Buffer) => Buffer;

/** The TOP_HASH_BLOCKS hasher: a unit's block digest in `block` blocks. */
export function blockDigestHasher(block: number): TopHasher {
  return (data) => blockDigest(unitHashes(data, data.length, block));
}

/** The top-level hash for a session: GMAC under `key`, or truncated SHA-256 without one. */
export function topHasher(key: Buffer | undefined): TopHasher {
  if (key === undefined) return wireHash;
  return (data) => {
    const c = createCipheriv('aes-128-gcm', key, GMAC_IV);
    c.setAAD(data);
    c.final();
    return c.getAuthTag();
  };
}

/** Lengths whose zero hash is kept (units, the last short one, a bmap's pieces). */
const ZERO_MEMO_ENTRIES = 256;

/** Memoizes a hasher's value for all-zero inputs by length (new files read as zeros). */
export function zeroHasher(hasher: TopHasher | typeof wireHash): (length: number) => Buffer {
  const memo = new Map<number, Buffer>();
  let zeros = Buffer.alloc(0);
  return (length) => {
    let h = memo.get(length);
    if (h === undefined) {
      // a peer choosing many lengths must not grow it without bound
      if (memo.size >= ZERO_MEMO_ENTRIES) memo.clear();
      if (zeros.length < length) zeros = Buffer.alloc(length);
      h = hasher(zeros.subarray(0, length));
      memo.set(length, h);
    }
    return h;
  };
}

/**
 * `hasher` with a shortcut for all-zero input: a hole (or a never-written area) reads as
 * zeros, and a memcmp against zeros (~30 GB/s) then the memoized hash of zeros gives the very
 * value `hasher` would, where hashing costs 6-10× more. Data that is not zero fails the
 * memcmp at its first nonzero byte, so the check costs nothing there.
 */
export function skippingZeros(hasher: TopHasher): TopHasher {
  const zero = zeroHasher(hasher);
  return (data) => (isZero(data) ? zero(data.length) : hasher(data));
}

/** Bytes compared against zeros at a time. */
const ZERO_SLICE_BYTES = 1024 * 1024;
let zeroSlice: Buffer | undefined;

/** Whether every byte of `data` is zero (memcmp against a slice of zeros). */
export function isZero(data: Buffer): boolean {
  zeroSlice ??= Buffer.alloc(ZERO_SLICE_BYTES);
  for (let at = 0; at < data.length; at += ZERO_SLICE_BYTES) {
    const n = Math.min(ZERO_SLICE_BYTES, data.length - at);
    if (data.compare(zeroSlice, 0, n, at, at + n) !== 0) return false;
  }
  return true;
}

export function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / 2 ** 32), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

/** Reads a u64 BE; undefined above 2^53 (no safe offset is that large). */
export function readU64(buf: Buffer, at: number): number | undefined {
  const hi = buf.readUInt32BE(at);
  if (hi >= 2 ** 21) return undefined;
  return hi * 2 ** 32 + buf.readUInt32BE(at + 4);
}

/** A whole frame, header included, ready to write. */
export function frame(type: FrameType, ...parts: Buffer[]): Buffer {
  const length = 1 + parts.reduce((n, p) => n + p.length, 0);
  const head = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
  head.writeUInt32BE(length, 0);
  head[4] = type;
  return Buffer.concat([head, ...parts], FRAME_HEADER_BYTES + length - 1);
}

export function jsonFrame(type: FrameType, value: unknown): Buffer {
  return frame(type, Buffer.from(JSON.stringify(value), 'utf8'));
}

export function helloFrame(hello: Hello): Buffer {
  const v = Buffer.allocUnsafe(2);
  v.writeUInt16BE(PROTOCOL_VERSION, 0);
  return frame(FrameType.HELLO, v, Buffer.from(JSON.stringify(hello), 'utf8'));
}

/** u64 offset ‖ u32 a ‖ u32 b: the layout of HASH_REQ (length, unit). */
export function rangeHeader(offset: number, a: number, b?: number): Buffer {
  const head = Buffer.allocUnsafe(b === undefined ? 12 : 16);
  writeU64(head, offset, 0);
  head.writeUInt32BE(a, 8);
  if (b !== undefined) head.writeUInt32BE(b, 12);
  return head;
}

/** u64 offset ‖ u32 raw length ‖ u8 encoding: the head of a DATA payload. */
export function dataHeader(offset: number, rawLength: number, encoding: Encoding): Buffer {
  const head = Buffer.allocUnsafe(13);
  writeU64(head, offset, 0);
  head.writeUInt32BE(rawLength, 8);
  head[12] = encoding;
  return head;
}

export interface Frame {
  type: number;
  payload: Buffer;
}

export class ProtocolError extends Error {}

/**
 * Splits a byte stream into frames. A length of zero or above MAX_FRAME_BYTES is refused
 * before any of the frame is buffered.
 */
export class FrameDecoder {
  #chunks: Buffer[] = [];
  #buffered = 0;

  /** Appends `chunk` and returns the frames now complete. Throws ProtocolError. */
  push(chunk: Buffer): Frame[] {
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
    const frames: Frame[] = [];
    for (;;) {
      if (this.#buffered < FRAME_HEADER_BYTES) break;
      const head = this.#peek(FRAME_HEADER_BYTES);
      const length = head.readUInt32BE(0);
      if (length === 0 || length > MAX_FRAME_BYTES) {
        throw new ProtocolError(`frame length ${length} out of bounds (1..${MAX_FRAME_BYTES})`);
      }
      if (this.#buffered < 4 + length) break;
      const whole = this.#take(4 + length);
      frames.push({ type: whole[4]!, payload: whole.subarray(5) });
    }
    return frames;
  }

  /** Bytes buffered that do not yet make a whole frame. */
  get pending(): number {
    return this.#buffered;
  }

  #peek(n: number): Buffer {
    const first = this.#chunks[0]!;
    if (first.length >= n) return first;
    const joined = Buffer.concat(this.#chunks);
    this.#chunks = [joined];
    return joined;
  }

  #take(n: number): Buffer {
    const joined = this.#peek(n);
    const out = joined.subarray(0, n);
    const rest = joined.subarray(n);
    this.#chunks = rest.length > 0 ? [rest] : [];
    this.#buffered -= n;
    return out;
  }
}
