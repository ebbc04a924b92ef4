/**
 * Unit tests of the HashDiffer (src/remote/hash-differ.ts): from a chunk whose top hashes
 * differ, it narrows down to the differing blocks through the 64 KiB level, asking the
 * remote for as few hashes as it can. The remote here is an in-memory buffer hashed exactly
 * as the agent hashes (unitHashes); the remote tests run the real agent over ssh.
 */

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { HashDiffer, MID_UNIT_BYTES } from '../src/remote/hash-differ.js';
import type { AgentLink } from '../src/remote/link.js';
import { unitHashes } from '../src/remote/protocol.js';
import { seededBytes } from './helpers/tmp.js';

const KiB = 1024;
const BS = 4 * KiB;
const UNIT = MID_UNIT_BYTES;

interface Request {
  offset: number;
  length: number;
  unit: number;
}

/** A remote image in memory; answers HASH_REQs as the agent does and records them. */
function remote(bytes: Buffer): { link: AgentLink; requests: Request[] } {
  const requests: Request[] = [];
  const fake = {
    hashes(offset: number, length: number, unit: number): Promise<Buffer> {
      requests.push({ offset, length, unit });
      assert.ok(offset + length <= bytes.length, 'asked past the end of the remote image');
      return Promise.resolve(unitHashes(bytes.subarray(offset, offset + length), length, unit));
    },
  };
  // HashDiffer asks its link for hashes only
  return { link: fake as unknown as AgentLink, requests };
}

/** `base` with one byte flipped at each offset. */
function changed(base: Buffer, at: number[]): Buffer {
  const b = Buffer.from(base);
  for (const o of at) b[o] = b[o]! ^ 0x5a;
  return b;
}

async function refine(
  differ: HashDiffer,
  offset: number,
  data: Buffer,
  length: number,
  zero = false,
): Promise<number[]> {
  const out: number[] = [];
  await differ.refine(offset, data, length, zero, out);
  return out;
}

test('one changed block: one request per level, narrowing from the chunk to its 64 KiB unit to the block', async () => {
  const chunk = 4 * UNIT;
  const local = seededBytes(chunk, 1);
  const { link, requests } = remote(changed(local, [2 * UNIT + 5 * BS + 9]));
  const out = await refine(new HashDiffer(link, chunk, BS), 0, local, chunk);
  assert.deepEqual(out, [2 * UNIT + 5 * BS, 2 * UNIT + 6 * BS]);
  assert.deepEqual(requests, [
    { offset: 0, length: chunk, unit: UNIT },
    { offset: 2 * UNIT, length: UNIT, unit: BS },
  ]);
});

test('neighbouring differing units are asked about in one request and neighbouring blocks come back as one span', async () => {
  const chunk = 4 * UNIT;
  const local = seededBytes(chunk, 2);
  // the last block of unit 1 and the first of unit 2, plus a block in unit 3 after an equal one
  const { link, requests } = remote(changed(local, [2 * UNIT - 1, 2 * UNIT, 3 * UNIT + 2 * BS]));
  const out = await refine(new HashDiffer(link, chunk, BS), 0, local, chunk);
  assert.deepEqual(out, [2 * UNIT - BS, 2 * UNIT + BS, 3 * UNIT + 2 * BS, 3 * UNIT + 3 * BS]);
  assert.deepEqual(requests, [
    { offset: 0, length: chunk, unit: UNIT },
    { offset: UNIT, length: 3 * UNIT, unit: BS },
  ]);
});

test('units apart are refined with one request each, at the chunk offset', async () => {
  const chunk = 4 * UNIT;
  const offset = 10 * chunk;
  const image = seededBytes(11 * chunk, 3);
  const local = Buffer.from(image.subarray(offset, offset + chunk));
  const { link, requests } = remote(changed(image, [offset + 7, offset + 3 * UNIT + 7]));
  const out = await refine(new HashDiffer(link, chunk, BS), offset, local, chunk);
  assert.deepEqual(out, [0, BS, 3 * UNIT, 3 * UNIT + BS]);
  assert.deepEqual(requests, [
    { offset, length: chunk, unit: UNIT },
    { offset, length: UNIT, unit: BS },
    { offset: offset + 3 * UNIT, length: UNIT, unit: BS },
  ]);
});

test('the last chunk of an image that ends mid-block: the short last block is found and clipped', async () => {
  const length = 2 * UNIT + 3 * BS + 100; // the chunk (and image) ends 100 bytes into a block
  const local = seededBytes(length, 4);
  const { link, requests } = remote(changed(local, [length - 1]));
  const out = await refine(new HashDiffer(link, 4 * UNIT, BS), 0, local, length);
  assert.deepEqual(out, [2 * UNIT + 3 * BS, length]);
  assert.deepEqual(requests, [
    { offset: 0, length, unit: UNIT },
    { offset: 2 * UNIT, length: 3 * BS + 100, unit: BS },
  ]);
});

