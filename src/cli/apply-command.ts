/** `blksync apply PATCH TARGET` */

import type { Command } from '@commander-js/extra-typings';
import type { ApplyResult } from '../engine/apply.js';
import { BlksyncError } from '../errors.js';
import { formatBytes } from '../size.js';
import { type SetExit, runOperation } from './common.js';

/** A version 1 patch has no hashes of the bytes between its records: say they were not checked. */
function unchecked(r: ApplyResult): string[] {
  return r.patchVersion === 1
    ? [
        'only where the records go was TARGET checked: this patch (version 1, from an older blksync) ' +
          'has no hashes of the bytes between them; make it again to have those checked too',
      ]
    : [];
}

function applySummary(r: ApplyResult): string {
  const what = r.reverse ? 'patch undone' : 'patch';
  if (r.alreadyApplied) {
    return [
      `${r.target} already holds the ${r.reverse ? 'base' : 'result'}: nothing to do (${r.records} records checked)`,
      ...unchecked(r),
    ].join('; ');
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
  parts.push(...unchecked(r));
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
    .option(
      '--force',
      'write even where TARGET holds neither the old nor the new content (the bytes between the records are then not checked)',
    )
    .option('-n, --dry-run', 'check everything and report; write nothing')
    .option('--json', 'print one JSON summary object on stdout')
    .option('-q, --quiet', 'print nothing but errors')
    .option('--debug', 'show stack traces on errors')
    .action(async (patch, target, opts) => {
      await runOperation(
        opts,
        setExit,
        async ({ signal, onProgress }) => {
          if (patch === '-' && process.stdin.isTTY)
            throw new BlksyncError(
              'EUSAGE',
              'apply - reads the patch from stdin, which is a terminal; pipe a patch in',
            );
          const { apply } = await import('../engine/apply.js');
          return apply(patch === '-' ? process.stdin : patch, target, {
            reverse: opts.reverse === true,
            force: opts.force === true,
            dryRun: opts.dryRun === true,
            signal,
            ...(onProgress ? { onProgress } : {}),
          });
        },
        applySummary,
      );
    });
}
