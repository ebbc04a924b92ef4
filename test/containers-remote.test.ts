/**
 * Containers at a remote end, over a real OpenSSH server on 127.0.0.1: a remote SRC that is a
 * container is refused by its agent (it would be copied as its own bytes) and streamed
 * through here instead, decoded here (pulled, or relayed to another DST); a local container
 * pushed to a remote DST is decoded here and sent as the image. With --raw, a remote container SRC is copied as
 * it is (pulled, or relayed between two remote ends).
 */

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { promisify } from 'node:util';
import { runCli } from './helpers/cli.js';
import { needTool } from './helpers/loop.js';
import { sharedSshd } from './helpers/sshd.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;

describe('containers at a remote end', () => {
  const server = sharedSshd();

  test('a remote zip SRC is streamed through here and decoded (WSRC_STREAMED); a local one pushed is decoded', async (t) => {
    const s = server(t);
    if (!s) return;
    if (!(await needTool(t, 'python3', 'python3'))) return;
    const dir = await tempDir(t);
    const data = Buffer.concat([seededBytes(MiB, 3), Buffer.alloc(MiB), seededBytes(MiB + 7, 4)]);
    const img = join(dir, 'os.img');
    await writeFile(img, data);
    const zip = join(dir, 'os.zip');
    await run('python3', [
      '-c',
      'import sys,zipfile\nwith zipfile.ZipFile(sys.argv[1],"w",zipfile.ZIP_DEFLATED) as z: z.write(sys.argv[2],"os.img")',
      zip,
      img,
    ]);
    const fresh = join(dir, 'pulled.img');
    const pulled = await runCli(['copy', '--json', '--ssh', s.ssh, `${s.host}:${zip}`, fresh]);
    assert.equal(pulled.code, 0, pulled.stderr);
    assert.ok((await readFile(fresh)).equals(data), 'the image, not the zip');
    const result = JSON.parse(pulled.stdout) as {
      container?: { format: string };
      warnings?: { code: string }[];
    };
    assert.deepEqual(
      result.warnings?.map((w) => w.code),
      ['WSRC_STREAMED'],
    );
    // again onto DST holding the image: still decoded, nothing written
    const again = await runCli(['copy', '--json', '--ssh', s.ssh, `${s.host}:${zip}`, fresh]);
    assert.equal(again.code, 0, again.stderr);
    assert.equal((JSON.parse(again.stdout) as { bytesWritten: number }).bytesWritten, 0);
    const pushed = join(dir, 'pushed.img');
    const r = await runCli(['copy', '--ssh', s.ssh, zip, `${s.host}:${pushed}`]);
    assert.equal(r.code, 0, r.stderr);
    assert.ok((await readFile(pushed)).equals(data));
  });

  test('a remote tar.gz relayed to a remote DST is decoded on the way; a remote 7z is still refused', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const data = Buffer.concat([seededBytes(MiB + 512, 5), Buffer.alloc(MiB)]);
    await writeFile(join(dir, 'os.img'), data);
    const tgz = join(dir, 'os.tar.gz');
    await run('tar', ['-czf', tgz, '-C', dir, 'os.img']);
    const relayed = join(dir, 'relayed.img');
    await writeFile(relayed, seededBytes(data.length, 6));
    const r = await runCli(['copy', '--ssh', s.ssh, `${s.host}:${tgz}`, `${s.host}:${relayed}`]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /streamed whole through ssh/);
    assert.ok((await readFile(relayed)).equals(data), 'relayed as the image');
    // 7z's magic: not decoded here either, so refused, nothing created
    const sevenZip = join(dir, 'os.7z');
    await writeFile(
      sevenZip,
      Buffer.concat([Buffer.from('377abcaf271c0004', 'hex'), seededBytes(4096, 7)]),
    );
    const none = join(dir, 'none.img');
    const refused = await runCli(['copy', '--ssh', s.ssh, `${s.host}:${sevenZip}`, none]);
    assert.equal(refused.code, 1, refused.stderr);
    assert.match(refused.stderr, /7z.*\[ESRC_CONTAINER\]$/m);
    assert.equal(existsSync(none), false, 'no DST created');
  });

  test('a remote qcow2 SRC is streamed here, spooled to a file and decoded by qemu-img', async (t) => {
    const s = server(t);
    if (!s) return;
    if (!(await needTool(t, 'qemu-img', 'qemu-utils'))) return;
    const dir = await tempDir(t);
    const data = Buffer.concat([Buffer.alloc(MiB), seededBytes(MiB + 4096, 8), Buffer.alloc(MiB)]);
    const img = join(dir, 'os.img');
    await writeFile(img, data);
    const qcow2 = join(dir, 'os.qcow2');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', img, qcow2]);
    const pulled = join(dir, 'pulled.img');
    const r = await runCli(['copy', '--json', '--ssh', s.ssh, `${s.host}:${qcow2}`, pulled]);
    assert.equal(r.code, 0, r.stderr);
    assert.ok((await readFile(pulled)).equals(data), 'the disk, not the qcow2 file');
    const codes = (JSON.parse(r.stdout) as { warnings?: { code: string }[] }).warnings?.map(
      (w) => w.code,
    );
    assert.ok(codes?.includes('WSRC_STREAMED') && codes.includes('WSPOOLED'), String(codes));
  });

  test('--raw copies a remote zip SRC as it is: pulled, and relayed to a remote DST', async (t) => {
    const s = server(t);
    if (!s) return;
    if (!(await needTool(t, 'python3', 'python3'))) return;
    const dir = await tempDir(t);
    const img = join(dir, 'os.img');
    await writeFile(img, seededBytes(MiB + 5, 7));
    const zip = join(dir, 'os.zip');
    await run('python3', [
      '-c',
      'import sys,zipfile\nwith zipfile.ZipFile(sys.argv[1],"w",zipfile.ZIP_DEFLATED) as z: z.write(sys.argv[2],"os.img")',
      zip,
      img,
    ]);
    const zipBytes = await readFile(zip);
    const pulled = join(dir, 'pulled.zip');
    const r = await runCli(['copy', '--raw', '--ssh', s.ssh, `${s.host}:${zip}`, pulled]);
    assert.equal(r.code, 0, r.stderr);
    assert.ok((await readFile(pulled)).equals(zipBytes), 'pulled as it is');
    const relayed = join(dir, 'relayed.zip');
    const r2 = await runCli([
      'copy',
      '--raw',
      '--ssh',
      s.ssh,
      `${s.host}:${zip}`,
      `${s.host}:${relayed}`,
    ]);
    assert.equal(r2.code, 0, r2.stderr);
    assert.ok((await readFile(relayed)).equals(zipBytes), 'relayed as it is');
  });
});
