/**
 * An index of SRC kept by a source agent on SRC's host (`--src-index host:FILE` or `auto`,
 * HELLO's `sourceIndex`), trusted under the local copy's policy: engine/source-index.ts opens
 * it (SRC's identity, mtime and ctime, clean, of SRC's size and of the digests' blocks, a
 * sample of SRC's blocks).
 *
 *   used     TOP_HASHES: each unit's block digest from the stored hashes (SRC not read);
 *            HASH_REQ in its blocks: the stored hashes' prefixes; DATA_REQ: SRC read, and
 *            each whole block sent checked against the index first (EINDEX_STALE)
 *   made     the TOP_HASHES scan reads every unit (no hole skipped) and hashes its blocks;
 *            at DONE, all of SRC seen and SRC unchanged since HELLO, the index is written
 */

import { SourceIndex, type SourceIndexReport } from '../../engine/source-index.js';
import { blockCountFor } from '../../formats/index-file.js';
import { HASH_BYTES, sha256 } from '../../hash.js';
import type { Opened } from '../../io/open.js';
import { blockDigest, WIRE_HASH_BYTES, type SourceIndexHello } from '../protocol.js';

export class KeptSourceIndex {
  readonly blockSize: number;
  /** The index is trusted: it answers for SRC without reading it. */
  readonly used: boolean;
  readonly #index: SourceIndex;
  readonly #size: number;
  readonly #hashes: Buffer | undefined;
  /** Made: SRC's block hashes as the scan reads it, and how many bytes it has seen. */
  readonly #table: Buffer | undefined;
  #seen = 0;

  private constructor(index: SourceIndex, blockSize: number, size: number, dryRun: boolean) {
    this.#index = index;
    this.blockSize = blockSize;
    this.#size = size;
    this.#hashes = index.hashes;
    this.used = index.hashes !== undefined;
    this.#table =
      this.used || dryRun ? undefined : Buffer.alloc(blockCountFor(size, blockSize) * HASH_BYTES);
  }

  /** Opens the index of `src` in `blockSize` blocks (HELLO's topBlock). */
  static async open(
    h: SourceIndexHello,
    src: Opened,
    blockSize: number,
    dryRun: boolean,
  ): Promise<KeptSourceIndex> {
    const index = await SourceIndex.open(
      { index: h.path, opened: src, rebuild: h.rebuild, dryRun },
      blockSize,
      src.size,
      true,
      h.verifySample,
    );
    return new KeptSourceIndex(index, blockSize, src.size, dryRun);
  }

  /** Being made, it needs every unit's bytes: the scan must not skip holes. */
  get making(): boolean {
    return this.#table !== undefined;
  }

  knows(): boolean {
    return this.used;
  }

  /** The block digest of [offset, offset + length) from the stored hashes (used only). */
  digest(offset: number, length: number): Buffer {
    return blockDigest(this.#prefixes(offset, length));
  }

  /** HASHES for a HASH_REQ in the index's blocks, from the index; undefined: read SRC. */
  hashesFor(offset: number, length: number, unit: number): Buffer | undefined {
    const bs = this.blockSize;
    if (!this.used || unit !== bs || offset % bs !== 0) return undefined;
    if (length % bs !== 0 && offset + length !== this.#size) return undefined;
    return this.#prefixes(offset, length);
  }

  #prefixes(offset: number, length: number): Buffer {
    const bs = this.blockSize;
    const first = offset / bs;
    const n = Math.ceil(length / bs);
    const out = Buffer.allocUnsafe(n * WIRE_HASH_BYTES);
    for (let k = 0; k < n; k++) {
      const h = (first + k) * HASH_BYTES;
      this.#hashes!.copy(out, k * WIRE_HASH_BYTES, h, h + WIRE_HASH_BYTES);
    }
    return out;
  }

  /** The scan read SRC's unit at `offset` (ascending, each once): its blocks' hashes. */
  learned(offset: number, data: Buffer, length: number): void {
    if (this.#table === undefined) return;
    const bs = this.blockSize;
    for (let s = 0; s < length; s += bs) {
      sha256(data, s, Math.min(s + bs, length)).copy(this.#table, ((offset + s) / bs) * HASH_BYTES);
    }
    this.#seen += length;
  }

  /**
   * Before bytes read from SRC are sent (DATA_REQ): each whole block must be what a used
   * index says, else SRC changed behind its identity (EINDEX_STALE; a cached index removed).
   */
  async check(offset: number, data: Buffer, length: number): Promise<void> {
    if (!this.used) return;
    const bs = this.blockSize;
    const first = Math.ceil(offset / bs) * bs;
    for (let b = first; b < offset + length; b += bs) {
      const end = Math.min(b + bs, this.#size);
      if (end > offset + length) break;
      const h = (b / bs) * HASH_BYTES;
      if (sha256(data, b - offset, end - offset).compare(this.#hashes!, h, h + HASH_BYTES) !== 0) {
        const err = this.#index.mismatch(b);
        await this.#index.close();
        throw err;
      }
    }
  }

  /** At DONE: a made index is written when the scan saw all of SRC. */
  async finish(): Promise<void> {
    if (this.#table !== undefined && this.#seen === this.#size) {
      await this.#index.save(this.#table);
    }
    await this.#index.close();
  }

  report(): SourceIndexReport {
    return this.#index.report();
  }
}
