/** `blksync apply PATCH TARGET` */

import type { Command } from '@commander-js/extra-typings';
import { apply, type ApplyResult } from '../engine/apply.js';
import { BlksyncError } from '../errors.js';
import { formatBytes } from '../size.js';
import { interruptible, progressFor, reportError, type SetExit } from './common.js';

function applySummary(r: ApplyResult): string {
  const what = r.reverse ? 'patch undone' : 'patch';
  if (r.alreadyApplied) {
    return `${r.target} already holds the ${r.reverse ? 'base' : 'result'}: nothing to do (${r.records} records checked)`;
  }
  const verb = r.dryRun ? 'would write' : 'wrote';
  const parts = [
    `${r.dryRun ? 'dry run: ' : ''}${what}: ${verb} ${r.recordsWritten} of ${r.records} records ` +
      `(${formatBytes(r.bytesWritten)}) in ${r.seconds.toFixed(2)} s`,
  ];
  if (r.recordsAlreadyApplied > 0)
    parts.push(`${r.recordsAlreadyApplied} records were already applied`);
  if (r.recordsForced > 0)
    parts.push(`${r.recordsForced} records written over other content (--force)`);
  if (r.resized)
    parts.push(`${r.dryRun ? 'would resize' : 'resized'} ${r.target} to ${r.toSize} bytes`);
  return parts.join('; ');
}

export function registerApply(program: Command, setExit: SetExit): void {
  program
    .command('apply')
    .description(
      'write a patch made by blksync diff into TARGET, refusing a TARGET that is not its base',
    )
    .argument('<patch>', 'the patch file, or - for stdin')
    .argument('<target>', 'the copy of the base to update (file or block device)')
    .option('--reverse', 'undo the patch (it must have been made with --reversible)')
    .option('--force', 'write even where TARGET holds neither the old nor the new content')
    .option('-n, --dry-run', 'check everything and report; write nothing')
    .option('--json', 'print one JSON summary object on stdout')
    .option('-q, --quiet', 'print nothing but errors')
    .option('--debug', 'show stack traces on errors')
    .action(async (patch, target, opts) => {
      if (patch === '-' && process.stdin.isTTY) {
        setExit(
          reportError(
            new BlksyncError(
              'EUSAGE',
              'apply - reads the patch from stdin, which is a terminal; pipe a patch in',
            ),
            false,
          ),
        );
        return;
      }
      const intr = interruptible();
      const { onProgress, bar } = progressFor(opts);
      try {
        const result = await apply(patch === '-' ? process.stdin : patch, target, {
          reverse: opts.reverse === true,
          force: opts.force === true,
          dryRun: opts.dryRun === true,
          signal: intr.signal,
          ...(onProgress ? { onProgress } : {}),
        });
        bar?.clear();
        if (opts.json === true) process.stdout.write(`${JSON.stringify(result)}\n`);
        else if (opts.quiet !== true) process.stdout.write(`${applySummary(result)}\n`);
      } catch (err) {
        bar?.clear();
        const partial =
          err instanceof BlksyncError ? (err.partial as ApplyResult | undefined) : undefined;
        if (partial !== undefined && opts.json === true) {
          process.stdout.write(
            `${JSON.stringify({ ...partial, error: (err as BlksyncError).code })}\n`,
          );
        }
        if (err instanceof BlksyncError && err.code === 'EINTERRUPTED') {
          process.stderr.write(`blksync: ${err.message} [${err.code}]\n`);
          setExit(intr.exitCode());
          return;
        }
        setExit(reportError(err, opts.debug === true));
      } finally {
        intr.dispose();
      }
    });
}
