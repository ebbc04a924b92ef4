/**
 * Range requests stay few when many chunks differ: pieces are coalesced and packed at most
 * MAX_RANGES_PER_REQUEST to a request, and a copy with hundreds of scattered changes still
 * takes a handful of requests and leaves DST identical.
 */

import assert from 'node:assert/strict';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import { copy } from '../src/copy.js';
import { ByteReader } from '../src/delta/byte-reader.js';
import { publish } from '../src/delta/publish.js';
import { MAX_RANGES_PER_REQUEST, planRequests } from '../src/delta/range-client.js';
import { serveDirectory } from './helpers/http-server.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

test('planRequests coalesces neighbours and packs ranges into few requests', () => {
  const pieces = Array.from({ length: 1000 }, (_, i) => ({
    start: i * 10_000,
    end: i * 10_000 + 3000 + (i % 7),
  }));
  const requests = planRequests(pieces);
  assert.ok(requests.length <= 3, `${requests.length} requests`);
  for (const r of requests) assert.ok(r.length <= MAX_RANGES_PER_REQUEST);
  const ranges = requests.flat();
  let k = 0;
  for (const p of pieces) {
    while (ranges[k]!.end < p.end) k++;
    assert.ok(ranges[k]!.start <= p.start && p.end <= ranges[k]!.end, `piece ${p.start} covered`);
  }
  // close neighbours become one range, far ones stay apart
  assert.deepEqual(
    planRequests([
      { start: 0, end: 100 },
      { start: 200, end: 300 },
      { start: 100_000, end: 100_100 },
    ]),
    [
      [
        { start: 0, end: 300 },
        { start: 100_000, end: 100_100 },
      ],
    ],
  );
});

test('hundreds of scattered changed chunks arrive in a few requests, DST identical', async (t) => {
  const dir = await tempDir(t);
  const www = join(dir, 'www');
  await mkdir(www);
  const size = 8 * 1024 * 1024;
  const v1 = seededBytes(size, 11);
  const v2 = Buffer.from(v1);
  // one change in every third 4 KiB chunk: 682 chunks, none adjacent
  for (let at = 100; at < size; at += 3 * 4096) v2[at] = v1[at]! ^ 0xff;
  const img = join(www, 'os.img');
  await writeFile(img, v2);
  await publish(img, { chunkSize: 4096 });
  const dst = join(dir, 'dst.img');
  await writeFile(dst, v1);
  const served = await serveDirectory(t, www);
  const r = await copy(`${served.url}/os.img`, dst);
  assert.deepEqual(await readFile(dst), v2);
  assert.equal(r.http?.chunksDiffering, 683);
  assert.ok(served.requests.length <= 6, `${served.requests.length} requests`);
});

test('a large piece arriving in small reads is read in linear time, not joined again per read', async () => {
  // 32 MiB in 64 KiB reads: a top level of a million groups, or 4 MiB chunks from a slow
  // network, arrive so; joining the pieces per read took 23 s here
  const size = 32 * 1024 * 1024;
  const part = Buffer.alloc(64 * 1024, 7);
  const stream = Readable.from(
    (function* () {
      for (let at = 0; at < size; at += part.length) yield part;
    })(),
  );
  const reader = new ByteReader(stream, 'x');
  const started = performance.now();
  const got = await reader.read(size, 'a piece');
  const seconds = (performance.now() - started) / 1000;
  assert.equal(got.length, size);
  assert.ok(got.every((b) => b === 7));
  assert.ok(seconds < 3, `read in ${seconds.toFixed(1)} s`);
});
