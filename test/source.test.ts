/**
 * Sources of `copy`: compressed images (src/io/decompress.ts), stdin and streams
 * (src/io/sequential-source.ts), http(s) (src/io/http-source.ts), put together by
 * src/engine/copy-source.ts.
 */

import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFile, readFile, stat, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { gzipSync } from 'node:zlib';
import { createBmap } from '../src/engine/bmap-create.js';
import { BlksyncError, copy } from '../src/index.js';
import { serializeBmap } from '../src/formats/bmap-write.js';
import { detectCompression } from '../src/io/decompress.js';
import { runCli } from './helpers/cli.js';
import { need } from './helpers/resources.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

const MiB = 1024 * 1024;
const BS = 4096;

const COMPRESSORS: Record<string, { ext: string; cmd: string[]; pkg: string }> = {
  gzip: { ext: 'gz', cmd: ['gzip', '-c'], pkg: 'gzip' },
  xz: { ext: 'xz', cmd: ['xz', '-c', '-0'], pkg: 'xz-utils' },
  zstd: { ext: 'zst', cmd: ['zstd', '-qc'], pkg: 'zstd' },
  bzip2: { ext: 'bz2', cmd: ['bzip2', '-c'], pkg: 'bzip2' },
  lz4: { ext: 'lz4', cmd: ['lz4', '-c'], pkg: 'lz4' },
};

function have(cmd: string): boolean {
  return spawnSync(cmd, ['--help'], { stdio: 'ignore' }).error === undefined;
}

function compress(kind: string, data: Buffer): Buffer {
  const c = COMPRESSORS[kind]!;
  return execFileSync(c.cmd[0]!, c.cmd.slice(1), { input: data, maxBuffer: 256 * MiB });
}

/** A 6 MiB image: random extents in zeros (compresses well, has a bmap). */
function imageBytes(seed: number): { image: Buffer; pieces: { offset: number; data: Buffer }[] } {
  const pieces = [
    { offset: 0, data: seededBytes(2 * BS, seed) },
    { offset: 2 * MiB, data: seededBytes(MiB, seed + 1) },
    { offset: 6 * MiB - 100, data: seededBytes(100, seed + 2) },
  ];
  const image = Buffer.alloc(6 * MiB);
  for (const p of pieces) p.data.copy(image, p.offset);
  return { image, pieces };
}

function isCode(code: string): (err: unknown) => boolean {
  return (err: unknown) => {
    assert.ok(err instanceof BlksyncError, String(err));
    assert.equal(err.code, code, err.message);
    return true;
  };
}

