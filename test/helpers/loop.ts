/**
 * Loop devices for tests (root only). Every device attached here is detached in the test's
 * after() hook, also when the test fails; mounts made through mountLoop are unmounted first.
 */

import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { promisify } from 'node:util';
import { IS_ROOT, need } from './resources.js';

export const run = promisify(execFile);

/** True when this process can attach loop devices. */
export function loopAvailable(): boolean {
  return IS_ROOT && existsSync('/dev/loop-control');
}

/** Skips (or fails under strict) unless loop devices can be used. */
export function needLoop(t: TestContext): boolean {
  return need(t, loopAvailable(), 'loop devices need root and /dev/loop-control');
}

/** Attaches `file` to a free loop device; `partscan` adds -P. Detached after the test. */
export async function attachLoop(
  t: TestContext,
  file: string,
  options: { partscan?: boolean } = {},
): Promise<string> {
  const args = ['-f', '--show', ...(options.partscan === true ? ['-P'] : []), file];
  const { stdout } = await run('losetup', args);
  const dev = stdout.trim();
  t.after(async () => {
    await run('losetup', ['-d', dev]).catch(() => {});
  });
  return dev;
}

/** Mounts `dev` on a fresh directory; unmounted (and the directory removed) after the test. */
export async function mountLoop(t: TestContext, dev: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'blksync-mnt-'));
  await run('mount', [dev, dir]);
  // if the detach hook runs first, losetup -d marks the busy device autoclear and the
  // kernel frees it at this umount
  t.after(async () => {
    await run('umount', [dir]).catch(() => {});
    await rm(dir, { recursive: true, force: true });
  });
  return dir;
}
