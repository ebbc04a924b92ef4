/**
 * The published index (formats/published.ts) refuses what it must: absurd sizes, offsets past
 * the data file, a decompression bomb, and a seeded fuzzer's mutations of the index and the
 * data, served over a real http server. Nothing but a BlksyncError may come out, and DST is
 * either the new image or, block by block, the old one or the new one: never anything else.
 */

import assert from 'node:assert/strict';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { brotliCompressSync } from 'node:zlib';
import { copy } from '../src/copy.js';
import { publish } from '../src/delta/publish.js';
import { BlksyncError } from '../src/errors.js';
import {
  checkTop,
  chunkCount,
  groupCount,
  groupLeafRange,
  HEADER_BYTES,
  LEAF_BYTES,
  parseGroup,
  parseHeader,
  topBytes,
} from '../src/formats/published.js';
import { serveDirectory } from './helpers/http-server.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

const SIZE = 1024 * 1024;
const CHUNK = 4096;

async function fixture(t: TestContext) {
  const dir = await tempDir(t);
  const www = join(dir, 'www');
  await mkdir(www);
  const img = join(www, 'os.img');
  await writeSparseFile(img, SIZE, [
    { offset: 8192, data: seededBytes(100_000, 7) },
    { offset: 600_000, data: Buffer.alloc(50_000, 'compressible text ') },
  ]);
  const v1 = await readFile(img);
  const v2 = Buffer.from(v1);
  v2.write('change one', 50_000);
  v2.write('change two', 620_000);
  v2.write('change three', 900_000);
  await writeFile(img, v2);
  await publish(img, { chunkSize: CHUNK });
  const index = await readFile(`${img}.blkpub`);
  const data = await readFile(`${img}.blkpub.data`);
  const served = await serveDirectory(t, www);
  return { dir, img, v1, v2, index, data, url: `${served.url}/os.img`, dst: join(dir, 'dst.img') };
}

/** Parses a whole index as a client would, every group. */
function parseAll(bytes: Buffer): void {
  const h = parseHeader(bytes, 'x');
  const top = bytes.subarray(HEADER_BYTES, HEADER_BYTES + topBytes(h));
  checkTop(h, Buffer.from(top), 'x');
  for (let g = 0; g < groupCount(h); g++) {
    const r = groupLeafRange(h, g);
    parseGroup(h, Buffer.from(top), g, bytes.subarray(r.start, r.end), 'x');
  }
}

function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
}

function expectCode(fn: () => unknown, code: string): void {
  assert.throws(fn, (err) => err instanceof BlksyncError && err.code === code);
}

test('absurd headers are refused before anything is allocated from them', async (t) => {
  const { index } = await fixture(t);
  parseAll(index);
  const edit = (at: number, write: (b: Buffer) => void): Buffer => {
    const b = Buffer.from(index);
    write(b.subarray(at));
    return b;
  };
  expectCode(
    () =>
      parseHeader(
        edit(16, (b) => b.writeBigUInt64LE(2n ** 62n)),
        'x',
      ),
    'EPUB_FORMAT',
  );
  expectCode(
    () =>
      parseHeader(
        edit(24, (b) => b.writeUInt32LE(5000)),
        'x',
      ),
    'EPUB_FORMAT',
  );
  expectCode(
    () =>
      parseHeader(
        edit(24, (b) => b.writeUInt32LE(1 << 30)),
        'x',
      ),
    'EPUB_FORMAT',
  );
  expectCode(
    () =>
      parseHeader(
        edit(28, (b) => b.writeUInt32LE(3)),
        'x',
      ),
    'EPUB_FORMAT',
  );
  expectCode(
    () =>
      parseHeader(
        edit(8, (b) => b.writeUInt32LE(2)),
        'x',
      ),
    'EPUB_FORMAT',
  );
  expectCode(
    () =>
      parseHeader(
        edit(32, (b) => b.writeUInt32LE(9)),
        'x',
      ),
    'EPUB_FORMAT',
  );
  // 2^40 chunks of 4 KiB: more than a client keeps hashes for
  expectCode(
    () =>
      parseHeader(
        edit(16, (b) => b.writeBigUInt64LE(2n ** 52n)),
        'x',
      ),
    'EPUB_FORMAT',
  );
  expectCode(() => parseHeader(index.subarray(0, 100), 'x'), 'EPUB_FORMAT');
  // a leaf whose offset lies past the data file
  const h = parseHeader(index, 'x');
  const r = groupLeafRange(h, 0);
  const past = edit(r.start + 32, (b) => b.writeBigUInt64LE(BigInt(h.dataSize)));
  const top = index.subarray(HEADER_BYTES, HEADER_BYTES + topBytes(h));
  // chunk 0 is a zero chunk: give it a kind of stored chunk so its offset counts
  past.writeUInt32LE(1, r.start + 44);
  past.writeUInt32LE(10, r.start + 40);
  expectCode(
    () => parseGroup(h, Buffer.from(top), 0, past.subarray(r.start, r.end), 'x'),
    'EPUB_FORMAT',
  );
});

