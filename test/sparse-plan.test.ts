/**
 * engine/sparse-plan.ts through copy(): where SRC and DST are both holes nothing is read; a
 * hole on one side against data on the other is still compared, so DST always ends equal
 * to SRC. Real sparse files on the test machine's file system.
 */

import assert from 'node:assert/strict';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { copy } from '../src/copy.js';
import { intersectRanges, unionRanges } from '../src/ranges.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

/** True when the file system under `dir` reports holes (a sparse file allocates less). */
async function reportsHoles(file: string): Promise<boolean> {
  const st = await stat(file);
  return st.blocks * 512 < st.size;
}

test('copy between sparse files reads only where one side holds data and ends equal', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  await writeSparseFile(src, SIZE, [
    { offset: 0, data: seededBytes(MiB, 1) }, // data against DST's hole: written
    { offset: 4 * MiB, data: seededBytes(MiB, 2) }, // data against other data: compared
    { offset: 10 * MiB, data: seededBytes(MiB, 3) }, // data against equal data: nothing written
  ]);
  await writeSparseFile(dst, SIZE, [
    { offset: 2 * MiB, data: seededBytes(MiB, 4) }, // data against SRC's hole: zeroed
    { offset: 4 * MiB, data: seededBytes(MiB, 5) },
    { offset: 10 * MiB, data: seededBytes(MiB, 3) },
    { offset: 14 * MiB + 4096, data: Buffer.from('one stray block') }, // against a hole
  ]);
  if (!(await reportsHoles(src))) {
    t.skip('this file system does not keep holes');
    return;
  }
  const r = await copy(src, dst);
  assert.deepEqual(await readFile(dst), await readFile(src));
  // 0-1, 2-3 (merged with the gap between), 4-5, 10-11 MiB and one block: not the 16 MiB
  assert.ok(r.bytesScanned < SIZE / 2, `scanned ${r.bytesScanned} of ${SIZE}`);
  assert.equal(r.bytesWritten, MiB + MiB + MiB + 4096);

  // a second run finds nothing to do, and reads no more than the data
  const again = await copy(src, dst);
  assert.equal(again.bytesWritten, 0);
  assert.ok(again.bytesScanned < SIZE / 2);
});

test('a hole in SRC against data in DST is written as zeros, even where DST alone has data', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  await writeSparseFile(src, SIZE, []);
  await writeSparseFile(dst, SIZE, [{ offset: 7 * MiB + 123, data: seededBytes(5000, 9) }]);
  const r = await copy(src, dst);
  assert.deepEqual(await readFile(dst), Buffer.alloc(SIZE));
  assert.equal(r.blocksDiffering, 2);
});

test('a new DST from a sparse SRC reads only SRC data and stays sparse', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  await writeSparseFile(src, SIZE, [{ offset: 8 * MiB, data: seededBytes(MiB, 6) }]);
  if (!(await reportsHoles(src))) {
    t.skip('this file system does not keep holes');
    return;
  }
  const r = await copy(src, dst);
  assert.deepEqual(await readFile(dst), await readFile(src));
  assert.equal(r.bytesScanned, MiB);
  assert.ok((await stat(dst)).blocks * 512 <= 2 * MiB);
});

test('--full still considers the whole image (dd behaviour)', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  await writeSparseFile(src, SIZE, [{ offset: 0, data: seededBytes(MiB, 7) }]);
  await writeSparseFile(dst, SIZE, []);
  const full = await copy(src, dst, { full: true });
  assert.equal(full.bytesScanned, SIZE);
  assert.deepEqual(await readFile(dst), await readFile(src));
});

test('with --index the plan is not narrowed: the index written describes the holes too, and the next copy uses it', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  const index = join(dir, 'dst.blkidx');
  // data in the first and last blocks, as an OS image has; holes between
  await writeSparseFile(src, SIZE, [
    { offset: 0, data: seededBytes(MiB, 11) },
    { offset: 6 * MiB, data: seededBytes(MiB, 12) },
    { offset: SIZE - MiB, data: seededBytes(MiB, 13) },
  ]);
  if (!(await reportsHoles(src))) {
    t.skip('this file system does not keep holes');
    return;
  }
  const first = await copy(src, dst, { index });
  assert.equal(first.index?.mode, 'created');
  // every block of DST is sampled: a hole's hash must be that of zeros
  const second = await copy(src, dst, { index, verifySample: SIZE / (64 * 1024) });
  assert.equal(second.index?.mode, 'used');
  assert.equal(second.bytesWritten, 0);
  assert.deepEqual(await readFile(dst), await readFile(src));
});

test('unionRanges and intersectRanges', () => {
  const a = [
    { start: 0, end: 10 },
    { start: 20, end: 30 },
  ];
  const b = [
    { start: 5, end: 12 },
    { start: 40, end: 50 },
  ];
  assert.deepEqual(unionRanges(a, b), [
    { start: 0, end: 12 },
    { start: 20, end: 30 },
    { start: 40, end: 50 },
  ]);
  assert.deepEqual(unionRanges(a, b, 8), [
    { start: 0, end: 30 },
    { start: 40, end: 50 },
  ]);
  assert.deepEqual(unionRanges([], []), []);
  assert.deepEqual(intersectRanges([{ start: 0, end: 100 }], a), a);
  assert.deepEqual(
    intersectRanges(
      [
        { start: 8, end: 22 },
        { start: 25, end: 45 },
      ],
      unionRanges(a, b),
    ),
    [
      { start: 8, end: 12 },
      { start: 20, end: 22 },
      { start: 25, end: 30 },
      { start: 40, end: 45 },
    ],
  );
});
