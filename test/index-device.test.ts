/**
 * Hash indexes on loop devices (root): `copy --index` reads nothing of the device beyond the
 * verification sample, as the device's own read counters show; the index names the device
 * by a stable identity; tampering and the wrong device are refused before any write.
 */

import assert from 'node:assert/strict';
import { open, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import type { CopyResult } from '../src/copy.js';
import { readIndexFile, type IndexFile } from '../src/formats/index-file.js';
import { sha256 } from '../src/hash.js';
import { runCli } from './helpers/cli.js';
import { attachLoop, ioStat, needLoop, readDevice, run } from './helpers/loop.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const MIB = 1024 * 1024;
const SIZE = 32 * MIB;

function essentials(i: IndexFile) {
  return {
    blockSize: i.blockSize,
    imageSize: i.imageSize,
    state: i.state,
    key: i.identity.key,
    hashes: sha256(i.hashes).toString('hex'),
  };
}

/** Drops the device's page cache, so that reads from it reach the device and are counted. */
async function flush(dev: string): Promise<void> {
  await run('blockdev', ['--flushbufs', dev]);
}

async function readsDuring<T>(dev: string, fn: () => Promise<T>): Promise<[T, number]> {
  await flush(dev);
  const before = await ioStat(dev);
  const result = await fn();
  const after = await ioStat(dev);
  return [result, (after.readSectors - before.readSectors) * 512];
}

async function setup(t: TestContext) {
  const dir = await tempDir(t);
  const old = seededBytes(SIZE, 11);
  const neu = Buffer.from(old);
  for (const o of [0, 5 * MIB + 7, 17 * MIB, SIZE - 70_000]) seededBytes(60_000, o).copy(neu, o);
  const backing = join(dir, 'disk.img');
  const src = join(dir, 'new.img');
  await writeFile(backing, old);
  await writeFile(src, neu);
  const dev = await attachLoop(t, backing);
  return { dir, old, neu, src, dev, index: join(dir, 'disk.blkidx') };
}

async function copyJson(args: string[]): Promise<CopyResult> {
  const r = await runCli(['copy', ...args, '--json']);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as CopyResult;
}

test('copy --index onto a loop device reads only the sample of it, and the index stays exact', async (t) => {
  if (!needLoop(t)) return;
  const s = await setup(t);
  const made = await runCli(['index', s.dev, '-o', s.index]);
  assert.equal(made.code, 0, made.stderr);
  const stored = await readIndexFile(s.index);
  assert.equal(stored.identity.kind, 'block-device');
  assert.match(stored.identity.key, /^loop:.*disk\.img$/, 'a loop device is named by its file');

  const [r, read] = await readsDuring(s.dev, () => copyJson([s.src, s.dev, '--index', s.index]));
  assert.equal(r.index?.mode, 'used');
  assert.equal(r.index.sampleBlocks, 16);
  // 16 blocks of 64 KiB, plus what the kernel's readahead adds to each
  assert.ok(read <= 16 * (64 * 1024 + 256 * 1024), `the device saw ${read} bytes read`);
  assert.ok(read >= 16 * 64 * 1024, `the sample was read from the device (${read} bytes)`);
  assert.deepEqual(await readDevice(s.dev, SIZE), s.neu);

  const fresh = join(s.dir, 'fresh.blkidx');
  assert.equal((await runCli(['index', s.dev, '-o', fresh])).code, 0);
  assert.deepEqual(
    essentials(await readIndexFile(s.index)),
    essentials(await readIndexFile(fresh)),
  );

  // for scale: a copy without an index reads all of the device
  const [, readAll] = await readsDuring(s.dev, () => copyJson([s.src, s.dev]));
  assert.ok(readAll >= SIZE, `a plain copy read ${readAll} bytes`);
  const [, readNone] = await readsDuring(s.dev, () =>
    copyJson([s.src, s.dev, '--index', s.index, '--verify-sample', '0']),
  );
  assert.equal(readNone, 0, '--verify-sample 0 reads nothing of the device');
});

test("a device written behind blksync's back, or another device, is refused before any write", async (t) => {
  if (!needLoop(t)) return;
  const s = await setup(t);
  assert.equal((await runCli(['index', s.dev, '-o', s.index])).code, 0);
  // someone rewrites the partition table area
  const fh = await open(s.dev, 'r+');
  await fh.write(Buffer.alloc(512, 0xee), 0, 512, 0);
  await fh.sync();
  await fh.close();
  const before = await ioStat(s.dev);
  const stale = await runCli(['copy', s.src, s.dev, '--index', s.index]);
  assert.equal(stale.code, 1);
  assert.match(
    stale.stderr,
    /cannot be trusted: \d+ sectors were written to .*--rebuild-index.*--trust-index.*EINDEX_STALE/,
  );
  // vouched for by the user, the index still meets the sample, which reads block 0
  const sampled = await runCli(['copy', s.src, s.dev, '--index', s.index, '--trust-index']);
  assert.equal(sampled.code, 1);
  assert.match(
    sampled.stderr,
    /is stale: the block at byte 0 .* does not match its hash.*EINDEX_STALE/,
  );
  assert.equal((await ioStat(s.dev)).writeSectors, before.writeSectors, 'nothing written');

  const other = await setup(t);
  const mismatch = await runCli(['copy', s.src, other.dev, '--index', s.index]);
  assert.equal(mismatch.code, 1);
  assert.match(mismatch.stderr, /does not describe this destination.*EINDEX_MISMATCH/);
  assert.deepEqual(await readDevice(other.dev, SIZE), other.old);

  const rebuilt = await copyJson([s.src, s.dev, '--index', s.index, '--rebuild-index']);
  assert.equal(rebuilt.index?.mode, 'rebuilt');
  assert.deepEqual(await readDevice(s.dev, SIZE), s.neu);
  const used = await copyJson([s.src, s.dev, '--index', s.index]);
  assert.equal(used.index?.mode, 'used');
  assert.equal(used.bytesWritten, 0);
});
