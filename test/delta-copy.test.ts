/**
 * `copy http://…/IMG DST` from a published image (blksync publish): only the chunks DST lacks
 * are fetched, by multipart range requests, and DST ends byte-identical to IMG; servers that
 * ignore Range, "not found" pages, and servers that misbehave (a cut answer, a wrong
 * Content-Range, 416, files changed between requests, a damaged chunk) give a right result or
 * a coded error with DST untouched.
 */

import assert from 'node:assert/strict';
import {
  closeSync,
  fsyncSync,
  openSync,
  renameSync,
  utimesSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { test, type TestContext } from 'node:test';
import { copy } from '../src/copy.js';
import { compressChunk, publish } from '../src/delta/publish.js';
import { openPublished } from '../src/delta/published-source.js';
import { BlksyncError, type BlksyncWarning } from '../src/errors.js';
import {
  CODEC_BROTLI,
  encodeHeader,
  encodeLeaf,
  groupChunksFor,
  KIND_COMPRESSED,
  LEAF_BYTES,
} from '../src/formats/published.js';
import { sha256 } from '../src/hash.js';
import type { Progress } from '../src/types.js';
import { serveDirectory, type ServerOptions } from './helpers/http-server.js';
import { runCli } from './helpers/cli.js';
import { attachLoop, needLoop } from './helpers/loop.js';
import { seededBytes, tempDir, writeSparseFile, vhdFooter } from './helpers/tmp.js';

const SIZE = 8 * 1024 * 1024;
const CHUNK = 16 * 1024;

/** v1: scattered data in a sparse image; v2: v1 with a few small changes far apart. */
async function fixture(t: TestContext, options: ServerOptions = {}) {
  const dir = await tempDir(t);
  const www = join(dir, 'www');
  await mkdir(www);
  const pieces = [
    { offset: 0, data: seededBytes(200_000, 1) },
    {
      offset: 3 * 1024 * 1024,
      data: Buffer.alloc(300_000, 'text of a file system, compressible '),
    },
    { offset: 6 * 1024 * 1024 + 4096, data: seededBytes(70_000, 2) },
  ];
  const img = join(www, 'os.img');
  await writeSparseFile(img, SIZE, pieces);
  const v1 = await readFile(img);
  const v2 = Buffer.from(v1);
  v2.write('changed!', 100_000);
  v2.write('another change', 3 * 1024 * 1024 + 150_000);
  v2.write('a new block', 5 * 1024 * 1024);
  await writeFile(img, v2);
  await publish(img, { chunkSize: CHUNK });
  const dst = join(dir, 'dst.img');
  await writeFile(dst, v1);
  const served = await serveDirectory(t, www, options);
  return { dir, www, img, dst, v1, v2, served, url: `${served.url}/os.img` };
}

async function rejectsWith(p: Promise<unknown>, code: string): Promise<BlksyncError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof BlksyncError, `not a BlksyncError: ${String(err)}`);
    assert.equal(err.code, code, err.message);
    return err;
  }
  assert.fail(`expected ${code}`);
}

test('an update fetches only the changed chunks in 4 requests and makes DST identical', async (t) => {
  const f = await fixture(t);
  const r = await copy(f.url, f.dst);
  assert.deepEqual(await readFile(f.dst), f.v2);
  assert.ok(r.http !== undefined, 'the published files were used');
  assert.equal(r.http.chunksDiffering, 3);
  // the index's head, the image's freshness probe and its last 512 bytes (a fixed VHD's
  // footer), the differing groups, the chunks: every request the server sees is counted
  assert.equal(r.http.requests, 5);
  assert.equal(f.served.requests.length, 5);
  // header + top level + three groups' leaf records + three chunks: a few KiB, not the image
  assert.ok(r.http.bytesFetched < 3 * CHUNK, `fetched ${r.http.bytesFetched}`);
  assert.ok(f.served.bytesSent() < 3 * CHUNK + 8192, `sent ${f.served.bytesSent()}`);
  assert.equal(r.bytesWritten, 3 * 4096);
  // a rerun has nothing to do: one request, nothing written
  const again = await copy(f.url, f.dst);
  assert.equal(again.bytesWritten, 0);
  assert.equal(again.http?.requests, 3);
  assert.equal(f.served.requests.length, 8);
});

