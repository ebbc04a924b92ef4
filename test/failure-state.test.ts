/**
 * A failure says what state it left (issue 12 §2): a source that breaks after writes began
 * says DST was partly written, how much, and that a rerun converges; `--json` prints one error
 * object on every failure; what can be checked before the first write is (an index that
 * cannot be written, a read-only device); advice fits the target; data after a compressed
 * stream's end is refused alike for gzip and bzip2; SRC mounted read-write is warned about.
 */

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { describe, test, type TestContext } from 'node:test';
import { gzipSync } from 'node:zlib';
import { runCli, type CliResult } from './helpers/cli.js';
import {
  attachLoop,
  mkfsExt4,
  mountLoop,
  needLoop,
  needTool,
  readDevice,
  run,
} from './helpers/loop.js';
import { IS_ROOT, need } from './helpers/resources.js';
import { sharedSshd } from './helpers/sshd.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const MiB = 1024 * 1024;

interface ErrorObject {
  error: { code: string; message: string };
  bytesWritten?: number;
  destination?: string;
  warnings?: { code: string; message: string }[];
}

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** The one JSON object a failed `--json` run prints on stdout. */
function errorObject(r: CliResult): ErrorObject {
  const lines = r.stdout.trim().split('\n');
  assert.equal(lines.length, 1, `one JSON object on stdout, got: ${r.stdout}`);
  const parsed = JSON.parse(lines[0]!) as ErrorObject;
  assert.equal(typeof parsed.error, 'object', `error is an object: ${lines[0]}`);
  assert.equal(typeof parsed.error.code, 'string');
  assert.equal(typeof parsed.error.message, 'string');
  return parsed;
}

/** The partial-write sentence: DST named, an amount, and that a rerun converges. */
function assertPartlyWritten(stderr: string, dst: string): void {
  assert.match(
    stderr,
    new RegExp(`${dst.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')} was partly written`),
  );
  assert.match(stderr, /\(\d+(\.\d+)? [KMG]?i?B written before the failure/);
  assert.match(stderr, /rerun the same command.*converges/);
}

/** An 8 MiB image and an existing DST of the same size that differs everywhere. */
async function imageAndDst(
  t: TestContext,
): Promise<{ dir: string; image: Buffer; dst: string; before: string }> {
  const dir = await tempDir(t);
  const image = seededBytes(8 * MiB, 12);
  const dst = join(dir, 'dst.img');
  const old = seededBytes(8 * MiB, 13);
  await writeFile(dst, old);
  return { dir, image, dst, before: sha256(old) };
}

test('a gzip stream cut short on stdin after writes began: ESRC_SHORT, DST partly written, how much, rerun converges', async (t) => {
  const { image, dst } = await imageAndDst(t);
  const gz = gzipSync(image, { level: 1 });
  const cut = gz.subarray(0, Math.floor(gz.length * 0.6));
  const r = await runCli(['copy', '-', dst, '--size', String(image.length), '--json'], {
    input: cut,
  });
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr.split('\n')[0]!, /^blksync: .*\[ESRC_SHORT\]$/);
  assertPartlyWritten(r.stderr, dst);
  const obj = errorObject(r);
  assert.equal(obj.error.code, 'ESRC_SHORT');
  assert.ok((obj.bytesWritten ?? 0) >= MiB, `bytesWritten ${obj.bytesWritten}`);
  assert.equal(obj.destination, dst);
  // a rerun with the whole stream converges
  const gzFull = await runCli(['copy', '-', dst, '--size', String(image.length)], { input: gz });
  assert.equal(gzFull.code, 0, gzFull.stderr);
  assert.equal(sha256(await readFile(dst)), sha256(image));
});