describe('compressed sources', () => {
  const { image, pieces } = imageBytes(1);

  it('recognises formats by magic bytes', () => {
    assert.equal(detectCompression(Buffer.from([0x1f, 0x8b, 8, 0, 0, 0])), 'gzip');
    assert.equal(detectCompression(Buffer.from('BZh91AY')), 'bzip2');
    assert.equal(detectCompression(Buffer.from('BZhx')), undefined);
    assert.equal(detectCompression(Buffer.from([0x28, 0xb5, 0x2f, 0xfd])), 'zstd');
    assert.equal(detectCompression(Buffer.alloc(6)), undefined);
  });

  for (const kind of Object.keys(COMPRESSORS)) {
    it(`${kind}: copies with and without a bmap; truncated or damaged is an error`, async (t) => {
      const c = COMPRESSORS[kind]!;
      if (!need(t, have(c.cmd[0]!), `${c.cmd[0]} is not installed (apt-get install ${c.pkg})`)) {
        return;
      }
      const dir = await tempDir(t);
      const raw = join(dir, 'disk.img');
      await writeSparseFile(raw, image.length, pieces);
      await createBmap(raw, { output: join(dir, 'disk.bmap') });
      const packed = compress(kind, image);
      // a name that does not tell the format: detection is by content
      const src = join(dir, 'disk.img.bin');
      await writeFile(src, packed);

      const withBmap = join(dir, 'a');
      const r1 = await copy(src, withBmap, { bmap: join(dir, 'disk.bmap') });
      assert.equal(r1.bytesScanned, 2 * BS + MiB + BS);
      assert.ok((await readFile(withBmap)).equals(image));

      const whole = join(dir, 'b');
      const r2 = await copy(src, whole, { noBmap: true });
      assert.equal(r2.bytesScanned, image.length);
      assert.ok((await readFile(whole)).equals(image));

      const cut = join(dir, 'cut.bin');
      await writeFile(cut, packed.subarray(0, Math.floor(packed.length * 0.6)));
      await assert.rejects(
        copy(cut, join(dir, 'c'), { bmap: join(dir, 'disk.bmap') }),
        isCode('ESRC_SHORT'),
      );
      await assert.rejects(copy(cut, join(dir, 'd'), { noBmap: true }), isCode('ESRC_SHORT'));

      const bad = Buffer.from(packed);
      for (let i = 64; i < Math.min(bad.length - 64, 4096); i++) bad[i] = 0x55;
      await writeFile(join(dir, 'bad.bin'), bad);
      await assert.rejects(copy(join(dir, 'bad.bin'), join(dir, 'e'), { noBmap: true }), (err) => {
        assert.ok(err instanceof BlksyncError);
        assert.ok(['ESRC_CORRUPT', 'ESRC_SHORT'].includes(err.code), err.message);
        return true;
      });
    });
  }
});

