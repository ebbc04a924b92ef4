/**
 * `copy hostA:SRC hostB:DST --direct` over a real OpenSSH server on 127.0.0.1 (both hosts are
 * the same server): the agent on SRC's host starts the one on DST's host itself, so the
 * hashes and the changed blocks cross the channel between the two hosts and blksync's own
 * channel carries only the agent, the handshake, progress and the summary.
 */

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { copy } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import type { RemoteCopyResult } from '../src/copy.js';
import { runCli } from './helpers/cli.js';
import { sharedSshd } from './helpers/sshd.js';
import { tempDir } from './helpers/tmp.js';

const MiB = 1024 * 1024;

describe('copy between two hosts with --direct', () => {
  /** Skips (or fails under strict) without sshd; returns the server. */
  const server = sharedSshd();
  const at = (host: string, path: string): string => `${host}:${path}`;

  test('the data goes host to host: byte-identical DST, little on the local channel', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 24 * MiB + 777;
    const old = randomBytes(size);
    const neu = Buffer.from(old);
    // 2 MiB of incompressible change, in two places
    randomBytes(MiB).copy(neu, 3 * MiB);
    randomBytes(MiB).copy(neu, 17 * MiB + 4096);
    await writeFile(join(dir, 'src.img'), neu);
    await writeFile(join(dir, 'dst.img'), old);
    const args = ['copy', '--direct', '--ssh', s.ssh, at(s.host, join(dir, 'src.img'))];

    const dry = await runCli([...args, '--json', '-n', at(s.host, join(dir, 'dst.img'))]);
    assert.equal(dry.code, 0, dry.stderr);
    const planned = JSON.parse(dry.stdout) as RemoteCopyResult;
    assert.equal(planned.dryRun, true);
    assert.equal(planned.bytesDiffering, 2 * MiB);
    assert.equal(planned.bytesWritten, 0);
    assert.deepEqual(await readFile(join(dir, 'dst.img')), old, 'a dry run writes nothing');

    const r = await runCli([...args, '--json', at(s.host, join(dir, 'dst.img'))]);
    assert.equal(r.code, 0, r.stderr);
    const result = JSON.parse(r.stdout) as RemoteCopyResult;
    assert.deepEqual(await readFile(join(dir, 'dst.img')), neu);
    assert.equal(result.bytesWritten, 2 * MiB);
    assert.equal(result.blocksDiffering, (2 * MiB) / 4096);
    assert.match(result.channel.host, /^blksync-test \(direct to blksync-test\)$/);
    // the changed data crossed the channel between the hosts...
    const direct = result.channel.direct;
    assert.ok(direct !== undefined, 'the summary has the direct channel');
    assert.ok(direct.bytesSent >= 2 * MiB, `host to host: ${direct.bytesSent}`);
    // ...and not this one: the agent's code (~14 KiB), the handshake, progress, the summary
    const local = result.channel.bytesSent + result.channel.bytesReceived;
    assert.ok(local < 64 * 1024, `the local channel carried ${local} bytes`);
    assert.ok(local * 20 < result.bytesWritten, `${local} is not far below the changed data`);

    const again = await runCli([...args, at(s.host, join(dir, 'dst.img'))]);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stdout, /wrote 0 B in 0 ranges/);
    assert.match(again.stdout, /^ssh blksync-test \(direct to blksync-test\): sent .* received/m);
    assert.match(
      again.stdout,
      /^ssh blksync-test → blksync-test \(between the hosts\): sent .* received/m,
    );

    const fresh = await runCli([...args, '--json', at(s.host, join(dir, 'new.img'))]);
    assert.equal(fresh.code, 0, fresh.stderr);
    assert.equal((JSON.parse(fresh.stdout) as RemoteCopyResult).created, true);
    assert.deepEqual(await readFile(join(dir, 'new.img')), neu);
  });

  test('a second host SRC cannot reach fails cleanly: EREMOTE_UNREACHABLE, nothing written', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    await writeFile(join(dir, 'src.img'), randomBytes(MiB));
    const dst = join(dir, 'dst.img');
    const r = await runCli([
      'copy',
      '--direct',
      '--ssh',
      s.ssh,
      at(s.host, join(dir, 'src.img')),
      at(s.unreachable, dst),
    ]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(
      r.stderr,
      /^blksync: blksync-test: cannot reach blksync-unreachable over ssh .*drop --direct.* \[EREMOTE_UNREACHABLE\]\n$/,
    );
    assert.equal(existsSync(dst), false, 'nothing was created');
  });

  test('an interrupted direct copy stops both agents; a rerun converges', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 96 * MiB;
    const neu = randomBytes(size);
    await writeFile(join(dir, 'src.img'), neu);
    const src = at(s.host, join(dir, 'src.img'));
    const dst = at(s.host, join(dir, 'dst.img'));
    const controller = new AbortController();
    let seen = 0;
    await assert.rejects(
      copy(src, dst, {
        remote: { ssh: s.ssh },
        direct: true,
        signal: controller.signal,
        onProgress: (p) => {
          seen = p.bytesScanned;
          if (p.bytesScanned > 0 && p.bytesScanned < size) controller.abort();
        },
      }),
      (err: unknown) => {
        assert.ok(err instanceof BlksyncError, String(err));
        assert.equal(err.code, 'EINTERRUPTED', err.message);
        assert.match(err.message, /rerun the same command to finish/);
        return true;
      },
    );
    assert.ok(seen > 0, 'progress came through the near agent');
    const rerun = (await copy(src, dst, {
      remote: { ssh: s.ssh },
      direct: true,
    })) as RemoteCopyResult;
    assert.ok(rerun.bytesWritten < size, `the rerun wrote ${rerun.bytesWritten} of ${size}`);
    assert.deepEqual(await readFile(join(dir, 'dst.img')), neu);
  });

  test('--direct needs two remote ends', async (t) => {
    const dir = await tempDir(t);
    await writeFile(join(dir, 'src.img'), randomBytes(4096));
    for (const [src, dst] of [
      [join(dir, 'src.img'), 'h:/x'],
      ['h:/x', join(dir, 'y')],
      [join(dir, 'src.img'), join(dir, 'y')],
    ] as const) {
      const r = await runCli(['copy', '--direct', src, dst]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, /--direct copies between two hosts.*\[EUSAGE\]/);
    }
  });
});