test('a truncated compressed source is an ESRC_ code in one short line, from a file and from stdin alike', async (t) => {
  const dir = await tempDir(t);
  const image = seededBytes(4 * MiB, 21);
  for (const [tool, args] of [
    ['gzip', ['-1', '-c']],
    ['bzip2', ['-1', '-c']],
  ] as const) {
    if (!(await needTool(t, tool, tool))) return;
    const packed = execFileSync(tool, args, { input: image, maxBuffer: 64 * MiB });
    const cut = packed.subarray(0, Math.floor(packed.length / 2));
    const file = join(dir, `cut.${tool}`);
    await writeFile(file, cut);
    const fromFile = await runCli(['copy', file, join(dir, `a-${tool}.img`)]);
    assert.match(fromFile.stderr, /\[ESRC_(SHORT|CORRUPT)\]/, `${tool} file: ${fromFile.stderr}`);
    // one short line: the decoder's first line, not bzip2's screenful of advice
    const line = fromFile.stderr.trim();
    assert.ok(!line.includes('\n') && line.length < 300, `${tool}: ${line}`);
    const fromStdin = await runCli(
      ['copy', '-', join(dir, `b-${tool}.img`), '--size', String(image.length)],
      { input: cut },
    );
    assert.match(
      fromStdin.stderr,
      /\[ESRC_(SHORT|CORRUPT)\]/,
      `${tool} stdin: ${fromStdin.stderr}`,
    );
  }
});

