/**
 * Interrupting `blksync copy` half-way (SIGINT, SIGTERM, a second SIGINT, SIGKILL) onto a
 * file and onto a loop device: the exit status and the summary a user sees, and that a rerun
 * of the same command always leaves DST identical to SRC.
 *
 * The kill lands mid-way because the test waits until the copy has visibly started writing
 * (DST's allocated blocks, or the loop device's read counter) and the image is far larger
 * than what that takes.
 */

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test, type TestContext } from 'node:test';
import type { CopyResult } from '../src/copy.js';
import { runCli, startCli, type CliResult } from './helpers/cli.js';
import { attachLoop, ioStat, needLoop, run } from './helpers/loop.js';
import { tempDir } from './helpers/tmp.js';

const MiB = 1024 * 1024;
/** SRC: 512 MiB, 1 MiB of random data every 2 MiB, holes between. */
const SIZE = 512 * MiB;
const PIECE = MiB;
const DATA = SIZE / 2;
/** Allow this long for an interrupted copy to exit (it should take about a second). */
const EXIT_TIMEOUT_MS = 10_000;

let shared: string;
let src: string;

before(async () => {
  shared = await mkdtemp(join(tmpdir(), 'blksync-intr-'));
  src = join(shared, 'src.img');
  const fh = await open(src, 'w');
  try {
    await fh.truncate(SIZE);
    for (let o = 0; o < SIZE; o += 2 * PIECE) await fh.write(randomBytes(PIECE), 0, PIECE, o);
  } finally {
    await fh.close();
  }
});

after(() => rm(shared, { recursive: true, force: true }));

async function identical(a: string, b: string): Promise<boolean> {
  return run('cmp', ['-s', '-n', String(SIZE), a, b]).then(
    () => true,
    () => false,
  );
}

/** Starts `blksync copy ...args`; the child is killed after the test if still running. */
function startCopy(t: TestContext, args: string[]): ReturnType<typeof startCli> {
  const started = startCli(['copy', ...args]);
  t.after(async () => {
    if (started.child.exitCode === null && started.child.signalCode === null) {
      started.child.kill('SIGKILL');
    }
    await started.done;
  });
  return started;
}

