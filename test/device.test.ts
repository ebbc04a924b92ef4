/**
 * `blksync copy` onto real block devices (loop devices, root only): what reaches the device,
 * what the kernel's write counters say was written, and every refusal leaving the device
 * untouched: mounted (itself, a partition, its whole disk; ext4 and btrfs), swap, held
 * exclusively, too small, missing, the same device, a partition and its own disk.
 */

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import {
  closeSync,
  constants,
  existsSync,
  fsyncSync,
  openSync,
  statSync,
  writeSync,
} from 'node:fs';
import { link, open, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { describe, test, type TestContext } from 'node:test';
import { copy, type CopyResult } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import { runCli, type CliResult } from './helpers/cli.js';
import {
  attachLoop,
  deviceSize,
  holdExclusive,
  ioStat,
  mkfsExt4,
  mountLoop,
  needLoop,
  needTool,
  partitionedLoop,
  readDevice,
  run,
  swapOn,
} from './helpers/loop.js';
import { sharedSshd } from './helpers/sshd.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const BS = 4096;
const MiB = 1024 * 1024;

/** Flips one byte at each offset. */
function mutate(data: Buffer, offsets: number[]): Buffer {
  const out = Buffer.from(data);
  for (const o of offsets) out[o] = (out[o]! ^ 0xff) & 0xff;
  return out;
}

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** A loop device over a new backing file holding `content`. */
async function loopWith(t: TestContext, dir: string, content: Buffer): Promise<string> {
  const backing = join(dir, `backing-${content.length}-${Date.now()}.img`);
  await writeFile(backing, content);
  return attachLoop(t, backing);
}

/** Runs `blksync copy ...args --json` and parses the summary when it exits 0. */
async function copyJson(args: string[]): Promise<{ res: CliResult; summary: CopyResult }> {
  const res = await runCli(['copy', '--json', ...args]);
  assert.equal(res.code, 0, `blksync copy failed: ${res.stderr}`);
  return { res, summary: JSON.parse(res.stdout) as CopyResult };
}

/** Sectors written to `dev` while `fn` ran (buffered writes reach the counters at fsync/close). */
async function sectorsWrittenDuring<T>(dev: string, fn: () => Promise<T>): Promise<[T, number]> {
  const before = await ioStat(dev);
  const value = await fn();
  const after = await ioStat(dev);
  return [value, after.writeSectors - before.writeSectors];
}

/** Bytes of whole 4 KiB pages the ranges touch: the most a page-cached write can send. */
function pageSpan(ranges: readonly { start: number; end: number }[]): number {
  return ranges.reduce((n, r) => n + Math.ceil(r.end / BS) * BS - Math.floor(r.start / BS) * BS, 0);
}

/**
 * Asserts that no block of SRC reached the device. A mounted file system may write to its
 * device on its own (journal commits), so a before/after hash would be flaky; SRC is random,
 * so any block of it that blksync wrote would show up.
 */
async function assertNothingOfSrc(dev: string, srcData: Buffer): Promise<void> {
  const held = await readDevice(dev, srcData.length);
  for (let o = 0; o < srcData.length; o += BS) {
    const e = Math.min(o + BS, srcData.length);
    assert.ok(
      !held.subarray(o, e).equals(srcData.subarray(o, e)),
      `the block at ${o} of ${dev} was written`,
    );
  }
}

function assertRefused(res: CliResult, code: string): void {
  assert.equal(res.code, 1, `expected exit 1, got ${res.code}: ${res.stderr}`);
  assert.match(res.stderr, new RegExp(`\\[${code}\\]`));
  assert.equal(res.stdout, '', 'a refusal prints no summary');
}

test('copy onto a larger device writes only the differing blocks and leaves the rest alone', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const devSize = 8 * MiB;
  const old = seededBytes(devSize, 11);
  const dev = await loopWith(t, dir, old);
  assert.equal(await deviceSize(dev), devSize);

  // SRC ends mid-block: its last block is 1234 bytes long
  const srcSize = 6 * MiB + 1234;
  const lastBlock = Math.floor((srcSize - 1) / BS) * BS;
  const neu = mutate(old.subarray(0, srcSize), [
    0,
    5 * BS + 100,
    5 * BS + 200,
    MiB + 7,
    srcSize - 1,
  ]);
  const src = join(dir, 'src.img');
  await writeFile(src, neu);

  const [{ summary }, sectors] = await sectorsWrittenDuring(dev, () => copyJson([src, dev]));
  const expected = [
    { start: 0, end: BS },
    { start: 5 * BS, end: 6 * BS },
    { start: MiB, end: MiB + BS },
    { start: lastBlock, end: srcSize },
  ];
  assert.deepEqual(summary.ranges, expected);
  assert.equal(summary.rangesWritten, 4);
  assert.equal(summary.blocksDiffering, 4);
  assert.equal(summary.bytesWritten, 3 * BS + 1234);
  assert.equal(summary.bytesTotal, srcSize);
  assert.equal(summary.destinationExtraBytes, devSize - srcSize);
  assert.equal(summary.created, false);

  const back = await readDevice(dev, devSize);
  assert.ok(back.subarray(0, srcSize).equals(neu), 'the device holds SRC');
  assert.ok(back.subarray(srcSize).equals(old.subarray(srcSize)), 'past SRC nothing changed');
  // the kernel saw only the differing blocks written (whole pages at most)
  assert.ok(sectors * 512 >= summary.bytesWritten, `device saw ${sectors} sectors written`);
  assert.ok(
    sectors * 512 <= pageSpan(expected),
    `device saw ${sectors} sectors written, expected at most ${pageSpan(expected) / 512}`,
  );

  // a rerun writes nothing, and says the device is larger than the image
  const [again, sectorsAgain] = await sectorsWrittenDuring(dev, () => runCli(['copy', src, dev]));
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stdout, /wrote 0 B in 0 ranges/);
  assert.match(again.stdout, /larger than the source; the rest was left untouched/);
  assert.equal(sectorsAgain, 0, 'a rerun with nothing to do writes nothing');
});

