/**
 * Containers from an http URL (a real server on 127.0.0.1, port 0): an Android sparse image,
 * a tar.gz and a qcow2 (spooled) decode as from a file; a 7z is refused before DST exists.
 */

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { copy } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import { needTool } from './helpers/loop.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;

test('an Android sparse image, a tar.gz and a qcow2 from a URL decode; a 7z is refused', async (t) => {
  if (!(await needTool(t, 'img2simg', 'android-sdk-libsparse-utils'))) return;
  if (!(await needTool(t, 'qemu-img', 'qemu-utils'))) return;
  const dir = await tempDir(t);
  const bytes = Buffer.concat([seededBytes(MiB, 1), Buffer.alloc(2 * MiB), seededBytes(MiB, 2)]);
  const img = join(dir, 'os.img');
  await writeFile(img, bytes);
  await run('img2simg', [img, join(dir, 'os.simg')]);
  await run('tar', ['-C', dir, '-czf', join(dir, 'os.tar.gz'), 'os.img']);
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-c', img, join(dir, 'os.qcow2')]);
  await writeFile(
    join(dir, 'os.7z'),
    Buffer.concat([Buffer.from([0x37, 0x7a, 0xbc, 0xaf, 0x27, 0x1c]), seededBytes(4096, 3)]),
  );
  const server = createServer((req, res) => {
    const name = new URL(req.url ?? '/', 'http://x').pathname.slice(1);
    readFile(join(dir, name)).then(
      (body) => {
        res.writeHead(200, { 'content-length': body.length });
        res.end(body);
      },
      () => {
        res.writeHead(404);
        res.end();
      },
    );
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  for (const name of ['os.simg', 'os.tar.gz', 'os.qcow2']) {
    const dst = join(dir, `${name}.out`);
    const warnings: string[] = [];
    await copy(`${base}/${name}`, dst, { onWarning: (w) => warnings.push(w.code) });
    assert.ok((await readFile(dst)).equals(bytes), name);
    // the qcow2 is spooled to a temporary file, and the user is told
    assert.equal(warnings.includes('WSPOOLED'), name === 'os.qcow2', `${name}: ${warnings.join()}`);
  }
  const dst = join(dir, '7z.out');
  await assert.rejects(copy(`${base}/os.7z`, dst), (err: unknown) => {
    assert.ok(err instanceof BlksyncError);
    assert.equal(err.code, 'ESRC_CONTAINER');
    return true;
  });
  assert.equal(existsSync(dst), false);
});
