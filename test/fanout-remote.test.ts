/**
 * `blksync copy SRC DST1 host:DST2 …`: local and remote destinations in one run, fed from one
 * read of SRC (stdin here, which can be read only once), over a real sshd on 127.0.0.1; an
 * unreachable host dropped while the others finish.
 */

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { copyMany, type CopyResult, type RemoteCopyResult } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import { runCli } from './helpers/cli.js';
import { sharedSshd } from './helpers/sshd.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const MiB = 1024 * 1024;

interface ManyJson {
  sourceBytesRead: number;
  failed: number;
  destinations: {
    destination: string;
    result?: CopyResult & Partial<RemoteCopyResult>;
    bytesRead: number;
    bytesWritten: number;
    error?: { code: string; message: string };
  }[];
}

describe('fan-out to local and remote destinations', () => {
  const server = sharedSshd();

  test('stdin to a file and two host:path ends in one run; an unreachable host is dropped', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 18 * MiB + 4096;
    const srcData = seededBytes(size, 21);
    const local = join(dir, 'local.img');
    const remoteOld = join(dir, 'remote-old.img');
    const remoteNew = join(dir, 'remote-new.img');
    const old = Buffer.from(srcData);
    seededBytes(64 * 1024, 22).copy(old, 7 * MiB);
    await writeFile(remoteOld, old);
    await writeFile(local, Buffer.alloc(size));

    const dsts = [
      local,
      `${s.host}:${remoteOld}`,
      `${s.unreachable}:${join(dir, 'never.img')}`,
      `${s.host}:${remoteNew}`,
    ];
    const res = await runCli(
      ['copy', '--json', '--ssh', s.ssh, '--size', String(size), '-', ...dsts],
      { input: srcData },
    );
    assert.equal(res.code, 1, res.stderr);
    const summary = JSON.parse(res.stdout) as ManyJson;
    assert.equal(summary.sourceBytesRead, size);
    assert.deepEqual(
      summary.destinations.map((d) => d.destination),
      dsts,
    );
    assert.equal(summary.failed, 1);
    assert.equal(summary.destinations[2]!.error?.code, 'ESSH');
    assert.match(res.stderr, /blksync: blksync-unreachable:.*\[ESSH\]/);
    // the old remote copy got only its differing 64 KiB
    const pushed = summary.destinations[1]!;
    assert.equal(pushed.bytesWritten, 64 * 1024);
    assert.ok(pushed.result?.channel !== undefined, 'a push, over ssh');
    for (const f of [local, remoteOld, remoteNew]) {
      assert.ok((await readFile(f)).equals(srcData), `${f} holds SRC`);
    }
  });

  test('--jobs 1: one link at a time, in waves that read a file SRC again; stdin is refused', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 5 * MiB;
    const srcData = seededBytes(size, 31);
    const src = join(dir, 'src.img');
    await writeFile(src, srcData);
    const files = ['a.img', 'b.img', 'c.img'].map((n) => join(dir, n));
    const local = join(dir, 'local.img');
    const dsts = [...files.map((f) => `${s.host}:${f}`), local];

    const res = await runCli(['copy', '--json', '--ssh', s.ssh, '--jobs', '1', src, ...dsts]);
    assert.equal(res.code, 0, res.stderr);
    const summary = JSON.parse(res.stdout) as ManyJson;
    // three waves: the local file rides with the first host
    assert.equal(summary.sourceBytesRead, 3 * size);
    assert.deepEqual(
      summary.destinations.map((d) => d.destination),
      dsts,
    );
    for (const f of [...files, local]) assert.ok((await readFile(f)).equals(srcData), f);

    const piped = await runCli(['copy', '--ssh', s.ssh, '--jobs', '1', '-', ...dsts], {
      input: srcData,
    });
    assert.equal(piped.code, 2);
    assert.match(piped.stderr, /stdin can be read once; give --jobs 3 or SRC as a file \[EUSAGE\]/);
  });

  test("a host's link killed mid-run: that destination is dropped, the others finish", async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 48 * MiB;
    const srcData = seededBytes(size, 41);
    const src = join(dir, 'src.img');
    await writeFile(src, srcData);
    const pids = join(dir, 'pids');
    const wrapper = join(dir, 'ssh');
    await writeFile(wrapper, `#!/bin/sh\necho $$ >> ${pids}\nexec ssh -F ${s.config} "$@"\n`, {
      mode: 0o755,
    });
    const files = ['a.img', 'b.img', 'local.img'].map((n) => join(dir, n));
    const dsts = [`${s.host}:${files[0]}`, `${s.host}:${files[1]}`, files[2]!];
    let killed: number | undefined;
    const many = await copyMany(src, dsts, {
      remote: { ssh: wrapper },
      onDestinationProgress: (i, p) => {
        if (killed === undefined && i < 2 && p.bytesWritten >= 8 * MiB) {
          // the first link started; whichever destination it carries is the one to fail
          const first = Number(readFileSync(pids, 'utf8').split('\n')[0]);
          killed = first;
          process.kill(first, 'SIGKILL');
        }
      },
    });
    assert.ok(killed !== undefined, 'a link was killed');
    assert.equal(many.failed, 1);
    const dropped = many.destinations.find((d) => d.error !== undefined)!;
    assert.ok(dropped.error instanceof BlksyncError);
    assert.equal(dropped.error.code, 'ECONNECTION_LOST');
    assert.ok(dsts.indexOf(dropped.destination) < 2, 'a remote destination');
    assert.equal(many.sourceBytesRead, size);
    for (const [i, f] of files.entries()) {
      if (dsts[i] === dropped.destination) continue;
      assert.ok((await readFile(f)).equals(srcData), `${f} holds SRC`);
    }
    // a rerun converges for the dropped one too
    const again = await copyMany(src, dsts, { remote: { ssh: s.ssh } });
    assert.equal(again.failed, 0);
    for (const f of files) assert.ok((await readFile(f)).equals(srcData));
  });
});