test('a device whose size is not a multiple of the block size is written to its last byte', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const size = 4 * MiB + 512; // loop devices come in 512-byte sectors
  const dev = await loopWith(t, dir, seededBytes(size, 21));
  assert.equal(await deviceSize(dev), size);
  const src = join(dir, 'src.img');
  const neu = seededBytes(size, 22);
  await writeFile(src, neu);

  const { summary } = await copyJson([src, dev]);
  assert.equal(summary.bytesWritten, size);
  assert.equal(summary.destinationExtraBytes, 0);
  assert.ok((await readDevice(dev, size)).equals(neu));

  // only the last, 512-byte block differs now
  await writeFile(src, mutate(neu, [size - 1]));
  const [{ summary: last }, sectors] = await sectorsWrittenDuring(dev, () => copyJson([src, dev]));
  assert.deepEqual(last.ranges, [{ start: size - 512, end: size }]);
  assert.equal(last.bytesWritten, 512);
  assert.ok(sectors >= 1 && sectors <= 8, `device saw ${sectors} sectors written`);
  assert.ok((await readDevice(dev, size)).equals(mutate(neu, [size - 1])));
});

test('a 4096-byte-sector device takes a 512-byte block size and a partial last sector', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const devSize = 8 * MiB;
  const old = seededBytes(devSize, 25);
  const backing = join(dir, 'backing.img');
  await writeFile(backing, old);
  const dev = await attachLoop(t, backing, { sectorSize: 4096 });
  const srcSize = 4 * MiB + 100;
  const neu = mutate(old.subarray(0, srcSize), [700, srcSize - 1]);
  const src = join(dir, 'src.img');
  await writeFile(src, neu);

  const { summary } = await copyJson(['-b', '512', src, dev]);
  assert.deepEqual(summary.ranges, [
    { start: 512, end: 1024 },
    { start: srcSize - 100, end: srcSize },
  ]);
  assert.equal(summary.bytesWritten, 612);
  const back = await readDevice(dev, devSize);
  assert.ok(back.subarray(0, srcSize).equals(neu), 'the device holds SRC');
  assert.ok(back.subarray(srcSize).equals(old.subarray(srcSize)), 'past SRC nothing changed');
});

