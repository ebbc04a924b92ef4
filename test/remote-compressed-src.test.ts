/**
 * A compressed image as a remote SRC (pull, relayed, --direct) over a real OpenSSH server on
 * 127.0.0.1: blksync decodes only where it runs, so the agent recognises the compression by
 * its magic bytes and refuses it; a pull or a relay then streams it through this machine
 * (with --size, as a compressed stdin needs), and without --size the copy is refused before
 * anything is written (ESRC_COMPRESSED) saying so. --direct refuses it with the command that
 * streams it through this machine instead; that command works.
 */

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { gzipSync } from 'node:zlib';
import { runCli } from './helpers/cli.js';
import { needTool } from './helpers/loop.js';
import { sharedSshd } from './helpers/sshd.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const MiB = 1024 * 1024;

describe('a compressed remote SRC', () => {
  const server = sharedSshd();

  test('pull, relay and --direct refuse it before writing, for every format', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const data = Buffer.alloc(3 * MiB + 123);
    seededBytes(MiB, 5).copy(data, MiB);
    const packed: [string, Buffer][] = [['gz', gzipSync(data)]];
    for (const [ext, cmd, pkg, args] of [
      ['xz', 'xz', 'xz-utils', ['-c', '-1', '-T1']],
      ['zst', 'zstd', 'zstd', ['-c', '-q', '-1']],
      ['bz2', 'bzip2', 'bzip2', ['-c', '-1']],
      ['lz4', 'lz4', 'lz4', ['-c', '-q']],
    ] as const) {
      if (await needTool(t, cmd, pkg)) {
        packed.push([ext, execFileSync(cmd, [...args], { input: data, maxBuffer: 64 * MiB })]);
      }
    }
    const old = seededBytes(data.length, 9);
    // the agent tells the formats apart by their magic, whichever way the copy runs: every
    // format is tried on a pull, every way (and an existing or a new DST) with one format
    const cases: { ext: string; mode: 'pull' | 'relay' | 'direct'; existing: boolean }[] = [];
    for (const [ext] of packed) cases.push({ ext, mode: 'pull', existing: false });
    for (const mode of ['pull', 'relay', 'direct'] as const) {
      cases.push({ ext: 'gz', mode, existing: true });
      if (mode !== 'pull') cases.push({ ext: 'gz', mode, existing: false });
    }
    for (const [ext, bytes] of packed) await writeFile(join(dir, `disk.img.${ext}`), bytes);
    for (const { ext, mode, existing } of cases) {
      const src = join(dir, `disk.img.${ext}`);
      const target = join(dir, `${existing ? 'dst' : 'fresh'}-${mode}-${ext}.img`);
      if (existing) await writeFile(target, old);
      const r = await runCli([
        'copy',
        '--ssh',
        s.ssh,
        ...(mode === 'direct' ? ['--direct'] : []),
        `${s.host}:${src}`,
        mode === 'pull' ? target : `${s.host}:${target}`,
      ]);
      const what = `${ext} ${mode} ${existing ? 'existing' : 'new'} DST`;
      assert.equal(r.code, 1, `${what}: ${r.stderr}`);
      const lines = r.stderr.trim().split('\n');
      assert.equal(lines.length, 1, r.stderr);
      assert.match(lines[0]!, /\[ESRC_COMPRESSED\]$/, what);
      assert.match(lines[0]!, /-compressed/);
      // what to do: stream it through this machine, or decompress it on the host
      if (mode === 'direct') {
        assert.match(lines[0]!, / 'cat .*disk\.img\.\w+' \| blksync copy --size BYTES - /);
      } else assert.match(lines[0]!, /give --size BYTES \(its decoded size\)/);
      assert.match(lines[0]!, /decompress it on blksync-test/);
      if (existing) assert.deepEqual(await readFile(target), old, `${what}: DST untouched`);
      else assert.equal(existsSync(target), false, `${what}: no DST created`);
    }
  });

  test('with --size, a pull and a relay stream it through here; the command --direct suggests works', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const data = seededBytes(2 * MiB + 5, 11);
    await writeFile(join(dir, 'disk.img.gz'), gzipSync(data));
    const r = await runCli([
      'copy',
      '--ssh',
      s.ssh,
      '--direct',
      `${s.host}:${join(dir, 'disk.img.gz')}`,
      `${s.host}:${join(dir, 'refused.img')}`,
    ]);
    assert.equal(existsSync(join(dir, 'refused.img')), false);
    const suggested = /`(.*)`/.exec(r.stderr)?.[1];
    assert.ok(suggested !== undefined, r.stderr);
    assert.match(suggested, /--size BYTES/);
    // what a user would run: the ssh command, with the size filled in and a real DST
    const [ssh] = suggested.split(' | ');
    const piped = execFileSync('sh', ['-c', ssh!], { maxBuffer: 64 * MiB });
    const out = join(dir, 'out.img');
    const c = await runCli(['copy', '--size', String(data.length), '-', out], { input: piped });
    assert.equal(c.code, 0, c.stderr);
    assert.deepEqual(await readFile(out), data);
    // pulled and relayed with --size: streamed through here, with the warning that says so
    for (const to of [join(dir, 'pulled.img'), `${s.host}:${join(dir, 'relayed.img')}`]) {
      const p = await runCli([
        'copy',
        '--ssh',
        s.ssh,
        '--size',
        String(data.length),
        `${s.host}:${join(dir, 'disk.img.gz')}`,
        to,
      ]);
      assert.equal(p.code, 0, p.stderr);
      assert.match(p.stderr, /streamed whole through ssh .*\[WSRC_STREAMED\]/);
    }
    assert.deepEqual(await readFile(join(dir, 'pulled.img')), data);
    assert.deepEqual(await readFile(join(dir, 'relayed.img')), data);
  });
});