test('from an empty or missing DST the image arrives whole, holes left as holes', async (t) => {
  const f = await fixture(t);
  const fresh = join(f.dir, 'fresh.img');
  const r = await copy(f.url, fresh);
  assert.deepEqual(await readFile(fresh), f.v2);
  assert.equal(r.created, true);
  assert.ok(r.http !== undefined);
  assert.ok(r.http.requests <= 5, `${r.http.requests} requests`);
  await writeFile(fresh, '');
  await copy(f.url, fresh);
  assert.deepEqual(await readFile(fresh), f.v2);
});

test("the bytes fetched count the chunks' stored bytes, in the result and in progress as they arrive", async (t) => {
  const f = await fixture(t);
  const fresh = join(f.dir, 'fresh.img');
  let lastFetched = 0;
  const r = await copy(f.url, fresh, {
    onProgress: (p) => (lastFetched = p.bytesFetched ?? lastFetched),
  });
  assert.ok(r.http !== undefined);
  const { bytesFetched, storedBytes } = r.http;
  assert.ok(storedBytes > 100_000, `stored ${storedBytes}`);
  assert.ok(bytesFetched >= storedBytes, `fetched ${bytesFetched} of ${storedBytes} stored`);
  assert.ok(
    bytesFetched <= f.served.bytesSent(),
    `fetched ${bytesFetched}, sent ${f.served.bytesSent()}`,
  );
  // the last progress report came after the last chunk was in
  assert.ok(lastFetched >= storedBytes, `progress told ${lastFetched}`);
});

test('--dry-run fetches and reports what a copy would write, and writes nothing', async (t) => {
  const f = await fixture(t);
  const r = await copy(f.url, f.dst, { dryRun: true });
  assert.deepEqual(await readFile(f.dst), f.v1);
  assert.equal(r.bytesDiffering, 3 * 4096);
  assert.equal(r.http?.requests, 5);
});

test('a server that ignores Range still gives the right result, from the whole files it sends', async (t) => {
  const f = await fixture(t, { ignoreRange: true });
  const r = await copy(f.url, f.dst);
  assert.deepEqual(await readFile(f.dst), f.v2);
  assert.equal(r.bytesWritten, 3 * 4096);
  assert.ok(f.served.requests.every((q) => q.status === 200));
  assert.ok(
    (r.http?.requests ?? 0) <= 3,
    'the freshness probe, the whole index and the whole data file, once each',
  );
});

test('without published files, or with a "not found" page sent as 200, the image streams as before', async (t) => {
  for (const notFoundPage of [false, true]) {
    const f = await fixture(t, { notFoundPage });
    await rm(join(f.www, 'os.img.blkpub'));
    const r = await copy(f.url, f.dst);
    assert.equal(r.http, undefined);
    assert.deepEqual(await readFile(f.dst), f.v2);
  }
});

test('a connection cut in the middle of the multipart answer is ESRC_SHORT; a rerun finishes', async (t) => {
  let cut = true;
  const f = await fixture(t, {
    hook: (req, res, file) => {
      if (!cut || file === undefined || !req.url!.endsWith('.data')) return false;
      cut = false;
      res.writeHead(206, {
        'content-type': 'multipart/byteranges; boundary=XYZ',
        'content-length': '100000',
        etag: file.etag,
      });
      res.write(`\r\n--XYZ\r\nContent-Range: bytes 0-99/${file.data.length}\r\n\r\n`);
      res.write(file.data.subarray(0, 50));
      setTimeout(() => res.socket?.destroy(), 20);
      return true;
    },
  });
  await rejectsWith(copy(f.url, f.dst), 'ESRC_SHORT');
  await copy(f.url, f.dst);
  assert.deepEqual(await readFile(f.dst), f.v2);
});