test('a device smaller than SRC is refused before anything is written', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const old = seededBytes(4 * MiB, 31);
  const dev = await loopWith(t, dir, old);
  const src = join(dir, 'src.img');
  await writeFile(src, seededBytes(4 * MiB + 1, 32));

  const [res, sectors] = await sectorsWrittenDuring(dev, () => runCli(['copy', src, dev]));
  assertRefused(res, 'EDEST_TOO_SMALL');
  assert.match(res.stderr, /4194304 bytes/, 'the message gives the device size');
  assert.match(res.stderr, /4194305 bytes/, 'the message gives the source size');
  assert.equal(sectors, 0);
  assert.ok((await readDevice(dev, 4 * MiB)).equals(old));
});

test('--dry-run on a device reports the differing blocks and writes nothing', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const old = seededBytes(4 * MiB, 41);
  const dev = await loopWith(t, dir, old);
  const src = join(dir, 'src.img');
  await writeFile(src, mutate(old, [10, 2 * MiB, 4 * MiB - 1]));

  const [{ summary }, sectors] = await sectorsWrittenDuring(dev, () =>
    copyJson(['--dry-run', src, dev]),
  );
  assert.equal(summary.dryRun, true);
  assert.equal(summary.bytesWritten, 0);
  assert.equal(summary.bytesDiffering, 3 * BS);
  assert.deepEqual(summary.ranges, [
    { start: 0, end: BS },
    { start: 2 * MiB, end: 2 * MiB + BS },
    { start: 4 * MiB - BS, end: 4 * MiB },
  ]);
  assert.equal(sectors, 0, 'a dry run writes nothing');
  assert.ok((await readDevice(dev, 4 * MiB)).equals(old));

  const text = await runCli(['copy', '-n', src, dev]);
  assert.equal(text.code, 0, text.stderr);
  assert.match(text.stdout, /dry run: .*would write 12\.0 KiB in 3 ranges/);
});

test('--full on a device writes every block without reading it', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const size = 4 * MiB;
  const old = seededBytes(size, 51);
  const dev = await loopWith(t, dir, old);
  const src = join(dir, 'src.img');
  const neu = mutate(old, [MiB]);
  await writeFile(src, neu);

  const [{ summary }, sectors] = await sectorsWrittenDuring(dev, () =>
    copyJson(['--full', src, dev]),
  );
  assert.equal(summary.full, true);
  assert.equal(summary.bytesWritten, size);
  assert.equal(summary.bytesRead, 0);
  assert.ok(sectors * 512 >= size, `device saw only ${sectors} sectors written`);
  assert.ok((await readDevice(dev, size)).equals(neu));
});

test('a mounted device is refused, naming the mount point', async (t) => {
  if (!needLoop(t) || !(await needTool(t, 'mkfs.ext4', 'e2fsprogs'))) return;
  const dir = await tempDir(t);
  const size = 32 * MiB;
  const backing = join(dir, 'fs.img');
  await writeFile(backing, Buffer.alloc(0));
  await run('truncate', ['-s', String(size), backing]);
  const dev = await attachLoop(t, backing);
  await mkfsExt4(dev);
  const mnt = await mountLoop(t, dev);
  await run('sync');
  const src = join(dir, 'src.img');
  const srcData = seededBytes(size, 61);
  await writeFile(src, srcData);

  const res = await runCli(['copy', src, dev]);
  assertRefused(res, 'EDEST_MOUNTED');
  assert.ok(res.stderr.includes(mnt), `the message names ${mnt}: ${res.stderr}`);
  await assertNothingOfSrc(dev, srcData);

  const dry = await runCli(['copy', '--dry-run', src, dev]);
  assertRefused(dry, 'EDEST_MOUNTED');
  await assertNothingOfSrc(dev, srcData);
});

