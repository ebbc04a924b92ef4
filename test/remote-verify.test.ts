/**
 * `copy --verify` with a remote end, over a real OpenSSH server on 127.0.0.1: the ranges a
 * run wrote are read back past the page cache (by the agent on DST's host for a push, a
 * relay and --direct; here for a pull) and their digests compared with what was sent.
 */

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { chmod, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { copy } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import type { RemoteCopyResult } from '../src/copy.js';
import { runCli } from './helpers/cli.js';
import { attachLoop, needLoop, readDevice } from './helpers/loop.js';
import { sharedSshd } from './helpers/sshd.js';
import { tempDir, writeSparseFile } from './helpers/tmp.js';

const MiB = 1024 * 1024;
const BS = 4096;

/** An old image and a new one with `changes` random 100,000-byte pieces replaced. */
function images(size: number, changes: number[]): { old: Buffer; neu: Buffer } {
  const old = randomBytes(size);
  const neu = Buffer.from(old);
  for (const at of changes) randomBytes(100_000).copy(neu, at);
  return { old, neu };
}

/**
 * A "remote node" whose O_DIRECT reads see other bytes than were written: a disk that lost
 * writes its page cache still holds. Without device-mapper (dm-flakey) on the test machine the
 * lie is told at the read: a preload flips the first byte of every O_DIRECT read.
 */
async function lyingNode(dir: string): Promise<string> {
  const preload = join(dir, 'lying-disk.cjs');
  await writeFile(
    preload,
    `const fsp = require('fs/promises');
const { constants } = require('fs');
const open = fsp.open;
fsp.open = async (path, flags, mode) => {
  const fh = await open(path, flags, mode);
  if (typeof flags === 'number' && (flags & constants.O_DIRECT) !== 0) {
    const read = fh.read.bind(fh);
    fh.read = async (buf, off, len, pos) => {
      const r = await read(buf, off, len, pos);
      if (r.bytesRead > 0) buf[off] ^= 0xff;
      return r;
    };
  }
  return fh;
};
`,
  );
  const node = join(dir, 'lying-node');
  await writeFile(node, `#!/bin/sh\nexec '${process.execPath}' -r '${preload}' "$@"\n`);
  await chmod(node, 0o755);
  return node;
}

describe('copy --verify with a remote end', () => {
  const server = sharedSshd();
  const at = (host: string, path: string): string => `${host}:${path}`;

  test('push: the agent reads back what it wrote; the summary says so', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const { old, neu } = images(9 * MiB + 300, [5, 4 * MiB - 50_000, 9 * MiB]);
    await writeFile(join(dir, 'src.img'), neu);
    await writeFile(join(dir, 'dst.img'), old);
    const r = await runCli([
      'copy',
      '--verify',
      '--json',
      '--ssh',
      s.ssh,
      join(dir, 'src.img'),
      at(s.host, join(dir, 'dst.img')),
    ]);
    assert.equal(r.code, 0, r.stderr);
    const result = JSON.parse(r.stdout) as RemoteCopyResult;
    assert.deepEqual(await readFile(join(dir, 'dst.img')), neu);
    assert.ok(result.bytesWritten > 0);
    assert.equal(result.verify?.against, 'written');
    assert.equal(result.verify?.algorithm, 'sha256');
    assert.equal(result.verify?.bytesVerified, result.bytesWritten);
    assert.equal(result.verify?.ranges, 1, 'one 64 MiB segment');
    assert.equal(result.verify?.direct, true, 'ext4 under the test directory has O_DIRECT');

    const text = await runCli([
      'copy',
      '--verify',
      '--ssh',
      s.ssh,
      join(dir, 'src.img'),
      at(s.host, join(dir, 'new.img')),
    ]);
    assert.equal(text.code, 0, text.stderr);
    assert.match(
      text.stdout,
      /verified .* bypassing the page cache \(O_DIRECT\), the bytes written match what was sent/,
    );
    assert.deepEqual(await readFile(join(dir, 'new.img')), neu);
  });

  test('push onto a device that does not hold what it was sent: EVERIFY names the range', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const { old, neu } = images(6 * MiB, [2 * MiB + 10]);
    await writeFile(join(dir, 'src.img'), neu);
    await writeFile(join(dir, 'dst.img'), old);
    const node = await lyingNode(dir);
    await assert.rejects(
      copy(join(dir, 'src.img'), at(s.host, join(dir, 'dst.img')), {
        remote: { ssh: s.ssh, remoteNode: node },
        verify: true,
      }),
      (err: unknown) => {
        assert.ok(err instanceof BlksyncError, String(err));
        assert.equal(err.code, 'EVERIFY', err.message);
        assert.match(err.message, /bytes 2097152-2199551 read back from the device do not match/);
        assert.match(err.message, /check the medium/);
        return true;
      },
    );
    // without --verify the same lie goes unseen: the end-to-end digest covers the link only
    await writeFile(join(dir, 'dst.img'), old);
    const r = await copy(join(dir, 'src.img'), at(s.host, join(dir, 'dst.img')), {
      remote: { ssh: s.ssh, remoteNode: node },
    });
    assert.equal(r.verify, undefined);

    const cli = await runCli([
      'copy',
      '--verify',
      '--ssh',
      s.ssh,
      '--remote-node',
      node,
      join(dir, 'src.img'),
      at(s.host, join(dir, 'dst2.img')),
    ]);
    assert.equal(cli.code, 1);
    assert.match(cli.stderr, /EVERIFY/);
    assert.equal(cli.stderr.trim().split('\n').length, 1, cli.stderr);
  });

  test('push and pull onto loop devices read back with O_DIRECT', async (t) => {
    const s = server(t);
    if (!s || !needLoop(t)) return;
    const dir = await tempDir(t);
    const size = 8 * MiB;
    const { old, neu } = images(size, [BS, 7 * MiB]);
    await writeFile(join(dir, 'src.img'), neu);
    await writeFile(join(dir, 'old.img'), old);
    const backing = join(dir, 'backing');
    await writeSparseFile(backing, size, [{ offset: 0, data: old }]);
    const dev = await attachLoop(t, backing);

    const push = await copy(join(dir, 'src.img'), at(s.host, dev), {
      remote: { ssh: s.ssh },
      verify: true,
    });
    assert.equal(push.verify?.direct, true);
    assert.equal(push.verify?.bytesVerified, push.bytesWritten);
    assert.ok((await readDevice(dev, size)).equals(neu));

    // pull: DST is local, read back here
    await writeFile(backing, old);
    const pulled = await copy(at(s.host, join(dir, 'src.img')), dev, {
      remote: { ssh: s.ssh },
      verify: true,
    });
    assert.equal(pulled.verify?.against, 'written');
    assert.equal(pulled.verify?.direct, true);
    assert.ok(pulled.bytesWritten > 0);
    assert.equal(pulled.verify?.bytesVerified, pulled.bytesWritten);
    assert.ok((await readDevice(dev, size)).equals(neu));
  });

  test('relay and --direct: DST host reads back; an unchanged rerun verifies nothing', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const { old, neu } = images(70 * MiB, [MiB, 66 * MiB]);
    await writeFile(join(dir, 'src.img'), neu);
    await writeFile(join(dir, 'a.img'), old);
    await writeFile(join(dir, 'b.img'), old);
    const src = at(s.host, join(dir, 'src.img'));

    const relayed = await copy(src, at(s.host, join(dir, 'a.img')), {
      remote: { ssh: s.ssh },
      verify: true,
    });
    assert.deepEqual(await readFile(join(dir, 'a.img')), neu);
    assert.equal(relayed.verify?.bytesVerified, relayed.bytesWritten);
    assert.equal(relayed.verify?.ranges, 2, 'writes in two 64 MiB segments');

    const direct = await copy(src, at(s.host, join(dir, 'b.img')), {
      remote: { ssh: s.ssh },
      direct: true,
      verify: true,
    });
    assert.deepEqual(await readFile(join(dir, 'b.img')), neu);
    assert.equal(direct.verify?.against, 'written');
    assert.equal(direct.verify?.bytesVerified, direct.bytesWritten);
    assert.equal(direct.verify?.ranges, 2);

    const again = await copy(src, at(s.host, join(dir, 'b.img')), {
      remote: { ssh: s.ssh },
      direct: true,
      verify: true,
    });
    assert.equal(again.bytesWritten, 0);
    assert.equal(again.verify?.bytesVerified, 0);
  });

  test('--verify with a dry run is refused before ssh starts', async (t) => {
    const dir = await tempDir(t);
    await writeFile(join(dir, 'src.img'), randomBytes(MiB));
    const r = await runCli([
      'copy',
      '--verify',
      '-n',
      join(dir, 'src.img'),
      'nohost.invalid:/x.img',
    ]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /dry run \[EUSAGE\]/);
  });
});
