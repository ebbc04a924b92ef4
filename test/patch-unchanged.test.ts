/**
 * apply checks TARGET between the patch's records too (version 2 patches): a TARGET that
 * differs from the base only where the patch changes nothing (a file edited on the device
 * since it was flashed) is refused with nothing written, instead of being patched into an
 * image that is neither the base nor the result, exit 0.
 */

import assert from 'node:assert/strict';
import { copyFile, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import { apply } from '../src/engine/apply.js';
import { diff } from '../src/engine/diff.js';
import { makeIndex } from '../src/engine/make-index.js';
import { BlksyncError } from '../src/errors.js';
import { describePatch } from '../src/formats/patch-info.js';
import { runCli } from './helpers/cli.js';
import { attachLoop, needLoop } from './helpers/loop.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

const MIB = 1024 * 1024;

interface Pair {
  dir: string;
  base: string;
  next: string;
  patch: string;
  target: string;
  baseBytes: Buffer;
  nextBytes: Buffer;
}

/** BASE of `size` random bytes, NEW with two changed runs; TARGET a copy of BASE. */
async function pair(
  t: Parameters<typeof tempDir>[0],
  size = 4 * MIB,
  options: Parameters<typeof diff>[3] = {},
): Promise<Pair> {
  const dir = await tempDir(t);
  const baseBytes = seededBytes(size, 4242);
  const nextBytes = Buffer.from(baseBytes);
  nextBytes.fill(1, MIB + 10, MIB + 5000);
  nextBytes.fill(2, 3 * MIB - 700, 3 * MIB + 100);
  const p: Pair = {
    dir,
    base: join(dir, 'base.img'),
    next: join(dir, 'new.img'),
    patch: join(dir, 'update.bsp'),
    target: join(dir, 'target.img'),
    baseBytes,
    nextBytes,
  };
  await writeFile(p.base, baseBytes);
  await writeFile(p.next, nextBytes);
  await writeFile(p.target, baseBytes);
  await diff(p.base, p.next, p.patch, options);
  return p;
}

/** TARGET with one byte changed at `at` (outside the patch's records). */
async function edited(p: Pair, at: number, from: Buffer = p.baseBytes): Promise<Buffer> {
  const bytes = Buffer.from(from);
  bytes[at] = bytes[at]! ^ 0x01;
  await writeFile(p.target, bytes);
  return bytes;
}

async function refusedUnchanged(run: Promise<unknown>): Promise<BlksyncError> {
  const err = await run.then(
    () => assert.fail('apply must refuse a TARGET changed outside the records'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof BlksyncError, String(err));
  assert.equal(err.code, 'EBASE_MISMATCH', err.message);
  assert.match(err.message, /outside the patch's records it holds other bytes/);
  return err;
}

test('a TARGET changed outside the records is refused, from a file and a stream, nothing written', async (t) => {
  const p = await pair(t);
  for (const at of [0, 2 * MIB + 12345, 4 * MIB - 1]) {
    const before = await edited(p, at);
    const err = await refusedUnchanged(apply(p.patch, p.target));
    assert.match(err.message, /nothing was written/);
    assert.deepEqual(await readFile(p.target), before, `file: written (edit at ${at})`);
    await refusedUnchanged(apply(Readable.from([await readFile(p.patch)]), p.target));
    assert.deepEqual(await readFile(p.target), before, `stream: written (edit at ${at})`);
    await refusedUnchanged(apply(p.patch, p.target, { dryRun: true }));
  }
  // the same TARGET once it is the base again applies, and every byte is checked
  await writeFile(p.target, p.baseBytes);
  const ok = await apply(p.patch, p.target);
  assert.equal(ok.unchangedChecked, true);
  assert.equal(ok.patchVersion, 2);
  assert.ok(ok.bytesRead >= 4 * MIB - 2 * 8192, `${ok.bytesRead} bytes read`);
  assert.deepEqual(await readFile(p.target), p.nextBytes);
  // a result changed outside the records is not "already applied"
  await edited(p, 5, p.nextBytes);
  await refusedUnchanged(apply(p.patch, p.target));
});

test('--force writes the records anyway and says the rest was not checked', async (t) => {
  const p = await pair(t);
  const before = await edited(p, 7);
  const r = await apply(p.patch, p.target, { force: true });
  assert.equal(r.unchangedChecked, false);
  const expected = Buffer.from(p.nextBytes);
  expected[7] = before[7]!;
  assert.deepEqual(await readFile(p.target), expected);
});

test('--records-only reads TARGET only where the records go, and the CLI says what was not checked', async (t) => {
  const p = await pair(t);
  const before = await edited(p, 3 * MIB + 4096);
  const r = await runCli(['apply', '--records-only', '--json', p.patch, p.target]);
  assert.equal(r.code, 0, r.stderr);
  const json = JSON.parse(r.stdout) as { unchangedChecked: boolean; bytesRead: number };
  assert.equal(json.unchangedChecked, false);
  assert.ok(json.bytesRead <= 3 * 8192, `${json.bytesRead} bytes read`);
  const expected = Buffer.from(p.nextBytes);
  expected[3 * MIB + 4096] = before[3 * MIB + 4096]!;
  assert.deepEqual(await readFile(p.target), expected);
  await writeFile(p.target, p.baseBytes);
  const text = await runCli(['apply', '--records-only', p.patch, p.target]);
  assert.match(
    text.stdout + text.stderr,
    /only where the records go was TARGET checked \(--records-only\)/,
  );
});

test('apply --reverse checks between the records too', async (t) => {
  const p = await pair(t, 4 * MIB, { reversible: true });
  await writeFile(p.target, p.nextBytes);
  const before = await edited(p, 2 * MIB, p.nextBytes);
  await refusedUnchanged(apply(p.patch, p.target, { reverse: true }));
  assert.deepEqual(await readFile(p.target), before);
  await writeFile(p.target, p.nextBytes);
  await apply(p.patch, p.target, { reverse: true });
  assert.deepEqual(await readFile(p.target), p.baseBytes);
});

test('from a stream, a later batch finding other bytes stops with what was written; a rerun on the fixed TARGET finishes', async (t) => {
  const dir = await tempDir(t);
  const size = 8 * MIB;
  const base = seededBytes(size, 515);
  const next = Buffer.from(base);
  // a change every 64 KiB: 128 records, in batches of 256 KiB of new content
  for (let o = 0; o < size; o += 64 * 1024) next[o + 100] = next[o + 100]! ^ 0xff;
  const files = ['base', 'new', 'target'].map((n) => join(dir, `${n}.img`));
  await writeFile(files[0]!, base);
  await writeFile(files[1]!, next);
  const patch = join(dir, 'p.bsp');
  await diff(files[0]!, files[1]!, patch);
  const target = Buffer.from(base);
  target[6 * MIB + 9000] = target[6 * MIB + 9000]! ^ 0x10; // between two records, late in the image
  await writeFile(files[2]!, target);
  const err = await refusedUnchanged(
    apply(Readable.from([await readFile(patch)]), files[2]!, { batchBytes: 256 * 1024 }),
  );
  assert.match(err.message, /records, .* were written before this batch/);
  const partial = err.partial as { recordsWritten: number };
  assert.ok(partial.recordsWritten > 0 && partial.recordsWritten < 128);
  // the stretch of the edit was never written: restore it and the rerun completes
  const now = await readFile(files[2]!);
  now[6 * MIB + 9000] = base[6 * MIB + 9000]!;
  await writeFile(files[2]!, now);
  await apply(Readable.from([await readFile(patch)]), files[2]!, { batchBytes: 256 * 1024 });
  assert.deepEqual(await readFile(files[2]!), next);
});

test('sparse images: holes are zeros without reading; data where BASE had a hole, or a hole where BASE had data, is refused', async (t) => {
  const dir = await tempDir(t);
  const size = 64 * MIB;
  const pieces = [
    { offset: 0, data: seededBytes(MIB, 1) },
    { offset: 20 * MIB, data: seededBytes(2 * MIB, 2) },
    { offset: 50 * MIB, data: seededBytes(MIB, 3) },
  ];
  const base = join(dir, 'base.img');
  const next = join(dir, 'new.img');
  const target = join(dir, 'target.img');
  const patch = join(dir, 'p.bsp');
  await writeSparseFile(base, size, pieces);
  await writeSparseFile(next, size, [
    ...pieces,
    { offset: 21 * MIB + 4096, data: Buffer.from('a changed file') },
  ]);
  await diff(base, next, patch);
  const fresh = async (extra: { offset: number; data: Buffer }[] = []): Promise<void> => {
    await writeSparseFile(target, 0, []);
    await writeSparseFile(target, size, [...pieces, ...extra]);
  };
  await fresh();
  const ok = await apply(patch, target, { dryRun: true });
  assert.ok(ok.bytesRead < 8 * MIB, `read ${ok.bytesRead} bytes of a 64 MiB image of 4 MiB data`);
  // data written into what BASE has as a hole
  await fresh([{ offset: 40 * MIB, data: Buffer.from('new data in a hole') }]);
  await refusedUnchanged(apply(patch, target));
  // BASE's data gone (a hole punched, or zeros written) where the patch changes nothing
  await fresh([{ offset: 50 * MIB, data: Buffer.alloc(MIB) }]);
  await refusedUnchanged(apply(patch, target));
  await fresh();
  await apply(patch, target);
  assert.deepEqual(await readFile(target), await readFile(next));
});

test('a patch made from an index of BASE checks between the records too', async (t) => {
  const p = await pair(t);
  const idx = join(p.dir, 'base.idx');
  await makeIndex(p.base, idx, { blockSize: 4096 });
  const fromIndex = join(p.dir, 'from-index.bsp');
  await diff(idx, p.next, fromIndex);
  await edited(p, 3 * MIB + 99999);
  await refusedUnchanged(apply(fromIndex, p.target));
  await writeFile(p.target, p.baseBytes);
  await apply(fromIndex, p.target);
  assert.deepEqual(await readFile(p.target), p.nextBytes);
});

test('sizes that differ: the bytes both images have are checked, up to the smaller size', async (t) => {
  const dir = await tempDir(t);
  const base = seededBytes(3 * MIB + 1234, 77);
  for (const nextSize of [5 * MIB + 17, 2 * MIB + 4096, 3 * MIB + 1234]) {
    const next = Buffer.alloc(nextSize);
    base.copy(next, 0, 0, Math.min(nextSize, base.length));
    next.fill(9, 100_000, 100_100);
    const files = ['base', 'new', 'target'].map((n) => join(dir, `${n}.img`));
    await writeFile(files[0]!, base);
    await writeFile(files[1]!, next);
    const patch = join(dir, `p${nextSize}.bsp`);
    await diff(files[0]!, files[1]!, patch);
    const target = Buffer.from(base);
    target[2 * MIB - 1] = target[2 * MIB - 1]! ^ 1;
    await writeFile(files[2]!, target);
    await refusedUnchanged(apply(patch, files[2]!));
    await writeFile(files[2]!, base);
    await apply(patch, files[2]!);
    assert.deepEqual(await readFile(files[2]!), next, `NEW of ${nextSize} bytes`);
  }
});

test('a loop device changed outside the records is refused, nothing written', async (t) => {
  if (!needLoop(t)) return;
  const p = await pair(t, 8 * MIB);
  const before = await edited(p, 6 * MIB);
  const dev = await attachLoop(t, p.target);
  await refusedUnchanged(apply(p.patch, dev));
  assert.deepEqual(await readFile(p.target), before);
});

test('CLI: the refusal is one line with EBASE_MISMATCH and exit 1', async (t) => {
  const p = await pair(t);
  await edited(p, 123);
  const r = await runCli(['apply', p.patch, p.target]);
  assert.equal(r.code, 1, r.stderr);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, /outside the patch's records .*--force .*\[EBASE_MISMATCH\]$/m);
});

test('a version 1 patch (an older blksync) still applies, checked only in its records, and says so', async (t) => {
  const dir = await tempDir(t);
  // test/fixtures/patch-v1/README.md: how the fixture was made
  const base = seededBytes(256 * 1024, 1701);
  const next = Buffer.from(base);
  next.fill(0x5a, 5000, 9000);
  next.fill(0xa5, 200_000, 200_100);
  const patch = join(dir, 'v1.bsp');
  await copyFile(join(import.meta.dirname, 'fixtures/patch-v1/reversible.bsp'), patch);
  assert.equal((await describePatch(patch, { verify: true })).version, 1);
  const target = join(dir, 'target.img');
  await writeFile(target, base);
  const r = await runCli(['apply', patch, target]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout + r.stderr, /version 1, from an older blksync.*make it again/);
  assert.deepEqual(await readFile(target), next);
  const back = await apply(patch, target, { reverse: true });
  assert.equal(back.unchangedChecked, false);
  assert.equal(back.patchVersion, 1);
  assert.deepEqual(await readFile(target), base);
  assert.equal((await stat(target)).size, base.length);
});
