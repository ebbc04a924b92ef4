/**
 * `blksync copy SRC DST1 DST2 …`: SRC read once for every destination, each destination
 * written only where it differs, and one that is refused or fails dropped while the others
 * finish. Loop devices (root) for the kernel's read and write counters; files and stdin
 * elsewhere.
 */

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { copyMany } from '../src/copy.js';
import type { CopyResult } from '../src/copy.js';
import { runCli, type CliResult } from './helpers/cli.js';
import {
  attachLoop,
  ioStat,
  mkfsExt4,
  mountLoop,
  needLoop,
  readDevice,
  run,
} from './helpers/loop.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const MiB = 1024 * 1024;
const KiB = 1024;

interface ManyJson {
  source: string;
  bytesTotal: number;
  sourceBytesRead: number;
  failed: number;
  destinations: {
    destination: string;
    result?: CopyResult;
    bytesRead: number;
    bytesWritten: number;
    error?: { code: string; message: string };
  }[];
}

/** SRC with `pieces` [offset, length] overwritten by other bytes: an older version of it. */
function olderVersion(src: Buffer, pieces: [number, number][], seed: number): Buffer {
  const out = Buffer.from(src);
  for (const [o, n] of pieces) seededBytes(n, seed + o).copy(out, o);
  return out;
}

/** Bytes of the 4 KiB blocks where `a` and `b` differ: what a copy must write. */
function differingBytes(a: Buffer, b: Buffer, bs = 4096): number {
  let n = 0;
  for (let o = 0; o < a.length; o += bs) {
    if (!a.subarray(o, o + bs).equals(b.subarray(o, o + bs))) n += Math.min(bs, a.length - o);
  }
  return n;
}

async function loopWith(t: TestContext, dir: string, name: string, content: Buffer) {
  const backing = join(dir, `${name}.img`);
  await writeFile(backing, content);
  return attachLoop(t, backing);
}

function parse(res: CliResult): ManyJson {
  assert.notEqual(res.stdout, '', `no JSON summary; stderr: ${res.stderr}`);
  return JSON.parse(res.stdout) as ManyJson;
}

test('four loop devices from one loop SRC: SRC read once, each written where it differs', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const size = 24 * MiB;
  const srcData = seededBytes(size, 1);
  const states: Record<string, Buffer> = {
    old: olderVersion(
      srcData,
      [
        [0, 64 * KiB],
        [5 * MiB + 12 * KiB, 300 * KiB],
        [size - 8 * KiB, 8 * KiB],
      ],
      7,
    ),
    zeros: Buffer.alloc(size),
    current: Buffer.from(srcData),
    older: olderVersion(srcData, [[2 * MiB, 9 * MiB]], 9),
  };
  const src = await loopWith(t, dir, 'src', srcData);
  const targets: Record<string, string> = {};
  for (const [name, data] of Object.entries(states)) {
    targets[name] = await loopWith(t, dir, name, data);
  }
  // SRC's cached pages would hide a second read from the counters: start with none
  await run('blockdev', ['--flushbufs', src]);
  const before = await Promise.all([src, ...Object.values(targets)].map((d) => ioStat(d)));

  const res = await runCli(['copy', '--json', src, ...Object.values(targets)]);
  assert.equal(res.code, 0, res.stderr);
  const summary = parse(res);

  const after = await Promise.all([src, ...Object.values(targets)].map((d) => ioStat(d)));
  const srcRead = (after[0]!.readSectors - before[0]!.readSectors) * 512;
  assert.ok(srcRead <= 1.1 * size, `SRC read ${srcRead} bytes for a ${size}-byte image`);
  assert.equal(summary.sourceBytesRead, size);
  assert.equal(summary.failed, 0);
  const names = Object.keys(states);
  for (const [i, name] of names.entries()) {
    const dev = targets[name]!;
    const own = differingBytes(srcData, states[name]!);
    const entry = summary.destinations[i]!;
    assert.equal(entry.destination, dev);
    assert.equal(entry.error, undefined);
    assert.equal(entry.bytesWritten, own, `${name}: bytes written`);
    assert.equal(entry.bytesRead, size, `${name}: read to compare`);
    const written = (after[i + 1]!.writeSectors - before[i + 1]!.writeSectors) * 512;
    assert.ok(
      written <= 1.1 * own + MiB,
      `${name}: the kernel saw ${written} bytes written for ${own} differing`,
    );
    if (own === 0) assert.equal(written, 0, `${name} was up to date: nothing written`);
    assert.ok((await readDevice(dev, size)).equals(srcData), `${name} now holds SRC`);
  }
});

