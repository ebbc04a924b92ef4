/**
 * The shared read of SRC behind `copy SRC DST1 DST2 …` (src/fanout/broadcast.ts): every view
 * gets SRC's bytes from one read, the ring stays bounded whatever the views' pace, a view
 * closed early does not hold the others back, and a failing SRC fails every view.
 */

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Broadcast, RING_CHUNKS } from '../src/fanout/broadcast.js';
import { wholeImagePlan } from '../src/engine/pipeline.js';
import type { Source } from '../src/types.js';
import { seededBytes } from './helpers/tmp.js';

const CHUNK = 64 * 1024;

/** SRC in memory, counting what is read of it; fails at `failAt` when given. */
function memorySource(data: Buffer, failAt?: number): Source & { reads: number[] } {
  const reads: number[] = [];
  return {
    size: data.length,
    reads,
    read(buf, offset, length) {
      if (failAt !== undefined && offset >= failAt) {
        return Promise.reject(new Error('disk on fire'));
      }
      reads.push(offset);
      const n = data.copy(buf, 0, offset, Math.min(data.length, offset + length));
      return Promise.resolve(n);
    },
    close: () => Promise.resolve(),
  };
}

/** Reads all of a view in `step`-byte reads, `ahead` in flight, yielding now and then. */
async function drain(view: Source, size: number, step: number, ahead = 4): Promise<Buffer> {
  const out = Buffer.alloc(size);
  const inFlight: Promise<void>[] = [];
  for (let o = 0; o < size; o += step) {
    const len = Math.min(step, size - o);
    const buf = Buffer.alloc(len);
    const read = view.read(buf, o, len).then((n) => {
      assert.equal(n, len);
      buf.copy(out, o);
    });
    read.catch(() => {}); // the first failure is awaited below; the rest must not be "unhandled"
    inFlight.push(read);
    if (inFlight.length >= ahead) await inFlight.shift();
    if ((o / step) % 7 === 0) await new Promise((resolve) => setImmediate(resolve));
  }
  await Promise.all(inFlight);
  return out;
}

test('every view gets all of SRC from one read, in chunks of any size', async () => {
  const data = seededBytes(40 * CHUNK + 123, 1);
  const src = memorySource(data);
  const b = new Broadcast(src, wholeImagePlan(data.length), CHUNK, RING_CHUNKS, 3);
  const views = [b.view(0), b.view(1), b.view(2)];
  // a push reads 4 chunks at a time, a local copy 1, another in odd pieces
  const got = await Promise.all([
    drain(views[0]!, data.length, CHUNK),
    drain(views[1]!, data.length, 4 * CHUNK),
    drain(views[2]!, data.length, 10_000),
  ]);
  for (const g of got) assert.ok(g.equals(data));
  for (const v of views) await v.close();
  await b.close();
  assert.equal(src.reads.length, 41, 'each chunk of SRC read once');
  assert.equal(new Set(src.reads).size, src.reads.length);
  assert.equal(b.bytesRead, data.length);
});

test('a view closed before reading does not hold the others back', async () => {
  const data = seededBytes(3 * RING_CHUNKS * CHUNK, 2);
  const b = new Broadcast(memorySource(data), wholeImagePlan(data.length), CHUNK, RING_CHUNKS, 2);
  const dropped = b.view(0);
  const kept = b.view(1);
  const reading = drain(kept, data.length, CHUNK);
  await dropped.close();
  assert.ok((await reading).equals(data));
  await kept.close();
  await b.close();
});

test('SRC failing mid-read fails every view with its error', async () => {
  const data = seededBytes(20 * CHUNK, 3);
  const b = new Broadcast(
    memorySource(data, 12 * CHUNK),
    wholeImagePlan(data.length),
    CHUNK,
    RING_CHUNKS,
    2,
  );
  const results = await Promise.allSettled([
    drain(b.view(0), data.length, CHUNK),
    drain(b.view(1), data.length, 2 * CHUNK),
  ]);
  for (const r of results) {
    assert.equal(r.status, 'rejected');
    assert.match(String(r.reason), /disk on fire/);
  }
  await b.close();
});
