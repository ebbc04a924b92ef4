/**
 * `copy` from a published image served by a real nginx (multipart/byteranges as nginx writes
 * them, If-Range, its own ETags): DST ends identical, in few requests, the bytes counted as
 * nginx's access log sees them.
 */

import assert from 'node:assert/strict';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { copy } from '../src/copy.js';
import { publish } from '../src/delta/publish.js';
import { NGINX, startNginx } from './helpers/nginx.js';
import { need } from './helpers/resources.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

test('nginx: an update in 4 requests, a fresh copy, a rerun with nothing to do', async (t) => {
  if (!need(t, NGINX !== undefined, 'nginx is not installed (apt-get install nginx)')) return;
  const dir = await tempDir(t);
  const www = join(dir, 'www');
  await mkdir(www);
  const img = join(www, 'os.img');
  const size = 16 * 1024 * 1024;
  await writeSparseFile(img, size, [
    { offset: 1024 * 1024, data: seededBytes(500_000, 3) },
    { offset: 9 * 1024 * 1024, data: Buffer.alloc(2_000_000, 'a config file line\n') },
  ]);
  const v1 = await readFile(img);
  const v2 = Buffer.from(v1);
  // changes in four chunks far apart: four ranges in one multipart answer
  for (const at of [1_100_000, 5_000_000, 9_500_000, 15_000_000]) v2.write('updated', at);
  await writeFile(img, v2);
  await publish(img);
  const dst = join(dir, 'dst.img');
  await writeFile(dst, v1);
  const server = await startNginx(t, www, join(dir, 'nginx'));
  const url = `${server.url}/os.img`;

  const r = await copy(url, dst);
  assert.deepEqual(await readFile(dst), v2);
  assert.equal(r.bytesWritten, 4 * 4096);
  const log = await server.log();
  // and the image's last 512 bytes (whether it ends with a fixed VHD's footer)
  assert.equal(log.length, 5, JSON.stringify(log));
  assert.ok(log.every((l) => l.status === 206));
  const sent = log.reduce((n, l) => n + l.bytesSent, 0);
  // four 64 KiB chunks at most, plus the index's header, top level and four groups
  assert.ok(sent < 4 * 65536 + 32 * 1024, `nginx sent ${sent} bytes`);

  const again = await copy(url, dst);
  assert.equal(again.bytesWritten, 0);
  assert.equal((await server.log()).length, 8);

  const fresh = join(dir, 'fresh.img');
  await copy(url, fresh);
  assert.deepEqual(await readFile(fresh), v2);
});
