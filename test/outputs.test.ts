/**
 * Every output blksync writes (index -o, diff -o, bmap create -o, io/output-file.ts) played
 * against as an attacker would: links planted at the output's name and at the temporary's
 * old predictable name, device nodes and FIFOs at the output path.
 */

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { lchown, lstat, readFile, readdir, stat, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { createBmap } from '../src/engine/bmap-create.js';
import { diff } from '../src/engine/diff.js';
import { makeIndex } from '../src/engine/make-index.js';
import { parseIndex, readIndexFile } from '../src/formats/index-file.js';
import { describePatch } from '../src/formats/patch-info.js';
import { runCli } from './helpers/cli.js';
import { run } from './helpers/loop.js';
import { IS_ROOT, need } from './helpers/resources.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

const KIB = 1024;
const VICTIM = 'root:x:0:0:the file a planted link aims at\n';

interface Setup {
  dir: string;
  base: string;
  next: string;
  /** A file (owned by root when the tests run as root) that links are planted towards. */
  victim: string;
}

async function setup(t: TestContext): Promise<Setup> {
  const dir = await tempDir(t);
  const s = {
    dir,
    base: join(dir, 'base.img'),
    next: join(dir, 'new.img'),
    victim: join(dir, 'victim'),
  };
  const data = seededBytes(256 * KIB, 1);
  await writeFile(s.base, data);
  const changed = Buffer.from(data);
  seededBytes(4 * KIB, 2).copy(changed, 64 * KIB);
  await writeSparseFile(s.next, 256 * KIB, [{ offset: 0, data: changed }]);
  await writeFile(s.victim, VICTIM);
  return s;
}

/** The three outputs, each written to `out`. */
const writers: [string, (s: Setup, out: string) => Promise<unknown>][] = [
  ['index', (s, out) => makeIndex(s.base, out, { hashThreads: 0 })],
  ['diff', (s, out) => diff(s.base, s.next, out)],
  ['bmap create', (s, out) => createBmap(s.next, { output: out })],
];

test('diff -o: a link planted at the old temporary name (OUT.blksync-partial) is not followed', async (t) => {
  const s = await setup(t);
  const out = join(s.dir, 'out.patch');
  await symlink(s.victim, `${out}.blksync-partial`);
  await diff(s.base, s.next, out);
  assert.equal(await readFile(s.victim, 'utf8'), VICTIM, 'the file the link points to is intact');
  assert.ok((await lstat(out)).isFile());
  assert.equal((await describePatch(out)).records > 0, true, 'the patch is whole');
  const left = (await readdir(s.dir)).filter((n) => n.includes('blksync-partial'));
  assert.deepEqual(left, ['out.patch.blksync-partial'], 'only the planted link; no temporary left');
});

for (const [name, write] of writers) {
  test(`${name} -o LINK: a link at the output path is refused (EOUTPUT_KIND), not followed or replaced`, async (t) => {
    const s = await setup(t);
    const out = join(s.dir, 'out');
    await symlink(s.victim, out);
    await assert.rejects(write(s, out), { code: 'EOUTPUT_KIND', message: /symbolic link/ });
    assert.equal(await readFile(s.victim, 'utf8'), VICTIM, 'the target of the link is intact');
    assert.ok((await lstat(out)).isSymbolicLink(), 'the link itself is left as it was');
    assert.deepEqual(
      (await readdir(s.dir)).filter((n) => n.includes('blksync-partial')),
      [],
      'no temporary is left behind',
    );
  });

  test(`${name} -o FILE replaces a regular file whole, through a temporary in its directory`, async (t) => {
    const s = await setup(t);
    const out = join(s.dir, 'out');
    await writeFile(out, 'old contents');
    await write(s, out);
    assert.ok((await lstat(out)).isFile());
    assert.notEqual(await readFile(out, 'utf8'), 'old contents');
    assert.deepEqual(
      (await readdir(s.dir)).filter((n) => n.includes('blksync-partial')),
      [],
    );
  });

  test(`${name} -o onto a character device (a null device made with mknod) writes it in place`, async (t) => {
    if (!need(t, IS_ROOT, 'mknod needs root')) return;
    const s = await setup(t);
    const dev = join(s.dir, 'null');
    await run('mknod', ['-m', '666', dev, 'c', '1', '3']);
    await write(s, dev);
    const st = await lstat(dev);
    assert.ok(st.isCharacterDevice(), 'the device node is still a character device');
    assert.equal(st.rdev, (await stat('/dev/null')).rdev);
    assert.deepEqual(
      (await readdir(s.dir)).filter((n) => n.includes('blksync-partial')),
      [],
    );
  });

  test(`${name} -o onto a FIFO writes into the FIFO; its reader gets the whole output`, async (t) => {
    const s = await setup(t);
    const fifo = join(s.dir, 'fifo');
    const got = join(s.dir, 'got');
    await run('mkfifo', [fifo]);
    // the reader is another process: if the FIFO were replaced its open would never return
    const reader = spawn('sh', ['-c', 'cat "$1" > "$2"', 'sh', fifo, got], { stdio: 'ignore' });
    const readerDone = new Promise<number | null>((resolve) => reader.on('close', resolve));
    t.after(() => {
      if (reader.exitCode === null) reader.kill('SIGKILL');
    });
    await write(s, fifo);
    assert.ok((await lstat(fifo)).isFIFO(), 'the FIFO is still a FIFO');
    assert.equal(await readerDone, 0);
    const ref = join(s.dir, 'ref');
    await write(s, ref);
    const bytes = await readFile(got);
    if (name === 'index') {
      // the index records when it was written: compare what it says
      const a = parseIndex(bytes);
      const b = await readIndexFile(ref);
      assert.deepEqual(a.hashes, b.hashes);
      assert.deepEqual(a.identity, b.identity);
    } else {
      assert.deepEqual(bytes, await readFile(ref));
    }
  });
}

test('a link of your own to a FIFO (as /dev/stdout is) is written through, in place', async (t) => {
  const s = await setup(t);
  const fifo = join(s.dir, 'fifo');
  const link = join(s.dir, 'out');
  const got = join(s.dir, 'got');
  await run('mkfifo', [fifo]);
  await symlink(fifo, link);
  const reader = spawn('sh', ['-c', 'cat "$1" > "$2"', 'sh', fifo, got], { stdio: 'ignore' });
  const readerDone = new Promise<number | null>((resolve) => reader.on('close', resolve));
  t.after(() => {
    if (reader.exitCode === null) reader.kill('SIGKILL');
  });
  await createBmap(s.next, { output: link });
  assert.equal(await readerDone, 0);
  assert.ok((await lstat(link)).isSymbolicLink() && (await lstat(fifo)).isFIFO());
  assert.equal(await readFile(got, 'utf8'), (await createBmap(s.next)).text);
});

test("another user's link is not followed even to a device (it could aim at /dev/port)", async (t) => {
  if (!need(t, IS_ROOT, 'mknod and lchown need root')) return;
  const s = await setup(t);
  const dev = join(s.dir, 'null');
  await run('mknod', ['-m', '666', dev, 'c', '1', '3']);
  const out = join(s.dir, 'out');
  await symlink(dev, out);
  await lchown(out, 12345, 12345);
  for (const [, write] of writers) {
    await assert.rejects(write(s, out), { code: 'EOUTPUT_KIND', message: /owned by uid 12345/ });
  }
  assert.ok((await lstat(out)).isSymbolicLink());
});

test('a directory or a block device node as the output is refused, and left as it is', async (t) => {
  const s = await setup(t);
  const outs = [s.dir];
  if (IS_ROOT) {
    // a block device node (of a loop device that need not exist): never replaced by a file
    outs.push(join(s.dir, 'disk'));
    await run('mknod', ['-m', '600', outs[1]!, 'b', '7', '250']);
  }
  for (const out of outs) {
    for (const [, write] of writers) {
      await assert.rejects(write(s, out), (err: NodeJS.ErrnoException) => {
        assert.equal(err.code, 'EOUTPUT_KIND', err.message);
        return true;
      });
    }
  }
  assert.ok((await lstat(s.dir)).isDirectory());
  if (IS_ROOT) assert.ok((await lstat(outs[1]!)).isBlockDevice());
});

test('blksync index IMG -o /dev/null and diff … -o /dev/null leave /dev/null a character device', async (t) => {
  if (!need(t, IS_ROOT, 'only root can replace /dev/null (the bug this guards against)')) return;
  const s = await setup(t);
  // if a regression replaces /dev/null, put the machine's back before anything else breaks
  t.after(async () => {
    if (!(await lstat('/dev/null')).isCharacterDevice()) {
      await run('sh', ['-c', 'rm -f /dev/null; mknod -m 666 /dev/null c 1 3']);
    }
  });
  for (const args of [
    ['index', s.base, '-o', '/dev/null'],
    ['diff', s.base, s.next, '-o', '/dev/null'],
    ['bmap', 'create', s.next, '-o', '/dev/null'],
  ]) {
    const r = await runCli(args);
    assert.equal(r.code, 0, `${args.join(' ')}: ${r.stderr}`);
    assert.ok((await lstat('/dev/null')).isCharacterDevice(), `${args[0]} kept /dev/null a device`);
  }
});

test('a device output that is full (/dev/full) fails every command, even for a tiny patch', async (t) => {
  const s = await setup(t);
  for (const args of [
    // identical inputs: the whole patch is one small write at the end
    ['diff', s.base, s.base, '-o', '/dev/full'],
    ['diff', s.base, s.next, '-o', '/dev/full'],
    ['index', s.base, '-o', '/dev/full'],
  ]) {
    const r = await runCli(args);
    assert.equal(r.code, 1, `${args.join(' ')} exited ${r.code}: ${r.stdout}${r.stderr}`);
    assert.match(r.stderr, /ENOSPC|no space/i);
  }
});
