/**
 * What vouches for an index of a device covers every path to its data (a hostile review's
 * findings): a loop device's backing file written directly, through a second loop device, or
 * while detached; a partition written through its whole disk; a discard; a write left dirty
 * in the page cache before the copy; and a regular file written by another process during
 * `copy --index`. In each case the next copy with `--index FILE` refuses (EINDEX_STALE)
 * instead of trusting the index, and `--index auto` reads and compares DST.
 */

import assert from 'node:assert/strict';
import { closeSync, fsyncSync, openSync, writeSync } from 'node:fs';
import { open, readFile, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { describe, test, type TestContext } from 'node:test';
import { copy, type CopyResult, type RemoteCopyResult } from '../src/copy.js';
import type { BlksyncWarning } from '../src/errors.js';
import { readIndexFile } from '../src/formats/index-file.js';
import { runCli } from './helpers/cli.js';
import {
  attachLoop,
  mountLoop,
  needLoop,
  needTool,
  partitionedLoop,
  readDevice,
  run,
} from './helpers/loop.js';
import { sharedSshd, type Sshd } from './helpers/sshd.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const MIB = 1024 * 1024;
const SIZE = 16 * MIB;
/** A 4 KiB block in the middle: the sample (first and last block) misses it. */
const TAMPERED = 5 * MIB + 8192;

async function copyJson(args: string[], env?: NodeJS.ProcessEnv): Promise<CopyResult> {
  const r = await runCli(['copy', ...args, '--json'], env !== undefined ? { env } : {});
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as CopyResult;
}

/** Writes 4 KiB of 0x5a at `offset` of `path` (a file or a device) and syncs it. */
function poke(path: string, offset: number, flags = 'r+'): void {
  const fd = openSync(path, flags);
  try {
    writeSync(fd, Buffer.alloc(4096, 0x5a), 0, 4096, offset);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * `neu` with its last MiB replaced: the copy writes nothing until it reaches the end, so a
 * write by another process in the middle never lands inside one of the copy's own writes
 * (where a ctime cannot tell the two apart, io/ctime-watch.ts) and is always seen.
 */
function onlyTailDiffers(neu: Buffer, seed: number): Buffer {
  const old = Buffer.from(neu);
  seededBytes(MIB, seed).copy(old, old.length - MIB);
  return old;
}

async function loopSetup(t: TestContext) {
  const dir = await tempDir(t);
  const neu = seededBytes(SIZE, 41);
  const backing = join(dir, 'disk.img');
  const src = join(dir, 'new.img');
  await writeFile(backing, seededBytes(SIZE, 42));
  await writeFile(src, neu);
  const dev = await attachLoop(t, backing);
  const index = join(dir, 'disk.blkidx');
  const args = [src, dev, '--index', index, '--verify-sample', '2'];
  const first = await copyJson(args);
  assert.equal(first.index?.mode, 'created');
  return { dir, neu, src, dev, backing, index, args };
}

/** The next copy with the named index refuses it as stale, and writes nothing. */
async function refusedStale(args: string[], why: RegExp): Promise<void> {
  const r = await runCli(['copy', ...args]);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /\[EINDEX_STALE\]/);
  assert.match(r.stderr, why);
}

test('F1: a loop device whose backing file is written directly is not vouched for', async (t) => {
  if (!needLoop(t)) return;
  const s = await loopSetup(t);
  // nothing wrote it since: the index still vouches
  const again = await copyJson(s.args);
  assert.equal(again.index?.mode, 'used');
  poke(s.backing, TAMPERED);
  await refusedStale(s.args, /backing file of the loop device .* was changed/);
  // --index auto reads and compares, and puts the block back
  const env = { XDG_CACHE_HOME: s.dir };
  const auto = [s.src, s.dev, '--index', 'auto', '--verify-sample', '2'];
  await copyJson(auto, env);
  poke(s.backing, TAMPERED);
  const r = await copyJson(auto, env);
  assert.equal(r.index?.mode, 'rebuilt');
  assert.equal(r.bytesWritten, 4096);
  assert.deepEqual(await readDevice(s.dev, SIZE), s.neu);
});

test('F1: a write through a second loop device on the same file is seen', async (t) => {
  if (!needLoop(t)) return;
  const s = await loopSetup(t);
  const other = await attachLoop(t, s.backing);
  poke(other, TAMPERED);
  await refusedStale(s.args, /backing file of the loop device .* was changed/);
});

test('F2: a loop device detached, its file changed, and attached again is not vouched for', async (t) => {
  if (!needLoop(t)) return;
  const s = await loopSetup(t);
  await run('losetup', ['-d', s.dev]);
  poke(s.backing, TAMPERED);
  // the same /dev/loopN again (attachLoop's cleanup detaches it)
  await run('losetup', [s.dev, s.backing]);
  await refusedStale(s.args, /backing file of the loop device .* was changed/);
});

test("F2: the index records the device's diskseq, which a re-attach moves; the backing file still vouches for a loop device", async (t) => {
  if (!needLoop(t)) return;
  const s = await loopSetup(t);
  const seq = (
    await readFile(`/sys/block/${basename(s.dev)}/diskseq`, 'utf8').catch(() => '')
  ).trim();
  if (seq === '') return t.skip('this kernel has no diskseq (< 5.15)');
  assert.equal((await readIndexFile(s.index)).identity.diskSeq, seq);
  await run('losetup', ['-d', s.dev]);
  await run('losetup', [s.dev, s.backing]);
  const again = await copyJson(s.args);
  assert.equal(again.index?.mode, 'used');
  assert.notEqual((await readIndexFile(s.index)).identity.diskSeq, seq);
});

test('F11: two loop devices on one file at other offsets keep their own --index auto entries', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  // both halves already hold SRC: no copy writes the file, whose ctime vouches for both
  const neu = seededBytes(SIZE, 51);
  const src = join(dir, 'new.img');
  await writeFile(src, neu);
  const backing = join(dir, 'two.img');
  await writeFile(backing, Buffer.concat([neu, neu]));
  const attachAt = async (offset: number): Promise<string> => {
    const args = ['-f', '--show', '-o', String(offset), '--sizelimit', String(SIZE), backing];
    const dev = (await run('losetup', args)).stdout.trim();
    t.after(() => run('losetup', ['-d', dev]));
    return dev;
  };
  const first = await attachAt(0);
  const second = await attachAt(SIZE);
  const env = { XDG_CACHE_HOME: dir };
  const auto = (dev: string) => [src, dev, '--index', 'auto', '--verify-sample', '2'];
  assert.equal((await copyJson(auto(first), env)).index?.mode, 'created');
  // the same file and size: before, the same cache entry, taken over from the first
  assert.equal((await copyJson(auto(second), env)).index?.mode, 'created');
  assert.equal((await copyJson(auto(first), env)).index?.mode, 'used');
  assert.equal((await copyJson(auto(second), env)).index?.mode, 'used');
});

test('F3: a partition written through its whole disk is not vouched for', async (t) => {
  if (!needLoop(t) || !(await needTool(t, 'sfdisk', 'fdisk'))) return;
  const dir = await tempDir(t);
  const { disk, part } = await partitionedLoop(t, join(dir, 'disk.img'), 64 * MIB);
  const src = join(dir, 'part.img');
  await writeFile(src, seededBytes(32 * MIB, 43));
  const index = join(dir, 'part.blkidx');
  const args = [src, part, '--index', index, '--verify-sample', '2'];
  await copyJson(args);
  assert.equal((await copyJson(args)).index?.mode, 'used');
  // the partition starts at 1 MiB: this is inside it, written through the disk
  poke(disk, MIB + TAMPERED);
  await refusedStale(args, /the disk holding the partition/);
});

/** Sets up a copy --index onto a loop device over the block device `under`. */
async function loopOverDevice(t: TestContext, under: string, dir: string) {
  const dev = await attachLoop(t, under);
  const src = join(dir, 'new.img');
  const neu = seededBytes(SIZE, 46);
  await writeFile(src, neu);
  const index = join(dir, 'stacked.blkidx');
  const args = [src, dev, '--index', index, '--verify-sample', '2'];
  await copyJson(args);
  assert.equal((await copyJson(args)).index?.mode, 'used');
  return { dev, src, neu, args };
}

test('F16: a loop device over a loop device written through another node of it is not vouched for', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const file = join(dir, 'base.img');
  await writeFile(file, seededBytes(SIZE, 47));
  const under = await attachLoop(t, file);
  const s = await loopOverDevice(t, under, dir);
  // a second node of the same device (as in a chroot or a container): /dev/loopN's own
  // timestamps do not move, only the device's write counter does
  const node = join(dir, 'node');
  const { stdout } = await run('stat', ['-c', '%Hr %Lr', under]);
  await run('mknod', [node, 'b', ...stdout.trim().split(' ')]);
  poke(node, TAMPERED);
  await refusedStale(s.args, /backing (file|device) of the loop device .* was changed/);
});

