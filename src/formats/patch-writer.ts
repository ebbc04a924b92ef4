/**
 * Writes a patch as a Sink: the pipeline hands it the differing spans of NEW in ascending
 * order, each with what BASE held there (its bytes, or its per-block hashes when BASE is an
 * index); neighbouring spans are coalesced into records of at most WRITE_RECORD_BYTES, and
 * the trailer (record count and SHA-256 of everything before it) is written by finish().
 * Output is a plain byte stream, so the patch can go to stdout as it is made.
 *
 * The blocks between records come through unchanged(), as their hashes, once per chunk and
 * before the chunk's differing spans: each record carries the hash list of the gap before
 * it, the trailer that of the last gap. Together the records and the gaps must tile the
 * image up to the smaller size, or the writer fails rather than leave bytes unchecked.
 */

import type { Writable } from 'node:stream';
import type { Sink } from '../types.js';
import { BlksyncError } from '../errors.js';
import { HASH_BYTES, sha256, sha256Stream } from '../hash.js';
import { HashList } from './hash-list.js';
import {
  clipped,
  encodeHeader,
  encodeRecordHeader,
  encodeTrailer,
  RECORD_NEW_COMPRESSED,
  RECORD_OLD_COMPRESSED,
  sharedEnd,
  WRITE_RECORD_BYTES,
  type PatchHeader,
} from './patch.js';
import { compressPayload } from './patch-compression.js';

/** What BASE held where a span goes: its bytes (clipped to the base size) or its block hashes. */
export type OldContent = { bytes: Buffer } | { blockHashes: Buffer };

/**
 * Bytes base and result share at `offset`: the hashes of their pieces (formats/hash-list.ts,
 * pieceHashes, cut at multiples of the header's gap unit), or zeros (`hashes` unset).
 */
export interface Unchanged {
  offset: number;
  bytes: number;
  hashes?: Buffer | undefined;
}

export interface PatchStats {
  records: number;
  /** Unpacked bytes of new and old content in the records. */
  newBytes: number;
  oldBytes: number;
  /** Bytes of payload as stored (after compression). */
  payloadBytes: number;
  /** Bytes of the whole patch. */
  patchBytes: number;
}

function blockHashesOf(data: Buffer, blockSize: number): Buffer {
  const out = Buffer.allocUnsafe(Math.ceil(data.length / blockSize) * HASH_BYTES);
  for (let s = 0, i = 0; s < data.length; s += blockSize, i += HASH_BYTES) {
    sha256(data, s, Math.min(s + blockSize, data.length)).copy(out, i);
  }
  return out;
}