describe('stdin', () => {
  it('reads a compressed image from a pipe with a bmap, and a raw one from a file', async (t) => {
    const dir = await tempDir(t);
    const { image, pieces } = imageBytes(2);
    const raw = join(dir, 'disk.img');
    await writeSparseFile(raw, image.length, pieces);
    await createBmap(raw, { output: join(dir, 'disk.bmap') });
    const out = join(dir, 'out');
    const r = await runCli(['copy', '--bmap', join(dir, 'disk.bmap'), '-', out], {
      input: gzipSync(image),
    });
    assert.equal(r.code, 0, r.stderr);
    assert.ok((await readFile(out)).equals(image));
    const noSize = await runCli(['copy', '-', join(dir, 'out2')], { input: gzipSync(image) });
    assert.equal(noSize.code, 2);
    assert.match(noSize.stderr, /not known before reading it all.*--bmap.*--size/);
    const sized = await runCli(['copy', '--size', String(image.length), '-', join(dir, 'out3')], {
      input: gzipSync(image),
    });
    assert.equal(sized.code, 0, sized.stderr);
    assert.ok((await readFile(join(dir, 'out3'))).equals(image));
    const small = await runCli(['copy', '--size', '5M', '-', join(dir, 'out4')], {
      input: gzipSync(image),
    });
    assert.equal(small.code, 2);
    assert.match(small.stderr, /larger than the 5242880 bytes given with --size/);
    const large = await runCli(['copy', '--size', '7M', '-', join(dir, 'out5')], {
      input: gzipSync(image),
    });
    assert.equal(large.code, 1);
    assert.match(large.stderr, /ESRC_SHORT/);
  });

  it("refuses a stream longer or shorter than its bmap's image, past the last mapped range", async (t) => {
    const dir = await tempDir(t);
    // the last mapped byte is 3 MiB into a 6 MiB image: the stream's end is past the plan's
    const pieces = [
      { offset: 0, data: seededBytes(2 * BS, 7) },
      { offset: 2 * MiB, data: seededBytes(MiB, 8) },
    ];
    const image = Buffer.alloc(6 * MiB);
    for (const p of pieces) p.data.copy(image, p.offset);
    const raw = join(dir, 'disk.img');
    await writeSparseFile(raw, image.length, pieces);
    const bmap = join(dir, 'disk.bmap');
    await createBmap(raw, { output: bmap });
    const longer = gzipSync(Buffer.concat([image, seededBytes(MiB, 9)]));
    const shorter = gzipSync(image.subarray(0, 5 * MiB));
    for (const [name, input] of [
      ['longer', longer],
      ['shorter', shorter],
    ] as const) {
      const r = await runCli(['copy', '--bmap', bmap, '-', join(dir, `out-${name}`)], { input });
      assert.equal(r.code, 1, `${name}: ${r.stderr}`);
      assert.match(r.stderr, /describes an image of 6291456 bytes but stdin .*\[EBMAP_MISMATCH\]/);
      // a compressed file SRC, its bmap found beside it
      await writeFile(join(dir, `${name}.img.gz`), input);
      await copyFile(bmap, join(dir, `${name}.img.bmap`));
      await assert.rejects(
        copy(join(dir, `${name}.img.gz`), join(dir, `file-${name}`)),
        isCode('EBMAP_MISMATCH'),
      );
    }
    const right = await runCli(['copy', '--bmap', bmap, '-', join(dir, 'out')], {
      input: gzipSync(image),
    });
    assert.equal(right.code, 0, right.stderr);
    assert.ok((await readFile(join(dir, 'out'))).equals(image));
  });

  it("refuses a --size that contradicts the bmap's image size, instead of ignoring it", async (t) => {
    const dir = await tempDir(t);
    const { image, pieces } = imageBytes(4);
    const raw = join(dir, 'disk.img');
    await writeSparseFile(raw, image.length, pieces);
    const bmap = join(dir, 'disk.bmap');
    await createBmap(raw, { output: bmap });
    await writeFile(join(dir, 'disk.img.gz'), gzipSync(image));
    for (const src of [join(dir, 'disk.img.gz'), raw]) {
      await assert.rejects(
        copy(src, join(dir, 'out'), { bmap, size: image.length - BS }),
        isCode('EUSAGE'),
      );
    }
    await assert.rejects(stat(join(dir, 'out')), { code: 'ENOENT' });
    const r = await copy(join(dir, 'disk.img.gz'), join(dir, 'out'), { bmap, size: image.length });
    assert.equal(r.bytesTotal, image.length);
  });

  it('refuses --size 0: it would copy nothing and exit 0 without reading the stream', async (t) => {
    const dir = await tempDir(t);
    const { image } = imageBytes(3);
    for (const size of ['0', '0K']) {
      const out = join(dir, `out-${size}`);
      const r = await runCli(['copy', '--size', size, '-', out], { input: gzipSync(image) });
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, /--size 0 is not an image size.*\[EUSAGE\]/);
      await assert.rejects(stat(out), { code: 'ENOENT' });
    }
    await assert.rejects(
      copy('-', join(dir, 'lib'), { size: -4096, noBmap: true }),
      isCode('EUSAGE'),
    );
  });
});