test('F17: a loop device over a partition written through its whole disk is not vouched for', async (t) => {
  if (!needLoop(t) || !(await needTool(t, 'sfdisk', 'fdisk'))) return;
  const dir = await tempDir(t);
  const { disk, part } = await partitionedLoop(t, join(dir, 'disk.img'), 64 * MIB);
  const s = await loopOverDevice(t, part, dir);
  // the partition starts at 1 MiB: this is inside it, written through the disk
  poke(disk, MIB + TAMPERED);
  await refusedStale(s.args, /backing (file|device) of the loop device .* was changed/);
  // --index auto reads and compares, and puts the block back
  const env = { XDG_CACHE_HOME: dir };
  const auto = [s.src, s.dev, '--index', 'auto', '--verify-sample', '2'];
  await copyJson(auto, env);
  poke(disk, MIB + TAMPERED);
  // the disk's page cache is not the partition's: drop what the partition and the loop
  // device cache, or the compare reads the old bytes from memory
  for (const d of [part, s.dev]) await run('blockdev', ['--flushbufs', d]);
  const r = await copyJson(auto, env);
  assert.equal(r.index?.mode, 'rebuilt');
  assert.equal(r.bytesWritten, 4096);
  assert.deepEqual(await readDevice(s.dev, SIZE), s.neu);
});

