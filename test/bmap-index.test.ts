/**
 * A bmap copy with `--index`: only the mapped ranges are hashed and compared, DST is not read
 * beyond the index's sample, and the index still describes all of DST afterwards (the
 * unmapped areas as the copy left them: holes punched in a file, untouched on a device).
 */

import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { copy } from '../src/copy.js';
import { makeIndex } from '../src/engine/make-index.js';
import { BlksyncError } from '../src/errors.js';
import { readIndexFile } from '../src/formats/index-file.js';
import { attachLoop, ioStat, needLoop, readDevice, run } from './helpers/loop.js';
import { BS, KiB, MiB, SIZE, bmapImage } from './helpers/bmap-image.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

/** The index's hashes equal those of a fresh index of DST's first SIZE bytes in 4 KiB blocks. */
async function assertIndexDescribes(index: string, dst: string, dir: string): Promise<void> {
  const fresh = join(dir, 'fresh.blkidx');
  // a device is larger than the image: index a copy of the part the image covers
  const head = join(dir, 'head.img');
  await writeFile(head, await readDevice(dst, SIZE));
  await makeIndex(head, fresh, { blockSize: BS });
  const kept = await readIndexFile(index);
  assert.equal(kept.state.kind, 'clean');
  assert.equal(kept.blockSize, BS);
  assert.ok(kept.hashes.equals((await readIndexFile(fresh)).hashes), 'index describes DST');
}

test('a bmap copy onto a file with --index: mapped ranges compared by hash, holes punched, index exact', async (t) => {
  const dir = await tempDir(t);
  const v1 = await bmapImage(dir, 1);
  const v2 = await bmapImage(dir, 2);
  const dst = join(dir, 'dst.img');
  const index = join(dir, 'dst.blkidx');
  await writeFile(dst, seededBytes(SIZE, 9)); // old junk everywhere

  const first = await copy(v1.path, dst, { index });
  assert.equal(first.index?.mode, 'created');
  assert.equal(first.index.blockSize, BS, "the bmap's block size");
  assert.deepEqual(await readFile(dst), v1.bytes, 'unmapped areas punched to zeros');
  await assertIndexDescribes(index, dst, dir);

  const second = await copy(v2.path, dst, { index });
  assert.equal(second.index?.mode, 'used');
  assert.ok(second.bytesRead <= 16 * BS, `read ${second.bytesRead} bytes of DST`);
  assert.equal(second.bytesWritten, 2 * BS);
  assert.deepEqual(await readFile(dst), v2.bytes);
  await assertIndexDescribes(index, dst, dir);
});

test('a bmap copy onto a device with --index: unmapped areas untouched and indexed, then not read', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const v1 = await bmapImage(dir, 1);
  const v2 = await bmapImage(dir, 2);
  const backing = join(dir, 'backing');
  const junk = seededBytes(10 * MiB, 8);
  await writeFile(backing, junk);
  const dev = await attachLoop(t, backing);
  const index = join(dir, 'dev.blkidx');

  const first = await copy(v1.path, dev, { index });
  assert.equal(first.index?.mode, 'created');
  const onDevice = await readDevice(dev, 10 * MiB);
  for (const [s, e] of [
    [3 * BS, MiB + 5 * BS],
    [SIZE, 10 * MiB],
  ] as const) {
    assert.ok(onDevice.subarray(s, e).equals(junk.subarray(s, e)), `bytes ${s}-${e} untouched`);
  }
  assert.ok(onDevice.subarray(0, 3 * BS).equals(v1.bytes.subarray(0, 3 * BS)));
  await assertIndexDescribes(index, dev, dir);

  await run('blockdev', ['--flushbufs', dev]);
  const before = await ioStat(dev);
  const second = await copy(v2.path, dev, { index });
  const read = ((await ioStat(dev)).readSectors - before.readSectors) * 512;
  assert.equal(second.index?.mode, 'used');
  assert.equal(second.bytesWritten, 2 * BS);
  assert.ok(read <= 16 * BS + 64 * KiB, `read ${read} bytes of the device`);
  const after = await readDevice(dev, SIZE);
  for (const [s, e] of [
    [MiB + 5 * BS, MiB + 305 * BS],
    [6 * MiB, 6 * MiB + BS],
  ] as const) {
    assert.ok(after.subarray(s, e).equals(v2.bytes.subarray(s, e)), `mapped ${s}-${e} is v2`);
  }
  await assertIndexDescribes(index, dev, dir);
});

test("an index in other blocks than the bmap's is refused unless --rebuild-index; so is -b that does not divide them", async (t) => {
  const dir = await tempDir(t);
  const v1 = await bmapImage(dir, 1);
  const dst = join(dir, 'dst.img');
  const index = join(dir, 'dst.blkidx');
  const junk = seededBytes(SIZE, 9);
  await writeFile(dst, junk);
  await makeIndex(dst, index); // 64 KiB blocks
  await assert.rejects(copy(v1.path, dst, { index }), (err: unknown) => {
    assert.ok(err instanceof BlksyncError && err.code === 'EUSAGE', String(err));
    assert.match(err.message, /65536-byte blocks but the bmap's blocks are 4096/);
    return true;
  });
  assert.deepEqual(await readFile(dst), junk, 'nothing written');
  await assert.rejects(copy(v1.path, dst, { index, blockSize: 8 * KiB }), (err: unknown) => {
    assert.ok(err instanceof BlksyncError && err.code === 'EUSAGE', String(err));
    return true;
  });
  const r = await copy(v1.path, dst, { index, rebuildIndex: true });
  assert.equal(r.index?.mode, 'rebuilt');
  await assertIndexDescribes(index, dst, dir);
});