test('a wrong Content-Range, or a 416, is ESRC_RANGE with nothing written', async (t) => {
  for (const answer of ['wrong-range', '416'] as const) {
    const f = await fixture(t, {
      hook: (req, res, file) => {
        if (file === undefined || !req.url!.endsWith('.data')) return false;
        if (answer === '416') {
          res.writeHead(416, { 'content-range': `bytes */${file.data.length}` }).end();
          return true;
        }
        // the first byte range of the file, whatever was asked for
        res
          .writeHead(206, {
            'content-range': `bytes 0-99/${file.data.length}`,
            'content-length': 100,
            etag: file.etag,
          })
          .end(file.data.subarray(0, 100));
        return true;
      },
    });
    await rejectsWith(copy(f.url, f.dst), 'ESRC_RANGE');
    assert.deepEqual(await readFile(f.dst), f.v1);
  }
});

test('published files changed between requests: EPUB_CHANGED, never a mix; a rerun updates', async (t) => {
  let swap: (() => void) | undefined;
  const f = await fixture(t, {
    onRequest: (req) => {
      // after the index's first answer, before its leaf records are asked for
      if (swap !== undefined && req.headers['if-range'] !== undefined) {
        swap();
        swap = undefined;
      }
    },
  });
  // v3, published elsewhere, replaces the served files between two requests of one copy
  const v3 = Buffer.from(f.v2);
  v3.write('third version', 7 * 1024 * 1024);
  const other = join(f.dir, 'v3');
  await mkdir(other);
  await writeFile(join(other, 'os.img'), v3);
  await publish(join(other, 'os.img'), { chunkSize: CHUNK });
  const v3Index = await readFile(join(other, 'os.img.blkpub'));
  const v3Data = await readFile(join(other, 'os.img.blkpub.data'));
  swap = () => {
    writeFileSync(`${f.img}.blkpub`, v3Index);
    writeFileSync(`${f.img}.blkpub.data`, v3Data);
    writeFileSync(f.img, v3);
    // a later mtime makes another ETag, as a real republish does
    const later = new Date(Date.now() + 5000);
    utimesSync(`${f.img}.blkpub`, later, later);
    utimesSync(`${f.img}.blkpub.data`, later, later);
  };
  await rejectsWith(copy(f.url, f.dst), 'EPUB_CHANGED');
  assert.deepEqual(await readFile(f.dst), f.v1);
  await copy(f.url, f.dst);
  assert.deepEqual(await readFile(f.dst), v3);
});

test('a damaged chunk is EPUB_CHECKSUM before it is written', async (t) => {
  const f = await fixture(t);
  const dataPath = join(f.www, 'os.img.blkpub.data');
  const data = await readFile(dataPath);
  // every stored byte flipped: whichever chunk is fetched first fails its hash
  for (let i = 0; i < data.length; i += 1) data[i] = data[i]! ^ 0x55;
  await writeFile(dataPath, data);
  const err = await rejectsWith(copy(f.url, f.dst), 'EPUB_CHECKSUM');
  assert.match(err.message, /nothing of it was written/);
  assert.deepEqual(await readFile(f.dst), f.v1);
});

test('blksync publish and copy --json from the command line', async (t) => {
  const f = await fixture(t);
  const pub = await runCli(['publish', f.img, '--json']);
  assert.equal(pub.code, 0, pub.stderr);
  const p = JSON.parse(pub.stdout) as { chunks: number; codec: string };
  assert.equal(p.chunks, SIZE / 64 / 1024);
  assert.equal(p.codec, 'brotli');
  const r = await runCli(['copy', f.url, f.dst, '--json']);
  assert.equal(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout) as {
    bytesWritten: number;
    http: { requests: number; bytesFetched: number };
  };
  assert.equal(out.bytesWritten, 3 * 4096);
  assert.equal(out.http.requests, 5);
  assert.ok(out.http.bytesFetched > 0);
  assert.deepEqual(await readFile(f.dst), f.v2);
  const again = await runCli(['copy', f.url, f.dst]);
  assert.equal(again.code, 0, again.stderr);
  assert.match(
    again.stdout + again.stderr,
    /published \S+os\.img\.blkpub: fetched .* in 3 requests/,
  );
});