test('the backing file of a mounted loop device is refused as DST; unchanged', async (t) => {
  if (!needLoop(t) || !(await needTool(t, 'mkfs.ext4', 'e2fsprogs'))) return;
  const dir = await tempDir(t);
  const size = 32 * MiB;
  const backing = join(dir, 'fs.img');
  await writeFile(backing, Buffer.alloc(0));
  await run('truncate', ['-s', String(size), backing]);
  const dev = await attachLoop(t, backing);
  await mkfsExt4(dev);
  const mnt = await mountLoop(t, dev);
  await run('sync');
  const before = await readFile(backing);
  const src = join(dir, 'src.img');
  await writeFile(src, seededBytes(size, 62));

  for (const args of [
    ['copy', src, backing],
    ['copy', '--dry-run', src, backing],
  ]) {
    const res = await runCli(args);
    assertRefused(res, 'EDEST_MOUNTED');
    assert.ok(res.stderr.includes(dev) && res.stderr.includes(mnt), res.stderr);
  }
  assert.ok((await readFile(backing)).equals(before), 'the mounted file system was not written');
});

test('the backing file of a mounted loop device is refused through another link once its own name is gone', async (t) => {
  if (!needLoop(t) || !(await needTool(t, 'mkfs.ext4', 'e2fsprogs'))) return;
  const dir = await tempDir(t);
  const size = 32 * MiB;
  const backing = join(dir, 'fs.img');
  const kept = join(dir, 'kept.img');
  await writeFile(backing, Buffer.alloc(0));
  await run('truncate', ['-s', String(size), backing]);
  const dev = await attachLoop(t, backing);
  await mkfsExt4(dev);
  const mnt = await mountLoop(t, dev);
  await run('sync');
  // sysfs now names the file "fs.img (deleted)"; a new file takes the old name
  await link(backing, kept);
  await rm(backing);
  await writeFile(backing, Buffer.alloc(0));
  const before = await readFile(kept);
  const src = join(dir, 'src.img');
  await writeFile(src, seededBytes(size, 63));

  const res = await runCli(['copy', src, kept]);
  assertRefused(res, 'EDEST_MOUNTED');
  assert.ok(res.stderr.includes(dev) && res.stderr.includes(mnt), res.stderr);
  assert.ok((await readFile(kept)).equals(before), 'the mounted file system was not written');
});

test('a loop device and its backing file through another link, its own name gone, are one destination', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const backing = join(dir, 'disk.img');
  const kept = join(dir, 'kept.img');
  const src = join(dir, 'src.img');
  await writeFile(backing, seededBytes(4 * MiB, 73));
  await writeFile(src, seededBytes(4 * MiB, 74));
  const dev = await attachLoop(t, backing);
  await link(backing, kept);
  await rm(backing);
  const before = await readFile(kept);

  const res = await runCli(['copy', src, dev, kept]);
  assert.equal(res.code, 2, res.stderr);
  assert.match(res.stderr, /same file or device.*\[EUSAGE\]/);
  assert.ok((await readFile(kept)).equals(before), 'nothing was written');
});

test('a loop device over SRC, or over another destination, is the same file: refused', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  const other = join(dir, 'other.img');
  const srcData = seededBytes(4 * MiB, 71);
  const otherData = seededBytes(4 * MiB, 72);
  await writeFile(src, srcData);
  await writeFile(other, otherData);
  const overSrc = await attachLoop(t, src);
  const overOther = await attachLoop(t, other);
  const res = await runCli(['copy', src, overSrc]);
  assertRefused(res, 'ESAME_FILE');
  // fan-out: a file and a loop device over it are one destination given twice
  const twice = await runCli(['copy', src, other, overOther]);
  assert.equal(twice.code, 2, twice.stderr);
  assert.match(twice.stderr, /\[EUSAGE\]/);
  assert.ok((await readFile(src)).equals(srcData), 'SRC untouched');
  assert.ok((await readFile(other)).equals(otherData), 'the other destination untouched');
});

/** Skips (or fails under strict) unless the partitioning and file system tools are there. */
async function needDiskTools(t: TestContext): Promise<boolean> {
  return (
    needLoop(t) &&
    (await needTool(t, 'mkfs.ext4', 'e2fsprogs')) &&
    (await needTool(t, 'sfdisk', 'fdisk')) &&
    (await needTool(t, 'partx', 'util-linux'))
  );
}

