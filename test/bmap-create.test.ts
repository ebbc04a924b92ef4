/** `bmap create` (src/engine/bmap-create.ts, src/io/sparse-map.ts) against the real bmaptool. */

import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it, type TestContext } from 'node:test';
import { promisify } from 'node:util';
import { createBmap } from '../src/engine/bmap-create.js';
import { BlksyncError } from '../src/errors.js';
import { parseBmap } from '../src/formats/bmap.js';
import { runCli } from './helpers/cli.js';
import { need } from './helpers/resources.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

const run = promisify(execFile);
const HAVE_BMAPTOOL = spawnSync('bmaptool', ['--version']).status === 0;

function needBmaptool(t: TestContext): boolean {
  return need(t, HAVE_BMAPTOOL, 'bmaptool is not installed (apt-get install bmap-tools)');
}

const BS = 4096;

/** A sparse file where each block is data with probability `p` (deterministic). */
async function randomSparse(path: string, blocks: number, tail: number, seed: number, p = 0.3) {
  const size = blocks * BS + tail;
  const rnd = seededBytes(blocks + 1, seed);
  const pieces: { offset: number; data: Buffer }[] = [];
  for (let b = 0; b <= blocks; b++) {
    if (rnd[b]! / 256 >= p) continue;
    const len = b < blocks ? BS : tail;
    if (len > 0) pieces.push({ offset: b * BS, data: seededBytes(len, seed + b + 1) });
  }
  await writeSparseFile(path, size, pieces);
  return size;
}

async function sameAsBmaptool(image: string): Promise<void> {
  const ours = await createBmap(image);
  const { stdout } = await run('bmaptool', ['create', image], { maxBuffer: 64 << 20 });
  assert.equal(ours.text, stdout, `bmap of ${image} differs from bmaptool's`);
}

describe('bmap create', () => {
  it("equals bmaptool's bmap for all-hole and fully mapped files of 1, bs-1, bs, bs+1 bytes", async (t) => {
    if (!needBmaptool(t)) return;
    const dir = await tempDir(t);
    for (const size of [1, BS - 1, BS, BS + 1, 3 * BS + 7]) {
      const hole = join(dir, `hole-${size}`);
      await writeSparseFile(hole, size, []);
      await sameAsBmaptool(hole);
      const full = join(dir, `full-${size}`);
      await writeSparseFile(full, size, [{ offset: 0, data: seededBytes(size, size) }]);
      await sameAsBmaptool(full);
    }
    const bmap = parseBmap(Buffer.from((await createBmap(join(dir, `hole-${BS + 1}`))).text));
    assert.equal(bmap.ranges.length, 0);
  });

  it("equals bmaptool's bmap for random per-block sparse files", async (t) => {
    if (!needBmaptool(t)) return;
    const dir = await tempDir(t);
    for (const [blocks, tail, seed] of [
      [500, 0, 1],
      [777, 123, 2],
      [64, 4095, 3],
    ] as const) {
      const f = join(dir, `r-${seed}`);
      await randomSparse(f, blocks, tail, seed);
      await sameAsBmaptool(f);
    }
  });

  it('--detect-zeros leaves out allocated all-zero blocks', async (t) => {
    const dir = await tempDir(t);
    const f = join(dir, 'dense');
    const data = Buffer.alloc(10 * BS);
    seededBytes(BS, 1).copy(data, 0);
    seededBytes(2 * BS, 2).copy(data, 4 * BS);
    data[10 * BS - 1] = 1;
    await writeSparseFile(f, data.length, [{ offset: 0, data }]);
    const plain = parseBmap(Buffer.from((await createBmap(f)).text));
    assert.deepEqual(
      plain.ranges.map((r) => [r.first, r.last]),
      [[0, 9]],
    );
    const out = join(dir, 'dense.bmap');
    const r = await runCli(['bmap', 'create', '--detect-zeros', '-q', f, '-o', out]);
    assert.equal(r.code, 0, r.stderr);
    const bmap = parseBmap(await readFile(out));
    assert.deepEqual(
      bmap.ranges.map((x) => [x.first, x.last]),
      [
        [0, 0],
        [4, 5],
        [9, 9],
      ],
    );
    assert.equal(
      bmap.ranges[1]!.checksum,
      (await import('node:crypto'))
        .createHash('sha256')
        .update(data.subarray(4 * BS, 6 * BS))
        .digest('hex'),
    );
  });

  it('writes a bmap that bmaptool copy accepts and copies correctly', async (t) => {
    if (!needBmaptool(t)) return;
    const dir = await tempDir(t);
    const img = join(dir, 'img');
    await randomSparse(img, 300, 100, 9);
    const r = await runCli(['bmap', 'create', img, '-o', `${img}.bmap`, '-q']);
    assert.equal(r.code, 0, r.stderr);
    const out = join(dir, 'copy');
    await run('bmaptool', ['copy', img, out]);
    assert.ok((await readFile(out)).equals(await readFile(img)));
    // a dense image (zeros written out) with a --detect-zeros bmap copies the same
    const dense = join(dir, 'dense');
    await writeSparseFile(dense, (await readFile(img)).length, [
      { offset: 0, data: await readFile(img) },
    ]);
    const z = await runCli([
      'bmap',
      'create',
      '--detect-zeros',
      dense,
      '-o',
      `${dense}.bmap`,
      '-q',
    ]);
    assert.equal(z.code, 0, z.stderr);
    const zout = join(dir, 'zcopy');
    await run('bmaptool', ['copy', dense, zout]);
    assert.ok((await readFile(zout)).equals(await readFile(img)));
  });

  it('stops with EINTERRUPTED when aborted, writing no bmap', async (t) => {
    const dir = await tempDir(t);
    const f = join(dir, 'img');
    await writeSparseFile(f, 5000, [{ offset: 0, data: Buffer.from('x') }]);
    const controller = new AbortController();
    controller.abort();
    await assert.rejects(
      createBmap(f, { output: `${f}.bmap`, signal: controller.signal }),
      (err: unknown) => err instanceof BlksyncError && err.code === 'EINTERRUPTED',
    );
    await assert.rejects(readFile(`${f}.bmap`), { code: 'ENOENT' });
  });

  it('prints to stdout without -o and refuses an empty image', async (t) => {
    const dir = await tempDir(t);
    const f = join(dir, 'one');
    await writeSparseFile(f, 5000, [{ offset: 0, data: Buffer.from('x') }]);
    const r = await runCli(['bmap', 'create', f]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(parseBmap(Buffer.from(r.stdout)).ranges.length, 1);
    const empty = join(dir, 'empty');
    await writeSparseFile(empty, 0, []);
    const e = await runCli(['bmap', 'create', empty]);
    assert.equal(e.code, 1);
    assert.match(e.stderr, /empty/);
  });
});