test('a decompression bomb in place of a chunk is refused, nothing written', async (t) => {
  const f = await fixture(t);
  // DST lacks only the last changed chunk (offset 900_000), whose leaf will point at a bomb
  const old = Buffer.from(f.v2);
  f.v1.copy(old, 900_000, 900_000, 900_100);
  await writeFile(f.dst, old);
  const h = parseHeader(f.index, 'x');
  const i = Math.floor(900_000 / CHUNK);
  const bomb = brotliCompressSync(Buffer.alloc(64 * 1024 * 1024));
  const at = HEADER_BYTES + topBytes(h) + i * LEAF_BYTES;
  const index = Buffer.from(f.index);
  index.writeBigUInt64LE(BigInt(f.data.length), at + 32);
  index.writeUInt32LE(bomb.length, at + 40);
  index.writeUInt32LE(1, at + 44); // compressed
  index.writeBigUInt64LE(BigInt(f.data.length + bomb.length), 40);
  await writeFile(`${f.img}.blkpub`, index);
  await writeFile(`${f.img}.blkpub.data`, Buffer.concat([f.data, bomb]));
  await assert.rejects(
    copy(f.url, f.dst),
    (err) =>
      err instanceof BlksyncError && err.code === 'EPUB_CHECKSUM' && /decompress/.test(err.message),
  );
  assert.deepEqual(await readFile(f.dst), old);
  assert.equal(chunkCount(h), SIZE / CHUNK);
});

test('fuzz: mutated indexes never parse into anything but a BlksyncError', async (t) => {
  const { index } = await fixture(t);
  const r = rng(20261204);
  for (let n = 0; n < 5000; n++) {
    let m = Buffer.from(index);
    const kind = Math.floor(r() * 4);
    const at = Math.floor(r() * m.length);
    if (kind === 0) m[at] = m[at]! ^ (1 << Math.floor(r() * 8));
    else if (kind === 1) m = m.subarray(0, at);
    else if (kind === 2) m.writeUInt32LE(Math.floor(r() * 2 ** 32), Math.min(at, m.length - 4));
    else
      m = Buffer.concat([
        m.subarray(0, at),
        seededBytes(1 + Math.floor(r() * 64), n),
        m.subarray(at),
      ]);
    try {
      parseAll(m);
    } catch (err) {
      assert.ok(err instanceof BlksyncError, `case ${n}: ${String(err)}`);
    }
  }
});

test('fuzz: copies from mutated published files write the new image or refuse', async (t) => {
  const f = await fixture(t);
  const r = rng(4242);
  const started = Date.now();
  let refused = 0;
  let cases = 0;
  for (; cases < 150 && Date.now() - started < 20_000; cases++) {
    const onData = r() < 0.4;
    let m = Buffer.from(onData ? f.data : f.index);
    const at = Math.floor(r() * m.length);
    const kind = Math.floor(r() * 3);
    if (kind === 0) m[at] = m[at]! ^ (1 << Math.floor(r() * 8));
    else if (kind === 1) m = m.subarray(0, at);
    else m.writeUInt32LE(Math.floor(r() * 2 ** 32), Math.min(at, m.length - 4));
    await writeFile(`${f.img}.blkpub`, onData ? f.index : m);
    await writeFile(`${f.img}.blkpub.data`, onData ? m : f.data);
    await writeFile(f.dst, f.v1);
    try {
      await copy(f.url, f.dst);
      assert.deepEqual(await readFile(f.dst), f.v2, `case ${cases}: a copy that succeeded`);
    } catch (err) {
      assert.ok(err instanceof BlksyncError, `case ${cases}: ${String(err)}`);
      refused++;
      const got = await readFile(f.dst);
      for (let o = 0; o < SIZE; o += 4096) {
        const b = got.subarray(o, o + 4096);
        assert.ok(
          b.equals(f.v1.subarray(o, o + 4096)) || b.equals(f.v2.subarray(o, o + 4096)),
          `case ${cases}: block at ${o} is neither version`,
        );
      }
    }
  }
  assert.ok(refused > cases / 4, `${refused} of ${cases} refused`);
});

test('stored chunks out of order in the index are EPUB_FORMAT, not blamed on the server', async (t) => {
  const f = await fixture(t);
  await writeFile(f.dst, f.v1);
  const h = parseHeader(f.index, 'x');
  // the second changed chunk (at 620_000) said to lie at the start of the data file
  const i = Math.floor(620_000 / CHUNK);
  const index = Buffer.from(f.index);
  index.writeBigUInt64LE(0n, HEADER_BYTES + topBytes(h) + i * LEAF_BYTES + 32);
  await writeFile(`${f.img}.blkpub`, index);
  await assert.rejects(
    copy(f.url, f.dst),
    (err) => err instanceof BlksyncError && err.code === 'EPUB_FORMAT',
  );
  assert.deepEqual(await readFile(f.dst), f.v1);
});

test('a data file cut short (or of another publish) is EPUB_FORMAT naming both files, not "changed meanwhile: rerun"', async (t) => {
  const f = await fixture(t);
  await writeFile(f.dst, f.v1);
  await writeFile(`${f.img}.blkpub.data`, f.data.subarray(0, f.data.length - 100));
  const err = await copy(f.url, f.dst).then(
    () => assert.fail('copied from a data file cut short'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof BlksyncError && err.code === 'EPUB_FORMAT', String(err));
  assert.match(err.message, /os\.img\.blkpub\.data/);
  assert.match(err.message, /publish again/);
  assert.deepEqual(await readFile(f.dst), f.v1);
});

test('an index cut short is EPUB_FORMAT (publish again), not blamed on the server', async (t) => {
  const f = await fixture(t);
  await writeFile(f.dst, f.v1);
  // cut inside the leaf records of the first group that differs (the change at 50_000)
  const h = parseHeader(f.index, 'x');
  const cut = groupLeafRange(h, Math.floor(50_000 / CHUNK / h.groupChunks)).start + 100;
  await writeFile(`${f.img}.blkpub`, f.index.subarray(0, cut));
  const err = await copy(f.url, f.dst).then(
    () => assert.fail('copied from an index cut short'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof BlksyncError && err.code === 'EPUB_FORMAT', String(err));
  assert.match(err.message, /publish again/);
  assert.deepEqual(await readFile(f.dst), f.v1);
});