describe('http sources', () => {
  const { image, pieces } = imageBytes(3);
  const packed = gzipSync(image);
  const longerPacked = gzipSync(Buffer.concat([image, Buffer.alloc(MiB, 5)]));
  let server: Server;
  let base: string;
  let bmapText: Buffer;
  const bigBmap = Buffer.from(
    serializeBmap({
      imageSize: 256 * MiB,
      blockSize: BS,
      checksumType: 'sha256',
      ranges: [{ first: 0, last: 0 }],
    }),
  );

  before(async () => {
    const { mkdtemp, rm } = await import('node:fs/promises');
    const { tmpdir } = await import('node:os');
    const dir = await mkdtemp(join(tmpdir(), 'blksync-http-'));
    const raw = join(dir, 'disk.img');
    await writeSparseFile(raw, image.length, pieces);
    bmapText = Buffer.from((await createBmap(raw)).text);
    await rm(dir, { recursive: true });
    server = createServer((req, res) => {
      const url = req.url ?? '';
      const send = (body: Buffer): void => {
        res.writeHead(200, { 'content-length': body.length });
        res.end(body);
      };
      if (url === '/disk.img.gz') send(packed);
      else if (url === '/longer.img.gz') send(longerPacked);
      else if (url === '/big.img') {
        // 256 MiB of which the bmap maps the first block: the copy must not wait for the rest
        res.writeHead(200, { 'content-length': 256 * MiB });
        const block = Buffer.alloc(MiB, 1);
        let sent = 0;
        const more = (): void => {
          while (sent < 256 && res.write(block)) sent++;
          if (sent < 256) res.once('drain', more);
          else res.end();
        };
        more();
      } else if (url === '/big.bmap') send(bigBmap);
      else if (url === '/disk.img') send(image);
      else if (url === '/disk.bmap') send(bmapText);
      else if (url === '/moved.img.gz') {
        res.writeHead(302, { location: '/disk.img.gz' });
        res.end();
      } else if (url === '/cut.img') {
        // promise the whole image, send a third, drop the connection
        res.writeHead(200, { 'content-length': image.length });
        res.write(image.subarray(0, 2 * MiB), () => res.socket?.destroy());
      } else if (url === '/broken.img.gz') {
        res.writeHead(500);
        res.end();
      } else {
        res.writeHead(404);
        res.end();
      }
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(() => new Promise<void>((resolve) => server.close(() => resolve())));

  it('copies a gzip image and finds its bmap at the URL as bmaptool does', async (t) => {
    const dir = await tempDir(t);
    const out = join(dir, 'out');
    const r = await copy(`${base}/disk.img.gz`, out);
    assert.equal(r.bmap?.path, `${base}/disk.bmap`);
    assert.equal(r.bytesScanned, 2 * BS + MiB + BS);
    assert.ok((await readFile(out)).equals(image));
    const moved = await copy(`${base}/moved.img.gz`, join(dir, 'moved'), {
      bmap: `${base}/disk.bmap`,
    });
    assert.equal(moved.bmap?.rangesVerified, 3);
    const raw = await copy(`${base}/disk.img`, join(dir, 'raw'), { noBmap: true });
    assert.equal(raw.bytesScanned, image.length);
    // compressed, its length is known only at its end: more than the bmap's image is refused
    await assert.rejects(
      copy(`${base}/longer.img.gz`, join(dir, 'longer'), { bmap: `${base}/disk.bmap` }),
      isCode('EBMAP_MISMATCH'),
    );
  });

  it('stops downloading once the last mapped range is in', async (t) => {
    const dir = await tempDir(t);
    const started = performance.now();
    const r = await runCli(['copy', '-q', `${base}/big.img`, join(dir, 'big')]);
    assert.equal(r.code, 0, r.stderr);
    assert.ok(performance.now() - started < 20_000);
    const out = await readFile(join(dir, 'big'));
    assert.equal(out.length, 256 * MiB);
    assert.ok(out.subarray(0, BS).equals(Buffer.alloc(BS, 1)));
    assert.ok(out.subarray(BS, 2 * BS).equals(Buffer.alloc(BS)));
  });

  it('reports 404, server errors and a connection cut mid-body', async (t) => {
    const dir = await tempDir(t);
    await assert.rejects(copy(`${base}/nothing.img`, join(dir, 'a')), (err: unknown) => {
      assert.ok(err instanceof BlksyncError && err.code === 'ESRC_HTTP');
      assert.match(err.message, /HTTP 404/);
      return true;
    });
    await assert.rejects(copy(`${base}/broken.img.gz`, join(dir, 'b')), /HTTP 500/);
    await assert.rejects(copy(`${base}/cut.img`, join(dir, 'c'), { noBmap: true }), (err) => {
      assert.ok(err instanceof BlksyncError && err.code === 'ESRC_SHORT', String(err));
      assert.match(err.message, /connection ended after \d+ bytes of 6291456/);
      return true;
    });
    await assert.rejects(
      copy(`${base}/disk.img`, join(dir, 'd'), { bmap: `${base}/nope.bmap` }),
      isCode('EBMAP_OPEN'),
    );
  });
});