test('an HTTP body cut mid-stream after writes began: ESRC_SHORT with the partial-write message and JSON', async (t) => {
  const { image, dst } = await imageAndDst(t);
  const server: Server = createServer((_req, res) => {
    res.writeHead(200, { 'content-length': image.length });
    // 6 MiB, then the connection drops
    res.write(image.subarray(0, 6 * MiB), () => res.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise((resolve) => server.close(resolve)));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/disk.img`;
  const r = await runCli(['copy', '--no-bmap', url, dst, '--json']);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr.split('\n')[0]!, /connection ended.*\[ESRC_SHORT\]$/);
  assertPartlyWritten(r.stderr, dst);
  const obj = errorObject(r);
  assert.equal(obj.error.code, 'ESRC_SHORT');
  assert.ok((obj.bytesWritten ?? 0) >= 4 * MiB, `bytesWritten ${obj.bytesWritten}`);
  const now = await readFile(dst);
  assert.ok(now.subarray(0, 4 * MiB).equals(image.subarray(0, 4 * MiB)), 'what was written is SRC');
});

test('--json prints one error object on stdout on every failure, also with nothing done', async (t) => {
  const dir = await tempDir(t);
  const r = await runCli(['copy', join(dir, 'missing.img'), join(dir, 'dst.img'), '--json']);
  assert.equal(r.code, 1);
  const obj = errorObject(r);
  assert.equal(obj.error.code, 'ESRC_OPEN');
  assert.match(obj.error.message, /missing\.img/);
  assert.equal(obj.bytesWritten, undefined, 'no partial fields where nothing is known');
  const usage = await runCli(['copy', '--json', '--bogus', 'a', 'b']);
  assert.equal(usage.code, 2);
  assert.equal(errorObject(usage).error.code, 'EUSAGE');
});

test('--size larger than the stream on stdin: ESRC_SHORT naming both sizes, and DST partly written', async (t) => {
  const { dir, image } = await imageAndDst(t);
  const dst = join(dir, 'new.img');
  const r = await runCli(['copy', '-', dst, '--size', String(2 * image.length)], { input: image });
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /\[ESRC_SHORT\]/);
  assert.doesNotMatch(r.stderr, /corrupt|damaged/);
  assert.match(r.stderr, new RegExp(String(image.length)));
  assert.match(r.stderr, new RegExp(String(2 * image.length)));
  assert.match(r.stderr, /--size/);
  assertPartlyWritten(r.stderr, dst);
});

test('an index that cannot be written is refused before DST is touched', async (t) => {
  const { dir, image, dst, before } = await imageAndDst(t);
  const src = join(dir, 'src.img');
  await writeFile(src, image);
  const index = join(dir, 'no-such-dir', 'dst.idx');
  const r = await runCli(['copy', src, dst, '--index', index]);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /\[EINDEX_WRITE\]/);
  assert.match(r.stderr, /no-such-dir/);
  assert.equal(sha256(await readFile(dst)), before, 'DST untouched');
  // a file where the directory should be
  await writeFile(join(dir, 'plain'), 'x');
  const r2 = await runCli(['copy', src, dst, '--index', join(dir, 'plain', 'dst.idx')]);
  assert.match(r2.stderr, /\[EINDEX_WRITE\]/);
  assert.equal(sha256(await readFile(dst)), before, 'DST untouched');
});

test('gzip and bzip2 with trailing garbage are treated alike: refused as ESRC_CORRUPT', async (t) => {
  const dir = await tempDir(t);
  const image = seededBytes(2 * MiB, 31);
  for (const [tool, args] of [
    ['gzip', ['-1', '-c']],
    ['bzip2', ['-1', '-c']],
  ] as const) {
    if (!(await needTool(t, tool, tool))) return;
    const packed = execFileSync(tool, args, { input: image, maxBuffer: 64 * MiB });
    const glued = Buffer.concat([packed, Buffer.from('this is not part of the image\n')]);
    const file = join(dir, `glued.${tool}`);
    await writeFile(file, glued);
    const dst = join(dir, `out-${tool}.img`);
    const r = await runCli(['copy', file, dst]);
    assert.equal(r.code, 1, `${tool}: ${r.stderr}`);
    assert.match(r.stderr, /data after the end of the .* stream.*\[ESRC_CORRUPT\]/, tool);
    assert.equal(existsSync(dst), false, `${tool}: nothing created`);
    const piped = await runCli(['copy', '-', dst, '--size', String(image.length)], {
      input: glued,
    });
    assert.match(piped.stderr, /data after the end of the .* stream.*\[ESRC_CORRUPT\]/, tool);
  }
});

test('a read-only device is refused at open, with a coded error that says read-only', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const old = seededBytes(4 * MiB, 41);
  const backing = join(dir, 'backing.img');
  await writeFile(backing, old);
  // attached read-only (losetup -r): the flag goes with the attachment. (blockdev --setro
  // would stay on the loop device for whoever attaches it next.)
  const { stdout } = await run('losetup', ['-f', '--show', '-r', backing]);
  const dev = stdout.trim();
  t.after(() => run('losetup', ['-d', dev]));
  const src = join(dir, 'src.img');
  await writeFile(src, seededBytes(4 * MiB, 42));
  const r = await runCli(['copy', src, dev, '--json']);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr.split('\n')[0]!, /read-only.*\[EDEST_READONLY\]$/);
  assert.doesNotMatch(r.stderr, /run as root/);
  // the advice that works for a loop device attached with -r (blockdev --setrw does not)
  assert.match(r.stderr, /attach its file again without -r/);
  assert.equal(errorObject(r).error.code, 'EDEST_READONLY');
  assert.ok((await readDevice(dev, old.length)).equals(old), 'device untouched');
  // a dry run only reads: allowed
  const dry = await runCli(['copy', '-n', src, dev]);
  assert.equal(dry.code, 0, dry.stderr);
});

test('EDEST_TOO_SMALL on a device does not suggest truncate; on a file it does', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const backing = join(dir, 'backing.img');
  await writeFile(backing, Buffer.alloc(4 * MiB));
  const dev = await attachLoop(t, backing);
  const src = join(dir, 'src.img');
  await writeFile(src, seededBytes(5 * MiB, 51));
  const r = await runCli(['copy', src, dev]);
  assert.match(r.stderr, /\[EDEST_TOO_SMALL\]/);
  assert.doesNotMatch(r.stderr, /truncate/);
  assert.match(r.stderr, /a device of at least 5\.00 MiB/);
  const small = join(dir, 'small.img');
  await writeFile(small, Buffer.alloc(MiB));
  const f = await runCli(['copy', src, small]);
  assert.match(f.stderr, /truncate -s \d+ .*\[EDEST_TOO_SMALL\]/);
});

test('SRC a device mounted read-write: copied with a warning; mounted read-only: no warning', async (t) => {
  if (!needLoop(t)) return;
  if (!(await needTool(t, 'mkfs.ext4', 'e2fsprogs'))) return;
  const dir = await tempDir(t);
  const backing = join(dir, 'backing.img');
  await writeFile(backing, Buffer.alloc(8 * MiB));
  const dev = await attachLoop(t, backing);
  await mkfsExt4(dev);
  const mnt = await mountLoop(t, dev);
  const out = join(dir, 'copy.img');
  const r = await runCli(['copy', dev, out, '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(
    r.stderr,
    /^blksync: warning: .* is mounted read-write on .*not be consistent.*\[WSRC_MOUNTED_RW\]$/m,
  );
  const summary = JSON.parse(r.stdout) as ErrorObject;
  assert.equal(summary.warnings?.[0]?.code, 'WSRC_MOUNTED_RW');
  await run('mount', ['-o', 'remount,ro', mnt]);
  const ro = await runCli(['copy', dev, out]);
  assert.equal(ro.code, 0, ro.stderr);
  assert.doesNotMatch(ro.stderr, /warning/);
});

describe('over ssh', () => {
  const server = sharedSshd();

  test('a push whose local stream is cut short after writes began: the same partial-write message and JSON', async (t) => {
    const s = server(t);
    if (s === undefined) return;
    const { image, dst } = await imageAndDst(t);
    const gz = gzipSync(image, { level: 1 });
    const cut = gz.subarray(0, Math.floor(gz.length * 0.6));
    const r = await runCli(
      ['copy', '--json', '--ssh', s.ssh, '--size', String(image.length), '-', `${s.host}:${dst}`],
      { input: cut },
    );
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr.split('\n')[0]!, /\[ESRC_SHORT\]$/);
    assertPartlyWritten(r.stderr, dst);
    const obj = errorObject(r);
    assert.equal(obj.error.code, 'ESRC_SHORT');
    assert.ok((obj.bytesWritten ?? 0) > 0, `bytesWritten ${obj.bytesWritten}`);
  });

  test('a push onto a read-only remote device is refused by the agent at open: EDEST_READONLY', async (t) => {
    const s = server(t);
    if (s === undefined) return;
    if (!needLoop(t)) return;
    const dir = await tempDir(t);
    const old = seededBytes(4 * MiB, 61);
    const backing = join(dir, 'backing.img');
    await writeFile(backing, old);
    const { stdout } = await run('losetup', ['-f', '--show', '-r', backing]);
    const dev = stdout.trim();
    t.after(() => run('losetup', ['-d', dev]));
    const src = join(dir, 'src.img');
    await writeFile(src, seededBytes(4 * MiB, 62));
    const r = await runCli(['copy', '--ssh', s.ssh, src, `${s.host}:${dev}`]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr.split('\n')[0]!, /read-only.*\[EDEST_READONLY\]$/);
    assert.ok((await readDevice(dev, old.length)).equals(old), 'device untouched');
  });
});

test('a DST root may not write (an immutable file): the hint does not tell root to run as root', async (t) => {
  if (!need(t, IS_ROOT, 'needs root (only root meets EPERM on an immutable file it owns)')) return;
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  await writeFile(src, seededBytes(MiB, 51));
  const old = seededBytes(MiB, 52);
  await writeFile(dst, old);
  let immutable = true;
  try {
    execFileSync('chattr', ['+i', dst], { stdio: 'ignore' });
  } catch {
    immutable = false;
  }
  if (!need(t, immutable, 'chattr +i is not supported on the temporary directory')) return;
  let r: CliResult;
  try {
    r = await runCli(['copy', src, dst]);
  } finally {
    // before the temporary directory is removed, which an immutable file would stop
    execFileSync('chattr', ['-i', dst], { stdio: 'ignore' });
  }
  assert.equal(r.code, 1, r.stderr);
  const line = r.stderr.trim().split('\n')[0]!;
  assert.match(line, /operation not permitted, even to root .*chattr -i/);
  assert.doesNotMatch(r.stderr, /run as root/);
  assert.ok((await readFile(dst)).equals(old), 'DST untouched');
});
