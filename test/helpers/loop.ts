/**
 * Loop devices for tests (root only). Everything set up here (loop devices, partitions,
 * mounts, helper processes) is torn down after the test, also when it fails, in the reverse
 * order of setup: a mount goes before the loop device under it.
 */

import { execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, open, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import type { TestContext } from 'node:test';
import { promisify } from 'node:util';
import { IS_ROOT, need } from './resources.js';

export const run = promisify(execFile);

type Cleanup = () => Promise<void>;
const stacks = new WeakMap<TestContext, Cleanup[]>();

/** Runs `fn` after the test, before everything registered earlier through this module. */
function defer(t: TestContext, fn: Cleanup): void {
  let stack = stacks.get(t);
  if (stack === undefined) {
    const fresh: Cleanup[] = [];
    stack = fresh;
    stacks.set(t, fresh);
    t.after(async () => {
      for (let f = fresh.pop(); f !== undefined; f = fresh.pop()) await f().catch(() => {});
    });
  }
  stack.push(fn);
}

/** True when this process can attach loop devices. */
export function loopAvailable(): boolean {
  return IS_ROOT && existsSync('/dev/loop-control');
}

/** Skips (or fails under strict) unless loop devices can be used. */
export function needLoop(t: TestContext): boolean {
  return need(t, loopAvailable(), 'loop devices need root and /dev/loop-control');
}

/** Skips (or fails under strict) unless `tool` is on the PATH. */
export async function needTool(t: TestContext, tool: string, pkg: string): Promise<boolean> {
  const found = await run('sh', ['-c', `command -v ${tool}`]).then(
    () => true,
    () => false,
  );
  return need(t, found, `${tool} is not installed (apt-get install ${pkg})`);
}

/** Names of the partitions the kernel knows for `dev` (e.g. ["loop3p1"]). */
async function partitionNames(dev: string): Promise<string[]> {
  const name = basename(dev);
  const entries = await readdir(`/sys/block/${name}`).catch(() => []);
  return entries.filter((e) => e.startsWith(`${name}p`));
}

/**
 * Attaches `file` to a free loop device; `partscan` adds -P and makes sure the partitions
 * exist (kernels built without partition-table parsers get them from `partx -a`);
 * `sectorSize` sets the logical sector size. Detached after the test.
 */
export async function attachLoop(
  t: TestContext,
  file: string,
  options: { partscan?: boolean; sectorSize?: number } = {},
): Promise<string> {
  const partscan = options.partscan === true;
  const args = ['-f', '--show', ...(partscan ? ['-P'] : [])];
  if (options.sectorSize !== undefined) args.push('--sector-size', String(options.sectorSize));
  args.push(file);
  const { stdout } = await run('losetup', args);
  const dev = stdout.trim();
  defer(t, async () => {
    if (partscan) await run('partx', ['-d', dev]).catch(() => {});
    await run('losetup', ['-d', dev]);
  });
  if (partscan && (await partitionNames(dev)).length === 0) {
    await run('partx', ['-a', dev]).catch(() => {});
  }
  return dev;
}

/** The device node of partition `n` of the partition-scanned loop device `dev`. */
export async function partitionOf(dev: string, n: number): Promise<string> {
  const part = `${dev}p${n}`;
  for (let i = 0; i < 50 && !existsSync(part); i++) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  if (!existsSync(part)) {
    throw new Error(`${part} did not appear (partitions: ${String(await partitionNames(dev))})`);
  }
  return part;
}

/** Makes an ext4 file system that does no background initialisation once mounted. */
export async function mkfsExt4(dev: string): Promise<void> {
  await run('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', dev]);
}

/** Makes `dev` a swap area and swaps on it until the test ends. */
export async function swapOn(t: TestContext, dev: string): Promise<void> {
  await run('mkswap', ['-f', dev]);
  await run('swapon', [dev]);
  defer(t, async () => {
    await run('swapoff', [dev]);
  });
}

/**
 * A disk image of `size` bytes with a GPT holding one 32 MiB partition at 1 MiB, attached
 * with its partitions; returns the disk and the partition.
 */
export async function partitionedLoop(
  t: TestContext,
  file: string,
  size: number,
): Promise<{ disk: string; part: string }> {
  const fh = await open(file, 'w');
  await fh.truncate(size);
  await fh.close();
  const sfdisk = run('sfdisk', ['-q', file]);
  sfdisk.child.stdin?.end('label: gpt\nstart=2048, size=65536, type=linux\n');
  await sfdisk;
  const disk = await attachLoop(t, file, { partscan: true });
  return { disk, part: await partitionOf(disk, 1) };
}

/** Mounts `dev` on a fresh directory; unmounted (and the directory removed) after the test. */
export async function mountLoop(t: TestContext, dev: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'blksync-mnt-'));
  defer(t, () => rm(dir, { recursive: true, force: true }));
  await run('mount', [dev, dir]);
  defer(t, async () => {
    await run('umount', [dir]);
  });
  return dir;
}

/**
 * Holds `dev` open with O_EXCL in another process (as mkfs, md or a second blksync would),
 * until the test ends. Resolves once the device is held.
 */
export async function holdExclusive(t: TestContext, dev: string): Promise<void> {
  const script =
    "const fs = require('node:fs');" +
    'fs.openSync(process.argv[1], fs.constants.O_RDONLY | fs.constants.O_EXCL);' +
    "process.stdout.write('held\\n');" +
    "process.stdin.on('data', () => {}).on('end', () => process.exit(0));";
  const child = spawn(process.execPath, ['-e', script, dev], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  defer(t, async () => {
    child.stdin.end();
    await exited;
  });
  await new Promise<void>((resolve, reject) => {
    child.stdout.once('data', () => resolve());
    child.once('exit', (code) => reject(new Error(`holding ${dev} failed (exit ${code})`)));
  });
}

/** Counters from /sys/class/block/NAME/stat (sectors are 512 bytes whatever the device's). */
export interface IoStat {
  readSectors: number;
  writeSectors: number;
}

export async function ioStat(dev: string): Promise<IoStat> {
  const text = await readFile(`/sys/class/block/${basename(dev)}/stat`, 'utf8');
  const f = text.trim().split(/\s+/).map(Number);
  return { readSectors: f[2] ?? 0, writeSectors: f[6] ?? 0 };
}

/** Reads `length` bytes of `dev` from `offset` (default: from 0). */
export async function readDevice(dev: string, length: number, offset = 0): Promise<Buffer> {
  const fh = await open(dev, 'r');
  try {
    const buf = Buffer.alloc(length);
    let got = 0;
    while (got < length) {
      const { bytesRead } = await fh.read(buf, got, length - got, offset + got);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    return buf.subarray(0, got);
  } finally {
    await fh.close();
  }
}

/** Size in bytes of the block device `dev`. */
export async function deviceSize(dev: string): Promise<number> {
  const text = await readFile(`/sys/class/block/${basename(dev)}/size`, 'utf8');
  return Number(text.trim()) * 512;
}