/** Polls `ready` until it holds; fails if the copy ends first (too fast to interrupt). */
async function waitForProgress(
  started: ReturnType<typeof startCli>,
  ready: () => Promise<boolean>,
): Promise<void> {
  let ended = false;
  void started.done.then(() => (ended = true));
  for (;;) {
    if (ended) {
      const r = await started.done;
      assert.fail(`the copy ended before it could be interrupted (exit ${r.code}): ${r.stderr}`);
    }
    if (await ready()) return;
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

/** Bytes allocated to a file (ext4 counts delayed allocations too). */
async function allocated(path: string): Promise<number> {
  const st = await stat(path).catch(() => undefined);
  return st === undefined ? 0 : st.blocks * 512;
}

/** Bytes read from a device since it was created (the counters outlive a loop detach). */
async function deviceRead(dev: string): Promise<number> {
  return (await ioStat(dev)).readSectors * 512;
}

/** Waits for the child to exit; fails (and kills it) if it takes longer than the timeout. */
async function exited(started: ReturnType<typeof startCli>): Promise<CliResult> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<'timeout'>((resolve) => {
    timer = setTimeout(() => resolve('timeout'), EXIT_TIMEOUT_MS);
  });
  const r = await Promise.race([started.done, timeout]);
  clearTimeout(timer);
  if (r === 'timeout') {
    started.child.kill('SIGKILL');
    assert.fail(`the interrupted copy did not exit within ${EXIT_TIMEOUT_MS / 1000} s`);
  }
  return r;
}

/** The JSON summary an interrupted `copy --json` prints. */
function interruptedSummary(r: CliResult): CopyResult & { interrupted: boolean } {
  const summary = JSON.parse(r.stdout) as CopyResult & { interrupted: boolean };
  assert.equal(summary.interrupted, true);
  assert.ok(summary.bytesScanned < SIZE, `it stopped mid-way (${summary.bytesScanned} scanned)`);
  assert.ok(summary.bytesWritten > 0, 'it had written something');
  return summary;
}

function assertInterruptedLine(r: CliResult): void {
  assert.match(r.stderr, /interrupted after .* rerun the same command to finish \[EINTERRUPTED\]/);
}

/** Reruns the same copy to completion and checks DST is now SRC. */
async function rerun(args: string[], dst: string): Promise<CopyResult> {
  const r = await runCli(['copy', '--json', ...args]);
  assert.equal(r.code, 0, `the rerun failed: ${r.stderr}`);
  assert.ok(await identical(src, dst), 'after the rerun DST is identical to SRC');
  return JSON.parse(r.stdout) as CopyResult;
}

/** A loop device over a fresh all-zero (sparse) backing file the size of SRC. */
async function zeroDevice(t: TestContext): Promise<string> {
  const dir = await tempDir(t);
  const backing = join(dir, 'backing.img');
  const fh = await open(backing, 'w');
  await fh.truncate(SIZE);
  await fh.close();
  return attachLoop(t, backing);
}

test('SIGINT during a copy to a new file: exit 130, a summary, and a rerun finishes', async (t) => {
  const dst = join(await tempDir(t), 'dst.img');
  const started = startCopy(t, [src, dst]);
  await waitForProgress(started, async () => (await allocated(dst)) >= 32 * MiB);
  started.child.kill('SIGINT');
  const r = await exited(started);

  assert.equal(r.code, 130, r.stderr);
  assert.match(
    r.stdout,
    /^scanned .* in .* s; \d+ blocks of 4\.00 KiB differ; wrote .* in \d+ ranges/,
  );
  assertInterruptedLine(r);
  assert.equal(await identical(src, dst), false, 'the copy was stopped before the end');

  const done = await rerun([src, dst], dst);
  assert.equal(done.created, false);
  assert.ok(done.bytesWritten < DATA, 'the rerun did not start over');
});

test('SIGINT during a copy to a loop device: exit 130, and the rerun writes exactly the rest', async (t) => {
  if (!needLoop(t)) return;
  const dev = await zeroDevice(t);
  const base = await deviceRead(dev);
  const started = startCopy(t, ['--json', src, dev]);
  await waitForProgress(started, async () => (await deviceRead(dev)) - base >= 64 * MiB);
  started.child.kill('SIGINT');
  const r = await exited(started);

  assert.equal(r.code, 130, r.stderr);
  const partial = interruptedSummary(r);
  assertInterruptedLine(r);

  const done = await rerun([src, dev], dev);
  assert.equal(done.bytesWritten, DATA - partial.bytesWritten, 'nothing lost, nothing redone');
});

test('SIGTERM during a copy onto an existing file: exit 143, and the rerun writes exactly the rest', async (t) => {
  const dst = join(await tempDir(t), 'dst.img');
  const fh = await open(dst, 'w');
  await fh.truncate(SIZE);
  await fh.close();
  const started = startCopy(t, ['--json', src, dst]);
  await waitForProgress(started, async () => (await allocated(dst)) >= 32 * MiB);
  started.child.kill('SIGTERM');
  const r = await exited(started);

  assert.equal(r.code, 143, r.stderr);
  const partial = interruptedSummary(r);
  assertInterruptedLine(r);

  const done = await rerun([src, dst], dst);
  assert.equal(done.bytesWritten, DATA - partial.bytesWritten, 'nothing lost, nothing redone');
});

test('a second SIGINT exits at once with 130, and a rerun finishes', async (t) => {
  const dst = join(await tempDir(t), 'dst.img');
  const started = startCopy(t, [src, dst]);
  await waitForProgress(started, async () => (await allocated(dst)) >= 32 * MiB);
  started.child.kill('SIGINT');
  started.child.kill('SIGINT');
  const r = await exited(started);

  // killed by the signal itself: the shell reports 130
  assert.ok(r.code === 130 || r.signal === 'SIGINT', `exit ${r.code} ${r.signal}: ${r.stderr}`);
  await rerun([src, dst], dst);
});

test('a patch FIFO no writer opened: a second SIGTERM ends the wait at once, DST as it was', async (t) => {
  // (copy refuses a FIFO SRC before opening it: ESRC_KIND, copy.test.ts)
  const dir = await tempDir(t);
  const fifo = join(dir, 'in.fifo');
  await run('mkfifo', [fifo]);
  const dst = join(dir, 'dst.img');
  await writeFile(dst, Buffer.alloc(4096, 1));
  const started = startCli(['apply', fifo, dst]);
  t.after(async () => {
    if (started.child.exitCode === null && started.child.signalCode === null) {
      started.child.kill('SIGKILL');
    }
    await started.done;
  });
  // apply waits in open() for a writer (as cat does); give it time to get there
  await new Promise((resolve) => setTimeout(resolve, 1500));
  started.child.kill('SIGTERM');
  await new Promise((resolve) => setTimeout(resolve, 200));
  started.child.kill('SIGTERM');
  const r = await exited(started);

  assert.equal(r.signal, 'SIGTERM', `exit ${r.code}: ${r.stderr}`);
  assert.deepEqual(await readFile(dst), Buffer.alloc(4096, 1));
});

test('SIGKILL during a copy to a loop device: a rerun finishes from what was written', async (t) => {
  if (!needLoop(t)) return;
  const dev = await zeroDevice(t);
  const base = await deviceRead(dev);
  const started = startCopy(t, [src, dev]);
  await waitForProgress(started, async () => (await deviceRead(dev)) - base >= 64 * MiB);
  started.child.kill('SIGKILL');
  const r = await exited(started);
  assert.equal(r.signal, 'SIGKILL');

  const done = await rerun([src, dev], dev);
  assert.ok(done.bytesWritten < DATA, 'what was written before the kill was kept');
});

test('SIGKILL right after DST is created: a rerun finishes', async (t) => {
  const dst = join(await tempDir(t), 'dst.img');
  const started = startCopy(t, [src, dst]);
  await waitForProgress(started, () => Promise.resolve(existsSync(dst)));
  started.child.kill('SIGKILL');
  const r = await exited(started);
  assert.equal(r.signal, 'SIGKILL');

  await rerun([src, dst], dst);
});
