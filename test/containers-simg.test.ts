/**
 * Android sparse images (img2simg's output, and hand-made ones with don't-care and CRC32
 * chunks) decoded natively: DST ends as simg2img's output where the image defines it, a
 * don't-care area of DST is left as it is (written as zeros with --full), the delta is kept,
 * and damaged images are refused before anything is written. Fuzzed.
 */

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { promisify } from 'node:util';
import { copy } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import { runCli } from './helpers/cli.js';
import { needTool } from './helpers/loop.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const run = promisify(execFile);
const BS = 4096;

type Chunk =
  | { type: 'raw'; data: Buffer }
  | { type: 'fill'; blocks: number; pattern: number }
  | { type: 'dontcare'; blocks: number }
  | { type: 'crc' };

/** Writes an Android sparse image (the layout in src/containers/simg.ts). */
function simg(chunks: Chunk[], blockSize = BS): Buffer {
  const parts: Buffer[] = [];
  let blocks = 0;
  for (const c of chunks) {
    const h = Buffer.alloc(12);
    let data: Buffer = Buffer.alloc(0);
    let n = 0;
    if (c.type === 'raw') {
      n = c.data.length / blockSize;
      data = c.data;
      h.writeUInt16LE(0xcac1, 0);
    } else if (c.type === 'fill') {
      n = c.blocks;
      data = Buffer.alloc(4);
      data.writeUInt32LE(c.pattern, 0);
      h.writeUInt16LE(0xcac2, 0);
    } else if (c.type === 'dontcare') {
      n = c.blocks;
      h.writeUInt16LE(0xcac3, 0);
    } else {
      data = Buffer.alloc(4);
      h.writeUInt16LE(0xcac4, 0);
    }
    h.writeUInt32LE(n, 4);
    h.writeUInt32LE(12 + data.length, 8);
    parts.push(h, data);
    blocks += n;
  }
  const fh = Buffer.alloc(28);
  fh.writeUInt32LE(0xed26ff3a, 0);
  fh.writeUInt16LE(1, 4);
  fh.writeUInt16LE(28, 8);
  fh.writeUInt16LE(12, 10);
  fh.writeUInt32LE(blockSize, 12);
  fh.writeUInt32LE(blocks, 16);
  fh.writeUInt32LE(chunks.length, 20);
  return Buffer.concat([fh, ...parts]);
}

/** A hand-made image: raw, fill, don't-care (blocks 40-59) and CRC chunks; its raw bytes. */
function handMade(): { bytes: Buffer; raw: Buffer; dontCare: [number, number] } {
  const a = seededBytes(10 * BS, 1);
  const b = seededBytes(20 * BS, 2);
  const bytes = simg([
    { type: 'raw', data: a },
    { type: 'fill', blocks: 30, pattern: 0x01efcdab },
    { type: 'dontcare', blocks: 20 },
    { type: 'crc' },
    { type: 'raw', data: b },
    { type: 'fill', blocks: 8, pattern: 0 },
  ]);
  const fill = Buffer.alloc(30 * BS);
  fill.fill(Buffer.from([0xab, 0xcd, 0xef, 0x01]));
  const raw = Buffer.concat([a, fill, Buffer.alloc(20 * BS), b, Buffer.alloc(8 * BS)]);
  return { bytes, raw, dontCare: [40 * BS, 60 * BS] };
}

async function simg2img(t: TestContext, src: string, out: string): Promise<boolean> {
  if (!(await needTool(t, 'simg2img', 'android-sdk-libsparse-utils'))) return false;
  await run('simg2img', [src, out]);
  return true;
}

test('an img2simg image is decoded to what simg2img gives; a second copy writes nothing', async (t) => {
  if (!(await needTool(t, 'img2simg', 'android-sdk-libsparse-utils'))) return;
  const dir = await tempDir(t);
  const raw = join(dir, 'system.img');
  // data, a repeated 4-byte pattern (a fill chunk) and zeros (a fill of 0)
  const pattern = Buffer.alloc(64 * BS);
  pattern.fill(Buffer.from([1, 2, 3, 4]));
  await writeFile(
    raw,
    Buffer.concat([
      seededBytes(100 * BS, 3),
      pattern,
      Buffer.alloc(300 * BS),
      seededBytes(7 * BS, 4),
    ]),
  );
  const sparse = join(dir, 'system.simg');
  await run('img2simg', [raw, sparse]);
  const dst = join(dir, 'dst');
  const first = await copy(sparse, dst);
  assert.ok((await readFile(dst)).equals(await readFile(raw)));
  assert.equal(first.bytesTotal, (await readFile(raw)).length);
  const again = await copy(sparse, dst);
  assert.equal(again.bytesWritten, 0);
  // one block changed in the image: one block written
  const changed = await readFile(raw);
  changed[50 * BS + 7] = changed[50 * BS + 7]! ^ 0xff;
  await writeFile(raw, changed);
  await run('img2simg', [raw, sparse]);
  const third = await copy(sparse, dst);
  assert.equal(third.bytesWritten, BS);
  assert.ok((await readFile(dst)).equals(changed));
});

