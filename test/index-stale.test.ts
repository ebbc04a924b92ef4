/**
 * A stale index is never trusted (issue 12 §1): what vouches for an index of DST is the
 * kernel's write counter of a device in the same boot, or a file's mtime and ctime; a sample
 * of blocks does not. DST written behind blksync's back is read and compared (--index auto)
 * or refused (--index FILE) unless the user vouches (--trust-index); --rebuild-index always
 * rebuilds; blksync index refuses a device written while it is read; --verify names the
 * blocks that differ and marks the index stale.
 */

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, existsSync, fsyncSync, openSync, writeSync } from 'node:fs';
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { copy, type CopyResult } from '../src/copy.js';
import { makeIndex } from '../src/engine/make-index.js';
import { BlksyncError } from '../src/errors.js';
import { readIndexFile } from '../src/formats/index-file.js';
import { runCli } from './helpers/cli.js';
import {
  attachLoop,
  holdExclusive,
  ioStat,
  mountLoop,
  needLoop,
  needTool,
  readDevice,
  run,
} from './helpers/loop.js';
import { needMapWrites, SharedMap } from './helpers/shared-map.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const MIB = 1024 * 1024;
const SIZE = 16 * MIB;
const INDEX_BLOCK = 64 * 1024;
/** A 4 KiB block in the middle: the sample (first and last block with --verify-sample 2) misses it. */
const TAMPERED = 5 * MIB + 8192;

async function copyJson(args: string[], env?: NodeJS.ProcessEnv): Promise<CopyResult> {
  const r = await runCli(['copy', ...args, '--json'], env !== undefined ? { env } : {});
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as CopyResult;
}

/** Writes one 4 KiB block of `dev` at `offset` as dd does, behind blksync's back. */
async function ddBlock(dir: string, dev: string, offset: number): Promise<void> {
  const junk = join(dir, 'junk');
  await writeFile(junk, Buffer.alloc(4096, 0x5a));
  await run('dd', [
    `if=${junk}`,
    `of=${dev}`,
    'bs=4096',
    `seek=${offset / 4096}`,
    'count=1',
    'conv=notrunc,fsync',
    'status=none',
  ]);
}

async function deviceSetup(t: TestContext) {
  const dir = await tempDir(t);
  const neu = seededBytes(SIZE, 31);
  const backing = join(dir, 'disk.img');
  const src = join(dir, 'new.img');
  await writeFile(backing, seededBytes(SIZE, 32));
  await writeFile(src, neu);
  const dev = await attachLoop(t, backing);
  return { dir, neu, src, dev, index: join(dir, 'disk.blkidx'), env: { XDG_CACHE_HOME: dir } };
}

test('--index auto: a device written behind blksync is read and compared, and the block rewritten', async (t) => {
  if (!needLoop(t)) return;
  const s = await deviceSetup(t);
  const args = [s.src, s.dev, '--index', 'auto', '--verify-sample', '2'];
  const first = await copyJson(args, s.env);
  assert.equal(first.index?.mode, 'created');
  // nothing wrote the device since: the kernel's counter vouches, the device is not read
  const second = await copyJson(args, s.env);
  assert.equal(second.index?.mode, 'used');
  assert.equal(second.bytesWritten, 0);

  await ddBlock(s.dir, s.dev, TAMPERED);
  const third = await copyJson(args, s.env);
  assert.equal(third.index?.mode, 'rebuilt');
  assert.match(third.index.reason ?? '', /sectors were written to/);
  assert.ok(third.bytesRead >= SIZE, `the device was read (${third.bytesRead} bytes)`);
  assert.equal(third.bytesWritten, 4096, 'the block dd wrote was put back');
  assert.deepEqual(await readDevice(s.dev, SIZE), s.neu);
  // and the rewritten index vouches again
  const fourth = await copyJson(args, s.env);
  assert.equal(fourth.index?.mode, 'used');
});

