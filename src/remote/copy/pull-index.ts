/**
 * A pull with `--index`: the index describes the local DST, so a chunk it vouches for is
 * compared by the agent's hashes of SRC against the stored ones, without reading DST, and only
 * the blocks whose hash differs are fetched (their new hashes go into the table).
 */

import { cachedIndexPath } from '../../io/cache-dir.js';
import { identityOf } from '../../io/identity.js';
import type { Opened } from '../../io/open.js';
import type { IndexTarget } from '../../engine/index-target.js';
import { DEFAULT_INDEX_BLOCK_SIZE } from '../../engine/make-index.js';
import { HASH_BYTES, sha256 } from '../../hash.js';
import type { Range } from '../../ranges.js';
import type { AgentLink } from '../link.js';
import { blockDigest, MIN_HASH_UNIT, WIRE_HASH_BYTES } from '../protocol.js';
import type { Found } from '../refiner.js';
import { readIndexIfAny } from '../remote-index.js';
import { fetchSpans } from '../roles.js';
import type { RemoteCopyOptions } from './options.js';

export function isTrusted(untrusted: readonly Range[], offset: number, length: number): boolean {
  return untrusted.every((r) => offset + length <= r.start || offset >= r.end);
}

/** Stores the SHA-256 of each block of `data[start, end)` (at image `offset`) in `table`. */
export function hashInto(
  table: Buffer,
  blockSize: number,
  offset: number,
  data: Buffer,
  start: number,
  end: number,
): void {
  for (let s = start; s < end; s += blockSize) {
    sha256(data, s, Math.min(s + blockSize, end)).copy(
      table,
      ((offset + s) / blockSize) * HASH_BYTES,
    );
  }
}

/**
 * The block size of a pull's TOP_HASH_BLOCKS stream: the index's, read before ssh starts
 * (the IndexSession reads it again once SRC's size is known), else that of an index about to
 * be made. Any block size compares chunks correctly; the index's lets it answer unread.
 */
export async function digestBlockFor(
  options: RemoteCopyOptions,
  target: Opened | undefined,
  dst: string,
  chunkSize: number,
): Promise<number> {
  // divides the chunk: it is -b's, which the chunk is made of, or 64 KiB of 4 MiB
  const made = options.blockSizeGiven ?? DEFAULT_INDEX_BLOCK_SIZE;
  let path = options.index!;
  if (path === 'auto') {
    if (target === undefined) return made;
    path = cachedIndexPath(await identityOf(dst, target.stats, target.size));
  }
  const found = await readIndexIfAny(path).catch(() => undefined);
  const bs = found !== undefined && 'index' in found ? found.index.blockSize : made;
  // an index whose blocks do not divide the chunk is refused by the IndexSession anyway
  return chunkSize % bs === 0 ? bs : made;
}

/** An index's block digest of [offset, offset + length): the stored hashes' prefixes. */
export function tableDigest(target: IndexTarget, offset: number, length: number): Buffer {
  const bs = target.blockSize;
  const first = offset / bs;
  const n = Math.ceil(length / bs);
  const hashes = Buffer.allocUnsafe(n * WIRE_HASH_BYTES);
  for (let i = 0; i < n; i++) {
    const h = (first + i) * HASH_BYTES;
    target.table.copy(hashes, i * WIRE_HASH_BYTES, h, h + WIRE_HASH_BYTES);
  }
  return blockDigest(hashes);
}

/**
 * Pull with an index that vouches for the chunk: the agent hashes SRC's blocks of the index's
 * size and only those whose hash differs from the stored one (a wire hash is a prefix of it)
 * are fetched; `later` gets what puts their new hashes into the table. DST is not read.
 */
export async function byIndex(
  target: IndexTarget,
  link: AgentLink,
  offset: number,
  length: number,
  dryRun: boolean,
  later: (update: () => void) => void,
): Promise<Found> {
  const bs = target.blockSize;
  const theirs = await link.hashes(offset, length, Math.max(bs, MIN_HASH_UNIT));
  const spans: number[] = [];
  for (let s = 0, k = 0; s < length; s += bs, k++) {
    const h = ((offset + s) / bs) * HASH_BYTES;
    const w = k * WIRE_HASH_BYTES;
    if (theirs.compare(target.table, h, h + WIRE_HASH_BYTES, w, w + WIRE_HASH_BYTES) === 0)
      continue;
    const e = Math.min(s + bs, length);
    if (spans.length > 0 && spans[spans.length - 1] === s) spans[spans.length - 1] = e;
    else spans.push(s, e);
  }
  if (dryRun) return { spans };
  const data = await fetchSpans(link, offset, spans);
  later(() => {
    for (let i = 0, at = 0; i < spans.length; i += 2) {
      const len = spans[i + 1]! - spans[i]!;
      hashInto(target.table, bs, offset + spans[i]!, data, at, at + len);
      at += len;
    }
  });
  return { spans, data };
}