test('F4: a discard is counted: the index is not vouched for after blkdiscard', async (t) => {
  if (!needLoop(t) || !(await needTool(t, 'blkdiscard', 'util-linux'))) return;
  const s = await loopSetup(t);
  await run('blkdiscard', ['-o', String(TAMPERED), '-l', '4096', s.dev]);
  await refusedStale(s.args, /discarded/);
});

test('F5: a write left dirty in the page cache before the copy is counted before the index is trusted', async (t) => {
  if (!needLoop(t)) return;
  const s = await loopSetup(t);
  // buffered, not synced, and the writer keeps the device open
  const fd = openSync(s.dev, 'r+');
  let closed = false;
  t.after(() => {
    if (!closed) closeSync(fd);
  });
  writeSync(fd, Buffer.alloc(4096, 0x5a), 0, 4096, TAMPERED);
  await refusedStale(s.args, /sectors were written to .* unaccounted for/);
  closeSync(fd);
  closed = true;
});

test('F6: a file written right after copy --index, in the same second of a coarse-timestamp file system, is not vouched for', async (t) => {
  if (!needLoop(t) || !(await needTool(t, 'mkfs.ext4', 'e2fsprogs'))) return;
  const dir = await tempDir(t);
  const fs = join(dir, 'fs.img');
  await writeFile(fs, Buffer.alloc(0));
  await run('truncate', ['-s', String(64 * MIB), fs]);
  // 128-byte inodes keep whole-second timestamps: a ctime cannot tell two writes in a second apart
  await run('mkfs.ext4', ['-q', '-F', '-I', '128', await attachLoop(t, fs)]);
  const mnt = await mountLoop(t, await attachLoop(t, fs));
  const size = 4 * MIB;
  const src = join(mnt, 'src.img');
  const dst = join(mnt, 'dst.img');
  const neu = seededBytes(size, 48);
  await writeFile(src, neu);
  await writeFile(dst, seededBytes(size, 49));
  const index = join(dir, 'dst.blkidx');
  const args = [src, dst, '--index', index, '--verify-sample', '2'];
  await copyJson(args);
  // at once: in the second of the copy's last write, unless the copy waited it out
  poke(dst, MIB + 8192);
  await refusedStale(args, /was (modified|changed) after the index was written/);

  // blksync index of a file written just before, then written again just after
  const made = join(mnt, 'made.img');
  const madeIndex = join(dir, 'made.blkidx');
  while (Date.now() % 1000 > 100) await new Promise((resolve) => setTimeout(resolve, 10));
  await writeFile(made, neu);
  const ix = await runCli(['index', made, '-o', madeIndex]);
  assert.equal(ix.code, 0, ix.stderr);
  poke(made, MIB + 8192);
  await refusedStale(
    [src, made, '--index', madeIndex, '--verify-sample', '2'],
    /was (modified|changed) after the index was written/,
  );
});