test('--index FILE: a device written behind blksync is refused, naming the index; --trust-index vouches; --rebuild-index rebuilds', async (t) => {
  if (!needLoop(t)) return;
  const s = await deviceSetup(t);
  const args = [s.src, s.dev, '--index', s.index, '--verify-sample', '2'];
  await copyJson(args);
  await ddBlock(s.dir, s.dev, TAMPERED);
  const tampered = await readDevice(s.dev, SIZE);

  const before = await ioStat(s.dev);
  const refused = await runCli(['copy', ...args]);
  assert.equal(refused.code, 1);
  assert.ok(refused.stderr.includes(`index ${s.index} cannot be trusted`), refused.stderr);
  assert.match(
    refused.stderr,
    /sectors were written to .*--rebuild-index.*--trust-index.*\[EINDEX_STALE\]\n$/,
  );
  assert.equal((await ioStat(s.dev)).writeSectors, before.writeSectors, 'nothing written');
  assert.deepEqual(await readDevice(s.dev, SIZE), tampered);

  // the user vouches (wrongly, here): the index is used, and the summary says on whose word
  const trusted = await runCli(['copy', ...args, '--trust-index']);
  assert.equal(trusted.code, 0, trusted.stderr);
  assert.match(trusted.stderr + trusted.stdout, /used \(trusted on your word: --trust-index\)/);
  // the trusted copy wrote a fresh index, which vouches again; written behind its back once more:
  await ddBlock(s.dir, s.dev, TAMPERED);
  const trustedJson = await copyJson([...args, '--trust-index']);
  assert.equal(trustedJson.index?.mode, 'used');
  assert.equal(trustedJson.index.trustedOnWord, true);

  const rebuilt = await copyJson([...args, '--rebuild-index']);
  assert.equal(rebuilt.index?.mode, 'rebuilt');
  assert.ok(rebuilt.bytesRead >= SIZE, 'DST was read once');
  assert.deepEqual(await readDevice(s.dev, SIZE), s.neu);
  const used = await copyJson(args);
  assert.equal(used.index?.mode, 'used');
});

test('a file changed with its mtime put back (touch -r) is caught by its ctime', async (t) => {
  const dir = await tempDir(t);
  const neu = seededBytes(8 * MIB, 41);
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  const ref = join(dir, 'ref');
  const index = join(dir, 'dst.blkidx');
  await writeFile(src, neu);
  await writeFile(dst, seededBytes(8 * MIB, 42));
  const args = [src, dst, '--index', index, '--verify-sample', '2'];
  await copyJson(args);
  await writeFile(ref, '');
  await run('touch', ['-r', dst, ref]);
  const fh = await open(dst, 'r+');
  await fh.write(Buffer.alloc(4096, 0x77), 0, 4096, TAMPERED);
  await fh.close();
  await run('touch', ['-r', ref, dst]);

  const refused = await runCli(['copy', ...args]);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /its ctime moved.*--rebuild-index.*\[EINDEX_STALE\]/);
  const auto = await copyJson([src, dst, '--index', 'auto', '--verify-sample', '2'], {
    XDG_CACHE_HOME: dir,
  });
  assert.equal(auto.index?.mode, 'created');
  assert.deepEqual(await readFile(dst), neu);

  // the same through a cached index: made, tampered with, then read and compared
  await run('touch', ['-r', dst, ref]);
  const fh2 = await open(dst, 'r+');
  await fh2.write(Buffer.alloc(4096, 0x78), 0, 4096, TAMPERED);
  await fh2.close();
  await run('touch', ['-r', ref, dst]);
  const again = await copyJson([src, dst, '--index', 'auto', '--verify-sample', '2'], {
    XDG_CACHE_HOME: dir,
  });
  assert.equal(again.index?.mode, 'rebuilt');
  assert.equal(again.bytesWritten, 4096);
  assert.deepEqual(await readFile(dst), neu);
});

