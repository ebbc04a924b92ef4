/**
 * Reads a patch sequentially (from a file or stdin), checking as it goes: the header CRC,
 * each record header's CRC and bounds (before any payload is read or allocated), each
 * payload's size and content hash, and at the end the record count and the SHA-256 of the
 * whole patch. Nothing read here is trusted before it is checked.
 */

import { BlksyncError } from '../errors.js';
import { HASH_BYTES, sha256Stream } from '../hash.js';
import type { SequentialReader } from '../io/stream-source.js';
import {
  contentHash,
  decodeHeader,
  decodeRecordHeader,
  decodeTrailer,
  HEADER_BYTES,
  recordHeaderBytes,
  RECORD_NEW_COMPRESSED,
  RECORD_OLD_COMPRESSED,
  RECORD_TAG,
  recordSizes,
  sharedEnd,
  TRAILER_TAG,
  trailerBytes,
  type PatchHeader,
  type RecordHeader,
} from './patch.js';
import { decompressPayload } from './patch-compression.js';

/** What to do with payloads: skip them (info), check them, or check and keep them (stdin). */
export type PayloadMode = 'skip' | 'verify' | 'keep';

export interface PatchRecord extends RecordHeader {
  /** Bytes of new and old content (clipped to the result and base sizes). */
  newBytes: number;
  oldBytes: number;
  /** Bytes of the payloads once unpacked: the content less the shared head and tail. */
  newPayload: number;
  oldPayload: number;
  /** Where the gap the record's gapHash covers starts: the previous record's end, or 0. */
  gapStart: number;
  /** Where each stored payload starts in the patch. */
  newPos: number;
  oldPos: number;
  /** Unpacked payloads (without the shared edges), in 'keep' mode. */
  newData?: Buffer;
  oldData?: Buffer;
}

/** Unchanged bytes of the image, [start, end), and the hash list of what base and result hold there. */
export interface Gap {
  start: number;
  end: number;
  hash: Buffer;
}

export class PatchReader {
  readonly #in: SequentialReader;
  readonly #hash = sha256Stream();
  #header: PatchHeader | undefined;
  #count = 0;
  #prevEnd = 0;
  #done = false;
  /** The gap after the last record (version 2), once the trailer has been read. */
  lastGap: Gap | undefined;

  constructor(input: SequentialReader) {
    this.#in = input;
  }

  get recordsRead(): number {
    return this.#count;
  }

  /** Bytes of the patch consumed so far. */
  get position(): number {
    return this.#in.position;
  }

  async #read(n: number, what: string): Promise<Buffer> {
    const buf = await this.#in.read(n);
    if (buf.length < n) {
      throw new BlksyncError(
        'EPATCH_TRUNCATED',
        `the patch ${this.#in.path} ends after ${this.#in.position} bytes, in the middle of ${what}; ` +
          'it was cut short (an interrupted diff or copy?): use the complete patch',
        { path: this.#in.path },
      );
    }
    this.#hash.update(buf);
    return buf;
  }

  async header(): Promise<PatchHeader> {
    this.#header ??= decodeHeader(await this.#read(HEADER_BYTES, 'the header'));
    return this.#header;
  }