test('F7: a file written by another process during copy --index: the index vouches for none of it, with a coded warning', async (t) => {
  const dir = await tempDir(t);
  const size = 24 * MIB;
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  const index = join(dir, 'dst.blkidx');
  const neu = seededBytes(size, 44);
  await writeFile(src, neu);
  await writeFile(dst, onlyTailDiffers(neu, 45));
  const behind = 80 * 1024;
  let wrote = false;
  const warnings: BlksyncWarning[] = [];
  await copy(src, dst, {
    index,
    verifySample: 2,
    chunkSize: MIB,
    onWarning: (w) => warnings.push(w),
    onProgress: (p) => {
      // block 20 (4 KiB) was already compared by the copy: another process changes it
      if (wrote || p.bytesScanned < 8 * MIB) return;
      wrote = true;
      poke(dst, behind);
    },
  });
  assert.ok(wrote, 'the write came while the copy ran');
  assert.deepEqual(
    warnings.map((w) => w.code),
    ['WDST_WRITTEN_MEANWHILE'],
  );
  assert.doesNotMatch(warnings[0]!.message, /before/);
  const left = await readIndexFile(index);
  assert.deepEqual(left.state, { kind: 'in-progress', dirty: { start: 0, end: size } });
  const again = await copyJson([src, dst, '--index', index, '--verify-sample', '2']);
  assert.ok(again.bytesWritten >= 4096, 'the block written meanwhile was put back');
  const fh = await open(dst, 'r');
  const now = Buffer.alloc(size);
  await fh.read(now, 0, size, 0);
  await fh.close();
  assert.ok(now.equals(neu), 'DST holds SRC');
});

test('WDST_WRITTEN_MEANWHILE: a device written during the copy is a coded warning in --json', async (t) => {
  if (!needLoop(t)) return;
  const s = await loopSetup(t);
  let wrote = false;
  const warnings: BlksyncWarning[] = [];
  const neu2 = Buffer.from(s.neu);
  neu2.fill(0x11, 12 * MIB, 12 * MIB + 4096);
  await writeFile(s.src, neu2);
  await copy(s.src, s.dev, {
    index: s.index,
    verifySample: 2,
    onWarning: (w) => warnings.push(w),
    onProgress: (p) => {
      if (wrote || p.bytesScanned < 8 * MIB) return;
      wrote = true;
      poke(s.dev, 2 * MIB + 8192);
    },
  });
  assert.ok(wrote);
  assert.deepEqual(
    warnings.map((w) => w.code),
    ['WDST_WRITTEN_MEANWHILE'],
  );
});

describe('the agent keeping the index beside DST applies the same stamp', () => {
  const server = sharedSshd();
  const at = (s: Sshd, path: string): string => `${s.host}:${path}`;

  test('F1 over ssh: a loop device whose backing file is written directly is read and compared', async (t) => {
    const s = server(t);
    if (!s || !needLoop(t)) return;
    const dir = await tempDir(t);
    const neu = seededBytes(SIZE, 46);
    const src = join(dir, 'src.img');
    const backing = join(dir, 'disk.img');
    await writeFile(src, neu);
    await writeFile(backing, seededBytes(SIZE, 47));
    const dev = await attachLoop(t, backing);
    // the agent's cache, in the test's directory
    const ssh = `${s.ssh} -o SetEnv=XDG_CACHE_HOME=${dir}`;
    const opts = { remote: { ssh }, index: 'auto', verifySample: 2 };
    assert.equal((await copy(src, at(s, dev), opts)).index?.mode, 'created');
    assert.equal((await copy(src, at(s, dev), opts)).index?.mode, 'used');
    poke(backing, TAMPERED);
    const third = (await copy(src, at(s, dev), opts)) as RemoteCopyResult;
    assert.equal(third.index?.mode, 'rebuilt');
    assert.match(third.index.reason ?? '', /backing file of the loop device/);
    assert.deepEqual(await readDevice(dev, SIZE), neu);
  });

  test("F7 over ssh: a file written by another process during a push: the agent's index vouches for none of it", async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 24 * MIB;
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    const index = join(dir, 'dst.blkidx');
    const neu = seededBytes(size, 48);
    await writeFile(src, neu);
    await writeFile(dst, onlyTailDiffers(neu, 49));
    let wrote = false;
    const warnings: BlksyncWarning[] = [];
    await copy(src, at(s, dst), {
      remote: { ssh: s.ssh },
      index: at(s, index),
      verifySample: 2,
      onWarning: (w) => warnings.push(w),
      onProgress: (p) => {
        if (wrote || p.bytesScanned < 8 * MIB) return;
        wrote = true;
        poke(dst, 80 * 1024);
      },
    });
    assert.ok(wrote, 'the write came while the copy ran');
    assert.deepEqual(
      warnings.map((w) => w.code),
      ['WDST_WRITTEN_MEANWHILE'],
    );
    const left = await readIndexFile(index);
    assert.deepEqual(left.state, { kind: 'in-progress', dirty: { start: 0, end: size } });
  });
});
