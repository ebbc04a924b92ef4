/**
 * Remote copies over a real OpenSSH server on 127.0.0.1 (test/helpers/sshd.ts): push, pull,
 * dry runs and block sizes through the CLI, the refusals a local run would give arriving with
 * the same codes, a remote without node, and a link killed mid-transfer then rerun.
 */

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { chmod, open, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { copy, type CopyResult } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import type { RemoteCopyResult } from '../src/copy.js';
import { cliCommand, runCli } from './helpers/cli.js';
import { attachLoop, mkfsExt4, mountLoop, needLoop } from './helpers/loop.js';
import { need } from './helpers/resources.js';
import { sharedSshd, type Sshd } from './helpers/sshd.js';
import { tempDir } from './helpers/tmp.js';
import { rejectsWith } from './helpers/assert-error.js';

const BS = 4096;
const MiB = 1024 * 1024;

/** Flips one byte at each offset. */
function mutate(data: Buffer, offsets: number[]): Buffer {
  const out = Buffer.from(data);
  for (const o of offsets) out[o] = (out[o]! ^ 0xff) & 0xff;
  return out;
}

describe('remote copy over ssh', () => {
  /** Skips (or fails under strict) without sshd; returns the server. */
  const server = sharedSshd();

  const at = (s: Sshd, path: string): string => `${s.host}:${path}`;

  test('push writes only the differing blocks; a rerun writes nothing', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 24 * MiB + 1234;
    const old = randomBytes(size);
    const offsets = [0, 5 * MiB + 17, 5 * MiB + 18, 12 * MiB, size - 1];
    const neu = mutate(old, offsets);
    await writeFile(join(dir, 'src.img'), neu);
    await writeFile(join(dir, 'dst.img'), old);
    const r = await runCli([
      'copy',
      '--json',
      '--ssh',
      s.ssh,
      join(dir, 'src.img'),
      at(s, join(dir, 'dst.img')),
    ]);
    assert.equal(r.code, 0, r.stderr);
    const result = JSON.parse(r.stdout) as RemoteCopyResult;
    assert.deepEqual(await readFile(join(dir, 'dst.img')), neu);
    const blocks = new Set(offsets.map((o) => Math.floor(o / BS))).size;
    assert.equal(result.blocksDiffering, blocks);
    assert.ok(result.bytesWritten <= blocks * BS);
    // agent code (~18 KiB) + hashes + 4 blocks: far below the image
    assert.ok(result.channel.bytesSent < 64 * 1024, `sent ${result.channel.bytesSent}`);
    assert.ok(result.channel.bytesReceived < 16 * 1024, `received ${result.channel.bytesReceived}`);

    const again = await runCli([
      'copy',
      '--ssh',
      s.ssh,
      join(dir, 'src.img'),
      at(s, join(dir, 'dst.img')),
    ]);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stdout, /wrote 0 B in 0 ranges/);
    assert.match(again.stdout, /ssh blksync-test: sent .* received/);
  });

  test('pull writes only the differing blocks, also with --block-size 64K', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 20 * MiB;
    const old = randomBytes(size);
    const neu = mutate(old, [100, 7 * MiB + 5, 19 * MiB]);
    await writeFile(join(dir, 'src.img'), neu);
    await writeFile(join(dir, 'dst.img'), old);
    const r = await copy(at(s, join(dir, 'src.img')), join(dir, 'dst.img'), {
      remote: { ssh: s.ssh },
      blockSize: 64 * 1024,
    });
    assert.deepEqual(await readFile(join(dir, 'dst.img')), neu);
    assert.equal(r.blocksDiffering, 3);
    assert.equal(r.bytesWritten, 3 * 64 * 1024);
    const channel = (r as RemoteCopyResult).channel;
    assert.ok(
      channel.bytesReceived < 3 * 64 * 1024 + 32 * 1024,
      `received ${channel.bytesReceived}`,
    );
  });

  test('remote to remote, relayed: only differing blocks; a new destination; a dry run', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 12 * MiB + 100;
    const old = randomBytes(size);
    const neu = mutate(old, [1, 4 * MiB, 11 * MiB + 3]);
    await writeFile(join(dir, 'src.img'), neu);
    await writeFile(join(dir, 'dst.img'), old);
    const args = ['copy', '--json', '--ssh', s.ssh, at(s, join(dir, 'src.img'))];
    const dry = await runCli([...args, '-n', at(s, join(dir, 'dst.img'))]);
    assert.equal(dry.code, 0, dry.stderr);
    assert.equal((JSON.parse(dry.stdout) as CopyResult).bytesDiffering, 3 * BS);
    assert.deepEqual(await readFile(join(dir, 'dst.img')), old);

    const r = await runCli([...args, at(s, join(dir, 'dst.img'))]);
    assert.equal(r.code, 0, r.stderr);
    const result = JSON.parse(r.stdout) as RemoteCopyResult;
    assert.equal(result.bytesWritten, 3 * BS);
    assert.deepEqual(await readFile(join(dir, 'dst.img')), neu);
    assert.match(result.channel.host, /blksync-test → blksync-test/);
    // two agents (~34 KiB each, deflated, since they carry an index of SRC and a file lock
    // too), hashes both ways, the blocks in from one and out to the other
    const both = result.channel.bytesSent + result.channel.bytesReceived;
    assert.ok(both < 104 * 1024, `channel: ${both}`);

    const fresh = await runCli([...args, at(s, join(dir, 'new.img'))]);
    assert.equal(fresh.code, 0, fresh.stderr);
    assert.equal((JSON.parse(fresh.stdout) as CopyResult).created, true);
    assert.deepEqual(await readFile(join(dir, 'new.img')), neu);
  });

  test('push and pull create a missing destination, sparse; compressible data is compressed', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 16 * MiB;
    const data = Buffer.alloc(size);
    data.write('hello '.repeat(100000), 3 * MiB);
    randomBytes(MiB).copy(data, 9 * MiB);
    await writeFile(join(dir, 'src.img'), data);

    const pushed = (await copy(join(dir, 'src.img'), at(s, join(dir, 'pushed.img')), {
      remote: { ssh: s.ssh },
    })) as RemoteCopyResult;
    assert.equal(pushed.created, true);
    assert.deepEqual(await readFile(join(dir, 'pushed.img')), data);
    assert.ok(pushed.channel.bytesSent < MiB + 200 * 1024, `sent ${pushed.channel.bytesSent}`);
    assert.ok((await stat(join(dir, 'pushed.img'))).blocks * 512 < 4 * MiB, 'holes stay holes');

    const pulled = (await copy(at(s, join(dir, 'src.img')), join(dir, 'pulled.img'), {
      remote: { ssh: s.ssh },
    })) as RemoteCopyResult;
    assert.equal(pulled.created, true);
    assert.deepEqual(await readFile(join(dir, 'pulled.img')), data);
    assert.ok(
      pulled.channel.bytesReceived < MiB + 200 * 1024,
      `received ${pulled.channel.bytesReceived}`,
    );
  });

  test('a destination larger than the image: its tail is left alone, either way; --full', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 9 * MiB + 4097;
    const old = randomBytes(13 * MiB);
    const neu = mutate(old.subarray(0, size), [9 * MiB + 4096, 3]);
    await writeFile(join(dir, 'src.img'), neu);
    const expected = Buffer.concat([neu, old.subarray(size)]);
    for (const [src, dst, extra] of [
      [join(dir, 'src.img'), at(s, join(dir, 'dst.img')), []],
      [at(s, join(dir, 'src.img')), join(dir, 'dst.img'), []],
      [join(dir, 'src.img'), at(s, join(dir, 'dst.img')), ['--full']],
      [at(s, join(dir, 'src.img')), join(dir, 'dst.img'), ['--full']],
    ] as const) {
      await writeFile(join(dir, 'dst.img'), old);
      const r = await runCli(['copy', '--json', ...extra, '--ssh', s.ssh, src, dst]);
      assert.equal(r.code, 0, r.stderr);
      const result = JSON.parse(r.stdout) as CopyResult;
      assert.equal(result.destinationExtraBytes, old.length - size);
      assert.equal(result.bytesWritten, extra.length > 0 ? size : BS + 1);
      assert.ok(
        (await readFile(join(dir, 'dst.img'))).equals(expected),
        `${src} -> ${dst} ${String(extra)}`,
      );
    }
  });

  test('--dry-run reports and changes nothing, either way', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const old = randomBytes(6 * MiB);
    const neu = mutate(old, [MiB, 5 * MiB]);
    await writeFile(join(dir, 'src.img'), neu);
    await writeFile(join(dir, 'dst.img'), old);
    for (const [src, dst] of [
      [join(dir, 'src.img'), at(s, join(dir, 'dst.img'))],
      [at(s, join(dir, 'src.img')), join(dir, 'dst.img')],
      [join(dir, 'src.img'), at(s, join(dir, 'new.img'))],
    ] as const) {
      const r = await runCli(['copy', '-n', '--json', '--ssh', s.ssh, src, dst]);
      assert.equal(r.code, 0, r.stderr);
      const result = JSON.parse(r.stdout) as CopyResult;
      assert.equal(result.dryRun, true);
      assert.equal(result.bytesWritten, 0);
      if (!dst.endsWith('new.img')) assert.equal(result.bytesDiffering, 2 * BS);
    }
    assert.deepEqual(await readFile(join(dir, 'dst.img')), old);
    assert.equal(existsSync(join(dir, 'new.img')), false);
  });

  test('remote refusals carry the codes a local run gives', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    await writeFile(join(dir, 'src.img'), randomBytes(2 * MiB));
    await writeFile(join(dir, 'small.img'), randomBytes(MiB));
    const opts = { remote: { ssh: s.ssh } };
    await rejectsWith(
      copy(join(dir, 'src.img'), at(s, join(dir, 'no/such/dir/x.img')), opts),
      'EDEST_OPEN',
    );
    await rejectsWith(copy(at(s, join(dir, 'missing.img')), join(dir, 'x.img'), opts), 'ESRC_OPEN');
    await rejectsWith(
      copy(join(dir, 'src.img'), at(s, '/dev/blksync-no-such-device'), opts),
      'EDEST_MISSING',
    );
    await rejectsWith(copy(join(dir, 'src.img'), at(s, dir), opts), 'EDEST_KIND');
    await rejectsWith(
      copy(join(dir, 'src.img'), at(s, join(dir, 'small.img')), opts),
      'EDEST_TOO_SMALL',
    );
    // the same codes through the CLI, with the host named in the message
    const r = await runCli([
      'copy',
      '--ssh',
      s.ssh,
      join(dir, 'src.img'),
      at(s, join(dir, 'small.img')),
    ]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^blksync: blksync-test: .*\[EDEST_TOO_SMALL\]\n$/);
    assert.equal(existsSync(join(dir, 'x.img')), false);
  });

  test('a remote file the agent may not open is refused with EACCES (agent as nobody)', async (t) => {
    const s = server(t);
    if (!s) return;
    if (
      !need(t, process.getuid?.() === 0 && existsSync('/usr/bin/setpriv'), 'needs root and setpriv')
    )
      return;
    const dir = await tempDir(t);
    await chmod(dir, 0o755);
    await writeFile(join(dir, 'src.img'), randomBytes(MiB));
    const old = randomBytes(MiB);
    await writeFile(join(dir, 'dst.img'), old, { mode: 0o600 });
    // --remote-node may be any command that runs node: here node as an unprivileged user
    const wrapper = join(dir, 'node-as-nobody');
    await writeFile(
      wrapper,
      `#!/bin/sh\nexec setpriv --reuid=nobody --regid=nogroup --clear-groups ${process.execPath} "$@"\n`,
      { mode: 0o755 },
    );
    const opts = { remote: { ssh: s.ssh, remoteNode: wrapper } };
    await rejectsWith(
      copy(join(dir, 'src.img'), at(s, join(dir, 'dst.img')), opts),
      'EDEST_OPEN',
      /EACCES/,
    );
    await rejectsWith(
      copy(at(s, join(dir, 'dst.img')), join(dir, 'out.img'), opts),
      'ESRC_OPEN',
      /EACCES/,
    );
    assert.deepEqual(await readFile(join(dir, 'dst.img')), old);
  });

  test('a remote without node: ENODE_MISSING says how to fix it', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    await writeFile(join(dir, 'src.img'), randomBytes(MiB));
    const r = await runCli([
      'copy',
      '--ssh',
      s.ssh,
      '--remote-node',
      '/nonexistent/node',
      join(dir, 'src.img'),
      at(s, join(dir, 'dst.img')),
    ]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /--remote-node PATH.*\[ENODE_MISSING\]/);
    assert.equal(existsSync(join(dir, 'dst.img')), false);
  });

  test('--sudo runs the agent through sudo -n', async (t) => {
    const s = server(t);
    if (!s) return;
    if (!need(t, existsSync('/usr/bin/sudo') && process.getuid?.() === 0, 'needs root and sudo')) {
      return;
    }
    const dir = await tempDir(t);
    const data = randomBytes(2 * MiB);
    await writeFile(join(dir, 'src.img'), data);
    const r = await copy(join(dir, 'src.img'), at(s, join(dir, 'dst.img')), {
      remote: { ssh: s.ssh, sudo: true },
    });
    assert.equal(r.created, true);
    assert.deepEqual(await readFile(join(dir, 'dst.img')), data);
  });

  test('an unreachable host or a missing ssh is ESSH', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    await writeFile(join(dir, 'src.img'), randomBytes(4096));
    const ssh = `ssh -F ${s.config} -o Port=1`;
    await rejectsWith(
      copy(join(dir, 'src.img'), at(s, join(dir, 'dst.img')), { remote: { ssh } }),
      'ESSH',
    );
    await rejectsWith(
      copy(join(dir, 'src.img'), at(s, join(dir, 'dst.img')), {
        remote: { ssh: '/nonexistent/ssh -x' },
      }),
      'ESSH',
      /cannot run ssh/,
    );
  });

  test('a mounted remote loop device is refused (EDEST_MOUNTED)', async (t) => {
    const s = server(t);
    if (!s || !needLoop(t)) return;
    const dir = await tempDir(t);
    const backing = join(dir, 'disk.img');
    const before = Buffer.alloc(8 * MiB);
    await writeFile(backing, before);
    const dev = await attachLoop(t, backing);
    await mkfsExt4(dev);
    await mountLoop(t, dev);
    await writeFile(join(dir, 'src.img'), randomBytes(4 * MiB));
    await rejectsWith(
      copy(join(dir, 'src.img'), at(s, dev), { remote: { ssh: s.ssh } }),
      'EDEST_MOUNTED',
    );
  });

  test('an aborted remote copy ends with EINTERRUPTED and its partial result; a rerun converges', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 48 * MiB;
    const neu = randomBytes(size);
    await writeFile(join(dir, 'src.img'), neu);
    for (const [src, dst] of [
      [join(dir, 'src.img'), at(s, join(dir, 'dst.img'))],
      [at(s, join(dir, 'src.img')), join(dir, 'dst.img')],
    ] as const) {
      await writeFile(join(dir, 'dst.img'), randomBytes(size));
      const controller = new AbortController();
      await assert.rejects(
        copy(src, dst, {
          remote: { ssh: s.ssh },
          signal: controller.signal,
          onProgress: (p) => {
            if (p.bytesScanned >= 8 * MiB) controller.abort();
          },
        }),
        (err: unknown) => {
          assert.ok(err instanceof BlksyncError);
          assert.equal(err.code, 'EINTERRUPTED', err.message);
          const partial = err.partial as CopyResult;
          assert.ok(partial.bytesScanned < size && partial.bytesWritten > 0);
          return true;
        },
      );
      await copy(src, dst, { remote: { ssh: s.ssh } });
      assert.ok((await readFile(join(dir, 'dst.img'))).equals(neu), `${src} -> ${dst}`);
    }
  });

  test('Ctrl-C to the whole process group (ssh too) exits 130 with EINTERRUPTED; a rerun converges', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 96 * MiB;
    const neu = randomBytes(size);
    const old = randomBytes(size);
    await writeFile(join(dir, 'src.img'), neu);
    await writeFile(join(dir, 'dst.img'), old);
    const args = ['copy', '--ssh', s.ssh, join(dir, 'src.img'), at(s, join(dir, 'dst.img'))];
    // detached: its own process group, which a terminal's Ctrl-C signals as a whole
    const child = spawn(...cliCommand(args), {
      detached: true,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.stdout.resume();
    const closed = new Promise<number | null>((resolve) => child.on('close', resolve));
    const head = Buffer.alloc(64 * 1024);
    for (let i = 0; i < 400; i++) {
      await new Promise((r) => setTimeout(r, 25));
      const fh = await open(join(dir, 'dst.img'), 'r');
      await fh.read(head, 0, head.length, 0);
      await fh.close();
      if (!head.equals(old.subarray(0, head.length))) break;
    }
    process.kill(-child.pid!, 'SIGINT');
    const code = await closed;
    assert.equal(code, 130, stderr);
    assert.match(stderr, /\[EINTERRUPTED\]/);
    assert.ok(!(await readFile(join(dir, 'dst.img'))).equals(neu), 'interrupted before the end');
    const again = await runCli(args);
    assert.equal(again.code, 0, again.stderr);
    assert.ok((await readFile(join(dir, 'dst.img'))).equals(neu));
  });

  test('ssh killed mid-transfer: ECONNECTION_LOST, and a rerun converges', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 64 * MiB;
    const old = randomBytes(size);
    const neu = randomBytes(size);
    await writeFile(join(dir, 'src.img'), neu);
    for (const direction of ['push', 'pull'] as const) {
      await writeFile(join(dir, 'dst.img'), old);
      const pidFile = join(dir, `ssh-${direction}.pid`);
      const wrapper = join(dir, `ssh-${direction}`);
      await writeFile(wrapper, `#!/bin/sh\necho $$ > ${pidFile}\nexec ssh -F ${s.config} "$@"\n`, {
        mode: 0o755,
      });
      const [src, dst] =
        direction === 'push'
          ? [join(dir, 'src.img'), at(s, join(dir, 'dst.img'))]
          : [at(s, join(dir, 'src.img')), join(dir, 'dst.img')];
      let killed = false;
      await rejectsWith(
        copy(src, dst, {
          remote: { ssh: wrapper },
          onProgress: (p) => {
            if (!killed && p.bytesWritten >= 8 * MiB) {
              killed = true;
              process.kill(Number(readFileSync(pidFile, 'utf8').trim()), 'SIGKILL');
            }
          },
        }),
        'ECONNECTION_LOST',
        /rerun/,
      );
      assert.ok(killed);
      const partial = await readFile(join(dir, 'dst.img'));
      assert.notDeepEqual(partial, neu, `${direction}: the first run did not finish`);
      await copy(src, dst, { remote: { ssh: s.ssh } });
      assert.ok(
        (await readFile(join(dir, 'dst.img'))).equals(neu),
        `${direction}: rerun converged`,
      );
    }
  });
});
