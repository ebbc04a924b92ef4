/** Pieces every CLI command shares: signals, progress, error reporting, options. */

import { CommanderError, Option } from '@commander-js/extra-typings';
import type { Progress } from '../types.js';
import { BlksyncError } from '../errors.js';
import { parseSize } from '../size.js';
import { EXIT_ERROR, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, exitCodeFor } from './exit-codes.js';
import { ProgressBar } from './progress.js';

export interface OutputOptions {
  json?: boolean;
  quiet?: boolean;
  debug?: boolean;
}

export function blockSizeOption(): Option<'-b, --block-size <size>', undefined, undefined, number> {
  return new Option(
    '-b, --block-size <size>',
    'compare/write granularity: 4K, 64K, 1M (default 4K)',
  ).argParser((v: string) => parseSize(v, 'block size'));
}

/** Sets up Ctrl-C / SIGTERM to abort the run; a second signal exits at once. */
export function interruptible(): {
  signal: AbortSignal;
  exitCode: () => number;
  dispose: () => void;
} {
  const controller = new AbortController();
  let code = EXIT_SIGINT;
  const handler = (sig: NodeJS.Signals): void => {
    if (controller.signal.aborted) process.exit(sig === 'SIGTERM' ? EXIT_SIGTERM : EXIT_SIGINT);
    code = sig === 'SIGTERM' ? EXIT_SIGTERM : EXIT_SIGINT;
    controller.abort(new Error(sig));
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
  return {
    signal: controller.signal,
    exitCode: () => code,
    dispose: () => {
      process.off('SIGINT', handler);
      process.off('SIGTERM', handler);
    },
  };
}

export function progressFor(opts: OutputOptions): {
  onProgress?: (p: Progress) => void;
  bar?: ProgressBar;
} {
  if (opts.json === true || opts.quiet === true || !process.stderr.isTTY) return {};
  const bar = new ProgressBar(process.stderr);
  return { onProgress: (p) => bar.update(p), bar };
}

export function reportError(err: unknown, debug: boolean): number {
  if (err instanceof CommanderError) {
    return err.exitCode === 0 ? 0 : EXIT_USAGE;
  }
  if (err instanceof BlksyncError) {
    process.stderr.write(`blksync: ${err.message} [${err.code}]\n`);
    if (debug && err.stack !== undefined) process.stderr.write(`${err.stack}\n`);
    return exitCodeFor(err.code);
  }
  const e = err instanceof Error ? err : new Error(String(err));
  process.stderr.write(`blksync: internal error: ${e.message} (rerun with --debug for details)\n`);
  if (debug && e.stack !== undefined) process.stderr.write(`${e.stack}\n`);
  return EXIT_ERROR;
}

/** Sets the process exit status; commands call it instead of touching process.exitCode. */
export type SetExit = (code: number) => void;

export interface RunOptions<R> {
  /** Where the summary goes (default stdout; stderr when stdout carries data, as `diff -o -`). */
  out?: NodeJS.WritableStream;
  /** Exit status of a successful run (compare: 1 when different). */
  exitCode?: (result: R) => number;
  /** Maps the status of a failed run (compare: every trouble is 2, as cmp). */
  errorExit?: (status: number) => number;
}

/**
 * Runs one operation the way every command does: Ctrl-C/SIGTERM abort it, a progress bar on a
 * terminal, then the summary (or one JSON object), and on failure one line on stderr. An
 * interrupted or failed run that carries a partial result prints that too, so the user sees
 * what was done.
 */
export async function runOperation<R extends object>(
  opts: OutputOptions,
  setExit: SetExit,
  operation: (ctx: { signal: AbortSignal; onProgress?: (p: Progress) => void }) => Promise<R>,
  summarize: (result: R) => string,
  options: RunOptions<R> = {},
): Promise<void> {
  const out = options.out ?? process.stdout;
  const intr = interruptible();
  const { onProgress, bar } = progressFor(opts);
  try {
    const result = await operation({ signal: intr.signal, ...(onProgress ? { onProgress } : {}) });
    bar?.clear();
    if (opts.json === true) out.write(`${JSON.stringify(result)}\n`);
    else if (opts.quiet !== true) out.write(`${summarize(result)}\n`);
    setExit(options.exitCode?.(result) ?? 0);
  } catch (err) {
    bar?.clear();
    const interrupted = err instanceof BlksyncError && err.code === 'EINTERRUPTED';
    const partial = err instanceof BlksyncError ? (err.partial as R | undefined) : undefined;
    if (partial !== undefined && opts.json === true) {
      const marker = interrupted ? { interrupted: true } : { error: (err as BlksyncError).code };
      out.write(`${JSON.stringify({ ...partial, ...marker })}\n`);
    } else if (partial !== undefined && interrupted && opts.quiet !== true) {
      out.write(`${summarize(partial)}\n`);
    }
    if (interrupted) {
      process.stderr.write(`blksync: ${err.message} [${err.code}]\n`);
      setExit(intr.exitCode());
      return;
    }
    const status = reportError(err, opts.debug === true);
    setExit(options.errorExit?.(status) ?? status);
  } finally {
    intr.dispose();
  }
}
