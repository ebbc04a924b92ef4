/**
 * DST's chunk hashes (delta/dest-hashes.ts) are SHA-256 of each chunk as it reads, with holes,
 * allocated zeros, a short DST and the worker thread that hashes every other piece.
 */

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, constants, openSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';
import { hashDestination, prepareDestination } from '../src/delta/dest-hashes.js';
import { CODEC_BROTLI, type PublishedHeader } from '../src/formats/published.js';
import { sha256 } from '../src/hash.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

const CHUNK = 64 * 1024;

function header(imageSize: number): PublishedHeader {
  return {
    imageSize,
    chunkSize: CHUNK,
    groupChunks: 16,
    codec: CODEC_BROTLI,
    dataSize: 0,
    root: Buffer.alloc(32),
    imageSha256: Buffer.alloc(32),
  };
}

test('with and without the worker thread, the hashes are those of each chunk', async (t) => {
  const dir = await tempDir(t);
  const dst = join(dir, 'dst.img');
  // 40 MiB + a short last chunk: data in pieces larger than one read, allocated zeros, holes
  const size = 40 * 1024 * 1024 + 1000;
  await writeSparseFile(dst, size, [
    { offset: 0, data: seededBytes(9 * 1024 * 1024, 1) },
    { offset: 12 * 1024 * 1024, data: Buffer.alloc(3 * 1024 * 1024) },
    { offset: 20 * 1024 * 1024 + 5, data: seededBytes(13 * 1024 * 1024, 2) },
    { offset: size - 500, data: Buffer.from('tail') },
  ]);
  const content = await readFile(dst);
  const expected = Buffer.alloc(Math.ceil(size / CHUNK) * 32);
  for (let i = 0; i * CHUNK < size; i++) {
    sha256(content, i * CHUNK, Math.min(size, (i + 1) * CHUNK)).copy(expected, i * 32);
  }
  const h = header(size);
  assert.deepEqual(await hashDestination(dst, h, undefined, Infinity), expected);
  assert.deepEqual(await hashDestination(dst, h, undefined, 0), expected);
  // an image larger than DST: the chunks DST does not hold whole never match
  const larger = await hashDestination(dst, header(size + CHUNK), undefined, 0);
  assert.deepEqual(
    larger.subarray(0, Math.floor(size / CHUNK) * 32),
    expected.subarray(0, Math.floor(size / CHUNK) * 32),
  );
  assert.ok(larger.subarray(Math.floor(size / CHUNK) * 32).every((b) => b === 0xff));
});

test('an interrupted hashing throws EINTERRUPTED, with worker threads or without', async (t) => {
  const dir = await tempDir(t);
  const dst = join(dir, 'dst.img');
  await writeSparseFile(dst, 8 * 1024 * 1024, [
    { offset: 0, data: seededBytes(8 * 1024 * 1024, 3) },
  ]);
  for (const workerMin of [0, Infinity]) {
    await assert.rejects(
      hashDestination(dst, header(8 * 1024 * 1024), AbortSignal.abort(), workerMin),
      {
        code: 'EINTERRUPTED',
      },
    );
  }
});

test('a DST prepared while the index is fetched: hashed as the header lays it out, or dropped unhashed', async (t) => {
  const dir = await tempDir(t);
  const dst = join(dir, 'dst.img');
  const size = 3 * CHUNK + 100;
  const content = seededBytes(size, 4);
  await writeSparseFile(dst, size, [{ offset: 0, data: content }]);
  // the worker started before the header is known, then given the job
  const prepared = await prepareDestination(dst, 0);
  const hashes = await prepared.hash(header(size), undefined);
  await prepared.close();
  for (let i = 0; i * CHUNK < size; i++) {
    assert.deepEqual(
      hashes.subarray(i * 32, (i + 1) * 32),
      sha256(content, i * CHUNK, Math.min(size, (i + 1) * CHUNK)),
    );
  }
  // not published after all: closed unhashed, its worker stopped (the test would hang otherwise)
  const unused = await prepareDestination(dst, 0);
  await unused.close();
  // a missing DST holds zeros
  const missing = await prepareDestination(join(dir, 'missing.img'), 0);
  const zeros = await missing.hash(header(size), undefined);
  assert.deepEqual(zeros.subarray(0, 32), sha256(Buffer.alloc(CHUNK)));
  await missing.close();
});

test('a FIFO DST is prepared at once as zeros, not waited on for a writer', async (t) => {
  const dir = await tempDir(t);
  const fifo = join(dir, 'fifo');
  execFileSync('mkfifo', [fifo]);
  // should an open wait for a writer, this one releases it when the test ends
  t.after(() => {
    try {
      closeSync(openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK));
    } catch {
      // ENXIO: no reader waits on it
    }
  });
  const prepared = await Promise.race([
    prepareDestination(fifo),
    delay(3000).then(() => undefined),
  ]);
  assert.ok(prepared !== undefined, 'preparing a FIFO DST waited for a writer');
  const hashes = await prepared.hash(header(4 * CHUNK), undefined);
  await prepared.close();
  for (let i = 0; i < 4; i++) {
    assert.deepEqual(hashes.subarray(i * 32, (i + 1) * 32), sha256(Buffer.alloc(CHUNK)));
  }
});