test('SRC on stdin, readable once, reaches files in different states', async (t) => {
  const dir = await tempDir(t);
  const size = 20 * MiB + 5000;
  const srcData = seededBytes(size, 2);
  const old = join(dir, 'old.img');
  const zeros = join(dir, 'zeros.img');
  const fresh = join(dir, 'new.img');
  const oldData = olderVersion(srcData, [[3 * MiB, 100 * KiB]], 3);
  await writeFile(old, oldData);
  await writeFile(zeros, Buffer.alloc(size));
  // the last two come from a targets file, with a comment and a blank line
  const list = join(dir, 'targets.txt');
  await writeFile(list, `# the lab's cards\n\n  ${zeros}\n${fresh}\n`);

  const res = await runCli(
    ['copy', '--json', '--size', String(size), '-', old, '--targets', list],
    { input: srcData },
  );
  assert.equal(res.code, 0, res.stderr);
  const summary = parse(res);
  assert.deepEqual(
    summary.destinations.map((d) => d.destination),
    [old, zeros, fresh],
  );
  assert.equal(summary.sourceBytesRead, size);
  assert.equal(summary.destinations[0]!.bytesWritten, differingBytes(srcData, oldData));
  assert.equal(summary.destinations[2]!.result?.created, true);
  for (const f of [old, zeros, fresh]) {
    assert.ok((await readFile(f)).equals(srcData), `${f} holds SRC`);
  }
});

test('a URL SRC is fetched once for all destinations', async (t) => {
  const dir = await tempDir(t);
  const size = 12 * MiB;
  const srcData = seededBytes(size, 15);
  let gets = 0;
  const server = createServer((req, res) => {
    if (req.method === 'GET') gets++;
    if (req.url !== '/image.img') {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'Content-Length': String(size) }).end(srcData);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const { port } = server.address() as AddressInfo;
  const dsts = [join(dir, 'a.img'), join(dir, 'b.img'), join(dir, 'c.img')];
  await writeFile(dsts[1]!, olderVersion(srcData, [[4 * MiB, 8 * KiB]], 16));

  const res = await runCli([
    'copy',
    '--json',
    '--no-bmap',
    `http://127.0.0.1:${port}/image.img`,
    ...dsts,
  ]);
  assert.equal(res.code, 0, res.stderr);
  assert.equal(gets, 1, 'one GET of the image');
  assert.equal(parse(res).destinations[1]!.bytesWritten, 8 * KiB);
  for (const f of dsts) assert.ok((await readFile(f)).equals(srcData), f);
});

test('a destination that fails mid-run (full tmpfs) is dropped; the others finish', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const size = 32 * MiB; // well past the shared ring, so a stuck view would hang the rest
  const srcData = seededBytes(size, 4);
  const src = join(dir, 'src.img');
  await writeFile(src, srcData);
  const small = await mkdtemp(join(tmpdir(), 'blksync-tmpfs-'));
  await run('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', small]);
  t.after(async () => {
    await run('umount', [small]);
    await rm(small, { recursive: true, force: true });
  });
  const full = join(small, 'card.img');
  const file = join(dir, 'a.img');
  await writeFile(file, olderVersion(srcData, [[MiB, MiB]], 5));
  const dev = await loopWith(t, dir, 'b', Buffer.alloc(size));

  const res = await runCli(['copy', '--json', src, file, full, dev]);
  assert.equal(res.code, 1, res.stderr);
  const summary = parse(res);
  assert.equal(summary.failed, 1);
  const failed = summary.destinations[1]!;
  assert.equal(failed.destination, full);
  assert.equal(failed.error?.code, 'EWRITE');
  assert.match(res.stderr, new RegExp(`blksync: ${full}: .*no space left.*\\[EWRITE\\]`));
  assert.ok(failed.bytesWritten > 0 && failed.bytesWritten < size);
  assert.ok((await readFile(file)).equals(srcData));
  assert.ok((await readDevice(dev, size)).equals(srcData));
});

test('a destination too small is refused before anything is written to it', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const size = 12 * MiB;
  const srcData = seededBytes(size, 6);
  const src = join(dir, 'src.img');
  await writeFile(src, srcData);
  const smallData = seededBytes(8 * MiB, 8);
  const small = await loopWith(t, dir, 'small', smallData);
  const other = join(dir, 'other.img');
  const before = await ioStat(small);

  const res = await runCli(['copy', '--json', src, small, other]);
  assert.equal(res.code, 1, res.stderr);
  const summary = parse(res);
  assert.equal(summary.destinations[0]!.error?.code, 'EDEST_TOO_SMALL');
  assert.equal(summary.destinations[0]!.bytesWritten, 0);
  assert.equal((await ioStat(small)).writeSectors, before.writeSectors);
  assert.ok((await readDevice(small, smallData.length)).equals(smallData));
  assert.ok((await readFile(other)).equals(srcData));
  assert.equal(summary.destinations[1]!.result?.bytesWritten, size);
});

