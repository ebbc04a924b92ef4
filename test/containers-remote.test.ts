/**
 * Containers at a remote end, over a real OpenSSH server on 127.0.0.1: a remote SRC that is a
 * container is refused by the agent before anything is written (it would be copied as its
 * own bytes; blksync decodes only where it runs), and a local container pushed to a remote
 * DST is decoded here and sent as the image. With --raw, a remote container SRC is copied as
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

  test('a remote zip SRC is refused (ESRC_CONTAINER) before writing; a local one pushed is decoded', async (t) => {
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
    const pulled = await runCli(['copy', '--ssh', s.ssh, `${s.host}:${zip}`, fresh]);
    assert.equal(pulled.code, 1, pulled.stderr);
    assert.match(pulled.stderr, /is a zip archive.*\[ESRC_CONTAINER\]$/m);
    assert.match(pulled.stderr, /unpack it on/);
    assert.equal(existsSync(fresh), false, 'no DST created');
    const pushed = join(dir, 'pushed.img');
    const r = await runCli(['copy', '--ssh', s.ssh, zip, `${s.host}:${pushed}`]);
    assert.equal(r.code, 0, r.stderr);
    assert.ok((await readFile(pushed)).equals(data));
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
