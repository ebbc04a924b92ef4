/**
 * Reports that must say what was done, not what was meant to be done: an interrupted apply's
 * summary, and an index of SRC that `--src-index` could not write (its ctime ahead of the
 * clock, as after a clock set back or a file from another host's clock).
 */

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { applySummary } from '../src/cli/apply-command.js';
import { copy } from '../src/copy.js';
import type { ApplyResult } from '../src/engine/apply.js';
import { settledPast } from '../src/io/ctime-watch.js';
import { runCli } from './helpers/cli.js';
import { attachLoop, mountLoop, needLoop, needTool, run } from './helpers/loop.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const MIB = 1024 * 1024;

function applied(over: Partial<ApplyResult>): ApplyResult {
  return {
    patch: '-',
    target: 'dst.img',
    reverse: false,
    dryRun: false,
    alreadyApplied: false,
    blockSize: 4096,
    fromSize: 8 * MIB,
    toSize: 8 * MIB,
    compression: 'none',
    patchVersion: 2,
    records: 10,
    recordsWritten: 4,
    recordsAlreadyApplied: 0,
    recordsForced: 0,
    bytesWritten: 4 * 4096,
    recordsToWrite: 10,
    bytesToWrite: 10 * 4096,
    bytesRead: 0,
    unchangedChecked: true,
    resized: false,
    streamed: true,
    seconds: 0.5,
    ...over,
  };
}

test('an apply interrupted after 4 of 10 records says it wrote 4, not the 10 it set out to write', () => {
  const line = applySummary(applied({}), false);
  assert.match(line, /wrote 4 of 10 records \(16(\.0)? KiB\)/);
  const dry = applySummary(applied({ dryRun: true, recordsWritten: 0, bytesWritten: 0 }), false);
  assert.match(dry, /dry run: patch: would write 10 of 10 records \(40(\.0)? KiB\)/);
});

test('a ctime far ahead of the clock is given up at once', async () => {
  const ahead = BigInt(Date.now() + 3_600_000) * 1_000_000n;
  assert.equal(await settledPast(ahead), false);
  assert.equal(await settledPast(BigInt(Date.now() - 60_000) * 1_000_000n), true);
});

test('--src-index with SRC ctime ahead of the clock: the copy is right, no index is written, and the report says why', async (t) => {
  if (!needLoop(t) || !(await needTool(t, 'debugfs', 'e2fsprogs'))) return;
  const dir = await tempDir(t);
  const fsImage = join(dir, 'fs.img');
  const data = seededBytes(4 * MIB, 71);
  await mkdir(join(dir, 'in'));
  await writeFile(join(dir, 'in', 'image.img'), data);
  await run('mkfs.ext4', ['-q', '-F', '-d', join(dir, 'in'), fsImage, '64M']);
  // the inode's ctime set in 2030 by debugfs, as a file from a host whose clock runs ahead
  await run('debugfs', ['-w', '-R', 'set_inode_field /image.img ctime 20300101', fsImage]);
  const mnt = await mountLoop(t, await attachLoop(t, fsImage));
  const image = join(mnt, 'image.img');
  const dst = join(dir, 'dst.img');
  await writeFile(dst, seededBytes(4 * MIB, 72));
  const srcIndex = join(dir, 'src.blkidx');
  const r = await copy(image, dst, { index: join(dir, 'dst.blkidx'), srcIndex });
  assert.ok((await readFile(dst)).equals(data), 'DST holds SRC');
  assert.equal(existsSync(srcIndex), false, 'no index vouches for a ctime ahead of the clock');
  assert.match(r.index?.source?.notWritten ?? '', /ahead of this machine's clock/);
  // the CLI says "not written", not "created"
  await writeFile(dst, seededBytes(4 * MIB, 73));
  const cli = await runCli([
    'copy',
    '--index',
    join(dir, 'dst2.blkidx'),
    '--src-index',
    srcIndex,
    image,
    dst,
  ]);
  assert.equal(cli.code, 0, cli.stderr);
  assert.match(cli.stdout + cli.stderr, /index of SRC .*: not written/);
  assert.doesNotMatch(cli.stdout + cli.stderr, /index of SRC [^\n]*: created/);
  assert.equal(existsSync(srcIndex), false);
});
