/**
 * The command line. The only module that reads process.argv, writes to stdout/stderr, sets
 * process.exitCode and handles signals; everything else is the library.
 */

import { Command, CommanderError, Option } from '@commander-js/extra-typings';
import { compare, type CompareResult } from '../engine/compare.js';
import { copy, type CopyResult } from '../engine/copy.js';
import type { Progress } from '../engine/types.js';
import { BlksyncError } from '../errors.js';
import { formatBytes, parseSize } from '../size.js';
import { EXIT_ERROR, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, exitCodeFor } from './exit-codes.js';
import { ProgressBar } from './progress.js';

interface OutputOptions {
  json?: boolean;
  quiet?: boolean;
  debug?: boolean;
}

function blockSizeOption(): Option<'-b, --block-size <size>', undefined, undefined, number> {
  return new Option('-b, --block-size <size>', 'compare/write granularity: 4K, 64K, 1M (default 4K)').argParser(
    (v: string) => parseSize(v, 'block size'),
  );
}

/** Sets up Ctrl-C / SIGTERM to abort the run; a second signal exits at once. */
function interruptible(): { signal: AbortSignal; exitCode: () => number; dispose: () => void } {
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

function progressFor(opts: OutputOptions): { onProgress?: (p: Progress) => void; bar?: ProgressBar } {
  if (opts.json === true || opts.quiet === true || !process.stderr.isTTY) return {};
  const bar = new ProgressBar(process.stderr);
  return { onProgress: (p) => bar.update(p), bar };
}

function copySummary(r: CopyResult): string {
  const verb = r.dryRun ? 'would write' : 'wrote';
  const lines = [
    `${r.dryRun ? 'dry run: ' : ''}scanned ${formatBytes(r.bytesScanned)} in ${r.seconds.toFixed(2)} s; ` +
      `${r.blocksDiffering} blocks of ${formatBytes(r.blockSize)} differ; ` +
      `${verb} ${formatBytes(r.dryRun ? r.bytesDiffering : r.bytesWritten)} in ${r.rangesWritten} ranges` +
      (r.created ? ` (created ${r.destination}, sparse)` : ''),
  ];
  if (r.destinationExtraBytes > 0) {
    lines.push(
      `${r.destination} is ${formatBytes(r.destinationExtraBytes)} larger than the source; the rest was left untouched`,
    );
  }
  return lines.join('\n');
}

function compareSummary(r: CompareResult): string {
  const lines: string[] = [];
  for (const range of r.ranges) {
    lines.push(`${range.start}-${range.end} (${range.end - range.start} bytes)`);
  }
  if (r.rangeCount > r.ranges.length) lines.push(`... ${r.rangeCount - r.ranges.length} more ranges`);
  if (r.sizeA !== r.sizeB) {
    lines.push(`sizes differ: ${r.a} is ${r.sizeA} bytes, ${r.b} is ${r.sizeB} bytes`);
  }
  lines.push(
    r.same
      ? `${r.a} and ${r.b} are identical (${formatBytes(r.bytesCompared)})`
      : `${r.rangeCount} differing ranges in ${formatBytes(r.bytesCompared)} compared`,
  );
  return lines.join('\n');
}

function reportError(err: unknown, debug: boolean): number {
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

function buildProgram(setExit: (code: number) => void): Command {
  const program = new Command()
    .name('blksync')
    .description('Update disk images and block devices, writing only the blocks that differ.')
    .version('0.1.0')
    .showHelpAfterError('(run blksync --help for usage)')
    .exitOverride();

  program
    .command('copy')
    .description('write SRC onto DST, writing only the blocks that differ')
    .argument('<src>', 'source image file or block device')
    .argument('<dst>', 'destination file or block device (a missing file is created, sparse)')
    .addOption(blockSizeOption())
    .option('-n, --dry-run', 'scan and report what would be written; write nothing')
    .option('--full', 'write everything without reading DST (like dd)')
    .option('--json', 'print one JSON summary object on stdout')
    .option('-q, --quiet', 'print nothing but errors')
    .option('--debug', 'show stack traces on errors')
    .action(async (src, dst, opts) => {
      const intr = interruptible();
      const { onProgress, bar } = progressFor(opts);
      try {
        const result = await copy(src, dst, {
          blockSize: opts.blockSize,
          dryRun: opts.dryRun === true,
          full: opts.full === true,
          signal: intr.signal,
          ...(onProgress ? { onProgress } : {}),
        });
        bar?.clear();
        if (opts.json === true) process.stdout.write(`${JSON.stringify(result)}\n`);
        else if (opts.quiet !== true) process.stdout.write(`${copySummary(result)}\n`);
      } catch (err) {
        bar?.clear();
        if (err instanceof BlksyncError && err.code === 'EINTERRUPTED') {
          const partial = err.partial as CopyResult | undefined;
          if (opts.json === true) {
            process.stdout.write(`${JSON.stringify({ ...partial, interrupted: true })}\n`);
          } else if (partial !== undefined && opts.quiet !== true) {
            process.stdout.write(`${copySummary(partial)}\n`);
          }
          process.stderr.write(`blksync: ${err.message} [${err.code}]\n`);
          setExit(intr.exitCode());
          return;
        }
        setExit(reportError(err, opts.debug === true));
      } finally {
        intr.dispose();
      }
    });

  program
    .command('compare')
    .description('report the byte ranges where A and B differ (exit 0 same, 1 different, 2 error)')
    .argument('<a>', 'first image file or block device')
    .argument('<b>', 'second image file or block device')
    .addOption(blockSizeOption())
    .option('--json', 'print one JSON object on stdout')
    .option('-q, --quiet', 'print nothing; the exit status tells')
    .option('--debug', 'show stack traces on errors')
    .action(async (a, b, opts) => {
      const intr = interruptible();
      const { onProgress, bar } = progressFor(opts);
      try {
        const result = await compare(a, b, {
          blockSize: opts.blockSize,
          signal: intr.signal,
          ...(onProgress ? { onProgress } : {}),
        });
        bar?.clear();
        if (opts.json === true) process.stdout.write(`${JSON.stringify(result)}\n`);
        else if (opts.quiet !== true) process.stdout.write(`${compareSummary(result)}\n`);
        setExit(result.same ? 0 : 1);
      } catch (err) {
        bar?.clear();
        // cmp's convention: trouble is 2, whatever kind
        const code = reportError(err, opts.debug === true);
        setExit(err instanceof BlksyncError && err.code === 'EINTERRUPTED' ? intr.exitCode() : code === 0 ? 0 : 2);
      } finally {
        intr.dispose();
      }
    });

  return program as unknown as Command;
}

/** Runs the CLI with `argv` (process.argv layout); sets process.exitCode. */
export async function main(argv: readonly string[]): Promise<void> {
  let exitCode: number | undefined;
  const program = buildProgram((code) => {
    exitCode = code;
  });
  try {
    await program.parseAsync([...argv]);
  } catch (err) {
    exitCode = reportError(err, argv.includes('--debug'));
  }
  process.exitCode = exitCode ?? 0;
}
