/**
 * engine/knowledge.ts's ReadTarget: DST known by reading it. A DST that ends before the
 * chunk asked for is refused (EDEST_SHORT), naming where it ends now.
 */

import assert from 'node:assert/strict';
import { open, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { ReadTarget } from '../src/engine/knowledge.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const MiB = 1024 * 1024;

test('a DST that shrank below the chunk read: EDEST_SHORT names its end, not the chunk', async (t) => {
  const dir = await tempDir(t);
  const dst = join(dir, 'dst.img');
  await writeFile(dst, seededBytes(4 * MiB, 3));
  const fh = await open(dst, 'r');
  t.after(() => fh.close());
  const target = new ReadTarget(fh, dst, MiB);
  const whole = await target.load(MiB, MiB);
  assert.equal(typeof whole.diff, 'function');
  // another program truncates DST while the copy runs
  await truncate(dst, MiB + 5);
  for (const at of [2 * MiB, MiB]) {
    await assert.rejects(target.load(at, MiB), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'EDEST_SHORT');
      assert.match(err.message, new RegExp(`ended at ${MiB + 5} bytes while being read`));
      return true;
    });
  }
});
