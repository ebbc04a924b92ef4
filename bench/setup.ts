/** What sections need before they measure: the built CLI and the peer tools installed. */

import { readdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { run } from './measure.js';

/** The repository root (bench/..). */
export const ROOT = fileURLToPath(new URL('../', import.meta.url));
/** The CLI as users run it: it needs dist/, see `ensureBuilt`. */
export const CLI = path.join(ROOT, 'bin', 'blksync.js');

async function newestMtime(dir: string): Promise<number> {
  let newest = 0;
  for (const entry of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (!entry.isFile()) continue;
    const { mtimeMs } = await stat(path.join(entry.parentPath, entry.name));
    newest = Math.max(newest, mtimeMs);
  }
  return newest;
}

/** Builds dist/ (`npm run build`) when it is missing or older than src/. */
export async function ensureBuilt(log: (line: string) => void): Promise<void> {
  const built = await stat(path.join(ROOT, 'dist', 'cli-bundle', 'main.cjs')).then(
    (s) => s.mtimeMs,
    () => 0,
  );
  if (built >= (await newestMtime(path.join(ROOT, 'src')))) return;
  log('building dist/ (npm run build) ...');
  try {
    await run('npm', ['run', 'build'], ROOT);
  } catch (err) {
    // tsc still emits on type errors (others may be mid-edit in src/); measure what it
    // emitted, but say so
    const emitted = await stat(path.join(ROOT, 'dist', 'cli-bundle', 'main.cjs')).catch(
      () => undefined,
    );
    if (emitted === undefined || emitted.mtimeMs < built) throw err;
    log(`WARNING: npm run build reported errors; benchmarking what tsc emitted:\n${String(err)}`);
  }
}

async function hasCommand(name: string): Promise<boolean> {
  return run('bash', ['-c', `command -v ${name}`]).then(
    () => true,
    () => false,
  );
}

/**
 * Installs missing peer tools with apt-get (Debian package names), running
 * `apt-get update` first only when a plain install fails.
 */
export async function ensureCommands(
  packages: Readonly<Record<string, string>>,
  log: (line: string) => void,
): Promise<void> {
  const missing: string[] = [];
  for (const [command, pkg] of Object.entries(packages)) {
    if (!(await hasCommand(command))) missing.push(pkg);
  }
  if (missing.length === 0) return;
  log(`installing ${missing.join(' ')} with apt-get ...`);
  const aptGet = (args: readonly string[]): Promise<string> =>
    run('env', ['DEBIAN_FRONTEND=noninteractive', 'apt-get', ...args]);
  try {
    await aptGet(['install', '-y', ...missing]);
  } catch {
    await aptGet(['update']);
    await aptGet(['install', '-y', ...missing]);
  }
}