test('a disk with a mounted partition is refused, naming the mount point', async (t) => {
  if (!(await needDiskTools(t))) return;
  const dir = await tempDir(t);
  const size = 64 * MiB;
  const { disk, part } = await partitionedLoop(t, join(dir, 'disk.img'), size);
  await mkfsExt4(part);
  const mnt = await mountLoop(t, part);
  await run('sync');
  const src = join(dir, 'src.img');
  const srcData = seededBytes(8 * MiB, 71);
  await writeFile(src, srcData);

  const res = await runCli(['copy', src, disk]);
  assertRefused(res, 'EDEST_MOUNTED');
  assert.ok(res.stderr.includes(mnt), `the message names ${mnt}: ${res.stderr}`);
  assert.match(res.stderr, /\(a partition of it\)/);

  const onPart = await runCli(['copy', src, part]);
  assertRefused(onPart, 'EDEST_MOUNTED');
  assert.ok(onPart.stderr.includes(mnt), `the message names ${mnt}: ${onPart.stderr}`);
  await assertNothingOfSrc(disk, srcData);
  await assertNothingOfSrc(part, srcData);
});

test('a partition of a mounted whole disk is refused, naming the mount point', async (t) => {
  if (!(await needDiskTools(t))) return;
  const dir = await tempDir(t);
  const size = 64 * MiB;
  const { disk, part } = await partitionedLoop(t, join(dir, 'disk.img'), size);
  // a file system over the whole disk, its stale partition still known to the kernel
  await mkfsExt4(disk);
  const mnt = await mountLoop(t, disk);
  await run('sync');
  const src = join(dir, 'src.img');
  const srcData = seededBytes(8 * MiB, 72);
  await writeFile(src, srcData);

  const res = await runCli(['copy', src, part]);
  assertRefused(res, 'EDEST_MOUNTED');
  assert.ok(res.stderr.includes(mnt), `the message names ${mnt}: ${res.stderr}`);
  assert.match(res.stderr, /\(its whole disk\)/);
  await assertNothingOfSrc(part, srcData);
});

test('a device mounted as btrfs (an anonymous device in mountinfo) is refused', async (t) => {
  if (!needLoop(t) || !(await needTool(t, 'mkfs.btrfs', 'btrfs-progs'))) return;
  const dir = await tempDir(t);
  const size = 128 * MiB; // mkfs.btrfs wants more than 109 MiB
  const backing = join(dir, 'fs.img');
  await writeFile(backing, Buffer.alloc(0));
  await run('truncate', ['-s', String(size), backing]);
  const dev = await attachLoop(t, backing);
  await run('mkfs.btrfs', ['-q', dev]);
  const mnt = await mountLoop(t, dev);
  const src = join(dir, 'src.img');
  const srcData = seededBytes(8 * MiB, 75);
  await writeFile(src, srcData);

  const res = await runCli(['copy', src, dev]);
  assertRefused(res, 'EDEST_MOUNTED');
  assert.ok(res.stderr.includes(mnt), `the message names ${mnt}: ${res.stderr}`);
  await assertNothingOfSrc(dev, srcData);
});

test('a device used as swap, or whose partition is, is refused', async (t) => {
  if (
    !(await needDiskTools(t)) ||
    !(await needTool(t, 'mkswap', 'util-linux')) ||
    !(await needTool(t, 'swapon', 'util-linux'))
  ) {
    return;
  }
  const dir = await tempDir(t);
  const size = 64 * MiB;
  const { disk, part } = await partitionedLoop(t, join(dir, 'disk.img'), size);
  await swapOn(t, part);
  const src = join(dir, 'src.img');
  await writeFile(src, seededBytes(8 * MiB, 73));
  const before = sha256(await readDevice(disk, size));

  const onPart = await runCli(['copy', src, part]);
  assertRefused(onPart, 'EDEST_BUSY');
  assert.match(onPart.stderr, new RegExp(`in use as swap; .*swapoff ${part}`));
  const onDisk = await runCli(['copy', src, disk]);
  assertRefused(onDisk, 'EDEST_BUSY');
  assert.match(
    onDisk.stderr,
    new RegExp(`in use as swap \\(a partition of it\\); .*swapoff ${part}`),
  );
  assert.equal(sha256(await readDevice(disk, size)), before, 'the disk is untouched');
});

