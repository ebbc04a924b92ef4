/** compare() and `blksync compare`: cmp for images. */

import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { compare } from '../src/engine/compare.js';
import { runCli } from './helpers/cli.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

test('identical files: exit 0', async (t) => {
  const dir = await tempDir(t);
  const data = seededBytes(1_000_001, 1);
  await writeFile(join(dir, 'a'), data);
  await writeFile(join(dir, 'b'), data);
  const r = await runCli(['compare', join(dir, 'a'), join(dir, 'b')]);
  assert.equal(r.code, 0);
  assert.match(r.stdout, /identical/);
});

test('differing files: exact, merged ranges and exit 1', async (t) => {
  const dir = await tempDir(t);
  const a = seededBytes(10 * 1024 * 1024, 2);
  const b = Buffer.from(a);
  // one changed region spanning a chunk boundary, and two single bytes far apart
  const chunk = 4 * 1024 * 1024;
  for (let i = chunk - 100; i < chunk + 50_000; i++) b[i] = (b[i]! + 1) & 0xff;
  b[7] = (b[7]! + 1) & 0xff;
  b[9_000_000] = (b[9_000_000]! + 1) & 0xff;
  await writeFile(join(dir, 'a'), a);
  await writeFile(join(dir, 'b'), b);
  const res = await compare(join(dir, 'a'), join(dir, 'b'));
  assert.equal(res.same, false);
  assert.deepEqual(res.ranges, [
    { start: 7, end: 8 },
    { start: chunk - 100, end: chunk + 50_000 },
    { start: 9_000_000, end: 9_000_001 },
  ]);
  const cli = await runCli(['compare', '--json', join(dir, 'a'), join(dir, 'b')]);
  assert.equal(cli.code, 1);
  const json = JSON.parse(cli.stdout) as { rangeCount: number };
  assert.equal(json.rangeCount, 3);
  const text = await runCli(['compare', join(dir, 'a'), join(dir, 'b')]);
  assert.match(text.stdout, /^7-8 \(1 bytes\)$/m);
});

test('different sizes are reported, not an error', async (t) => {
  const dir = await tempDir(t);
  const a = seededBytes(5000, 3);
  await writeFile(join(dir, 'a'), a);
  await writeFile(join(dir, 'b'), a.subarray(0, 4000));
  const r = await runCli(['compare', join(dir, 'a'), join(dir, 'b')]);
  assert.equal(r.code, 1);
  assert.match(r.stdout, /sizes differ: .* is 5000 bytes, .* is 4000 bytes/);
  const res = await compare(join(dir, 'a'), join(dir, 'b'));
  assert.equal(res.rangeCount, 0);
  assert.equal(res.bytesCompared, 4000);
});

test('errors exit 2 like cmp', async (t) => {
  const dir = await tempDir(t);
  await writeFile(join(dir, 'a'), 'x');
  const r = await runCli(['compare', join(dir, 'a'), join(dir, 'missing')]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /\[ESRC_OPEN\]/);
  const u = await runCli(['compare', join(dir, 'a')]);
  assert.equal(u.code, 2);
});
