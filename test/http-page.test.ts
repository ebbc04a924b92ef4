/**
 * A web server's "not found" page sent with 200 (text/html) in place of an image must never be
 * written over DST; a URL that does not parse is a coded error, not an internal one.
 */

import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { readFile, writeFile } from 'node:fs/promises';
import { copy } from '../src/copy.js';
import { absent, rejectsWith } from './helpers/assert-error.js';
import { runCli } from './helpers/cli.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const PAGE = '<!DOCTYPE html><html><body>Not found</body></html>\n';

test('an image URL answered with a web page is refused; DST untouched or not created', async (t) => {
  const dir = await tempDir(t);
  const server = createServer((req, res) => {
    res.writeHead(200, {
      'content-type': 'text/html; charset=utf-8',
      'content-length': Buffer.byteLength(PAGE),
    });
    res.end(PAGE);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;

  const fresh = join(dir, 'new.img');
  await rejectsWith(copy(`${base}/os.img.xz`, fresh), 'ESRC_HTTP', /web page.*check the URL/);
  await absent(fresh);

  const old = seededBytes(65536, 3);
  const dst = join(dir, 'dst.img');
  await writeFile(dst, old);
  await rejectsWith(copy(`${base}/os.img`, dst), 'ESRC_HTTP', /text\/html/);
  assert.deepEqual(await readFile(dst), old);

  // asked for: written as sent
  await copy(`${base}/page`, join(dir, 'page.html'), { raw: true });
  assert.equal(await readFile(join(dir, 'page.html'), 'utf8'), PAGE);
});

test('a URL that does not parse is ESRC_OPEN, for copy and index alike', async (t) => {
  const dir = await tempDir(t);
  for (const args of [
    ['copy', 'https://[::1', join(dir, 'z')],
    ['index', 'http://[::1/x', '-o', join(dir, 'q')],
  ]) {
    const r = await runCli(args);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /^blksync: .*not a valid URL.* \[ESRC_OPEN\]/);
  }
});

test('index and diff take --timeout too: a stalled server ends in ETIMEOUT', async (t) => {
  const dir = await tempDir(t);
  const sockets = new Set<import('node:net').Socket>();
  const server = createServer((req, res) => {
    // headers, then silence
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': 1 << 20 });
    res.write(Buffer.alloc(1000));
  });
  server.on('connection', (s) => sockets.add(s));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(
    () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  );
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/os.img`;
  const base = join(dir, 'base.img');
  await writeFile(base, seededBytes(1 << 20, 4));
  for (const args of [
    ['index', '--timeout', '1', url, '-o', join(dir, 'x.idx')],
    ['diff', '--timeout', '1', base, url, '-o', join(dir, 'x.patch')],
  ]) {
    const r = await runCli(args);
    assert.equal(r.code, 1, `${args[0]}: ${r.stderr}`);
    assert.match(r.stderr, /\[ETIMEOUT\]/);
  }
});
