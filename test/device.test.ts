/**
 * `blksync copy` onto real block devices (loop devices, root only): what reaches the device,
 * what the kernel's write counters say was written, and every refusal (mounted, mounted
 * partition, held exclusively, too small, missing, same device) leaving the device untouched.
 */

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, statSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import type { CopyResult } from '../src/engine/copy.js';
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
  partitionOf,
  readDevice,
  run,
} from './helpers/loop.js';
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
  await writeFile(src, seededBytes(size, 61));
  const before = sha256(await readDevice(dev, size));

  const res = await runCli(['copy', src, dev]);
  assertRefused(res, 'EDEST_MOUNTED');
  assert.ok(res.stderr.includes(mnt), `the message names ${mnt}: ${res.stderr}`);
  assert.equal(sha256(await readDevice(dev, size)), before, 'the device is untouched');

  const dry = await runCli(['copy', '--dry-run', src, dev]);
  assertRefused(dry, 'EDEST_MOUNTED');
});

test('a disk with a mounted partition is refused, naming the mount point', async (t) => {
  if (
    !needLoop(t) ||
    !(await needTool(t, 'mkfs.ext4', 'e2fsprogs')) ||
    !(await needTool(t, 'sfdisk', 'fdisk')) ||
    !(await needTool(t, 'partx', 'util-linux'))
  ) {
    return;
  }
  const dir = await tempDir(t);
  const size = 64 * MiB;
  const backing = join(dir, 'disk.img');
  await writeFile(backing, Buffer.alloc(0));
  await run('truncate', ['-s', String(size), backing]);
  const sfdisk = run('sfdisk', ['-q', backing]);
  sfdisk.child.stdin!.end('label: gpt\nstart=2048, size=65536, type=linux\n');
  await sfdisk;
  const disk = await attachLoop(t, backing, { partscan: true });
  const part = await partitionOf(disk, 1);
  await mkfsExt4(part);
  const mnt = await mountLoop(t, part);
  await run('sync');
  const src = join(dir, 'src.img');
  await writeFile(src, seededBytes(8 * MiB, 71));
  const before = sha256(await readDevice(disk, size));

  const res = await runCli(['copy', src, disk]);
  assertRefused(res, 'EDEST_MOUNTED');
  assert.ok(res.stderr.includes(mnt), `the message names ${mnt}: ${res.stderr}`);
  assert.match(res.stderr, /partition/);

  const onPart = await runCli(['copy', src, part]);
  assertRefused(onPart, 'EDEST_MOUNTED');
  assert.ok(onPart.stderr.includes(mnt), `the message names ${mnt}: ${onPart.stderr}`);
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

test('a missing /dev path is an error and nothing is created', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  await writeFile(src, seededBytes(64 * 1024, 91));
  const missing = `/dev/blksync-test-missing-${process.pid}`;

  const res = await runCli(['copy', src, missing]);
  assertRefused(res, 'EDEST_MISSING');
  assert.ok(res.stderr.includes(missing));
  assert.equal(existsSync(missing), false, `${missing} must not be created`);
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
