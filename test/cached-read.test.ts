/**
 * Reads of cached data on the event loop's thread (io/cached-read.ts, preadv2 RWF_NOWAIT):
 * what the page cache holds comes back byte for byte, what it does not hold is left to the
 * ordinary read (readFully ends with every byte either way), and the end of a file stops it.
 */

import assert from 'node:assert/strict';
import { open, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { CACHED_READ_MIN_BYTES, readCached } from '../src/io/cached-read.js';
import { readFully } from '../src/io/read-fully.js';
import { dropCachedPages } from '../src/io/sparse-map.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const MIB = 1024 * 1024;

test('cached data is read on this thread; data not cached is left to the ordinary read', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'img');
  const content = seededBytes(8 * MIB, 21);
  await writeFile(path, content);
  const fh = await open(path, 'r');
  t.after(() => fh.close());
  await fh.sync();

  // cached (just written): all of a read, into the middle of a larger buffer
  const big = Buffer.alloc(3 * MIB);
  const cached = readCached(fh, big, 4096, 2 * MIB, MIB);
  assert.equal(cached, 2 * MIB);
  assert.ok(big.subarray(4096, 4096 + 2 * MIB).equals(content.subarray(MIB, 3 * MIB)));
  assert.ok(
    big.subarray(0, 4096).every((b) => b === 0),
    'nothing written before bufOffset',
  );

  // the end of the file stops it: fewer bytes, never garbage
  const tail = Buffer.alloc(MIB);
  assert.equal(readCached(fh, tail, 0, MIB, 8 * MIB - 300 * 1024), 300 * 1024);
  assert.ok(tail.subarray(0, 300 * 1024).equals(content.subarray(8 * MIB - 300 * 1024)));

  // not cached: the page cache dropped (clean pages), nothing comes back on this thread
  dropCachedPages(fh.fd);
  const cold = Buffer.alloc(2 * MIB);
  const got = readCached(fh, cold, 0, 2 * MIB, 4 * MIB);
  if (got === 2 * MIB) {
    t.diagnostic('the kernel kept the pages cached (DONTNEED is advice): cold case not checked');
  } else {
    assert.ok(got < 2 * MIB);
    assert.ok(cold.subarray(0, got).equals(content.subarray(4 * MIB, 4 * MIB + got)));
  }
  // readFully ends with every byte whatever the cache held
  const whole = Buffer.alloc(8 * MIB);
  dropCachedPages(fh.fd);
  assert.equal(await readFully(fh, whole, 0, 8 * MIB, 0), 8 * MIB);
  assert.ok(whole.equals(content));
  // past the end: fewer bytes
  assert.equal(await readFully(fh, whole, 0, 8 * MIB, 7 * MIB), MIB);
});

test('small reads are left to the ordinary read (koffi is not loaded for them)', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'small');
  await writeFile(path, seededBytes(64 * 1024, 22));
  const fh = await open(path, 'r');
  t.after(() => fh.close());
  const buf = Buffer.alloc(64 * 1024);
  assert.ok(64 * 1024 < CACHED_READ_MIN_BYTES);
  assert.equal(readCached(fh, buf, 0, buf.length, 0), 0);
  assert.equal(await readFully(fh, buf, 0, buf.length, 0), buf.length);
});
