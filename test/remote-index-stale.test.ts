/**
 * The agent keeps an index beside DST on its host and decides with the same index policy as a
 * local copy (engine/index-policy.ts), from the identity it takes there: over a real OpenSSH
 * server on 127.0.0.1, a DST changed behind blksync's back with its mtime put back (touch -r),
 * or a device written by dd, is detected stale by the agent too.
 */

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { copy } from '../src/copy.js';
import type { RemoteCopyResult } from '../src/copy.js';
import { attachLoop, loopAvailable, readDevice, run } from './helpers/loop.js';
import { sharedSshd, type Sshd } from './helpers/sshd.js';
import { seededBytes, tempDir } from './helpers/tmp.js';
import { rejectsWith } from './helpers/assert-error.js';

const MiB = 1024 * 1024;
const TAMPERED = 5 * MiB + 8192;

/** Changes 4 KiB of `path` at TAMPERED and puts its mtime back, as `touch -r` does. */
async function tamperKeepingMtime(dir: string, path: string): Promise<void> {
  const stamp = join(dir, 'stamp');
  await writeFile(stamp, '');
  execFileSync('touch', ['-r', path, stamp]);
  const fh = await open(path, 'r+');
  await fh.write(Buffer.alloc(4096, 0x66), 0, 4096, TAMPERED);
  await fh.close();
  execFileSync('touch', ['-r', stamp, path]);
}

describe('an index kept by the agent is detected stale as a local one is', () => {
  const server = sharedSshd();
  const at = (s: Sshd, path: string): string => `${s.host}:${path}`;

  test('host:FILE and auto: a file changed with its mtime put back', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const data = seededBytes(8 * MiB, 71);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await writeFile(src, data);
    await writeFile(dst, seededBytes(8 * MiB, 72));
    const opts = { remote: { ssh: s.ssh }, index: at(s, join(dir, 'dst.blkidx')), verifySample: 2 };
    await copy(src, at(s, dst), opts);
    await tamperKeepingMtime(dir, dst);
    const changed = await readFile(dst);
    await rejectsWith(copy(src, at(s, dst), opts), 'EINDEX_STALE', /ctime moved.*--trust-index/);
    assert.ok((await readFile(dst)).equals(changed), 'nothing written');
    const rebuilt = (await copy(src, at(s, dst), {
      ...opts,
      rebuildIndex: true,
    })) as RemoteCopyResult;
    assert.equal(rebuilt.index?.mode, 'rebuilt');
    assert.ok((await readFile(dst)).equals(data));

    // a push keeping the index here decides the same from the agent's identity of DST
    const here = { ...opts, index: join(dir, 'here.blkidx') };
    await copy(src, at(s, dst), here);
    await tamperKeepingMtime(dir, dst);
    await rejectsWith(copy(src, at(s, dst), here), 'EINDEX_STALE', /ctime moved/);
    const trusted = (await copy(src, at(s, dst), {
      ...here,
      trustIndex: true,
    })) as RemoteCopyResult;
    assert.equal(trusted.index?.mode, 'used');
    assert.equal(trusted.index.trustedOnWord, true);
  });

  test('auto onto a device: dd behind blksync is caught by the write counter on the agent', async (t) => {
    const s = server(t);
    if (!s) return;
    if (!loopAvailable()) {
      t.skip('loop devices need root and /dev/loop-control');
      return;
    }
    const dir = await tempDir(t);
    const size = 16 * MiB;
    const data = seededBytes(size, 81);
    const src = join(dir, 'src.img');
    await writeFile(src, data);
    await writeFile(join(dir, 'disk.img'), seededBytes(size, 82));
    const dev = await attachLoop(t, join(dir, 'disk.img'));
    // the agent's cache, in the test's directory
    const ssh = `${s.ssh} -o SetEnv=XDG_CACHE_HOME=${dir}`;
    const opts = { remote: { ssh }, index: 'auto', verifySample: 2 };
    const first = (await copy(src, at(s, dev), opts)) as RemoteCopyResult;
    assert.equal(first.index?.mode, 'created');
    const again = (await copy(src, at(s, dev), opts)) as RemoteCopyResult;
    assert.equal(again.index?.mode, 'used', 'nothing wrote the device: the counter vouches');
    await writeFile(join(dir, 'junk'), Buffer.alloc(4096, 0x5a));
    await run('dd', [
      `if=${join(dir, 'junk')}`,
      `of=${dev}`,
      'bs=4096',
      `seek=${TAMPERED / 4096}`,
      'conv=notrunc,fsync',
      'status=none',
    ]);
    const third = (await copy(src, at(s, dev), opts)) as RemoteCopyResult;
    assert.equal(third.index?.mode, 'rebuilt');
    assert.match(third.index.reason ?? '', /sectors were written/);
    assert.deepEqual(await readDevice(dev, size), data);
  });
});