test('a block device DST (loop) holding v1 is updated to v2 by the changed chunks only', async (t) => {
  if (!needLoop(t)) return;
  const f = await fixture(t);
  const dev = await attachLoop(t, f.dst);
  const r = await copy(f.url, dev);
  assert.equal(r.http?.chunksDiffering, 3);
  assert.equal(r.bytesWritten, 3 * 4096);
  const back = Buffer.alloc(SIZE);
  const { open } = await import('node:fs/promises');
  const fh = await open(dev, 'r');
  try {
    await fh.read(back, 0, SIZE, 0);
  } finally {
    await fh.close();
  }
  assert.deepEqual(back, f.v2);
});

test(
  'Ctrl-C while the server stalls mid-answer stops the copy; a rerun finishes',
  { timeout: 30_000 },
  async (t) => {
    let stall = true;
    const f = await fixture(t, {
      hook: (req, res, file) => {
        if (!stall || file === undefined || !req.url!.endsWith('.data')) return false;
        stall = false;
        res.writeHead(206, {
          'content-type': 'multipart/byteranges; boundary=XYZ',
          etag: file.etag,
        });
        // a part header, then silence: the connection stays open
        res.write(`\r\n--XYZ\r\nContent-Range: bytes 0-99/${file.data.length}\r\n\r\n`);
        return true;
      },
    });
    const controller = new AbortController();
    const copying = copy(f.url, f.dst, { signal: controller.signal });
    setTimeout(() => controller.abort(), 500);
    await rejectsWith(copying, 'EINTERRUPTED');
    await copy(f.url, f.dst);
    assert.deepEqual(await readFile(f.dst), f.v2);
  },
);

test('a --size that contradicts the published image size is EUSAGE, nothing written, as without the published files', async (t) => {
  const f = await fixture(t);
  const err = await rejectsWith(copy(f.url, f.dst, { size: SIZE / 2 }), 'EUSAGE');
  assert.match(err.message, /--size/);
  assert.deepEqual(await readFile(f.dst), f.v1);
  const r = await copy(f.url, f.dst, { size: SIZE });
  assert.ok(r.http !== undefined);
  assert.deepEqual(await readFile(f.dst), f.v2);
});

test('a directory as DST is refused as by any copy (EDEST_KIND)', async (t) => {
  const f = await fixture(t);
  await rejectsWith(copy(f.url, f.dir), 'EDEST_KIND');
});

test('an image replaced and not published again is streamed whole, with WPUB_STALE; DST gets it', async (t) => {
  const f = await fixture(t);
  // v3: another image of another size at the URL; the published files still describe v2
  const v3 = seededBytes(SIZE - 4096, 9);
  await writeFile(f.img, v3);
  const warnings: BlksyncWarning[] = [];
  const r = await copy(f.url, f.dst, { onWarning: (w) => warnings.push(w) });
  assert.deepEqual(
    warnings.map((w) => w.code),
    ['WPUB_STALE'],
  );
  assert.equal(r.http, undefined, 'not copied from the published files');
  assert.ok(
    (await readFile(f.dst)).subarray(0, v3.length).equals(v3),
    'DST holds the image served',
  );

  // the same size, modified after it was published
  const g = await fixture(t);
  const v4 = Buffer.from(g.v2);
  v4.write('edited after publish', 1000);
  await writeFile(g.img, v4);
  utimesSync(g.img, new Date(), new Date(Date.now() + 5000));
  const warned: string[] = [];
  await copy(g.url, g.dst, { onWarning: (w) => warned.push(w.code) });
  assert.deepEqual(warned, ['WPUB_STALE']);
  assert.ok((await readFile(g.dst)).equals(v4));
});

