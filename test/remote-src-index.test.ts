/** --src-index with a remote end: refused before any ssh starts, never silently ignored. */

import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { runCli } from './helpers/cli.js';
import { tempDir, writeRandomFile } from './helpers/tmp.js';

test('--src-index on a push or a pull is a usage error, not silently ignored', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  await writeRandomFile(src, 65536, 1);
  // a host that does not exist: the refusal must come before ssh is tried
  for (const [from, to] of [
    [src, 'blksync-no-such-host:/tmp/dst.img'],
    ['blksync-no-such-host:/tmp/src.img', join(dir, 'dst.img')],
  ] as const) {
    const r = await runCli([
      'copy',
      '--index',
      'auto',
      '--src-index',
      join(dir, 'src.idx'),
      from,
      to,
    ]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /--src-index .*drop --src-index \[EUSAGE\]/);
  }
});