test("don't-care chunks are left as DST holds them (not read, not written); --full writes zeros there", async (t) => {
  const dir = await tempDir(t);
  const { bytes, raw, dontCare } = handMade();
  const src = join(dir, 'hand.simg');
  await writeFile(src, bytes);
  const reference = join(dir, 'reference.raw');
  if (await simg2img(t, src, reference)) {
    assert.ok(
      (await readFile(reference)).equals(raw),
      'the hand-made image is what simg2img reads',
    );
  }
  const dst = join(dir, 'dst');
  const old = seededBytes(raw.length, 77);
  await writeFile(dst, old);
  const r = await copy(src, dst);
  const got = await readFile(dst);
  const [from, to] = dontCare;
  assert.ok(got.subarray(0, from).equals(raw.subarray(0, from)));
  assert.ok(got.subarray(to).equals(raw.subarray(to)));
  assert.ok(got.subarray(from, to).equals(old.subarray(from, to)), "DST's don't-care area kept");
  assert.equal(r.bytesScanned, raw.length - (to - from));
  await copy(src, dst, { full: true });
  assert.ok((await readFile(dst)).equals(raw));
});

test("an Android sparse image from stdin, and xz-compressed, is decoded (don't-care as zeros)", async (t) => {
  if (!(await needTool(t, 'xz', 'xz-utils'))) return;
  const dir = await tempDir(t);
  const { bytes, raw } = handMade();
  const dst = join(dir, 'dst');
  const r = await runCli(['copy', '-', dst], { input: bytes });
  assert.equal(r.code, 0, r.stderr);
  assert.ok((await readFile(dst)).equals(raw));
  const src = join(dir, 'hand.simg');
  await writeFile(src, bytes);
  await run('xz', ['-k', src]);
  const dst2 = join(dir, 'dst2');
  await copy(`${src}.xz`, dst2);
  assert.ok((await readFile(dst2)).equals(raw));
});

test('a truncated image, a lying block count and an unknown chunk are refused before any write', async (t) => {
  const dir = await tempDir(t);
  const { bytes } = handMade();
  const cases: [string, Buffer, string][] = [
    ['truncated', bytes.subarray(0, bytes.length - 100), 'ESRC_SHORT'],
    ['lying', Buffer.from(bytes), 'ESRC_CORRUPT'],
    ['unknown', Buffer.from(bytes), 'ESRC_CORRUPT'],
    ['block size', Buffer.from(bytes), 'ESRC_CORRUPT'],
  ];
  cases[1]![1].writeUInt32LE(1000, 16); // blocks in the image
  cases[2]![1].writeUInt16LE(0xcaff, 28); // the first chunk's type
  cases[3]![1].writeUInt32LE(4095, 12);
  for (const [name, data, code] of cases) {
    const src = join(dir, `${name}.simg`);
    await writeFile(src, data);
    const dst = join(dir, `${name}.out`);
    await assert.rejects(copy(src, dst), (err: unknown) => {
      assert.ok(err instanceof BlksyncError, String(err));
      assert.equal(err.code, code, `${name}: ${err.message}`);
      return true;
    });
    assert.equal(existsSync(dst), false, `${name}: no DST`);
  }
});

test('fuzz: mutated Android sparse images decode or fail with a BlksyncError, never anything else', async (t) => {
  const dir = await tempDir(t);
  const { bytes } = handMade();
  let x = 20261204;
  const r = (): number => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
  const src = join(dir, 'fuzz.simg');
  const dst = join(dir, 'fuzz.out');
  for (let i = 0; i < 300; i++) {
    let m = Buffer.from(bytes);
    const at = Math.floor(r() * Math.min(m.length, 200)); // headers are where the parser lives
    const kind = i % 3;
    if (kind === 0) m[at] = Math.floor(r() * 256);
    else if (kind === 1) m = m.subarray(0, Math.floor(r() * m.length));
    else m.writeUInt32LE(Math.floor(r() * 2 ** 32), at - (at % 4));
    await writeFile(src, m);
    try {
      await copy(src, dst, { dryRun: true });
    } catch (err) {
      assert.ok(err instanceof BlksyncError, `case ${i}: ${String(err)}`);
    }
  }
});