test('a file written through a shared map before blksync index and again after it is not trusted', async (t) => {
  const dir = await tempDir(t);
  if (!(await needMapWrites(t, dir))) return;
  const dst = join(dir, 'dst.img');
  const src = join(dir, 'src.img');
  const index = join(dir, 'dst.blkidx');
  await writeFile(dst, seededBytes(8 * MIB, 61));
  const map = await SharedMap.open(dst, 8 * MIB);
  try {
    // the first write to the page faults and moves the mtime; the index then records the
    // page as it is, and SRC is that content
    map.write(TAMPERED, Buffer.alloc(16, 0x41));
    await makeIndex(dst, index);
    await writeFile(src, await readFile(dst));
    // the page is still dirty and writable unless the index synced the file: no fault, no mtime
    map.write(TAMPERED, Buffer.alloc(16, 0x42));
  } finally {
    await map.close();
  }
  await assert.rejects(
    copy(src, dst, { index, verifySample: 0 }),
    (err: unknown) => err instanceof BlksyncError && err.code === 'EINDEX_STALE',
  );
  const r = await copy(src, dst, { index, rebuildIndex: true, verifySample: 0 });
  assert.equal(r.bytesWritten, 4096);
  assert.ok((await readFile(dst)).equals(await readFile(src)), 'DST holds SRC');
});

test('a file written through a shared map during a copy with --index gets an index that vouches for none of it', async (t) => {
  const dir = await tempDir(t);
  if (!(await needMapWrites(t, dir))) return;
  const dst = join(dir, 'dst.img');
  const src = join(dir, 'src.img');
  const index = join(dir, 'dst.blkidx');
  await writeFile(dst, seededBytes(SIZE, 62));
  const fh = await open(dst, 'r');
  await fh.sync();
  await fh.close();
  const map = await SharedMap.open(dst, SIZE);
  let wrote = false;
  try {
    // the first write to the clean page faults and moves the ctime, before the copy
    map.write(TAMPERED, Buffer.alloc(16, 0x41));
    await writeFile(src, await readFile(dst));
    const first = await copy(src, dst, {
      index,
      onProgress: (p) => {
        // once the copy has read the page: the page is dirty and writable unless the copy
        // synced DST first, and this write moves nothing
        if (wrote || p.bytesScanned <= TAMPERED + 4096) return;
        map.write(TAMPERED, Buffer.alloc(16, 0x42));
        wrote = true;
      },
    });
    assert.equal(first.bytesWritten, 0);
  } finally {
    await map.close();
  }
  assert.ok(wrote, 'the page was written during the copy');
  await copy(src, dst, { index, verifySample: 0 });
  assert.ok((await readFile(dst)).equals(await readFile(src)), 'DST holds SRC');
});

test('a file on a file system without fsync (squashfs) is indexed, and copied with indexes of SRC and DST', async (t) => {
  if (!needLoop(t) || !(await needTool(t, 'mksquashfs', 'squashfs-tools'))) return;
  const dir = await tempDir(t);
  await run('mkdir', [join(dir, 'in')]);
  const data = seededBytes(4 * MIB, 63);
  await writeFile(join(dir, 'in', 'image.img'), data);
  await run('mksquashfs', [join(dir, 'in'), join(dir, 'fs.sqfs'), '-noappend', '-quiet']);
  const mnt = await mountLoop(t, await attachLoop(t, join(dir, 'fs.sqfs')));
  // read-only: fsync(2) there is EINVAL, and nothing can write the file to sync
  const image = join(mnt, 'image.img');
  const dst = join(dir, 'dst.img');
  await writeFile(dst, seededBytes(4 * MIB, 64));
  await makeIndex(image, join(dir, 'image.blkidx'));
  const srcIndex = join(dir, 'src.blkidx');
  const r = await copy(image, dst, { index: join(dir, 'dst.blkidx'), srcIndex });
  assert.equal(r.index?.source?.mode, 'created');
  assert.ok((await readFile(dst)).equals(data), 'DST holds SRC');
  // and a dry run with an index of DST there
  const dry = await copy(dst, image, { index: join(dir, 'ro.blkidx'), dryRun: true });
  assert.equal(dry.bytesDiffering, 0);
});