test('a disk whose partition another program holds exclusively is refused', async (t) => {
  if (!(await needDiskTools(t))) return;
  const dir = await tempDir(t);
  const size = 64 * MiB;
  const { disk, part } = await partitionedLoop(t, join(dir, 'disk.img'), size);
  const src = join(dir, 'src.img');
  await writeFile(src, seededBytes(8 * MiB, 74));
  await holdExclusive(t, part);
  const before = sha256(await readDevice(disk, size));

  const [res, sectors] = await sectorsWrittenDuring(disk, () => runCli(['copy', src, disk]));
  assertRefused(res, 'EDEST_BUSY');
  assert.equal(sectors, 0);
  assert.equal(sha256(await readDevice(disk, size)), before, 'the disk is untouched');
});

test('a device another program holds exclusively is refused', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const old = seededBytes(4 * MiB, 81);
  const dev = await loopWith(t, dir, old);
  const src = join(dir, 'src.img');
  await writeFile(src, seededBytes(4 * MiB, 82));
  await holdExclusive(t, dev);

  const [res, sectors] = await sectorsWrittenDuring(dev, () => runCli(['copy', src, dev]));
  assertRefused(res, 'EDEST_BUSY');
  assert.match(res.stderr, new RegExp(`${dev} is in use`));
  assert.equal(sectors, 0);
  assert.ok((await readDevice(dev, 4 * MiB)).equals(old));
});

test('a missing /dev path is an error and nothing is created, however it is spelled', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  await writeFile(src, seededBytes(64 * 1024, 91));
  const name = `blksync-test-missing-${process.pid}`;
  // should a regression create the file, do not leave it in /dev
  t.after(() => rm(`/dev/${name}`, { force: true }));
  const devLink = join(dir, 'devlink');
  await symlink('/dev', devLink);
  const spellings = [
    `/dev/${name}`,
    `//dev/${name}`,
    relative(process.cwd(), `/dev/${name}`),
    join(devLink, name),
    `/dev/disk/by-id/${name}`,
  ];
  for (const [i, missing] of spellings.entries()) {
    const res = await runCli(['copy', ...(i === 0 ? ['--dry-run'] : []), src, missing]);
    assertRefused(res, 'EDEST_MISSING');
    assert.ok(res.stderr.includes(missing), res.stderr);
    assert.equal(existsSync(`/dev/${name}`), false, `${missing} must not be created`);
  }
});

test('SRC and DST the same device is refused, also through another device node', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const old = seededBytes(4 * MiB, 101);
  const dev = await loopWith(t, dir, old);

  const [res, sectors] = await sectorsWrittenDuring(dev, () => runCli(['copy', dev, dev]));
  assertRefused(res, 'ESAME_FILE');
  assert.equal(sectors, 0);

  // a second node for the same device (as /dev/disk/by-id/... would be)
  const rdev = statSync(dev).rdev;
  const alias = join(dir, 'alias');
  const major = (rdev >>> 8) & 0xfff;
  const minor = (rdev & 0xff) | ((rdev >>> 12) & 0xfff00);
  await run('mknod', [alias, 'b', String(major), String(minor)]);
  const viaAlias = await runCli(['copy', alias, dev]);
  assertRefused(viaAlias, 'ESAME_FILE');
  assert.ok((await readDevice(dev, 4 * MiB)).equals(old));
});

