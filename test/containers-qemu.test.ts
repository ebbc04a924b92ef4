/**
 * Virtual disks built by the real qemu-img (qcow2, compressed qcow2, an overlay on a backing
 * file, VHD fixed and dynamic, VMDK sparse and streamOptimized, VDI) are decoded: DST ends
 * equal to `qemu-img convert -O raw`, the delta is kept on a loop device (writes counted by
 * the kernel), a fixed VHD needs no qemu-img, and without qemu-img the others are refused
 * naming qemu-utils, before anything is written.
 */

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { copy } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import { runCli } from './helpers/cli.js';
import { attachLoop, ioStat, needLoop, needTool, readDevice } from './helpers/loop.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const run = promisify(execFile);
const BS = 4096;
const MiB = 1024 * 1024;

/** 8 MiB: data, zeros, data (a size VHD's geometry keeps as it is is not needed: compared with qemu's own output). */
function image(seed: number): Buffer {
  return Buffer.concat([
    seededBytes(3 * MiB, seed),
    Buffer.alloc(4 * MiB),
    seededBytes(MiB, seed + 1),
  ]);
}

async function reference(src: string, format: string, out: string): Promise<Buffer> {
  await run('qemu-img', ['convert', '-f', format, '-O', 'raw', src, out]);
  return readFile(out);
}

test('qcow2 (plain, compressed), VHD (fixed, dynamic), VMDK (sparse, streamOptimized) and VDI decode as qemu-img does', async (t) => {
  if (!(await needTool(t, 'qemu-img', 'qemu-utils'))) return;
  const dir = await tempDir(t);
  const raw = join(dir, 'os.raw');
  await writeFile(raw, image(1));
  const cases: [string, string, string[]][] = [
    ['a.qcow2', 'qcow2', ['-O', 'qcow2']],
    ['c.qcow2', 'qcow2', ['-O', 'qcow2', '-c']],
    ['fixed.vhd', 'vpc', ['-O', 'vpc', '-o', 'subformat=fixed']],
    ['dynamic.vhd', 'vpc', ['-O', 'vpc', '-o', 'subformat=dynamic']],
    ['sparse.vmdk', 'vmdk', ['-O', 'vmdk']],
    ['stream.vmdk', 'vmdk', ['-O', 'vmdk', '-o', 'subformat=streamOptimized']],
    ['a.vdi', 'vdi', ['-O', 'vdi']],
  ];
  for (const [name, format, args] of cases) {
    const src = join(dir, name);
    await run('qemu-img', ['convert', '-f', 'raw', ...args, raw, src]);
    const want = await reference(src, format, join(dir, `${name}.ref`));
    const dst = join(dir, `${name}.out`);
    await copy(src, dst);
    assert.ok((await readFile(dst)).equals(want), `${name}: DST equals qemu-img's raw image`);
    assert.ok(want.subarray(0, 8 * MiB).equals(await readFile(raw)), `${name}: the image itself`);
    const again = await copy(src, dst);
    assert.equal(again.bytesWritten, 0, `${name}: nothing differs the second time`);
  }
});

test('a qcow2 onto a loop device writes only the blocks that differ (kernel write counters)', async (t) => {
  if (!(await needTool(t, 'qemu-img', 'qemu-utils'))) return;
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const raw = join(dir, 'os.raw');
  const bytes = image(2);
  await writeFile(raw, bytes);
  const disk = join(dir, 'disk');
  // DST holds the image but for 3 blocks
  const old = Buffer.from(bytes);
  for (const b of [5, 900, 1800]) seededBytes(BS, b).copy(old, b * BS);
  await writeFile(disk, old);
  const dev = await attachLoop(t, disk);
  const qcow = join(dir, 'os.qcow2');
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-c', raw, qcow]);
  const before = await ioStat(dev);
  const res = await runCli(['copy', '--json', qcow, dev]);
  assert.equal(res.code, 0, res.stderr);
  const after = await ioStat(dev);
  const summary = JSON.parse(res.stdout) as { bytesWritten: number };
  assert.equal(summary.bytesWritten, 3 * BS);
  assert.ok(
    (after.writeSectors - before.writeSectors) * 512 <= 3 * BS,
    'only 3 blocks reached the device',
  );
  assert.ok((await readDevice(dev, bytes.length)).equals(bytes));
});

