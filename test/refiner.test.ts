/**
 * Unit tests of the Refiner (src/remote/refiner.ts): it walks the chunks of an image ahead of
 * the pipeline, asks whether each chunk's top hashes are equal, and refines the ones that
 * differ, several at once. `same` and `refine` here are in-memory stand-ins for the agent's
 * hashes; the remote tests run the real thing over ssh.
 */

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { REFINE_CONCURRENCY, Refiner, type Found } from '../src/remote/refiner.js';

const CHUNK = 100;

/** Lets every promise callback and immediate queued so far run. */
function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

interface Gate {
  promise: Promise<void>;
  open: () => void;
}

function gate(): Gate {
  let open!: () => void;
  const promise = new Promise<void>((resolve) => (open = resolve));
  return { promise, open };
}

/** Records the calls; `differs(offset)` decides each chunk; spans name the chunk. */
function roles(differs: (offset: number) => boolean) {
  const sameCalls: [number, number][] = [];
  const refineCalls: [number, number][] = [];
  let running = 0;
  let maxRunning = 0;
  const gates = new Map<number, Gate>();
  let holdRefines = false;
  return {
    sameCalls,
    refineCalls,
    gates,
    get maxRunning() {
      return maxRunning;
    },
    hold() {
      holdRefines = true;
    },
    same: (offset: number, length: number): Promise<boolean> => {
      sameCalls.push([offset, length]);
      return Promise.resolve(!differs(offset));
    },
    refine: async (offset: number, length: number): Promise<Found> => {
      refineCalls.push([offset, length]);
      running++;
      maxRunning = Math.max(maxRunning, running);
      try {
        if (holdRefines) {
          const g = gate();
          gates.set(offset, g);
          await g.promise;
        }
        return { spans: [offset % 7, length] };
      } finally {
        running--;
      }
    },
  };
}

test('each chunk is asked about once, in order; equal chunks have no spans, differing ones are refined', async () => {
  const r = roles((o) => o === 100 || o === 300);
  const refiner = new Refiner(450, CHUNK, r.same, r.refine);
  const found = [];
  for (let o = 0; o < 450; o += CHUNK) found.push(await refiner.get(o));
  assert.deepEqual(r.sameCalls, [
    [0, 100],
    [100, 100],
    [200, 100],
    [300, 100],
    [400, 50],
  ]);
  assert.deepEqual(r.refineCalls, [
    [100, 100],
    [300, 100],
  ]);
  assert.deepEqual(
    found.map((f) => f.spans),
    [[], [2, 100], [], [6, 100], []],
  );
  await refiner.stop();
});

test('a size that is a multiple of the chunk size has no empty chunk at the end', async () => {
  const r = roles(() => true);
  const refiner = new Refiner(300, CHUNK, r.same, r.refine);
  for (let o = 0; o < 300; o += CHUNK) await refiner.get(o);
  await refiner.stop();
  assert.deepEqual(r.refineCalls, [
    [0, 100],
    [100, 100],
    [200, 100],
  ]);
});

test('an image smaller than one chunk is one short chunk; an empty image has none', async () => {
  const r = roles(() => true);
  const refiner = new Refiner(1, CHUNK, r.same, r.refine);
  assert.deepEqual((await refiner.get(0)).spans, [0, 1]);
  await refiner.stop();
  assert.deepEqual(r.sameCalls, [[0, 1]]);

  const e = roles(() => true);
  const empty = new Refiner(0, CHUNK, e.same, e.refine);
  await settle();
  await empty.stop();
  assert.deepEqual(e.sameCalls, []);
  assert.deepEqual(e.refineCalls, []);
  await assert.rejects(empty.get(0), /refiner stopped/);
});

test('results found before they are asked for wait; results asked for before they are found arrive', async () => {
  const r = roles(() => true);
  r.hold();
  const refiner = new Refiner(300, CHUNK, r.same, r.refine);
  const second = refiner.get(100); // asked before it is found
  await settle();
  r.gates.get(0)!.open();
  r.gates.get(200)!.open();
  await settle();
  const third = await refiner.get(200); // found before it is asked
  assert.deepEqual(third.spans, [4, 100]);
  r.gates.get(100)!.open();
  assert.deepEqual((await second).spans, [2, 100]);
  assert.deepEqual((await refiner.get(0)).spans, [0, 100]);
  await refiner.stop();
});

