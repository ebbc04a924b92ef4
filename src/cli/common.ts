/** Pieces every CLI command shares: signals, progress, error reporting, options. */

import { CommanderError, Option } from '@commander-js/extra-typings';
import type { Progress } from '../types.js';
import { BlksyncError, type BlksyncWarning, type ErrorCode } from '../errors.js';
import { DEFAULT_TIMEOUT_S, parseTimeout } from '../limits.js';
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

/** `--timeout SECONDS`: how long a peer (web server, ssh agent) may stay silent. */
export function timeoutOption(): Option<'--timeout <seconds>', undefined, undefined, number> {
  return new Option(
    '--timeout <seconds>',
    `give up on a peer (web server, ssh agent) silent this many seconds while an answer is due (default ${DEFAULT_TIMEOUT_S})`,
  ).argParser(parseTimeout);
}

/**
 * Sets up Ctrl-C / SIGTERM to abort the run; a second signal ends the process at once, by the
 * signal itself (exit status 128 + its number, as the shell reports it): process.exit() would
 * wait for libuv's thread pool, where an open() of a FIFO no writer opened never returns.
 */
export function interruptible(): {
  signal: AbortSignal;
  exitCode: () => number;
  dispose: () => void;
} {
  const controller = new AbortController();
  let code = EXIT_SIGINT;
  const handler = (sig: NodeJS.Signals): void => {
    if (controller.signal.aborted) {
      process.off('SIGINT', handler);
      process.off('SIGTERM', handler);
      process.kill(process.pid, sig);
      return;
    }
    code = sig === 'SIGTERM' ? EXIT_SIGTERM : EXIT_SIGINT;
    // the reason is what a step that checks the signal throws (signal.throwIfAborted()): an
    // interruption with its code, not an internal error
    controller.abort(
      new BlksyncError('EINTERRUPTED', `interrupted (${sig}); rerun the same command to finish`),
    );
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

/**
 * Text from outside (file names, remote error messages, HTTP reasons and bodies) printed with
 * its control characters escaped as \xNN: no ESC or BEL from a hostile name or server reaches
 * the terminal, and a message stays one line. C0, DEL and C1 are escaped; other characters
 * (UTF-8 names) are kept.
 */
export function escapeControl(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => {
    return `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`;
  });
}

/** Writes one line on stderr, escaped: the one place the CLI prints errors and warnings. */
function printLine(text: string): void {
  process.stderr.write(`${escapeControl(text)}\n`);
}

/**
 * Prints a summary (several lines, each escaped: paths, signers' names and remote hosts come
 * from outside too).
 */
export function printText(out: NodeJS.WritableStream, text: string): void {
  out.write(`${text.split('\n').map(escapeControl).join('\n')}\n`);
}

/** Prints a library warning: `blksync: warning: message [CODE]` on stderr. */
export function printWarning(w: BlksyncWarning): void {
  printLine(`blksync: warning: ${w.message} [${w.code}]`);
}

/** commander's own errors, with the project's codes: every one of them is a usage error. */
function usageMessage(err: CommanderError): string {
  if (err.code === 'commander.help') return 'a known command is needed: see the list below';
  // "unknown option '--jsn'\n(Did you mean --json?)": one line
  return err.message.replace(/^error: /, '').replace(/\s*\n\s*/g, ' ');
}

export interface ReportOptions {
  /** Where the JSON error object goes (default stdout). */
  out?: NodeJS.WritableStream;
  /** Warnings given before the failure (JSON: `warnings`). */
  warnings?: readonly BlksyncWarning[];
  /** Text commander wrote for this error (its help), shown after the error line. */
  usageText?: string;
}

/**
 * Reports a failure the one way every command does, and returns its exit status: the first
 * stderr line is `blksync: message [CODE]` (the stack follows only with --debug); with
 * `--json` one object goes to stdout as well, the same shape for every failure:
 * `{"error": {"code", "message"}, ...what the run had done}`.
 */
export function reportError(err: unknown, opts: OutputOptions, report: ReportOptions = {}): number {
  let code: ErrorCode | undefined;
  let message: string;
  let status: number;
  if (err instanceof CommanderError) {
    if (err.exitCode === 0) {
      if (report.usageText !== undefined) process.stdout.write(report.usageText);
      return 0;
    }
    code = 'EUSAGE';
    message = usageMessage(err);
    status = EXIT_USAGE;
  } else if (err instanceof BlksyncError) {
    code = err.code;
    message = err.message;
    status = exitCodeFor(err.code);
  } else {
    const e = err instanceof Error ? err : new Error(String(err));
    message = `internal error: ${e.message} (rerun with --debug for details)`;
    status = EXIT_ERROR;
  }
  printLine(`blksync: ${message}${code !== undefined ? ` [${code}]` : ''}`);
  if (err instanceof CommanderError) {
    const help = report.usageText?.trim();
    process.stderr.write(
      help !== undefined && help !== '' ? `${help}\n` : '(run blksync --help for usage)\n',
    );
  } else if (opts.debug === true && err instanceof Error && err.stack !== undefined) {
    printText(process.stderr, err.stack);
  }
  if (opts.json === true) {
    // what the run had done, when known (an interrupted copy's summary, bytes written)
    const partial: Record<string, unknown> =
      err instanceof BlksyncError && typeof err.partial === 'object' && err.partial !== null
        ? { ...(err.partial as Record<string, unknown>) }
        : {};
    delete partial.error;
    const warnings =
      report.warnings !== undefined && report.warnings.length > 0
        ? { warnings: report.warnings }
        : {};
    const interrupted = code === 'EINTERRUPTED' ? { interrupted: true } : {};
    const object = {
      error: { code: code ?? 'EINTERNAL', message },
      ...partial,
      ...interrupted,
      ...warnings,
    };
    (report.out ?? process.stdout).write(`${JSON.stringify(object)}\n`);
  }
  return status;
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
 * terminal, warnings on stderr as they come, then the summary (or one JSON object), and on
 * failure one line on stderr (and with --json the error object). An interrupted run's partial
 * result is summarized too, so the user sees what was done.
 */
export async function runOperation<R extends object>(
  opts: OutputOptions,
  setExit: SetExit,
  operation: (ctx: {
    signal: AbortSignal;
    onProgress?: (p: Progress) => void;
    onWarning: (w: BlksyncWarning) => void;
  }) => Promise<R>,
  summarize: (result: R) => string,
  options: RunOptions<R> = {},
): Promise<void> {
  const out = options.out ?? process.stdout;
  const intr = interruptible();
  const { onProgress, bar } = progressFor(opts);
  const warnings: BlksyncWarning[] = [];
  const onWarning = (w: BlksyncWarning): void => {
    warnings.push(w);
    bar?.clear();
    printWarning(w);
  };
  try {
    const result = await operation({
      signal: intr.signal,
      onWarning,
      ...(onProgress ? { onProgress } : {}),
    });
    bar?.clear();
    if (opts.json === true) {
      const withWarnings = warnings.length > 0 ? { ...result, warnings } : result;
      out.write(`${JSON.stringify(withWarnings)}\n`);
    } else if (opts.quiet !== true) printText(out, summarize(result));
    setExit(options.exitCode?.(result) ?? 0);
  } catch (err) {
    bar?.clear();
    const interrupted = err instanceof BlksyncError && err.code === 'EINTERRUPTED';
    const partial = err instanceof BlksyncError ? (err.partial as R | undefined) : undefined;
    if (partial !== undefined && interrupted && opts.json !== true && opts.quiet !== true) {
      printText(out, summarize(partial));
    }
    const status = reportError(err, opts, { out, warnings });
    setExit(interrupted ? intr.exitCode() : (options.errorExit?.(status) ?? status));
  } finally {
    intr.dispose();
  }
}
