/**
 * `blksync diff --format simg BASE NEW -o OUT`: an Android sparse image of NEW's size with
 * NEW's differing blocks (raw, or fill for a repeated 32-bit value) and don't-care elsewhere.
 * Checked with the real simg2img (which writes zeros for don't-care) and by copying it with
 * blksync onto a copy of BASE, which must end equal to NEW.
 */

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { EXIT_USAGE } from '../src/cli/exit-codes.js';
import { runCli } from './helpers/cli.js';
import { needTool } from './helpers/loop.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const run = promisify(execFile);
const BS = 4096;

/** BASE and NEW: NEW is BASE with some scattered blocks changed (one of them a fill). */
function images(
  blocks: number,
  newBlocks = blocks,
): { base: Buffer; next: Buffer; changed: number[] } {
  const base = seededBytes(blocks * BS, 1);
  const next = Buffer.alloc(newBlocks * BS);
  base.copy(next, 0, 0, Math.min(base.length, next.length));
  const changed = [0, 3, 4, 17, 40].filter((b) => b < Math.min(blocks, newBlocks));
  for (const b of changed) seededBytes(BS, 100 + b).copy(next, b * BS);
  // a block of one repeated 32-bit value: a FILL chunk
  if (newBlocks > 30) {
    next.fill(Buffer.from([0xde, 0xad, 0xbe, 0xef]), 30 * BS, 31 * BS);
    changed.push(30);
  }
  for (let b = blocks; b < newBlocks; b++) {
    seededBytes(BS, 500 + b).copy(next, b * BS);
    changed.push(b);
  }
  return { base, next, changed: changed.sort((a, b) => a - b) };
}

/** simg2img's output: NEW's blocks where they differ, zeros (don't-care) elsewhere. */
function expectedExpansion(next: Buffer, changed: number[]): Buffer {
  const out = Buffer.alloc(next.length);
  for (const b of changed) next.copy(out, b * BS, b * BS, (b + 1) * BS);
  return out;
}

async function diffSimg(dir: string, base: Buffer, next: Buffer): Promise<string> {
  await writeFile(join(dir, 'base.img'), base);
  await writeFile(join(dir, 'new.img'), next);
  const out = join(dir, 'out.simg');
  const r = await runCli([
    'diff',
    '--format',
    'simg',
    join(dir, 'base.img'),
    join(dir, 'new.img'),
    '-o',
    out,
  ]);
  assert.equal(r.code, 0, r.stderr);
  return out;
}

test('diff --format simg: simg2img expands it to NEW where it differs and zeros elsewhere; copied onto BASE it gives NEW', async (t) => {
  if (!(await needTool(t, 'simg2img', 'android-sdk-libsparse-utils'))) return;
  const dir = await tempDir(t);
  const { base, next, changed } = images(64);
  const out = await diffSimg(dir, base, next);
  const simg = await readFile(out);
  assert.equal(simg.readUInt32LE(0), 0xed26ff3a);
  assert.equal(simg.readUInt32LE(16), 64, 'blocks in the image: NEW size / 4096');
  // only the changed blocks' data is stored (5 raw blocks; the fill block is 4 bytes)
  assert.ok(simg.length < 6 * BS, `sparse image of ${simg.length} bytes`);
  assert.ok(simg.includes(Buffer.from([0xc2, 0xca])), 'the repeated 32-bit block is a FILL chunk');

  await run('simg2img', [out, join(dir, 'full.raw')]);
  assert.deepEqual(await readFile(join(dir, 'full.raw')), expectedExpansion(next, changed));

  await copyFile(join(dir, 'base.img'), join(dir, 'dst.img'));
  const r = await runCli(['copy', out, join(dir, 'dst.img')]);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(await readFile(join(dir, 'dst.img')), next);
});