  /**
   * The next record, or undefined after the trailer has been read and the patch's count and
   * checksum verified.
   */
  async next(mode: PayloadMode): Promise<PatchRecord | undefined> {
    const h = await this.header();
    if (this.#done) return undefined;
    const tag = await this.#read(4, 'a record');
    if (tag.equals(TRAILER_TAG)) {
      await this.#trailer(tag);
      return undefined;
    }
    if (!tag.equals(RECORD_TAG)) {
      throw new BlksyncError(
        'EPATCH_FORMAT',
        `not a valid blksync patch: expected a record or the trailer at byte ${this.#in.position - 4}`,
      );
    }
    const rest = await this.#read(recordHeaderBytes(h.version) - 4, 'a record header');
    const r = decodeRecordHeader(Buffer.concat([tag, rest]), h, this.#prevEnd);
    const gapStart = this.#prevEnd;
    this.#prevEnd = r.offset + r.length;
    const sizes = recordSizes(r, h);
    const rec: PatchRecord = {
      ...r,
      newBytes: sizes.newBytes,
      oldBytes: sizes.oldBytes,
      newPayload: sizes.newPayload,
      oldPayload: sizes.oldPayload,
      gapStart,
      newPos: this.#in.position,
      oldPos: this.#in.position + r.newStored,
    };
    const newStored = await this.#read(r.newStored, 'a payload');
    const oldStored = await this.#read(r.oldStored, 'a payload');
    if (mode !== 'skip') {
      // a payload without shared edges is the whole content: check it now; one with edges
      // is checked by apply once it has TARGET's edges
      const whole = r.head === 0 && r.tail === 0;
      const newData = await unpack(
        h,
        newStored,
        (r.flags & RECORD_NEW_COMPRESSED) !== 0,
        rec.newPayload,
      );
      if (whole) checkContent(h, rec, newData, r.newHash, 'new');
      if (mode === 'keep') rec.newData = Buffer.from(newData);
      if (h.reversible) {
        const oldData = await unpack(
          h,
          oldStored,
          (r.flags & RECORD_OLD_COMPRESSED) !== 0,
          rec.oldPayload,
        );
        if (whole) checkContent(h, rec, oldData, r.oldHash, 'old');
        if (mode === 'keep') rec.oldData = Buffer.from(oldData);
      }
    }
    this.#count++;
    return rec;
  }

  async #trailer(tag: Buffer): Promise<void> {
    const h = await this.header();
    const rest = await this.#read(trailerBytes(h.version) - HASH_BYTES - 4, 'the trailer');
    const hash = decodeTrailer(Buffer.concat([tag, rest]), this.#count, h.version);
    const expected = this.#hash.digest();
    const stored = await this.#in.read(HASH_BYTES);
    if (stored.length < HASH_BYTES) {
      throw new BlksyncError(
        'EPATCH_TRUNCATED',
        `the patch ${this.#in.path} ends inside its trailer; use the complete patch`,
        {
          path: this.#in.path,
        },
      );
    }
    if (!stored.equals(expected)) {
      throw new BlksyncError(
        'EPATCH_CHECKSUM',
        `the patch ${this.#in.path} is corrupted: its SHA-256 checksum does not match; make it again or copy it again`,
        { path: this.#in.path },
      );
    }
    if (!(await this.#in.atEnd())) {
      throw new BlksyncError(
        'EPATCH_FORMAT',
        `not a valid blksync patch: bytes follow the trailer of ${this.#in.path}`,
        {
          path: this.#in.path,
        },
      );
    }
    if (hash !== undefined) {
      const end = Math.max(this.#prevEnd, sharedEnd(h));
      // records and gaps must describe every byte of the result (and, to undo it, of the
      // base): past them apply would neither write nor check, and call what is there the result
      const described = h.reversible ? Math.max(h.baseSize, h.resultSize) : h.resultSize;
      if (end < described) {
        throw new BlksyncError(
          'EPATCH_FORMAT',
          `not a valid blksync patch: its records end at ${end} bytes, before the ${described === h.resultSize ? 'result' : 'base'}'s end (${described})`,
          { path: this.#in.path },
        );
      }
      this.lastGap = { start: this.#prevEnd, end, hash };
    }
    this.#done = true;
  }
}

async function unpack(
  h: PatchHeader,
  stored: Buffer,
  compressed: boolean,
  raw: number,
): Promise<Buffer> {
  return compressed ? decompressPayload(h.compression, stored, raw) : stored;
}

function checkContent(
  h: PatchHeader,
  r: RecordHeader,
  data: Buffer,
  hash: Buffer,
  what: string,
): void {
  if (!contentHash(data, h.blockSize).equals(hash)) {
    throw new BlksyncError(
      'EPATCH_CHECKSUM',
      `the patch is corrupted: the ${what} content of the record at offset ${r.offset} does not match its hash`,
    );
  }
}