test("a qcow2 overlay reads through its backing file, named relative to the overlay's directory", async (t) => {
  if (!(await needTool(t, 'qemu-io', 'qemu-utils'))) return;
  const dir = await tempDir(t);
  await mkdir(join(dir, 'vm'));
  const base = join(dir, 'vm', 'base.raw');
  const bytes = image(3);
  await writeFile(base, bytes);
  const overlay = join(dir, 'vm', 'overlay.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', overlay]);
  await run('qemu-io', ['-c', 'write -P 0xab 1M 64k', overlay]);
  const want = Buffer.from(bytes);
  want.fill(0xab, MiB, MiB + 64 * 1024);
  const dst = join(dir, 'dst');
  const warnings: string[] = [];
  await copy(overlay, dst, { onWarning: (w) => warnings.push(w.message) });
  assert.ok((await readFile(dst)).equals(want));
  assert.match(warnings.join('\n'), /its backing file base\.raw is read too/);
  // from stdin the backing file could not be resolved: refused, nothing written
  const viaStdin = join(dir, 'stdin.out');
  const r = await runCli(['copy', '-', viaStdin], { input: await readFile(overlay) });
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /overlay of base\.raw/);
  assert.equal(existsSync(viaStdin), false);
});

test("a VMDK descriptor's extent and a qcow2's data file name other files: warned from a file, refused from a stream", async (t) => {
  if (!(await needTool(t, 'qemu-img', 'qemu-utils'))) return;
  const dir = await tempDir(t);
  const secret = join(dir, 'secret');
  const vmdk = join(dir, 'desc.vmdk');
  await writeFile(
    vmdk,
    `# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 2048 FLAT "${secret}" 0\n`,
  );
  const qcow = join(dir, 'ext.qcow2');
  await run('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-o',
    `data_file=${secret},data_file_raw=on`,
    qcow,
    '1M',
  ]);
  // written after qemu-img create, which makes the data file anew
  const bytes = seededBytes(MiB, 11);
  await writeFile(secret, bytes);
  for (const src of [vmdk, qcow]) {
    // from a file: read as qemu-img reads it, with a warning naming the other file
    const dst = `${src}.out`;
    const warnings: string[] = [];
    await copy(src, dst, { onWarning: (w) => warnings.push(`${w.code} ${w.message}`) });
    assert.ok((await readFile(dst)).equals(bytes));
    assert.ok(warnings.some((w) => w.startsWith('WSRC_BACKING') && w.includes(secret)));
    // from a stream (a URL, a pipe) the name would be resolved on this machine: refused
    const viaStdin = `${src}.stdin`;
    const r = await runCli(['copy', '-', viaStdin], { input: await readFile(src) });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /cannot be resolved from a stream.*\[ESRC_CONTAINER\]/);
    assert.equal(existsSync(viaStdin), false);
  }
});

test('without qemu-img: a fixed VHD still decodes; a qcow2 is refused naming qemu-utils, no DST', async (t) => {
  if (!(await needTool(t, 'qemu-img', 'qemu-utils'))) return;
  const dir = await tempDir(t);
  const raw = join(dir, 'os.raw');
  await writeFile(raw, image(4));
  const vhd = join(dir, 'fixed.vhd');
  const qcow = join(dir, 'os.qcow2');
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=fixed', raw, vhd]);
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow]);
  const want = await reference(vhd, 'vpc', join(dir, 'vhd.ref'));
  // a PATH with node and the tools the CLI needs, but no qemu-img
  const bin = join(dir, 'bin');
  await mkdir(bin);
  await symlink(process.execPath, join(bin, 'node'));
  const env = { PATH: bin };
  const fixed = await runCli(['copy', vhd, join(dir, 'vhd.out')], { env });
  assert.equal(fixed.code, 0, fixed.stderr);
  assert.ok((await readFile(join(dir, 'vhd.out'))).equals(want));
  const refused = await runCli(['copy', qcow, join(dir, 'q.out')], { env });
  assert.notEqual(refused.code, 0);
  assert.match(refused.stderr, /qcow2.*qemu-img.*apt-get install qemu-utils/);
  assert.equal(existsSync(join(dir, 'q.out')), false);
});

