/** The progress line a person sees: drawn on a terminal, absent when output is not one. */

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { formatDuration } from '../src/cli/progress.js';
import { cliCommand, runCli } from './helpers/cli.js';
import { need } from './helpers/resources.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const run = promisify(execFile);

test('on a terminal, copy draws a progress bar on stderr, then the summary', async (t) => {
  if (!need(t, existsSync('/usr/bin/script'), 'script(1) from bsdutils gives the CLI a terminal'))
    return;
  const dir = await tempDir(t);
  await writeFile(join(dir, 'src'), seededBytes(64 * 1024 * 1024, 1));
  // script(1) runs the command on a pseudo-terminal and copies what it prints
  const [node, args] = cliCommand(['copy', join(dir, 'src'), join(dir, 'dst')]);
  const cmd = [node, ...args].map((a) => `'${a}'`).join(' ');
  const { stdout } = await run('script', ['-qfec', cmd, '/dev/null'], { cwd: process.cwd() });
  assert.match(stdout, /\[[#-]{24}\]\s+\d+% .* \/ 64\.0 MiB .*\/s {2}ETA \d+:\d\d {2}differing /);
  assert.match(stdout, /wrote 64\.0 MiB in 1 ranges \(created .*dst, sparse\)/);
});

test('off a terminal, no progress is drawn: stderr stays empty', async (t) => {
  const dir = await tempDir(t);
  await writeFile(join(dir, 'src'), seededBytes(8 * 1024 * 1024, 2));
  const r = await runCli(['copy', join(dir, 'src'), join(dir, 'dst')]);
  assert.equal(r.code, 0);
  assert.equal(r.stderr, '');
  assert.equal(r.stdout.split('\n').filter(Boolean).length, 1, 'one summary line');
});

test('durations read as m:ss or h:mm:ss', () => {
  assert.equal(formatDuration(5), '0:05');
  assert.equal(formatDuration(125), '2:05');
  assert.equal(formatDuration(3725), '1:02:05');
  assert.equal(formatDuration(Infinity), '--:--');
});