test("copy --index of a diff's simg onto BASE gives NEW, its index hashing the don't-care blocks from DST; a rerun writes nothing", async (t) => {
  const dir = await tempDir(t);
  const { base, next } = images(64);
  const out = await diffSimg(dir, base, next);
  const dst = join(dir, 'dst.img');
  const idx = join(dir, 'dst.idx');
  await copyFile(join(dir, 'base.img'), dst);
  const first = await runCli(['copy', '--json', '--index', idx, out, dst]);
  assert.equal(first.code, 0, first.stderr);
  // before, with --index the don't-care blocks were written as zeros: DST was not NEW
  assert.deepEqual(await readFile(dst), next);
  const again = await runCli(['copy', '--json', '--index', idx, out, dst]);
  assert.equal(again.code, 0, again.stderr);
  const r = JSON.parse(again.stdout) as { bytesWritten: number; index: { mode: string } };
  assert.equal(r.bytesWritten, 0);
  assert.equal(r.index.mode, 'used');
  // the index vouches for DST as it is: copying BASE back with it leaves DST equal to BASE
  const back = await runCli(['copy', '--index', idx, join(dir, 'base.img'), dst]);
  assert.equal(back.code, 0, back.stderr);
  assert.deepEqual(await readFile(dst), base);
  // index blocks must tile the image's defined ranges
  const wide = await runCli(['copy', '--index', join(dir, 'w.idx'), '-b', '64K', out, dst]);
  assert.equal(wide.code, EXIT_USAGE, wide.stderr);
  assert.match(wide.stderr, /does not divide the 4096-byte blocks.*\[EUSAGE\]/);
  assert.deepEqual(await readFile(dst), base);
});

test('diff --format simg: NEW longer than BASE stores every block past BASE; NEW shorter gives an image of NEW size', async (t) => {
  if (!(await needTool(t, 'simg2img', 'android-sdk-libsparse-utils'))) return;
  const dir = await tempDir(t);
  const longer = images(48, 56);
  const out = await diffSimg(dir, longer.base, longer.next);
  await run('simg2img', [out, join(dir, 'full.raw')]);
  assert.deepEqual(
    await readFile(join(dir, 'full.raw')),
    expectedExpansion(longer.next, longer.changed),
  );
  // a device holding BASE, as large as NEW (copy does not grow a file DST)
  const dst = Buffer.alloc(longer.next.length);
  longer.base.copy(dst);
  await writeFile(join(dir, 'dst.img'), dst);
  const r = await runCli(['copy', out, join(dir, 'dst.img')]);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(await readFile(join(dir, 'dst.img')), longer.next);

  const shorter = images(48, 32);
  const out2 = await diffSimg(dir, shorter.base, shorter.next);
  assert.equal((await readFile(out2)).readUInt32LE(16), 32);
  await run('simg2img', [out2, join(dir, 'full2.raw')]);
  assert.deepEqual(
    await readFile(join(dir, 'full2.raw')),
    expectedExpansion(shorter.next, shorter.changed),
  );
});

test("diff --format simg: identical inputs give a valid image of only don't-care", async (t) => {
  if (!(await needTool(t, 'simg2img', 'android-sdk-libsparse-utils'))) return;
  const dir = await tempDir(t);
  const bytes = seededBytes(16 * BS, 7);
  const out = await diffSimg(dir, bytes, bytes);
  const simg = await readFile(out);
  assert.equal(simg.length, 28 + 12, "the header and one don't-care chunk");
  assert.equal(simg.readUInt32LE(20), 1, 'one chunk');
  assert.equal(simg.readUInt16LE(28), 0xcac3);
  await run('simg2img', [out, join(dir, 'full.raw')]);
  assert.deepEqual(await readFile(join(dir, 'full.raw')), Buffer.alloc(bytes.length));
});

test('diff --format simg refuses what it cannot write, writing nothing: NEW not whole blocks, stdout, --reversible', async (t) => {
  const dir = await tempDir(t);
  await writeFile(join(dir, 'base.img'), seededBytes(8 * BS, 1));
  await writeFile(join(dir, 'new.img'), seededBytes(8 * BS + 100, 2));
  const out = join(dir, 'out.simg');
  let r = await runCli([
    'diff',
    '--format',
    'simg',
    join(dir, 'base.img'),
    join(dir, 'new.img'),
    '-o',
    out,
  ]);
  assert.equal(r.code, EXIT_USAGE, r.stderr);
  assert.match(r.stderr, /32868 bytes, not a multiple of the block size 4096/);
  assert.equal(existsSync(out), false);

  r = await runCli([
    'diff',
    '--format',
    'simg',
    join(dir, 'base.img'),
    join(dir, 'base.img'),
    '-o',
    '-',
  ]);
  assert.equal(r.code, EXIT_USAGE, r.stderr);
  assert.match(r.stderr, /needs -o FILE/);
  assert.equal(r.stdout, '');

  r = await runCli([
    'diff',
    '--format',
    'simg',
    '--reversible',
    join(dir, 'base.img'),
    join(dir, 'base.img'),
    '-o',
    out,
  ]);
  assert.equal(r.code, EXIT_USAGE, r.stderr);
  assert.equal(existsSync(out), false);
});