test('a compressed image served where its published files stand for another (same size, older) is decoded (WPUB_CONTAINER), not written by ranges', async (t) => {
  // publish refuses a compressed image; its files can still stand beside one that replaced
  // the image published with the same size and an older time (cp -p), which the size and
  // Last-Modified cannot tell: the image's magic does
  const dir = await tempDir(t);
  const image = Buffer.concat([seededBytes(300_000, 3), Buffer.alloc(700_000)]);
  const zipped = gzipSync(image);
  const gz = join(dir, 'os.img.gz');
  const plain = Buffer.concat([Buffer.from('plain'), seededBytes(zipped.length - 5, 4)]);
  await writeFile(gz, plain);
  await publish(gz, { chunkSize: CHUNK });
  await writeFile(gz, zipped);
  const earlier = new Date(Date.now() - 60_000);
  utimesSync(gz, earlier, earlier);
  const served = await serveDirectory(t, dir);
  const url = `${served.url}/os.img.gz`;
  const dst = join(dir, 'dst.img');
  const warnings: string[] = [];
  const r = await copy(url, dst, { size: image.length, onWarning: (w) => warnings.push(w.code) });
  assert.deepEqual(warnings, ['WPUB_CONTAINER']);
  assert.equal(r.http, undefined, 'not copied from the published files');
  assert.deepEqual(await readFile(dst), image);
  // --raw takes the published files as they stand
  const raw = join(dir, 'raw.img');
  const byRanges = await copy(url, raw, { raw: true });
  assert.ok(byRanges.http !== undefined);
  assert.deepEqual(await readFile(raw), plain);
});

test('a fixed VHD served where its published files stand for another is known by its footer (WPUB_CONTAINER), not written by ranges', async (t) => {
  // a fixed VHD starts as the raw disk it holds: only its last 512 bytes tell, so they are
  // asked for too; its published files (a blksync before publish refused it, or an image
  // replaced as above) would write the footer with the disk, exit 0
  const dir = await tempDir(t);
  const footer = vhdFooter();
  const vhd = Buffer.concat([seededBytes(4 * CHUNK, 5), footer]);
  const path = join(dir, 'os.vhd');
  const plain = seededBytes(vhd.length, 6);
  await writeFile(path, plain);
  await publish(path, { chunkSize: CHUNK });
  await writeFile(path, vhd);
  const earlier = new Date(Date.now() - 60_000);
  utimesSync(path, earlier, earlier);
  const served = await serveDirectory(t, dir);
  const url = `${served.url}/os.vhd`;
  const dst = join(dir, 'dst.img');
  const warnings: string[] = [];
  await assert.rejects(
    copy(url, dst, { onWarning: (w) => warnings.push(w.code) }),
    (err) => err instanceof BlksyncError && err.code === 'ESRC_CONTAINER',
  );
  assert.deepEqual(warnings, ['WPUB_CONTAINER']);
  await assert.rejects(readFile(dst), { code: 'ENOENT' });
  // --raw takes the published files as they stand
  const byRanges = await copy(url, dst, { raw: true });
  assert.ok(byRanges.http !== undefined);
  assert.deepEqual(await readFile(dst), plain);
});

/** v2 published and served, DST holding v1. */
async function servedPair(t: TestContext, v1: Buffer, v2: Buffer) {
  const dir = await tempDir(t);
  const www = join(dir, 'www');
  await mkdir(www);
  const img = join(www, 'os.img');
  await writeFile(img, v2);
  await publish(img, { chunkSize: CHUNK });
  const dst = join(dir, 'dst.img');
  await writeFile(dst, v1);
  const served = await serveDirectory(t, www);
  return { dst, url: `${served.url}/os.img` };
}

test('moved data: a chunk DST holds at another place is read from there, not fetched', async (t) => {
  const v1 = Buffer.concat([seededBytes(SIZE / 2, 7), Buffer.alloc(SIZE / 2)]);
  // v2: a 64 KiB run of v1's data copied to 5 MiB, and a new block at 7 MiB
  const v2 = Buffer.from(v1);
  v1.copy(v2, 5 * 1024 * 1024, 1024 * 1024, 1024 * 1024 + 4 * CHUNK);
  seededBytes(4096, 8).copy(v2, 7 * 1024 * 1024);
  const { dst, url } = await servedPair(t, v1, v2);
  const dry = await copy(url, dst, { dryRun: true });
  assert.equal(dry.http?.chunksSeeded, 4);
  const r = await copy(url, dst);
  assert.deepEqual(await readFile(dst), v2);
  assert.equal(r.http?.chunksDiffering, 5);
  assert.equal(r.http?.chunksSeeded, 4);
  assert.equal(r.http?.chunksFetched, 1);
  // the moved 64 KiB of random data were not on the wire: only the one new block's chunk
  assert.ok(r.http.bytesFetched < 2 * CHUNK, `fetched ${r.http.bytesFetched}`);
});