test('a damaged qcow2 is refused before any write (qemu-img says why)', async (t) => {
  if (!(await needTool(t, 'qemu-img', 'qemu-utils'))) return;
  const dir = await tempDir(t);
  const raw = join(dir, 'os.raw');
  await writeFile(raw, image(5));
  const qcow = join(dir, 'os.qcow2');
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow]);
  const q = await readFile(qcow);
  // the L1 table's offset (header byte 40) pointed far past the end
  q.writeBigUInt64BE(0x7fff_0000_0000n, 40);
  await writeFile(qcow, q);
  const dst = join(dir, 'dst');
  await assert.rejects(copy(qcow, dst), (err: unknown) => {
    assert.ok(err instanceof BlksyncError);
    assert.equal(err.code, 'ESRC_CORRUPT');
    return true;
  });
  assert.equal(existsSync(dst), false);
});

test('a truncated VDI or qcow (v1), whose data qemu-img would read as zeros past the end, is refused before any write', async (t) => {
  if (!(await needTool(t, 'qemu-img', 'qemu-utils'))) return;
  const dir = await tempDir(t);
  const raw = join(dir, 'os.raw');
  await writeFile(raw, image(6));
  for (const format of ['vdi', 'qcow']) {
    const src = join(dir, `os.${format}`);
    await run('qemu-img', ['convert', '-f', 'raw', '-O', format, raw, src]);
    const whole = await readFile(src);
    // cut inside the last data cluster: qemu-img check finds nothing and convert exits 0
    await writeFile(src, whole.subarray(0, whole.length - 64 * 1024));
    const dst = join(dir, `${format}.out`);
    await assert.rejects(copy(src, dst), (err: unknown) => {
      assert.ok(err instanceof BlksyncError);
      assert.equal(err.code, 'ESRC_SHORT', err.message);
      assert.match(err.message, /truncated/);
      return true;
    });
    assert.equal(existsSync(dst), false);
  }
});

test('a full temporary directory is EWRITE naming it, not a damaged image (from a file and spooled)', async (t) => {
  if (!(await needTool(t, 'qemu-img', 'qemu-utils')) || !needLoop(t)) return; // mount needs root
  const dir = await tempDir(t);
  const raw = join(dir, 'os.raw');
  await writeFile(raw, image(8));
  const qcow = join(dir, 'os.qcow2');
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow]);
  const small = await mkdtemp(join(tmpdir(), 'blksync-tmpfs-'));
  await run('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', small]);
  t.after(async () => {
    await run('umount', [small]);
    await rm(small, { recursive: true, force: true });
  });
  const env = { ...process.env, TMPDIR: small };
  const dst = join(dir, 'dst');
  for (const r of [
    await runCli(['copy', '-q', qcow, dst], { env }),
    await runCli(['copy', '-q', '-', dst], { env, input: await readFile(qcow) }),
  ]) {
    assert.equal(r.code, 1);
    const last = r.stderr.trimEnd().split('\n').pop()!;
    assert.match(last, /^blksync: .*temporary directory .*blksync-tmpfs-.*TMPDIR.*\[EWRITE\]$/);
    assert.doesNotMatch(r.stderr, /good copy/);
    assert.equal(existsSync(dst), false);
  }
});

