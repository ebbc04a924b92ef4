/**
 * Refusals that protect the user's files whatever the command: an output that is one of the
 * inputs, a failed copy that must leave DST as it was, a stalled stream that must not delay
 * Ctrl-C. (Found in review; each was a real loss of data or a hang.)
 */

import assert from 'node:assert/strict';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { runCli, startCli } from './helpers/cli.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

test('an output file that is an input is refused, and the input survives', async (t) => {
  const dir = await tempDir(t);
  const img = join(dir, 'img');
  const dst = join(dir, 'dst');
  const data = seededBytes(300_000, 1);
  await writeFile(img, data);
  await writeFile(dst, seededBytes(300_000, 2));
  const cases: string[][] = [
    ['index', img, '-o', img],
    ['bmap', 'create', img, '-o', img],
    ['copy', img, dst, '--index', dst, '--rebuild-index'],
    ['copy', img, dst, '--index', img, '--rebuild-index'],
    ['diff', img, dst, '-o', dst],
  ];
  for (const args of cases) {
    const r = await runCli(args);
    assert.equal(r.code, 1, args.join(' '));
    assert.match(r.stderr, /writing it would destroy that.*\[ESAME_FILE\]/, args.join(' '));
  }
  assert.deepEqual(await readFile(img), data);
  assert.deepEqual(await readFile(dst), seededBytes(300_000, 2));
});

test('a bmap copy that fails its checksum leaves an existing DST untouched (no holes punched)', async (t) => {
  const dir = await tempDir(t);
  const img = join(dir, 'img');
  const mib = 1024 * 1024;
  await writeSparseFile(img, 8 * mib, [
    { offset: 0, data: seededBytes(mib, 3) },
    { offset: 7 * mib, data: seededBytes(mib, 4) },
  ]);
  const made = await runCli(['bmap', 'create', img, '-o', `${img}.bmap`]);
  assert.equal(made.code, 0, made.stderr);
  const bad = seededBytes(mib, 3);
  bad[100] = bad[100]! ^ 0xff;
  await writeFile(img, bad, { flag: 'r+' });
  const dst = join(dir, 'dst');
  const old = seededBytes(8 * mib, 5);
  await writeFile(dst, old);
  const r = await runCli(['copy', img, dst]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /\[EBMAP_CHECKSUM\]/);
  assert.deepEqual(await readFile(dst), old, 'not a byte of DST changed');
});

test('a bmap copy whose first range fails its checksum leaves no new DST behind', async (t) => {
  const dir = await tempDir(t);
  const img = join(dir, 'img');
  const mib = 1024 * 1024;
  const good = seededBytes(mib, 3);
  await writeSparseFile(img, 8 * mib, [{ offset: 0, data: good }]);
  const made = await runCli(['bmap', 'create', img, '-o', `${img}.bmap`]);
  assert.equal(made.code, 0, made.stderr);
  const bad = Buffer.from(good);
  bad[100] = bad[100]! ^ 0xff;
  await writeFile(img, bad, { flag: 'r+' });
  const dst = join(dir, 'new.img');
  const r = await runCli(['copy', img, dst]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /nothing of this range was written.*\[EBMAP_CHECKSUM\]/);
  await assert.rejects(stat(dst), /ENOENT/, 'the DST this run created is gone');
});

test('a destination created by this run is removed when a refusal comes before writing', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src');
  await writeFile(src, seededBytes(100_000, 6));
  await writeFile(join(dir, 'bad.idx'), 'not an index');
  const r = await runCli(['copy', src, join(dir, 'new'), '--index', join(dir, 'bad.idx')]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /\[EINDEX_FORMAT\]/);
  await assert.rejects(stat(join(dir, 'new')), /ENOENT/);
});

test('SIGTERM while stdin stalls stops the copy at once with 143', async (t) => {
  const dir = await tempDir(t);
  const dst = join(dir, 'dst');
  const { child, done } = startCli(['copy', '--size', String(4 * 1024 * 1024), '-', dst], {
    keepStdinOpen: true,
  });
  child.stdin!.write(seededBytes(1024 * 1024, 7));
  // wait until the copy is under way (DST created), then stop it while stdin has nothing more
  for (let i = 0; i < 200; i++) {
    if (
      await stat(dst).then(
        () => true,
        () => false,
      )
    )
      break;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  child.kill('SIGTERM');
  const r = await done;
  assert.equal(r.code, 143, r.stderr);
  assert.match(r.stderr, /\[EINTERRUPTED\]/);
});

test('info on a directory is a one-line error with a code', async () => {
  const r = await runCli(['info', '/tmp']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^blksync: cannot read \/tmp: is a directory \(EISDIR\) \[E[A-Z_]+\]\n$/);
});
