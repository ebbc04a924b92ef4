/**
 * `blksync publish`: the same image gives the same bytes, holes and zero chunks cost nothing,
 * -o DIR writes there, and a chunk size that cannot be is refused, as is a compressed image
 * or a container (its copy would write what it holds, not its bytes), and an image written
 * while it is read.
 */

import assert from 'node:assert/strict';
import { closeSync, openSync, writeSync } from 'node:fs';
import { mkdir, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { gzipSync } from 'node:zlib';
import { publish } from '../src/delta/publish.js';
import { BlksyncError } from '../src/errors.js';
import { parseHeader } from '../src/formats/published.js';
import { sha256 } from '../src/hash.js';
import { attachLoop, needLoop } from './helpers/loop.js';
import { seededBytes, tempDir, writeSparseFile, vhdFooter } from './helpers/tmp.js';

test('publishing is deterministic, and holes and zero chunks are not stored', async (t) => {
  const dir = await tempDir(t);
  const img = join(dir, 'disk.img');
  const size = 64 * 1024 * 1024;
  await writeSparseFile(img, size, [
    { offset: 5 * 65536, data: seededBytes(65536, 9) },
    // written zeros: allocated, but a chunk of zeros all the same
    { offset: 40 * 65536, data: Buffer.alloc(3 * 65536) },
    { offset: size - 1000, data: Buffer.from('the end') },
  ]);
  const a = await publish(img);
  const other = join(dir, 'out');
  await mkdir(other);
  const b = await publish(img, { outputDir: other });
  assert.equal(b.index, join(other, 'disk.img.blkpub'));
  for (const name of ['disk.img.blkpub', 'disk.img.blkpub.data']) {
    assert.deepEqual(await readFile(join(dir, name)), await readFile(join(other, name)), name);
  }
  assert.equal(a.chunks, 1024);
  assert.equal(a.zeroChunks, 1022);
  // one random chunk stored raw, one nearly empty chunk compressed to a few bytes
  assert.ok(a.dataBytes < 65536 + 100, `${a.dataBytes} bytes of data`);
  assert.equal((await stat(a.data)).size, a.dataBytes);
  const h = parseHeader(await readFile(a.index), a.index);
  assert.equal(h.imageSize, size);
  assert.equal(h.imageSha256.toString('hex'), sha256(await readFile(img)).toString('hex'));
});

test('a chunk size that is not a power of two from 4K to 4M is refused (larger ones could not be copied from)', async (t) => {
  const dir = await tempDir(t);
  const img = join(dir, 'disk.img');
  await writeSparseFile(img, 1 << 20, []);
  for (const chunkSize of [1000, 3 * 4096, 2048, 8 * 1024 * 1024, 32 * 1024 * 1024]) {
    await assert.rejects(
      publish(img, { chunkSize }),
      (err) => err instanceof BlksyncError && err.code === 'EUSAGE',
    );
  }
});

test('a compressed image or a container (a fixed VHD, known only by its footer) is refused, nothing written', async (t) => {
  const dir = await tempDir(t);
  const data = seededBytes(1 << 20, 3);
  const footer = vhdFooter();
  const cases: [string, Buffer, string][] = [
    ['os.img.gz', gzipSync(data), 'ESRC_COMPRESSED'],
    ['os.vhd', Buffer.concat([data, footer]), 'ESRC_CONTAINER'],
  ];
  for (const [name, bytes, code] of cases) {
    const img = join(dir, name);
    await writeFile(img, bytes);
    await assert.rejects(
      publish(img),
      (err) =>
        err instanceof BlksyncError &&
        err.code === code &&
        /publish that image \(blksync copy /.test(err.message),
      name,
    );
  }
  assert.deepEqual((await readdir(dir)).sort(), ['os.img.gz', 'os.vhd']);
});

test('an image written by another program while it is published fails ESRC_CHANGED, nothing published', async (t) => {
  // the published files would stand for a mix of the old and the new image, which a copy of
  // its URL writes (the index, written last, is newer than the image: not seen as stale)
  const dir = await tempDir(t);
  const img = join(dir, 'disk.img');
  const size = 8 * 1024 * 1024;
  await writeFile(img, seededBytes(size, 11));
  let written = false;
  await assert.rejects(
    publish(img, {
      onProgress: (p) => {
        if (written || p.bytesScanned === 0) return;
        written = true;
        // the start, read already, changes
        const fd = openSync(img, 'r+');
        writeSync(fd, seededBytes(4096, 12), 0, 4096, 0);
        closeSync(fd);
      },
    }),
    (err) =>
      err instanceof BlksyncError &&
      err.code === 'ESRC_CHANGED' &&
      /nothing was published/.test(err.message),
  );
  assert.deepEqual(await readdir(dir), ['disk.img']);
  // left alone, it publishes
  await publish(img);
});

test('a compressed block device is refused too, the advice naming a file outside /dev', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const backing = join(dir, 'backing');
  await writeFile(
    backing,
    Buffer.concat([gzipSync(seededBytes(1 << 20, 4)), Buffer.alloc(1 << 20)]),
  );
  const dev = await attachLoop(t, backing);
  await assert.rejects(
    publish(dev, { outputDir: dir }),
    (err) =>
      err instanceof BlksyncError &&
      err.code === 'ESRC_COMPRESSED' &&
      err.message.includes(`blksync publish ${join(dir, 'plain.img')}`),
  );
  await assert.rejects(
    publish(dev),
    (err) => err instanceof BlksyncError && err.message.includes('blksync publish plain.img'),
  );
  assert.deepEqual(await readdir(dir), ['backing']);
});