test('moved data onto a DST of other content (nearly every chunk differs): the chunks it holds elsewhere are still read from there', async (t) => {
  // v2 holds one content at chunks 10-11 and 40-41; DST holds other content everywhere but
  // at 40-41, where it holds that one: 40-41 stay, 10-11 are read from them
  const v2 = seededBytes(SIZE, 21);
  v2.copy(v2, 40 * CHUNK, 10 * CHUNK, 12 * CHUNK);
  const v1 = seededBytes(SIZE, 22);
  v2.copy(v1, 40 * CHUNK, 40 * CHUNK, 42 * CHUNK);
  const { dst, url } = await servedPair(t, v1, v2);
  const r = await copy(url, dst);
  assert.deepEqual(await readFile(dst), v2);
  assert.equal(r.http?.chunksDiffering, SIZE / CHUNK - 2);
  assert.equal(r.http?.chunksSeeded, 2);
  assert.equal(r.http?.chunksFetched, SIZE / CHUNK - 4);
});

test('a seed DST no longer holds (written meanwhile) is EDEST_CHANGED, never written as it is', async (t) => {
  const v1 = seededBytes(SIZE, 9);
  const v2 = Buffer.from(v1);
  v1.copy(v2, 5 * 1024 * 1024, 1024 * 1024, 1024 * 1024 + CHUNK);
  const { dst, url } = await servedPair(t, v1, v2);
  const published = await openPublished(url, { destination: dst });
  assert.ok(published !== undefined);
  t.after(() => published.source.close());
  // another program writes the seed's place after DST was hashed
  const fd = openSync(dst, 'r+');
  writeSync(fd, Buffer.alloc(4096, 0x77), 0, 4096, 1024 * 1024);
  closeSync(fd);
  const at = 5 * 1024 * 1024;
  const err = await rejectsWith(
    published.source.read(Buffer.alloc(CHUNK), at, CHUNK),
    'EDEST_CHANGED',
  );
  assert.match(err.message, /rerun/);
});

test('many differing chunks of one content (an image padded with 0xff) are planned at once, not in quadratic time', async (t) => {
  // written directly, not published: 32768 chunks of 4 KiB of 0xff, each stored on its own
  const chunks = 32768;
  const dir = await tempDir(t);
  const stored = await compressChunk(CODEC_BROTLI, Buffer.alloc(4096, 0xff));
  const hash = sha256(Buffer.alloc(4096, 0xff));
  const groupChunks = groupChunksFor(chunks);
  const leaves = Buffer.alloc(chunks * LEAF_BYTES);
  for (let i = 0; i < chunks; i++) {
    const leaf = { hash, offset: i * stored.length, length: stored.length, kind: KIND_COMPRESSED };
    encodeLeaf(leaf, leaves, i * LEAF_BYTES);
  }
  const groupHash = sha256(Buffer.concat(Array.from({ length: groupChunks }, () => hash)));
  const top = Buffer.concat(Array.from({ length: chunks / groupChunks }, () => groupHash));
  const header = encodeHeader({
    imageSize: chunks * 4096,
    chunkSize: 4096,
    groupChunks,
    codec: CODEC_BROTLI,
    dataSize: chunks * stored.length,
    root: sha256(top),
    imageSha256: Buffer.alloc(32),
  });
  await writeFile(join(dir, 'os.img.blkpub'), Buffer.concat([header, top, leaves]));
  await writeFile(join(dir, 'os.img.blkpub.data'), Buffer.concat(Array(chunks).fill(stored)));
  const served = await serveDirectory(t, dir);
  const started = performance.now();
  const published = await openPublished(`${served.url}/os.img`, {
    destination: join(dir, 'missing.img'),
  });
  const seconds = (performance.now() - started) / 1000;
  assert.ok(published !== undefined);
  t.after(() => published.source.close());
  assert.equal(published.report().chunksDiffering, chunks);
  // quadratic, it took ~30 s here; linear, well under one
  assert.ok(seconds < 5, `planning took ${seconds.toFixed(1)} s`);
});