test('a partition and its own disk are refused as SRC and DST', async (t) => {
  if (!(await needDiskTools(t))) return;
  const dir = await tempDir(t);
  const size = 64 * MiB;
  const { disk, part } = await partitionedLoop(t, join(dir, 'disk.img'), size);
  const before = sha256(await readDevice(disk, size));

  // the partition's content written over the disk would overwrite the partition as it is read
  const [res, sectors] = await sectorsWrittenDuring(disk, () => runCli(['copy', part, disk]));
  assertRefused(res, 'ESAME_FILE');
  const back = await runCli(['copy', disk, part]);
  assert.equal(back.code, 1, back.stderr);
  assert.match(back.stderr, /\[(ESAME_FILE|EDEST_TOO_SMALL)\]/);
  assert.equal(sectors, 0);
  assert.equal(sha256(await readDevice(disk, size)), before, 'the disk is untouched');
});

test('a device SRC written during the copy (its write counter moves) fails ESRC_CHANGED', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const size = 16 * MiB;
  const dev = await loopWith(t, dir, seededBytes(size, 51));
  const dst = join(dir, 'dst.img');
  let written = false;
  await assert.rejects(
    copy(dev, dst, {
      chunkSize: MiB,
      depth: 1,
      onProgress: (p) => {
        if (written || p.bytesScanned === 0) return;
        written = true;
        // O_SYNC: the write reaches the device (and its counter) at once
        const fd = openSync(dev, constants.O_WRONLY | constants.O_SYNC);
        writeSync(fd, seededBytes(BS, 52), 0, BS, size - BS);
        fsyncSync(fd);
        closeSync(fd);
      },
    }),
    (e: unknown) => {
      assert.ok(e instanceof BlksyncError, String(e));
      assert.equal(e.code, 'ESRC_CHANGED', e.message);
      assert.match(e.message, /count of sectors written/);
      return true;
    },
  );
  // left alone, it copies
  await copy(dev, dst);
  assert.ok((await readFile(dst)).equals(await readDevice(dev, size)));
});

/** A loop device over a partition, holding SRC's bytes, then written through the disk. */
async function staleUnderLoop(t: TestContext) {
  const dir = await tempDir(t);
  const { disk, part } = await partitionedLoop(t, join(dir, 'disk.img'), 64 * MiB);
  // the loop device holds the partition open, so the partition's page cache outlives each run
  const dev = await attachLoop(t, part);
  const neu = seededBytes(16 * MiB, 71);
  const src = join(dir, 'new.img');
  await writeFile(src, neu);
  assert.equal((await runCli(['copy', src, dev])).code, 0);
  assert.deepEqual(await readDevice(dev, neu.length), neu); // now cached
  // written through the whole disk (the partition starts at 1 MiB), synced
  const fh = await open(disk, 'r+');
  await fh.write(Buffer.alloc(BS, 0x5a), 0, BS, MiB + 5 * MiB);
  await fh.sync();
  await fh.close();
  return { src, dev, part, neu };
}

async function holdsSrc(part: string, neu: Buffer): Promise<void> {
  await run('blockdev', ['--flushbufs', part]);
  assert.deepEqual(await readDevice(part, neu.length), neu);
}

test('a loop device over a partition written through its disk: the copy compares the device, not a stale cache', async (t) => {
  if (!needLoop(t) || !(await needTool(t, 'sfdisk', 'fdisk'))) return;
  const s = await staleUnderLoop(t);
  const r = await runCli(['copy', s.src, s.dev, '--json']);
  assert.equal(r.code, 0, r.stderr);
  const written = (JSON.parse(r.stdout) as CopyResult).bytesWritten;
  assert.equal(written, BS, 'the changed block is written back');
  await holdsSrc(s.part, s.neu);
});

describe('pulled from a remote SRC', () => {
  const server = sharedSshd();
  test('the same device DST: compared anew, not from a stale cache', async (t) => {
    const ssh = server(t);
    if (!ssh || !needLoop(t) || !(await needTool(t, 'sfdisk', 'fdisk'))) return;
    const s = await staleUnderLoop(t);
    const r = await copy(`${ssh.host}:${s.src}`, s.dev, { remote: { ssh: ssh.ssh } });
    assert.equal(r.bytesWritten, BS, 'the changed block is written back');
    await holdsSrc(s.part, s.neu);
  });
});