test('a sound qcow2 of 1 PiB onto a small DST is not called damaged (its size is the trouble)', async (t) => {
  if (!(await needTool(t, 'qemu-img', 'qemu-utils'))) return;
  const dir = await tempDir(t);
  const qcow = join(dir, 'huge.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '1P']);
  const dst = join(dir, 'dst');
  const before = Buffer.alloc(MiB, 7);
  await writeFile(dst, before);
  const r = await runCli(['copy', qcow, dst]);
  assert.equal(r.code, 1);
  // the temporary file cannot be that large (ext4), or DST is too small (a larger file system)
  assert.match(r.stderr, /(temporary directory.*TMPDIR.*\[EWRITE\]|\[EDEST_TOO_SMALL\])\n$/);
  assert.doesNotMatch(r.stderr, /good copy/);
  assert.ok((await readFile(dst)).equals(before));
});

test("the seed's overlay commit: an overlay of DST itself copies only its own clusters (DST reads counted)", async (t) => {
  if (!(await needTool(t, 'qemu-io', 'qemu-utils'))) return;
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const bytes = Buffer.concat([seededBytes(16 * MiB, 6), Buffer.alloc(16 * MiB)]);
  const disk = join(dir, 'disk');
  await writeFile(disk, bytes);
  const dev = await attachLoop(t, disk);
  const overlay = join(dir, 'overlay.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', dev, '-F', 'raw', overlay]);
  // the changes made in the overlay: 256 KiB of data (half of it equal to what DST holds),
  // and 128 KiB zeroed
  await run('qemu-io', ['-c', 'write -P 0xab 1M 128k', '-c', 'write -z 4M 128k', overlay]);
  await run('qemu-io', ['-c', `write -P 0 20M 128k`, overlay]);
  const want = Buffer.from(bytes);
  want.fill(0xab, MiB, MiB + 128 * 1024);
  want.fill(0, 4 * MiB, 4 * MiB + 128 * 1024);
  const allocated = 3 * 128 * 1024;

  const dry = await runCli(['copy', '--dry-run', '--json', overlay, dev]);
  assert.equal(dry.code, 0, dry.stderr);
  const plan = JSON.parse(dry.stdout) as { bytesDiffering: number; bytesScanned: number };
  assert.equal(plan.bytesScanned, allocated, 'only the overlay clusters are considered');
  assert.equal(plan.bytesDiffering, 2 * 128 * 1024, 'the zeros at 20M are there already');

  await run('blockdev', ['--flushbufs', dev]);
  const before = await ioStat(dev);
  const res = await runCli(['copy', '--json', overlay, dev]);
  assert.equal(res.code, 0, res.stderr);
  const after = await ioStat(dev);
  const summary = JSON.parse(res.stdout) as {
    bytesWritten: number;
    container: { overlayOfDestination?: boolean };
  };
  assert.equal(summary.container.overlayOfDestination, true);
  assert.equal(summary.bytesWritten, 2 * 128 * 1024);
  const read = (after.readSectors - before.readSectors) * 512;
  assert.ok(read <= 2 * allocated, `DST read ${read} bytes for ${allocated} allocated`);
  assert.ok((after.writeSectors - before.writeSectors) * 512 <= 2 * 128 * 1024);
  assert.ok((await readDevice(dev, bytes.length)).equals(want));
  // the same overlay onto another file: the whole image, through qemu-img
  const other = join(dir, 'other');
  await copy(overlay, other);
  assert.ok((await readFile(other)).equals(want));
});

test('a qcow2 given on stdin redirected from a file (`< os.qcow2`) is read by qemu-img through this process', async (t) => {
  if (!(await needTool(t, 'qemu-img', 'qemu-utils'))) return;
  const dir = await tempDir(t);
  const raw = join(dir, 'os.raw');
  const bytes = image(7);
  await writeFile(raw, bytes);
  const qcow = join(dir, 'os.qcow2');
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow]);
  const dst = join(dir, 'dst');
  const entry = fileURLToPath(new URL('./helpers/cli-entry.ts', import.meta.url));
  await run('sh', [
    '-c',
    '"$0" --import tsx "$1" copy -q - "$2" < "$3"',
    process.execPath,
    entry,
    dst,
    qcow,
  ]);
  assert.ok((await readFile(dst)).equals(bytes));
});
