/**
 * The agent's unasked TOP_HASHES stream: one hash per top-level unit of its file, sent while
 * the request queue runs beside it, so blksync can compare chunks before it asks for anything.
 * A unit's hash always goes out before any DATA for that unit can have come.
 */

import type { FileHandle } from 'node:fs/promises';
import { trace, traceOnce } from '../../trace.js';
import type { AgentIndex } from '../agent-index.js';
import {
  blockDigestHasher,
  frame,
  FrameType,
  rangeHeader,
  TOP_HASH_BLOCKS,
  TOP_HASH_GMAC,
  skippingZeros,
  topHasher,
  zeroHasher,
  type Hello,
  type TopHasher,
} from '../protocol.js';
import { agentDataMap } from './data-map.js';
import { readFully, type AgentSession, type Opened } from './session.js';

/** TOP_HASHES batched per frame. */
const TOP_BATCH = 4;
/**
 * Top-level units read ahead while hashing: 2, one read while the other is hashed. Each is a
 * fresh 4 MiB buffer (1,024 page faults; ~17 ms of a VM's time here): 4 cost the agent ~2k
 * more faults and ~0.1 s for nothing.
 */
const TOP_READ_AHEAD = 2;

/**
 * The top-level hash HELLO asked for: GMAC under its key, block digests, or SHA-256; a unit
 * of zeros (a hole: most of an OS image) costs a memcmp instead of hashing.
 */
export function hasherOf(h: Hello): TopHasher {
  if (h.topHash === TOP_HASH_BLOCKS) return skippingZeros(blockDigestHasher(h.topBlock!));
  return skippingZeros(
    topHasher(h.topHash === TOP_HASH_GMAC ? Buffer.from(h.key!, 'hex') : undefined),
  );
}

/** The hash of HASHES replies HELLO's `reqHash` asked for: GMAC under its key. */
export function reqHasherOf(h: Hello): TopHasher {
  return skippingZeros(topHasher(Buffer.from(h.key!, 'hex')));
}

/** Stands for a unit not read: all hole. */
const HOLE = Buffer.alloc(0);

/**
 * Reads the whole file in `unit`s and sends each unit's hash. A unit the file system reports
 * as all hole (data-map.ts) is not read: it reads as zeros, so its hash is that of zeros. Not
 * while an index is being made, which needs every block's bytes.
 */
export async function topHashes(
  s: AgentSession,
  o: Opened,
  fh: FileHandle,
  unit: number,
  hasher: TopHasher,
): Promise<void> {
  // taken before any DATA can come: a unit's hash goes out before anything is written to it
  const making = s.index !== undefined || s.sourceIndex?.making === true;
  const data = o.kind === 'file' && !making ? await agentDataMap(fh.fd, o.limit) : undefined;
  trace(`data map: ${data === undefined ? 'none, reading all' : `${data.length} data ranges`}`);
  const zero = zeroHasher(hasher);
  let d = 0;
  /** Whether [off, end) is all hole (data ranges ascend, and so do the units asked). */
  const hole = (off: number, end: number): boolean => {
    if (data === undefined) return false;
    while (d < data.length && data[d]!.end <= off) d++;
    return d >= data.length || data[d]!.start >= end;
  };
  // a few buffers reused round robin: fresh 4 MiB buffers cost a page fault per 4 KiB
  const free: Buffer[] = [];
  const reads: Promise<[Buffer, number]>[] = [];
  let next = 0;
  const start = (): void => {
    if (next >= o.limit || s.failed) return;
    const off = next;
    const len = Math.min(unit, o.limit - off);
    next += len;
    if (hole(off, off + len)) {
      reads.push(Promise.resolve([HOLE, len]));
      return;
    }
    const buf = free.pop() ?? Buffer.allocUnsafe(unit);
    const p = readFully(o, fh, buf, len, off).then((): [Buffer, number] => {
      s.bytesRead += len;
      return [buf, len];
    });
    p.catch(() => {});
    reads.push(p);
  };
  for (let i = 0; i < TOP_READ_AHEAD; i++) start();
  let batch: Buffer[] = [];
  let batchOffset = 0;
  for (let off = 0; off < o.limit && !s.failed; off += unit) {
    const [buf, len] = await reads.shift()!;
    start();
    if (batch.length === 0) batchOffset = off;
    if (buf === HOLE) batch.push(zero(len));
    else {
      // before this unit's hash goes out: no DATA for it can have come yet
      s.index?.learned(off, buf, len);
      s.sourceIndex?.learned(off, buf, len);
      batch.push(hasher(buf.subarray(0, len)));
      free.push(buf);
    }
    if (batch.length === TOP_BATCH || off + unit >= o.limit) {
      await s.send(frame(FrameType.TOP_HASHES, rangeHeader(batchOffset, unit), ...batch));
      traceOnce('first TOP_HASHES sent');
      batch = [];
    }
  }
  trace(`scan done (${s.bytesRead} bytes read)`);
}

/**
 * A used index's TOP_HASHES: each unit's block digest from the table, its file read only
 * where the index does not vouch (then its hashes are learned first). DST's index, or SRC's.
 */
export async function digestHashes(
  s: AgentSession,
  o: Opened,
  fh: FileHandle,
  unit: number,
  idx: Pick<AgentIndex, 'knows' | 'learned' | 'digest'>,
): Promise<void> {
  let batch: Buffer[] = [];
  let batchOffset = 0;
  for (let off = 0; off < o.limit && !s.failed; off += unit) {
    const len = Math.min(unit, o.limit - off);
    if (!idx.knows(off, len)) {
      const buf = Buffer.allocUnsafe(len);
      await readFully(o, fh, buf, len, off);
      s.bytesRead += len;
      idx.learned(off, buf, len);
    }
    if (batch.length === 0) batchOffset = off;
    batch.push(idx.digest(off, len));
    if (batch.length === TOP_BATCH || off + unit >= o.limit) {
      await s.send(frame(FrameType.TOP_HASHES, rangeHeader(batchOffset, unit), ...batch));
      batch = [];
    }
  }
}