test('a chunk shorter than one 64 KiB unit still narrows to blocks', async () => {
  const length = 5 * BS + 1;
  const local = seededBytes(length, 5);
  const { link } = remote(changed(local, [BS, length - 1]));
  const out = await refine(new HashDiffer(link, 4 * UNIT, BS), 0, local, length);
  assert.deepEqual(out, [BS, 2 * BS, 5 * BS, length]);
});

test('a zero-length range finds nothing', async () => {
  const { link } = remote(Buffer.alloc(0));
  const out = await refine(new HashDiffer(link, 4 * UNIT, BS), 0, Buffer.alloc(0), 0);
  assert.deepEqual(out, []);
});

test('top hashes that differ over equal content (the image ends inside a larger DST) find nothing', async () => {
  const chunk = 2 * UNIT;
  const local = seededBytes(chunk, 6);
  const { link, requests } = remote(Buffer.from(local));
  const out = await refine(new HashDiffer(link, chunk, BS), 0, local, chunk);
  assert.deepEqual(out, []);
  assert.equal(requests.length, 1, 'no block hashes asked for once the units agree');
});

test('a new local file reads as zeros: the remote blocks that are not zero are found', async () => {
  const chunk = 2 * UNIT;
  const theirs = Buffer.alloc(chunk);
  seededBytes(10, 7).copy(theirs, UNIT + BS + 3);
  const { link } = remote(theirs);
  const out = await refine(new HashDiffer(link, chunk, BS), 0, Buffer.alloc(0), chunk, true);
  assert.deepEqual(out, [UNIT + BS, UNIT + 2 * BS]);
});

test('blocks of 64 KiB or more skip the middle level; a block as large as the chunk needs no request', async () => {
  const chunk = 4 * UNIT;
  const local = seededBytes(chunk, 8);
  const theirs = changed(local, [UNIT + 1]);

  const a = remote(theirs);
  assert.deepEqual(await refine(new HashDiffer(a.link, chunk, UNIT), 0, local, chunk), [
    UNIT,
    2 * UNIT,
  ]);
  assert.deepEqual(a.requests, [{ offset: 0, length: chunk, unit: UNIT }]);

  const b = remote(theirs);
  assert.deepEqual(await refine(new HashDiffer(b.link, chunk, 2 * UNIT), 0, local, chunk), [
    0,
    2 * UNIT,
  ]);
  assert.deepEqual(b.requests, [{ offset: 0, length: chunk, unit: 2 * UNIT }]);

  const c = remote(theirs);
  assert.deepEqual(await refine(new HashDiffer(c.link, chunk, chunk), 0, local, chunk), [0, chunk]);
  assert.deepEqual(c.requests, []);
});

test('a chunk of one 64 KiB unit goes straight to blocks', async () => {
  const local = seededBytes(UNIT, 9);
  const { link, requests } = remote(changed(local, [3 * BS]));
  const out = await refine(new HashDiffer(link, UNIT, BS), 0, local, UNIT);
  assert.deepEqual(out, [3 * BS, 4 * BS]);
  assert.deepEqual(requests, [{ offset: 0, length: UNIT, unit: BS }]);
});

test('a failing request fails the refinement', async () => {
  const fake = {
    hashes: (): Promise<Buffer> => Promise.reject(new Error('link lost')),
  } as unknown as AgentLink;
  await assert.rejects(
    refine(new HashDiffer(fake, 4 * UNIT, BS), 0, seededBytes(UNIT, 1), UNIT),
    /link lost/,
  );
});

test('between two remotes: both are asked the same questions and the differing blocks are found', async () => {
  const chunk = 4 * UNIT;
  const length = chunk - 2 * BS - 50; // the image's last, short chunk
  const offset = chunk;
  const from = seededBytes(offset + length, 10);
  const to = changed(from, [offset + 17, offset + UNIT + 3, offset + length - 1]);
  const src = remote(from);
  const dst = remote(to);
  const out: number[] = [];
  await new HashDiffer(src.link, chunk, BS).refineBetween(offset, length, dst.link, out);
  const lastBlock = Math.floor((length - 1) / BS) * BS;
  assert.deepEqual(out, [0, BS, UNIT, UNIT + BS, lastBlock, length]);
  assert.deepEqual(src.requests, dst.requests);
  assert.deepEqual(src.requests, [
    { offset, length, unit: UNIT },
    { offset, length: 2 * UNIT, unit: BS },
    { offset: offset + 3 * UNIT, length: length - 3 * UNIT, unit: BS },
  ]);
});
