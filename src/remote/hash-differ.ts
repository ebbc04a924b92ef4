/**
 * Finding what differs between a local chunk and the same range on the remote, by hashes:
 *
 *   4 MiB group   agent streams its hash unasked ──► equal? done (the common case)
 *        │ differs
 *   64 KiB units  one HASH_REQ for the group ──────► keep the units that differ
 *        │
 *   blocks        one HASH_REQ per run of differing units ──► the differing blocks
 *
 * A mostly unchanged image costs one 16-byte hash per 4 MiB (4 KiB per GiB); a changed
 * region costs ~1 KiB of hashes per 64 KiB around it, then only its blocks. Many chunks
 * refine at once (each is a read-ahead of the pipeline), so the round trips overlap.
 */

import { wireHash, WIRE_HASH_BYTES, zeroHasher, type TopHasher } from './protocol.js';
import type { AgentLink } from './link.js';

/** The middle level of the hash tree. */
export const MID_UNIT_BYTES = 64 * 1024;

/** The wire hash of `length` zero bytes (a new or empty local file reads as zeros). */
export const zeroHash = zeroHasher(wireHash);

export class HashDiffer {
  readonly #link: AgentLink;
  /** Hash units below the top, largest first, ending with the block size. */
  readonly #levels: number[];
  readonly #hash: TopHasher;
  readonly #zero: (length: number) => Buffer;

  /** `hash`: the agent's HASHES hash (the wire hash unless HELLO's `reqHash` chose GMAC). */
  constructor(link: AgentLink, chunkSize: number, blockSize: number, hash: TopHasher = wireHash) {
    this.#link = link;
    this.#hash = hash;
    this.#zero = hash === wireHash ? zeroHash : zeroHasher(hash);
    this.#levels = [];
    if (blockSize < MID_UNIT_BYTES && chunkSize > MID_UNIT_BYTES) this.#levels.push(MID_UNIT_BYTES);
    if (blockSize < chunkSize) this.#levels.push(blockSize);
  }

  /**
   * Appends to `out`, as [start, end) pairs relative to the chunk, the spans of
   * [offset, offset + length) where the remote differs from `data` (zeros when `zero`),
   * the chunk's top-level hashes being known to differ already.
   */
  async refine(
    offset: number,
    data: Buffer,
    length: number,
    zero: boolean,
    out: number[],
  ): Promise<void> {
    const local = (s: number, e: number): Buffer =>
      zero ? this.#zero(e - s) : this.#hash(data.subarray(s, e));
    let candidates = [0, length];
    for (const unit of this.#levels) {
      const replies: Promise<Buffer>[] = [];
      for (let i = 0; i < candidates.length; i += 2) {
        const s = candidates[i]!;
        replies.push(this.#link.hashes(offset + s, candidates[i + 1]! - s, unit));
      }
      const got = await Promise.all(replies);
      const next: number[] = [];
      for (let i = 0; i < candidates.length; i += 2) {
        const remote = got[i / 2]!;
        const ce = candidates[i + 1]!;
        for (let s = candidates[i]!, k = 0; s < ce; s += unit, k++) {
          const e = Math.min(s + unit, ce);
          const mine = local(s, e);
          if (mine.compare(remote, k * WIRE_HASH_BYTES, (k + 1) * WIRE_HASH_BYTES) === 0) continue;
          if (next.length > 0 && next[next.length - 1] === s) next[next.length - 1] = e;
          else next.push(s, e);
        }
      }
      candidates = next;
      if (candidates.length === 0) break;
    }
    for (const c of candidates) out.push(c);
  }

  /**
   * Like refine, but both sides are remote (a copy between two hosts relayed through this
   * one): `mine` answers for the destination, the differ's own link for the source.
   */
  async refineBetween(
    offset: number,
    length: number,
    mine: AgentLink,
    out: number[],
  ): Promise<void> {
    let candidates = [0, length];
    for (const unit of this.#levels) {
      const theirs: Promise<Buffer>[] = [];
      const ours: Promise<Buffer>[] = [];
      for (let i = 0; i < candidates.length; i += 2) {
        const s = candidates[i]!;
        const len = candidates[i + 1]! - s;
        theirs.push(this.#link.hashes(offset + s, len, unit));
        ours.push(mine.hashes(offset + s, len, unit));
      }
      const [a, b] = await Promise.all([Promise.all(theirs), Promise.all(ours)]);
      const next: number[] = [];
      for (let i = 0; i < candidates.length; i += 2) {
        const x = a[i / 2]!;
        const y = b[i / 2]!;
        const ce = candidates[i + 1]!;
        for (let s = candidates[i]!, k = 0; s < ce; s += unit, k++) {
          const h = k * WIRE_HASH_BYTES;
          if (x.compare(y, h, h + WIRE_HASH_BYTES, h, h + WIRE_HASH_BYTES) === 0) continue;
          const e = Math.min(s + unit, ce);
          if (next.length > 0 && next[next.length - 1] === s) next[next.length - 1] = e;
          else next.push(s, e);
        }
      }
      candidates = next;
      if (candidates.length === 0) break;
    }
    for (const c of candidates) out.push(c);
  }
}
