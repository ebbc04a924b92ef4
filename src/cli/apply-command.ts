/** `blksync apply PATCH TARGET` */

import type { Command } from '@commander-js/extra-typings';
import type { ApplyResult } from '../engine/apply.js';
import { BlksyncError } from '../errors.js';
import { formatBytes } from '../size.js';
import { type SetExit, runOperation } from './common.js';

/** Says when TARGET was not checked between the records, and why. */
function unchecked(r: ApplyResult, force: boolean): string[] {
  if (r.patchVersion === 1) {
    return [
      'only where the records go was TARGET checked: this patch (version 1, from an older blksync) ' +
        'has no hashes of the bytes between them; make it again to have those checked too',
    ];
  }
  if (r.unchangedChecked) return [];
  return force
    ? ['TARGET was not checked between the records (--force)']
    : ['only where the records go was TARGET checked (--records-only)'];
}

/** The summary line of an apply, also of one interrupted (what it wrote before the signal). */
export function applySummary(r: ApplyResult, force: boolean): string {
  const what = r.reverse ? 'patch undone' : 'patch';
  if (r.alreadyApplied) {
    return [
      `${r.target} already holds the ${r.reverse ? 'base' : 'result'}: nothing to do (${r.records} records checked)`,
      ...unchecked(r, force),
    ].join('; ');
  }
  // interrupted, an apply has written fewer records than it set out to write
  const [verb, records, bytes] = r.dryRun
    ? ['would write', r.recordsToWrite, r.bytesToWrite]
    : ['wrote', r.recordsWritten, r.bytesWritten];
  const parts = [
    `${r.dryRun ? 'dry run: ' : ''}${what}: ${verb} ${records} of ${r.records} records ` +
      `(${formatBytes(bytes)}) in ${r.seconds.toFixed(2)} s`,
  ];
  if (r.recordsAlreadyApplied > 0)
    parts.push(`${r.recordsAlreadyApplied} records were already applied`);
  if (r.recordsForced > 0)
    parts.push(`${r.recordsForced} records written over other content (--force)`);
  if (r.resized)
    parts.push(`${r.dryRun ? 'would resize' : 'resized'} ${r.target} to ${r.toSize} bytes`);
  parts.push(...unchecked(r, force));
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
    .option(
      '--records-only',
      'check TARGET only where the patch writes, not the bytes between (no full read of TARGET; a TARGET changed there is patched as it is)',
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
            recordsOnly: opts.recordsOnly === true,
            signal,
            ...(onProgress ? { onProgress } : {}),
          });
        },
        (r) => applySummary(r, opts.force === true),
      );
    });
}