test("a loop device's backing file written during a copy that writes nothing: the index vouches for none of it", async (t) => {
  if (!needLoop(t)) return;
  const s = await deviceSetup(t);
  const backing = join(s.dir, 'disk.img');
  await writeFile(s.src, await readFile(backing));
  let wrote = false;
  const first = await copy(s.src, s.dev, {
    index: s.index,
    onProgress: (p) => {
      // once the copy has read the block: written straight into the file, behind the loop
      // device's counter
      if (wrote || p.bytesScanned <= TAMPERED + 4096) return;
      const fd = openSync(backing, 'r+');
      writeSync(fd, Buffer.alloc(4096, 0x5a), 0, 4096, TAMPERED);
      fsyncSync(fd);
      closeSync(fd);
      wrote = true;
    },
  });
  assert.ok(wrote, 'the backing file was written during the copy');
  assert.equal(first.bytesWritten, 0);
  assert.equal(first.index?.changedMeanwhile, true);
  const again = await copy(s.src, s.dev, { index: s.index, verifySample: 0 });
  assert.equal(again.bytesWritten, INDEX_BLOCK, 'the block written meanwhile was put back');
  assert.ok((await readDevice(s.dev, SIZE)).equals(await readFile(s.src)), 'DST holds SRC');
});

test('--rebuild-index rebuilds a sound index: DST is read once and a fresh index written', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  const index = join(dir, 'dst.blkidx');
  await writeFile(src, seededBytes(4 * MIB, 51));
  await writeFile(dst, seededBytes(4 * MIB, 52));
  await copyJson([src, dst, '--index', index]);
  const written = (await readIndexFile(index)).writtenAt;
  const r = await copyJson([src, dst, '--index', index, '--rebuild-index']);
  assert.equal(r.index?.mode, 'rebuilt');
  assert.ok(r.bytesRead >= 4 * MIB, `DST read (${r.bytesRead} bytes)`);
  assert.ok((await readIndexFile(index)).writtenAt >= written);
});

test('blksync index refuses a device written while it is read, and one another program claims', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  await writeFile(join(dir, 'disk.img'), seededBytes(64 * MIB, 61));
  const dev = await attachLoop(t, join(dir, 'disk.img'));
  const out = join(dir, 'disk.blkidx');

  // a writer that keeps writing one block (synced) until stopped
  const script =
    "const fs = require('node:fs');" +
    "const fd = fs.openSync(process.argv[1], 'r+');" +
    'const b = Buffer.alloc(4096, 1);' +
    "process.stdout.write('writing\\n');" +
    'for (;;) { fs.writeSync(fd, b, 0, 4096, 40960); fs.fsyncSync(fd); }';
  const writer = spawn(process.execPath, ['-e', script, dev], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exited = new Promise<void>((resolve) => writer.once('exit', () => resolve()));
  t.after(async () => {
    writer.kill('SIGKILL');
    await exited;
  });
  await new Promise<void>((resolve) => writer.stdout.once('data', () => resolve()));
  const r = await runCli(['index', dev, '-o', out]);
  writer.kill('SIGKILL');
  await exited;
  assert.equal(r.code, 1, r.stdout);
  assert.match(r.stderr, /changed while it was read .*sectors were written.*\[ESRC_CHANGED\]/);
  assert.equal(existsSync(out), false, 'no index written');

  await holdExclusive(t, dev);
  const busy = await runCli(['index', dev, '-o', out]);
  assert.equal(busy.code, 1);
  assert.match(busy.stderr, /is in use .*\[ESRC_OPEN\]/);
  assert.equal(existsSync(out), false, 'no index written');
});

