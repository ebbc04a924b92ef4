/**
 * Runs the blksync CLI as a child process, as a user would. The CLI is built from the sources
 * on first use in each test process, the way `npm run build` builds it: one esbuild CommonJS
 * bundle (bin/blksync.js runs such a bundle) and the agent bundle it sends over ssh. A bundle starts
 * with ~0.08 s of CPU where the sources through tsx take ~0.3 s, and the suite starts the CLI
 * a few hundred times. Built fresh from the sources, it is never stale.
 */

import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildSync } from 'esbuild';
import { AGENT_BUILD } from '../../src/remote/agent-payload.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const ENTRY = fileURLToPath(new URL('./cli-entry.ts', import.meta.url));
const AGENT_ENTRY = join(ROOT, 'src', 'remote', 'agent-entry.ts');

const PREFIX = 'blksync-test-cli-';
const STALE_MS = 24 * 60 * 60 * 1000;

let bundle: string | undefined;

/**
 * Builds the CLI once per process into a directory of its own, removed when the process
 * exits. It sits under node_modules/.cache so the packages left outside it (koffi) resolve
 * as they do beside dist/; the agent goes where the bundled agent-payload.ts looks for it in
 * a built package, ../../dist/agent.cjs from the bundle.
 */
function cliBundle(): string {
  if (bundle !== undefined) return bundle;
  const cache = join(ROOT, 'node_modules', '.cache');
  mkdirSync(cache, { recursive: true });
  // what a test process killed before its exit left behind, a day ago or more
  for (const name of readdirSync(cache)) {
    const old = join(cache, name);
    if (
      name.startsWith(PREFIX) &&
      (statSync(old, { throwIfNoEntry: false })?.mtimeMs ?? Infinity) < Date.now() - STALE_MS
    ) {
      rmSync(old, { recursive: true, force: true });
    }
  }
  const base = mkdtempSync(join(cache, PREFIX));
  process.once('exit', () => rmSync(base, { recursive: true, force: true }));
  const outdir = join(base, 'cli', 'bundle');
  buildSync({
    ...AGENT_BUILD,
    entryPoints: [AGENT_ENTRY],
    outfile: join(base, 'dist', 'agent.cjs'),
    logLevel: 'warning',
  });
  bundle = join(outdir, 'cli-entry.cjs');
  // as package.json's build:cli builds dist/cli-bundle/main.cjs
  buildSync({
    entryPoints: [ENTRY],
    bundle: true,
    platform: 'node',
    format: 'cjs',
    target: 'node20',
    external: ['koffi', 'esbuild'],
    define: { 'import.meta.url': '__blksyncUrl' },
    banner: { js: "const __blksyncUrl = require('node:url').pathToFileURL(__filename).href;" },
    outfile: bundle,
    logLevel: 'warning',
  });
  return bundle;
}

/** The command that starts `blksync ...args`: for spawn, or (quoted) for a shell. */
export function cliCommand(args: string[]): [string, string[]] {
  return [process.execPath, [cliBundle(), ...args]];
}

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Starts `blksync ...args`; the caller may signal the child. */
export function startCli(
  args: string[],
  options: { input?: Buffer | string; keepStdinOpen?: boolean; env?: NodeJS.ProcessEnv } = {},
): {
  child: ChildProcess;
  done: Promise<CliResult>;
} {
  const [file, argv] = cliCommand(args);
  const child = spawn(file, argv, {
    stdio: ['pipe', 'pipe', 'pipe'],
    ...(options.env !== undefined ? { env: { ...process.env, ...options.env } } : {}),
  });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  child.stdin.on('error', () => {});
  if (options.input !== undefined) child.stdin.end(options.input);
  else if (options.keepStdinOpen !== true) child.stdin.end();
  const done = new Promise<CliResult>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
  return { child, done };
}

/** Runs `blksync ...args` to completion. */
export function runCli(
  args: string[],
  options: { input?: Buffer | string; env?: NodeJS.ProcessEnv } = {},
): Promise<CliResult> {
  return startCli(args, options).done;
}
