/**
 * Two blksync runs writing the same regular file at once (io/file-lock.ts): the second
 * refuses with EDEST_BUSY and writes nothing, instead of mixing its writes with the first's
 * (both used to end with exit 0, the file holding neither image). The first is stood in for
 * by util-linux's flock(1), which holds the same lock another blksync takes.
 */

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test, type TestContext } from 'node:test';
import { runCli } from './helpers/cli.js';
import { needTool } from './helpers/loop.js';
import { sharedSshd } from './helpers/sshd.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const SIZE = 1024 * 1024;

/** Holds flock(2) on `path` in another process until the test ends; resolves once held. */
async function holdLock(t: TestContext, path: string): Promise<void> {
  const child = spawn('flock', ['-x', path, '-c', 'echo held; read x'], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  t.after(async () => {
    child.stdin.end();
    await exited;
  });
  await new Promise<void>((resolve, reject) => {
    child.stdout.once('data', () => resolve());
    child.once('exit', (code) => reject(new Error(`flock ${path} failed (exit ${code})`)));
  });
}

test('copy and apply onto a file another blksync is writing refuse with EDEST_BUSY and write nothing', async (t) => {
  if (!(await needTool(t, 'flock', 'util-linux'))) return;
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  const base = seededBytes(SIZE, 1);
  await writeFile(src, seededBytes(SIZE, 2));
  await writeFile(dst, base);
  const patch = join(dir, 'p.patch');
  const d = await runCli(['diff', dst, src, '-o', patch]);
  assert.equal(d.code, 0, d.stderr);
  await holdLock(t, dst);
  for (const args of [
    ['copy', src, dst],
    ['copy', src, dst, '--index', join(dir, 'dst.blkidx')],
    ['apply', patch, dst],
  ]) {
    const r = await runCli(args);
    assert.notEqual(r.code, 0, `${args[0]} must refuse: ${r.stdout}`);
    assert.match(r.stderr, /another blksync.*\[EDEST_BUSY\]/);
    assert.ok((await readFile(dst)).equals(base), `${args[0]} wrote nothing`);
  }
  // a dry run only reads: it takes no lock
  const dry = await runCli(['copy', src, dst, '--dry-run']);
  assert.equal(dry.code, 0, dry.stderr);
});

test('a copy onto a file is not kept out by a lock a finished run held', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  const neu = seededBytes(SIZE, 3);
  await writeFile(src, neu);
  for (let i = 0; i < 2; i++) {
    const r = await runCli(['copy', src, dst]);
    assert.equal(r.code, 0, r.stderr);
  }
  assert.ok((await readFile(dst)).equals(neu));
});

describe('a push: the agent takes the same lock on a file DST', () => {
  const server = sharedSshd();
  test('a push onto a file another blksync is writing refuses with EDEST_BUSY and writes nothing', async (t) => {
    const s = server(t);
    if (!s || !(await needTool(t, 'flock', 'util-linux'))) return;
    const dir = await tempDir(t);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    const base = seededBytes(SIZE, 4);
    await writeFile(src, seededBytes(SIZE, 5));
    await writeFile(dst, base);
    await holdLock(t, dst);
    const r = await runCli(['copy', '--ssh', s.ssh, src, `${s.host}:${dst}`]);
    assert.notEqual(r.code, 0, r.stdout);
    assert.match(r.stderr, /another blksync.*\[EDEST_BUSY\]/);
    assert.ok((await readFile(dst)).equals(base), 'nothing written');
  });
  test('without the other holder, a push and then another both complete', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    const neu = seededBytes(SIZE, 6);
    await writeFile(src, neu);
    for (let i = 0; i < 2; i++) {
      const r = await runCli(['copy', '--ssh', s.ssh, src, `${s.host}:${dst}`]);
      assert.equal(r.code, 0, r.stderr);
    }
    assert.ok((await readFile(dst)).equals(neu));
  });
});