test('progress tells DST being hashed before the chunks are fetched, then the bytes fetched', async (t) => {
  const f = await fixture(t);
  const seen: Progress[] = [];
  const r = await copy(f.url, f.dst, { onProgress: (p) => seen.push({ ...p }) });
  // the copy's progress tells bytes fetched so far, up to the result's
  const copying = seen.filter((p) => p.phase === undefined);
  assert.ok(copying.length > 0);
  for (const p of copying) {
    assert.ok(p.bytesFetched !== undefined && p.bytesFetched > 0);
    assert.ok(p.bytesFetched <= r.http!.bytesFetched);
  }
  const hashing = seen.filter((p) => p.phase === 'hashing DST');
  assert.ok(hashing.length > 0, 'told while hashing DST');
  const last = hashing[hashing.length - 1]!;
  assert.ok(last.bytesTotal > 0 && last.bytesScanned === last.bytesTotal);
  // hashing comes first: no copy progress before its last report
  const firstCopy = seen.findIndex((p) => p.phase === undefined);
  assert.ok(firstCopy === -1 || firstCopy > seen.lastIndexOf(last));
});

test('DST replaced after it was hashed (while the index is fetched): EDEST_CHANGED, the new file untouched', async (t) => {
  let replaced = false;
  const other = seededBytes(SIZE, 9);
  let dstPath = '';
  const f = await fixture(t, {
    onRequest: (req) => {
      // the leaf records of the differing groups: asked for once DST is hashed
      if (!replaced && req.url?.endsWith('.blkpub') === true && req.headers.range !== undefined) {
        if (!req.headers.range.startsWith('bytes=0-')) {
          writeFileSync(`${dstPath}.new`, other);
          renameSync(`${dstPath}.new`, dstPath);
          replaced = true;
        }
      }
    },
  });
  dstPath = f.dst;
  await rejectsWith(copy(f.url, f.dst), 'EDEST_CHANGED');
  assert.ok(replaced, 'DST was not replaced: the test did not race');
  assert.deepEqual(await readFile(f.dst), other);
});

test('DST written in place after it was hashed: EDEST_CHANGED, not a copy planned from stale hashes', async (t) => {
  let written = false;
  let dstPath = '';
  const f = await fixture(t, {
    onRequest: (req) => {
      // the leaf records of the differing groups: asked for once DST is hashed
      const range = req.headers.range;
      if (!written && req.url?.endsWith('.blkpub') === true && range !== undefined) {
        if (!range.startsWith('bytes=0-')) {
          const fd = openSync(dstPath, 'r+');
          writeSync(fd, Buffer.from('written by another program'), 0, 26, 7 * 1024 * 1024);
          closeSync(fd);
          written = true;
        }
      }
    },
  });
  dstPath = f.dst;
  await rejectsWith(copy(f.url, f.dst), 'EDEST_CHANGED');
  assert.ok(written, 'DST was not written: the test did not race');
});

test('a device DST written after it was hashed (its count of sectors written moved): EDEST_CHANGED', async (t) => {
  if (!needLoop(t)) return;
  let written = false;
  let dev = '';
  const f = await fixture(t, {
    onRequest: (req) => {
      // the leaf records of the differing groups: asked for once DST is hashed
      const range = req.headers.range;
      if (!written && req.url?.endsWith('.blkpub') === true && range !== undefined) {
        if (!range.startsWith('bytes=0-')) {
          // another program writes the device, and its write reaches it (fsync)
          const fd = openSync(dev, 'r+');
          writeSync(fd, Buffer.alloc(4096, 7), 0, 4096, 7 * 1024 * 1024);
          fsyncSync(fd);
          closeSync(fd);
          written = true;
        }
      }
    },
  });
  dev = await attachLoop(t, f.dst);
  const err = await rejectsWith(copy(f.url, dev), 'EDEST_CHANGED');
  assert.match(err.message, /sectors written/);
  assert.ok(written, 'DST was not written: the test did not race');
  // nothing of the update was written: the device holds v1 but for the other program's block
  const held = await readFile(dev);
  const expected = Buffer.from(f.v1);
  expected.fill(7, 7 * 1024 * 1024, 7 * 1024 * 1024 + 4096);
  assert.ok(held.equals(expected));
});