/** Bytes a and b share at their start (at most n). */
function sharedHead(a: Buffer, b: Buffer, n: number): number {
  let i = 0;
  while (i + 64 <= n && a.compare(b, i, i + 64, i, i + 64) === 0) i += 64;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

/** Bytes a and b (of equal length) share at their end, at most n. */
function sharedTail(a: Buffer, b: Buffer, n: number): number {
  const len = a.length;
  let i = 0;
  while (i + 64 <= n && a.compare(b, len - i - 64, len - i, len - i - 64, len - i) === 0) i += 64;
  while (i < n && a[len - 1 - i] === b[len - 1 - i]) i++;
  return i;
}

interface Pending {
  offset: number;
  end: number;
  newData: Buffer;
  newLength: number;
  oldData: Buffer;
  oldLength: number;
  /** False when some of BASE's content came as hashes only: then nothing can be trimmed. */
  oldKnown: boolean;
  newHashes: Buffer[];
  oldHashes: Buffer[];
  /** Hash list of the unchanged bytes between the previous record and this one. */
  gapHash: Buffer;
}

export class PatchWriter implements Sink {
  readonly header: PatchHeader;
  readonly #out: Writable;
  readonly #end: boolean;
  readonly #hash = sha256Stream();
  readonly #recordLimit: number;
  #pending: Pending | undefined;
  /** The pending record's bytes; reused, so what is handed to the stream is always a copy. */
  #scratchNew: Buffer | undefined;
  #scratchOld: Buffer | undefined;
  #error: Error | undefined;
  /** Unchanged bytes of the latest chunk, not yet known to precede no record. */
  #unchanged: Unchanged[] = [];
  /** The gap being hashed (from its first unchanged bytes), and the image offset up to which records and gaps are accounted. */
  #gap: HashList | undefined;
  #cursor = 0;
  #started = false;
  #finished = false;
  readonly stats: PatchStats = {
    records: 0,
    newBytes: 0,
    oldBytes: 0,
    payloadBytes: 0,
    patchBytes: 0,
  };

  /** `end`: end the stream in finish() (false for stdout, which the CLI owns). */
  constructor(header: PatchHeader, out: Writable, options: { end: boolean }) {
    this.header = header;
    this.#out = out;
    this.#end = options.end;
    this.#recordLimit = Math.max(WRITE_RECORD_BYTES, header.blockSize);
    out.on('error', (err: Error) => {
      this.#error ??= err;
    });
  }

  async #emit(buf: Buffer): Promise<void> {
    if (this.#error !== undefined) throw this.#writeError(this.#error);
    this.#hash.update(buf);
    this.stats.patchBytes += buf.length;
    if (!this.#out.write(buf)) {
      await new Promise<void>((resolve) => {
        const done = (): void => {
          this.#out.off('drain', done);
          this.#out.off('error', done);
          this.#out.off('close', done);
          resolve();
        };
        this.#out.on('drain', done);
        this.#out.on('error', done);
        this.#out.on('close', done);
      });
      if (this.#error !== undefined) throw this.#writeError(this.#error);
    }
  }

  #writeError(err: Error): BlksyncError {
    // the output's own error (io/output-file.ts) already says what and where
    if (err instanceof BlksyncError) return err;
    const code = (err as NodeJS.ErrnoException).code;
    return new BlksyncError(
      'EWRITE',
      code === 'EPIPE'
        ? 'cannot write the patch: the reader of the pipe went away (EPIPE)'
        : `cannot write the patch: ${err.message}`,
      { cause: err },
    );
  }

  async #start(): Promise<void> {
    if (this.#started) return;
    this.#started = true;
    await this.#emit(encodeHeader(this.header));
  }

  /**
   * The unchanged bytes of one chunk, in order, before its differing spans are added. The
   * previous chunk's spans have all been added by then, so what it left unchanged after its
   * last span belongs to the gap being hashed.
   */
  unchanged(parts: readonly Unchanged[]): void {
    this.#takeUnchanged(Infinity);
    this.#unchanged = [...parts];
  }

  /** Moves the unchanged bytes before `pos` into the gap being hashed. */
  #takeUnchanged(pos: number): void {
    const end = sharedEnd(this.header);
    while (this.#unchanged.length > 0 && this.#unchanged[0]!.offset < pos) {
      const u = this.#unchanged.shift()!;
      if (u.offset !== this.#cursor || u.offset + u.bytes > end) {
        throw new Error(
          `PatchWriter: unchanged bytes at [${u.offset}, ${u.offset + u.bytes}) where ${this.#cursor} was next (shared end ${end})`,
        );
      }
      this.#gap ??= new HashList(this.header.gapUnit, u.offset);
      if (u.hashes === undefined) this.#gap.addZeros(u.offset + u.bytes);
      else this.#gap.add(u.hashes, u.offset + u.bytes);
      this.#cursor += u.bytes;
    }
  }

  /** The hash of the gap ending at `pos` (where a record starts), and a new gap after it. */
  #cutGap(pos: number): Buffer {
    this.#takeUnchanged(pos);
    if (this.#cursor !== pos) {
      throw new Error(
        `PatchWriter: bytes [${this.#cursor}, ${pos}) are neither changed nor unchanged`,
      );
    }
    // an empty gap's list is empty: the hash of nothing
    const hash = (this.#gap ?? new HashList(this.header.gapUnit, pos)).digest();
    this.#gap = undefined;
    return hash;
  }

  /** Sink.write without old content: only for spans past the end of BASE. */
  write(data: Buffer, offset: number): Promise<void> {
    return this.add(offset, data.length, data, { bytes: Buffer.alloc(0) });
  }

  /**
   * Adds the span [offset, offset + length): `newData` is NEW's bytes there (clipped to the
   * result size), `old` what BASE held there. Spans come in ascending order, block-aligned.
   */
  async add(offset: number, length: number, newData: Buffer, old: OldContent): Promise<void> {
    await this.#start();
    const h = this.header;
    for (let at = 0; at < length;) {
      const p = this.#pending;
      const pos = offset + at;
      if (p !== undefined && (p.end !== pos || p.end - p.offset >= this.#recordLimit)) {
        await this.#flush();
      }
      const room =
        this.#recordLimit - (this.#pending ? this.#pending.end - this.#pending.offset : 0);
      const take = Math.min(length - at, room);
      const q = (this.#pending ??= {
        gapHash: this.#cutGap(pos),
        offset: pos,
        end: pos,
        newData: (this.#scratchNew ??= Buffer.allocUnsafe(this.#recordLimit)),
        newLength: 0,
        oldData: (this.#scratchOld ??= Buffer.allocUnsafe(this.#recordLimit)),
        oldLength: 0,
        oldKnown: true,
        newHashes: [],
        oldHashes: [],
      });
      const newPart = newData.subarray(at, at + clipped(pos, take, h.resultSize));
      newPart.copy(q.newData, q.newLength);
      q.newLength += newPart.length;
      q.newHashes.push(blockHashesOf(newPart, h.blockSize));
      const oldLen = clipped(pos, take, h.baseSize);
      if ('bytes' in old) {
        const oldPart = old.bytes.subarray(at, at + oldLen);
        if (oldPart.length !== oldLen)
          throw new Error('PatchWriter: old content shorter than the span');
        q.oldHashes.push(blockHashesOf(oldPart, h.blockSize));
        oldPart.copy(q.oldData, q.oldLength);
        q.oldLength += oldLen;
      } else {
        q.oldKnown = false;
        if (h.reversible) throw new Error('PatchWriter: a reversible patch needs the old bytes');
        const first = (at / h.blockSize) * HASH_BYTES;
        q.oldHashes.push(
          old.blockHashes.subarray(first, first + Math.ceil(oldLen / h.blockSize) * HASH_BYTES),
        );
      }
      q.end = pos + take;
      this.#cursor = q.end;
      at += take;
    }
  }

  async #pack(data: Buffer, flag: number): Promise<[Buffer, number]> {
    if (this.header.compression === 'none' || data.length === 0) return [Buffer.from(data), 0];
    const packed = await compressPayload(this.header.compression, data);
    return packed.length < data.length ? [packed, flag] : [Buffer.from(data), 0];
  }

  async #flush(): Promise<void> {
    const p = this.#pending;
    if (p === undefined) return;
    this.#pending = undefined;
    const newData = p.newData.subarray(0, p.newLength);
    const oldData = p.oldData.subarray(0, p.oldLength);
    // leave out the bytes old and new share at the record's edges: apply takes them from TARGET
    const both = Math.min(newData.length, oldData.length);
    const head = p.oldKnown ? sharedHead(newData, oldData, both) : 0;
    const tail =
      p.oldKnown && newData.length === oldData.length
        ? sharedTail(newData, oldData, both - head)
        : 0;
    const newPayload = newData.subarray(head, newData.length - tail);
    const oldPayload = this.header.reversible
      ? oldData.subarray(head, oldData.length - tail)
      : Buffer.alloc(0);
    const [newStored, newFlag] = await this.#pack(newPayload, RECORD_NEW_COMPRESSED);
    const [oldStored, oldFlag] = await this.#pack(oldPayload, RECORD_OLD_COMPRESSED);
    await this.#emit(
      encodeRecordHeader({
        offset: p.offset,
        length: p.end - p.offset,
        flags: newFlag | oldFlag,
        newStored: newStored.length,
        oldStored: oldStored.length,
        head,
        tail,
        oldHash: sha256(Buffer.concat(p.oldHashes)),
        newHash: sha256(Buffer.concat(p.newHashes)),
        gapHash: p.gapHash,
      }),
    );
    await this.#emit(newStored);
    if (oldStored.length > 0) await this.#emit(oldStored);
    this.stats.records++;
    this.stats.newBytes += newData.length;
    this.stats.oldBytes += this.header.reversible ? oldData.length : 0;
    this.stats.payloadBytes += newStored.length + oldStored.length;
  }

  /** Writes the last record and the trailer and ends the output. */
  async finish(): Promise<void> {
    if (this.#finished) return;
    this.#finished = true;
    await this.#start();
    await this.#flush();
    const last = this.#cutGap(Math.max(this.#cursor, sharedEnd(this.header)));
    if (this.#unchanged.length > 0) {
      throw new Error(
        `PatchWriter: unchanged bytes at ${this.#unchanged[0]!.offset} after the last record`,
      );
    }
    await this.#emit(encodeTrailer(this.stats.records, last));
    const digest = this.#hash.digest();
    this.stats.patchBytes += digest.length;
    await new Promise<void>((resolve, reject) => {
      const fail = (err: Error): void => reject(this.#writeError(err));
      if (this.#end) {
        this.#out.once('error', fail);
        // end's callback is also told of a failed last write (ENOSPC on /dev/full)
        this.#out.end(digest, (err?: Error | null) => (err ? fail(err) : resolve()));
      } else {
        this.#out.write(digest, (err) => (err ? fail(err) : resolve()));
      }
    });
  }

  /** Stops without a trailer (interrupted or failed): what was written is refused by readers. */
  abort(): void {
    this.#finished = true;
    if (this.#end) this.#out.destroy();
  }
}
