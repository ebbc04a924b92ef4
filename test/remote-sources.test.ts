/**
 * Pushes from every kind of local source over a real OpenSSH server on 127.0.0.1: compressed
 * images (xz, gzip) onto a remote file and a remote loop device, stdin, an http URL, and a
 * bmap plan (only mapped ranges considered, checksums verified before anything is sent).
 * Also: a URL is never taken for an ssh `host:path`.
 */

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, writeSync } from 'node:fs';
import { open, readFile, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { gzipSync } from 'node:zlib';
import { createBmap } from '../src/engine/bmap-create.js';
import { copy } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import type { RemoteCopyResult } from '../src/copy.js';
import { isRemote, parseRemote } from '../src/remote/spec.js';
import { runCli } from './helpers/cli.js';
import { attachLoop, needLoop, needTool, readDevice } from './helpers/loop.js';
import { sharedSshd, type Sshd } from './helpers/sshd.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

const BS = 4096;
const MiB = 1024 * 1024;
/** A push that sends one 4 KiB block: the agent's bundle (~28 KiB deflated), the block, hashes. */
const ONE_BLOCK_PUSH_BYTES = 40 * 1024;

/** A 10 MiB image: random extents among zeros, so it compresses and has holes for a bmap. */
function image(seed: number): { data: Buffer; pieces: { offset: number; data: Buffer }[] } {
  const size = 10 * MiB + 1000;
  const pieces = [
    { offset: 0, data: seededBytes(3 * BS, seed) },
    { offset: MiB + 5 * BS, data: seededBytes(300 * BS, seed + 1) },
    { offset: 6 * MiB, data: seededBytes(BS, seed + 2) },
    { offset: 10 * MiB, data: seededBytes(1000, seed + 3) },
  ];
  const data = Buffer.alloc(size);
  for (const p of pieces) p.data.copy(data, p.offset);
  return { data, pieces };
}

function xz(data: Buffer): Buffer {
  return execFileSync('xz', ['-c', '-1', '-T1'], { input: data, maxBuffer: 64 * MiB });
}

describe('push from any local source', () => {
  const server = sharedSshd();
  let http: Server | undefined;
  let base = '';
  const served = new Map<string, Buffer>();

  before(async () => {
    http = createServer((req, res) => {
      const body = served.get(req.url ?? '');
      if (body === undefined) {
        res.writeHead(404).end();
        return;
      }
      res.writeHead(200, { 'content-length': body.length }).end(body);
    });
    await new Promise<void>((resolve) => http!.listen(0, '127.0.0.1', resolve));
    base = `http://127.0.0.1:${(http.address() as AddressInfo).port}`;
  });
  after(async () => {
    await new Promise((resolve) => http?.close(resolve));
  });

  const at = (s: Sshd, path: string): string => `${s.host}:${path}`;

  test('a URL is never an ssh end, whatever its port or user part', () => {
    for (const url of [
      'http://example.com/disk.img',
      'https://example.com:8443/disk.img.xz',
      'http://me@example.com:8080/disk.img',
      'HTTPS://[::1]:8443/disk.img',
    ]) {
      assert.equal(parseRemote(url), undefined, url);
      assert.equal(isRemote(url), false, url);
    }
    // rsync's rule still holds for the rest
    assert.deepEqual(parseRemote('http:disk.img'), { destination: 'http', path: 'disk.img' });
  });

  test('a URL source with a port is copied locally, not over ssh', async (t) => {
    const dir = await tempDir(t);
    const { data } = image(1);
    served.set('/local.img', data);
    // no --ssh: an ssh attempt would fail (ESSH); a local copy succeeds
    const r = await copy(`${base}/local.img`, join(dir, 'out.img'), {
      remote: { ssh: '/nonexistent/ssh' },
    });
    assert.equal(r.created, true);
    assert.ok((await readFile(join(dir, 'out.img'))).equals(data));
  });

  test('a SRC file written during a push fails ESRC_CHANGED, not exit 0 with a mix', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const src = join(dir, 'src.img');
    const size = 16 * MiB;
    await writeFile(src, seededBytes(size, 31));
    const dst = join(dir, 'dst.img');
    await writeFile(dst, Buffer.alloc(size, 1));
    let written = false;
    await assert.rejects(
      copy(src, at(s, dst), {
        remote: { ssh: s.ssh },
        onProgress: (p) => {
          if (written || p.bytesScanned === 0) return;
          written = true;
          const fh = openSync(src, 'r+');
          writeSync(fh, seededBytes(BS, 32), 0, BS, size - BS);
          closeSync(fh);
        },
      }),
      (e: unknown) => {
        assert.ok(e instanceof BlksyncError, String(e));
        assert.equal(e.code, 'ESRC_CHANGED', e.message);
        return true;
      },
    );
    await copy(src, at(s, dst), { remote: { ssh: s.ssh } });
    assert.ok((await readFile(dst)).equals(await readFile(src)));
  });

  test('xz and gzip images pushed to a remote file equal the decompressed image', async (t) => {
    const s = server(t);
    if (!s || !(await needTool(t, 'xz', 'xz-utils'))) return;
    const dir = await tempDir(t);
    const { data } = image(2);
    await writeFile(join(dir, 'disk.img.xz'), xz(data));
    await writeFile(join(dir, 'disk.img.gz'), gzipSync(data));
    const old = seededBytes(data.length, 77);
    for (const name of ['disk.img.xz', 'disk.img.gz']) {
      // onto a new file, then onto an existing one that differs in one block
      const fresh = join(dir, `${name}.new`);
      const r = await runCli(['copy', '--json', '--ssh', s.ssh, join(dir, name), at(s, fresh)]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal((JSON.parse(r.stdout) as RemoteCopyResult).created, true);
      assert.ok((await readFile(fresh)).equals(data), `${name} → new remote file`);

      const changed = Buffer.from(data);
      changed[6 * MiB + 10] = changed[6 * MiB + 10]! ^ 0xff;
      await writeFile(join(dir, 'dst.img'), changed);
      const again = (await copy(join(dir, name), at(s, join(dir, 'dst.img')), {
        remote: { ssh: s.ssh },
      })) as RemoteCopyResult;
      assert.equal(again.bytesWritten, BS, name);
      assert.ok(
        again.channel.bytesSent < ONE_BLOCK_PUSH_BYTES,
        `${name}: sent ${again.channel.bytesSent}`,
      );
      assert.ok((await readFile(join(dir, 'dst.img'))).equals(data), `${name} → existing file`);

      await writeFile(join(dir, 'dst.img'), old);
      await copy(join(dir, name), at(s, join(dir, 'dst.img')), { remote: { ssh: s.ssh } });
      assert.ok((await readFile(join(dir, 'dst.img'))).equals(data), `${name} → other file`);
    }
  });

  test('an xz image pushed to a remote loop device equals the decompressed image', async (t) => {
    const s = server(t);
    if (!s || !needLoop(t) || !(await needTool(t, 'xz', 'xz-utils'))) return;
    const dir = await tempDir(t);
    const { data } = image(3);
    await writeFile(join(dir, 'disk.img.xz'), xz(data));
    await writeFile(join(dir, 'disk.img.gz'), gzipSync(data));
    const backing = join(dir, 'backing');
    const before = seededBytes(12 * MiB, 4);
    const tail = before.subarray(data.length);
    await writeFile(backing, before);
    const dev = await attachLoop(t, backing);
    for (const name of ['disk.img.xz', 'disk.img.gz']) {
      const r = await runCli(['copy', '--json', '--ssh', s.ssh, join(dir, name), at(s, dev)]);
      assert.equal(r.code, 0, r.stderr);
      const device = await readDevice(dev, data.length + tail.length);
      assert.ok(device.subarray(0, data.length).equals(data), `${name} → ${dev}`);
      assert.ok(device.subarray(data.length).equals(tail), 'the rest of the device is left alone');
    }
  });

  test('stdin and an http URL (gzip) are pushed', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const { data } = image(6);
    served.set('/disk.img.gz', gzipSync(data));
    served.set('/disk.img', data);
    await writeFile(join(dir, 'dst.img'), seededBytes(data.length, 8));
    const url = await runCli([
      'copy',
      '--json',
      '--size',
      String(data.length),
      '--ssh',
      s.ssh,
      `${base}/disk.img.gz`,
      at(s, join(dir, 'dst.img')),
    ]);
    assert.equal(url.code, 0, url.stderr);
    assert.ok((await readFile(join(dir, 'dst.img'))).equals(data), 'gzip URL');

    const plain = await runCli([
      'copy',
      '--ssh',
      s.ssh,
      `${base}/disk.img`,
      at(s, join(dir, 'u.img')),
    ]);
    assert.equal(plain.code, 0, plain.stderr);
    assert.ok((await readFile(join(dir, 'u.img'))).equals(data), 'plain URL');

    const changed = Buffer.from(data);
    changed[MiB + 5 * BS] = changed[MiB + 5 * BS]! ^ 1;
    const piped = await runCli(
      [
        'copy',
        '--json',
        '--size',
        String(changed.length),
        '--ssh',
        s.ssh,
        '-',
        at(s, join(dir, 'dst.img')),
      ],
      { input: gzipSync(changed) },
    );
    assert.equal(piped.code, 0, piped.stderr);
    // compressed from a pipe: its size is known only from --size (checked at its end)
    assert.equal((JSON.parse(piped.stdout) as RemoteCopyResult).bytesWritten, BS);
    assert.ok((await readFile(join(dir, 'dst.img'))).equals(changed), 'stdin');
  });

  test('a bmap push considers only mapped ranges and verifies them before sending', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const { data, pieces } = image(9);
    const img = join(dir, 'disk.img');
    await writeSparseFile(img, data.length, pieces);
    await createBmap(img, { output: `${img}.bmap` });
    const mapped = 3 * BS + 300 * BS + BS + 1000;
    // an existing destination: mapped ranges become the image's, the rest is left as it was
    const old = seededBytes(data.length, 10);
    await writeFile(join(dir, 'dst.img'), old);
    const r = (await copy(img, at(s, join(dir, 'dst.img')), {
      remote: { ssh: s.ssh },
    })) as RemoteCopyResult;
    assert.equal(r.bmap?.path, `${img}.bmap`);
    assert.equal(r.bmap?.rangesVerified, 4);
    assert.equal(r.bytesScanned, mapped);
    // the differing pieces were hashed at each level: never all of DST
    assert.ok(r.bytesRead <= 3 * mapped, `the agent read ${r.bytesRead}`);
    const got = await readFile(join(dir, 'dst.img'));
    const expected = Buffer.from(old);
    for (const p of pieces) p.data.copy(expected, p.offset);
    assert.ok(got.equals(expected));
    // a rerun sends a hash per mapped piece and nothing else
    const again = (await copy(img, at(s, join(dir, 'dst.img')), {
      remote: { ssh: s.ssh },
    })) as RemoteCopyResult;
    assert.equal(again.bytesWritten, 0);
    assert.equal(again.bytesRead, mapped);
    // the agent's code (~18 KiB) and one hash request per mapped piece
    assert.ok(again.channel.bytesSent < ONE_BLOCK_PUSH_BYTES, `sent ${again.channel.bytesSent}`);

    // onto a new remote file: the image exactly (unmapped areas stay holes)
    const fresh = await runCli(['copy', '--ssh', s.ssh, img, at(s, join(dir, 'new.img'))]);
    assert.equal(fresh.code, 0, fresh.stderr);
    assert.match(fresh.stdout, /bmap .*4 range checksums verified/);
    assert.ok((await readFile(join(dir, 'new.img'))).equals(data));

    // compressed beside its bmap (disk.img.xz finds disk.img.bmap, as bmaptool does)
    if (await needTool(t, 'xz', 'xz-utils')) {
      await writeFile(join(dir, 'disk.img.xz'), xz(data));
      await writeFile(join(dir, 'xz.img'), old);
      const packed = (await copy(join(dir, 'disk.img.xz'), at(s, join(dir, 'xz.img')), {
        remote: { ssh: s.ssh },
      })) as RemoteCopyResult;
      assert.equal(packed.bmap?.path, `${img}.bmap`);
      assert.equal(packed.bytesScanned, mapped);
      assert.ok((await readFile(join(dir, 'xz.img'))).equals(expected));
    }

    // a damaged image: refused by its checksum, nothing written there
    const fh = await open(img, 'r+');
    await fh.write(Buffer.from('BAD'), 0, 3, 11);
    await fh.close();
    await writeFile(join(dir, 'dst.img'), old);
    await assert.rejects(
      copy(img, at(s, join(dir, 'dst.img')), { remote: { ssh: s.ssh } }),
      (err: unknown) => {
        assert.ok(err instanceof BlksyncError, String(err));
        assert.equal(err.code, 'EBMAP_CHECKSUM', err.message);
        return true;
      },
    );
    assert.ok((await readFile(join(dir, 'dst.img'))).equals(old), 'nothing written');
  });
});