test('a read-only and a mounted destination are refused; the other is written', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const size = 8 * MiB;
  const srcData = seededBytes(size, 13);
  const src = join(dir, 'src.img');
  await writeFile(src, srcData);
  const roData = seededBytes(size, 14);
  const roBacking = join(dir, 'ro.img');
  await writeFile(roBacking, roData);
  const ro = (await run('losetup', ['-f', '--show', '-r', roBacking])).stdout.trim();
  t.after(() => run('losetup', ['-d', ro]));
  const mountedBacking = join(dir, 'fs.img');
  await writeFile(mountedBacking, Buffer.alloc(32 * MiB));
  const mounted = await attachLoop(t, mountedBacking);
  await mkfsExt4(mounted);
  await mountLoop(t, mounted);
  const file = join(dir, 'card.img');
  const before = await ioStat(ro);

  const res = await runCli(['copy', '--json', src, ro, mounted, file]);
  assert.equal(res.code, 1, res.stderr);
  const summary = parse(res);
  assert.deepEqual(
    summary.destinations.map((d) => d.error?.code),
    ['EDEST_READONLY', 'EDEST_MOUNTED', undefined],
  );
  assert.equal((await ioStat(ro)).writeSectors, before.writeSectors);
  assert.ok((await readDevice(ro, size)).equals(roData));
  assert.ok((await readFile(file)).equals(srcData));
});

test('several destinations: --index FILE and a destination given twice are usage errors', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  await writeFile(src, seededBytes(MiB, 1));
  const a = join(dir, 'a.img');
  const b = join(dir, 'b.img');
  await writeFile(a, Buffer.alloc(MiB));

  const indexed = await runCli(['copy', src, a, b, '--index', join(dir, 'x.idx')]);
  assert.equal(indexed.code, 2);
  assert.match(indexed.stderr, /--index .* describes one destination.*--index auto.*\[EUSAGE\]/);
  const twice = await runCli(['copy', src, a, b, join(dir, '.', 'a.img')]);
  assert.equal(twice.code, 2);
  assert.match(twice.stderr, /same file.*give each destination once \[EUSAGE\]/);
  assert.equal(existsSync(b), false, 'nothing created');
  assert.ok((await readFile(a)).equals(Buffer.alloc(MiB)), 'nothing written');
  // not there yet: two names of the path it would be created at, or a dangling link to it
  await symlink('b.img', join(dir, 'to-b'));
  for (const other of [join(dir, '.', 'b.img'), join(dir, 'to-b')]) {
    const created = await runCli(['copy', src, b, other]);
    assert.equal(created.code, 2, created.stderr);
    assert.match(created.stderr, /same file.*give each destination once \[EUSAGE\]/);
    assert.equal(existsSync(b), false, 'nothing created');
  }
});

test('a dry run to several destinations reports each and writes nothing', async (t) => {
  const dir = await tempDir(t);
  const size = 3 * MiB;
  const srcData = seededBytes(size, 17);
  const src = join(dir, 'src.img');
  await writeFile(src, srcData);
  const old = join(dir, 'old.img');
  const oldData = olderVersion(srcData, [[MiB, 4 * KiB]], 18);
  await writeFile(old, oldData);
  const missing = join(dir, 'new.img');

  const res = await runCli(['copy', '--json', '-n', src, old, missing]);
  assert.equal(res.code, 0, res.stderr);
  const summary = parse(res);
  assert.deepEqual(
    summary.destinations.map((d) => d.result?.bytesDiffering),
    [4 * KiB, size],
  );
  assert.deepEqual(
    summary.destinations.map((d) => d.bytesWritten),
    [0, 0],
  );
  assert.ok((await readFile(old)).equals(oldData), 'untouched');
  assert.equal(existsSync(missing), false, 'not created');
});

test('copyMany: --index auto keeps one cached index per destination', async (t) => {
  const dir = await tempDir(t);
  const size = 6 * MiB;
  const srcData = seededBytes(size, 11);
  const src = join(dir, 'src.img');
  await writeFile(src, srcData);
  const dsts = [join(dir, 'a.img'), join(dir, 'b.img')];
  await writeFile(dsts[0]!, Buffer.alloc(size));
  await writeFile(dsts[1]!, olderVersion(srcData, [[MiB, 4 * KiB]], 12));
  const cache = join(dir, 'cache');
  const env = process.env.XDG_CACHE_HOME;
  process.env.XDG_CACHE_HOME = cache;
  t.after(() => {
    if (env === undefined) delete process.env.XDG_CACHE_HOME;
    else process.env.XDG_CACHE_HOME = env;
  });

  const first = await copyMany(src, dsts, { index: 'auto' });
  assert.equal(first.failed, 0);
  const paths = first.destinations.map((d) => d.result?.index?.path);
  assert.ok(
    paths.every((p) => p?.startsWith(cache) === true),
    String(paths),
  );
  assert.notEqual(paths[0], paths[1]);
  // the second run knows both from their indexes: DST is read only for the sample
  const second = await copyMany(src, dsts, { index: 'auto' });
  for (const d of second.destinations) {
    assert.equal(d.result?.index?.mode, 'used');
    assert.equal(d.bytesWritten, 0);
    assert.ok(d.bytesRead < size / 4, `${d.destination} read ${d.bytesRead}`);
  }
  for (const f of dsts) assert.ok((await readFile(f)).equals(srcData));
});