test('--verify failing names the blocks that differ and marks the index stale; a rerun repairs them', async (t) => {
  if (!needLoop(t)) return;
  const s = await deviceSetup(t);
  const args = [s.src, s.dev, '--index', s.index, '--verify-sample', '2'];
  await copyJson(args);
  await ddBlock(s.dir, s.dev, TAMPERED);
  // the user vouches wrongly: the tampered block is skipped, and --verify finds it
  const r = await runCli(['copy', ...args, '--trust-index', '--verify']);
  assert.equal(r.code, 1);
  const block = Math.floor(TAMPERED / INDEX_BLOCK);
  assert.match(
    r.stderr,
    new RegExp(
      `block ${block} \\(bytes ${block * INDEX_BLOCK}-${(block + 1) * INDEX_BLOCK - 1}\\) .*do not hold what SRC has.*marked stale.*\\[EVERIFY\\]`,
    ),
  );
  const marked = await readIndexFile(s.index);
  assert.equal(marked.state.kind, 'in-progress', 'the index no longer vouches for the block');
  const again = await copyJson(args);
  assert.equal(again.index?.mode, 'used');
  assert.equal(again.bytesWritten, INDEX_BLOCK, 'the marked block was compared and rewritten');
  assert.deepEqual(await readDevice(s.dev, SIZE), s.neu);
});

test('a device written by another program during the copy: the index written then vouches for none of it', async (t) => {
  if (!needLoop(t)) return;
  const s = await deviceSetup(t);
  // the device differs from SRC only at 12 MiB: the block written behind blksync's back (at
  // 2 MiB, already compared equal when it is written) is one blksync does not write itself
  const near = Buffer.from(s.neu);
  near.fill(0x11, 12 * MIB, 12 * MIB + 4096);
  const fh = await open(s.dev, 'r+');
  await fh.write(near, 0, SIZE, 0);
  await fh.sync();
  await fh.close();
  // blksync holds the device with O_EXCL, which does not keep out a plain writer (dd)
  const behind = 2 * MIB + 8192;
  let wrote = false;
  const r = await copy(s.src, s.dev, {
    index: s.index,
    verifySample: 2,
    onProgress: (p) => {
      if (wrote || p.bytesScanned < 8 * MIB) return;
      wrote = true;
      const fd = openSync(s.dev, 'r+');
      writeSync(fd, Buffer.alloc(4096, 0x3c), 0, 4096, behind);
      fsyncSync(fd);
      closeSync(fd);
    },
  });
  assert.ok(wrote, 'the write came while the copy ran');
  assert.ok((r.index?.sectorsWrittenMeanwhile ?? 0) >= 8, JSON.stringify(r.index));
  const left = await readIndexFile(s.index);
  assert.deepEqual(left.state, { kind: 'in-progress', dirty: { start: 0, end: SIZE } });
  const again = await copyJson([s.src, s.dev, '--index', s.index, '--verify-sample', '2']);
  assert.equal(again.bytesWritten, INDEX_BLOCK, 'the block written meanwhile was put back');
  assert.deepEqual(await readDevice(s.dev, SIZE), s.neu);
});

test('an interrupted copy stamps its index after its last sync: the rerun reads back only the marked range', async (t) => {
  const dir = await tempDir(t);
  const size = 24 * MIB;
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  const index = join(dir, 'dst.blkidx');
  await writeFile(src, seededBytes(size, 91));
  await writeFile(dst, seededBytes(size, 92));
  await copy(src, dst, { index, chunkSize: MIB });
  // the first 8 MiB stay as they are; every block after differs
  const neu = Buffer.concat([
    seededBytes(size, 91).subarray(0, 8 * MIB),
    seededBytes(16 * MIB, 93),
  ]);
  await writeFile(src, neu);
  const controller = new AbortController();
  await assert.rejects(
    copy(src, dst, {
      index,
      chunkSize: MIB,
      indexCheckpointBytes: 2 * MIB,
      signal: controller.signal,
      onProgress: (p) => {
        if (p.bytesScanned >= 12 * MIB) controller.abort();
      },
    }),
    /interrupted/,
  );
  const left = await readIndexFile(index);
  assert.equal(left.state.kind, 'in-progress');
  const r = await copy(src, dst, { index, chunkSize: MIB });
  assert.equal(r.index?.mode, 'used', r.index?.reason);
  // from the first write (at 8 MiB) to the end; what lies before still vouched for
  assert.equal(r.index.bytesReread, size - 8 * MIB);
  assert.deepEqual(await readFile(dst), neu);
});