test(`at most ${REFINE_CONCURRENCY} chunks are refined at once; the next starts when one ends`, async () => {
  const chunks = REFINE_CONCURRENCY + 4;
  const r = roles(() => true);
  r.hold();
  const refiner = new Refiner(chunks * CHUNK, CHUNK, r.same, r.refine);
  await settle();
  assert.equal(r.refineCalls.length, REFINE_CONCURRENCY);
  // the walk waits for a free slot before asking about the next chunk
  assert.equal(r.sameCalls.length, REFINE_CONCURRENCY + 1);
  r.gates.get(3 * CHUNK)!.open();
  await settle();
  assert.equal(r.refineCalls.length, REFINE_CONCURRENCY + 1);
  for (let o = 0; o < chunks * CHUNK; o += CHUNK) {
    r.gates.get(o)?.open();
    await settle();
  }
  for (let o = 0; o < chunks * CHUNK; o += CHUNK) {
    r.gates.get(o)?.open();
    await refiner.get(o);
  }
  assert.equal(r.refineCalls.length, chunks);
  assert.equal(r.maxRunning, REFINE_CONCURRENCY);
  await refiner.stop();
});

test('a failing refine fails its own chunk only', async () => {
  const refiner = new Refiner(
    300,
    CHUNK,
    () => Promise.resolve(false),
    (offset) =>
      offset === 100
        ? Promise.reject(new Error('agent said no'))
        : Promise.resolve({ spans: [0, 1] }),
  );
  assert.deepEqual((await refiner.get(0)).spans, [0, 1]);
  await assert.rejects(refiner.get(100), /agent said no/);
  assert.deepEqual((await refiner.get(200)).spans, [0, 1]);
  await refiner.stop();
});

test('a failing comparison fails its chunk and every later one, and nothing more is asked', async () => {
  const sameCalls: number[] = [];
  const refiner = new Refiner(
    400,
    CHUNK,
    (offset) => {
      sameCalls.push(offset);
      return offset === 100 ? Promise.reject(new Error('link lost')) : Promise.resolve(true);
    },
    () => Promise.resolve({ spans: [] }),
  );
  assert.deepEqual((await refiner.get(0)).spans, []);
  for (const o of [100, 200, 300]) await assert.rejects(refiner.get(o), /link lost/);
  assert.deepEqual(sameCalls, [0, 100]);
  await refiner.stop();
});

test('stop() fails the chunks still awaited and waits for the refinements under way', async () => {
  const r = roles(() => true);
  r.hold();
  const refiner = new Refiner(3 * CHUNK, CHUNK, r.same, r.refine);
  await settle();
  const waiting = refiner.get(5 * CHUNK); // never found: the stop answers it
  let stopped = false;
  const stopping = refiner.stop().then(() => (stopped = true));
  await assert.rejects(waiting, /refiner stopped/);
  await settle();
  assert.equal(stopped, false, 'stop() returned while a refinement was still under way');
  for (const g of r.gates.values()) g.open();
  await stopping;
  await assert.rejects(refiner.get(7 * CHUNK), /refiner stopped/);
});

test('after stop() no refinement starts, also for a chunk that was waiting for a free slot', async () => {
  const r = roles(() => true);
  r.hold();
  const refiner = new Refiner((REFINE_CONCURRENCY + 3) * CHUNK, CHUNK, r.same, r.refine);
  await settle();
  assert.equal(r.refineCalls.length, REFINE_CONCURRENCY);
  const stopping = refiner.stop();
  await settle();
  for (const g of r.gates.values()) g.open();
  await stopping;
  await settle();
  assert.equal(r.refineCalls.length, REFINE_CONCURRENCY);
});

test('after stop() no refinement starts for a chunk whose comparison was still under way', async () => {
  const answer = gate();
  const refineCalls: number[] = [];
  const refiner = new Refiner(
    2 * CHUNK,
    CHUNK,
    async () => {
      await answer.promise;
      return false;
    },
    (offset) => {
      refineCalls.push(offset);
      return Promise.resolve({ spans: [] });
    },
  );
  await settle();
  const stopping = refiner.stop();
  answer.open();
  await stopping;
  await settle();
  assert.deepEqual(refineCalls, []);
});
