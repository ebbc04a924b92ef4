/** `blksync diff BASE NEW -o PATCH` */

import { Option, type Command } from '@commander-js/extra-typings';
import { diff, type DiffResult } from '../engine/diff.js';
import { BlksyncError } from '../errors.js';
import { formatBytes } from '../size.js';
import {
  blockSizeOption,
  interruptible,
  progressFor,
  reportError,
  type SetExit,
} from './common.js';

function diffSummary(r: DiffResult): string {
  return (
    `scanned ${formatBytes(r.bytesScanned)} in ${r.seconds.toFixed(2)} s; ` +
    `${formatBytes(r.bytesDiffering)} differ; wrote ${r.output === '-' ? 'a patch' : r.output} of ` +
    `${formatBytes(r.patchBytes)} (${r.records} records` +
    (r.reversible ? ', reversible' : '') +
    (r.compression !== 'none' ? `, ${r.compression}` : '') +
    ')'
  );
}

export function registerDiff(program: Command, setExit: SetExit): void {
  program
    .command('diff')
    .description(
      'write a patch of the blocks of NEW that differ from BASE (apply it with blksync apply)',
    )
    .argument(
      '<base>',
      'the image the patch will be applied to (file or block device), or its index (blksync index)',
    )
    .argument('<new>', 'the image the patch turns BASE into')
    .requiredOption('-o, --output <patch>', 'the patch file, or - for stdout')
    .addOption(blockSizeOption())
    .option('--reversible', 'also store the replaced blocks, so apply --reverse can undo the patch')
    .addOption(
      new Option(
        '--compress <method>',
        'compress the payload (zstd needs the optional zstd-napi package)',
      ).choices(['none', 'gzip', 'zstd'] as const),
    )
    .option('--json', 'print one JSON summary object (on stderr with -o -)')
    .option('-q, --quiet', 'print nothing but errors')
    .option('--debug', 'show stack traces on errors')
    .action(async (base, next, opts) => {
      const toStdout = opts.output === '-';
      if (toStdout && process.stdout.isTTY) {
        setExit(
          reportError(
            new BlksyncError(
              'EUSAGE',
              'refusing to write a binary patch to a terminal; redirect stdout or use -o FILE',
            ),
            false,
          ),
        );
        return;
      }
      const intr = interruptible();
      const { onProgress, bar } = progressFor(opts);
      const report = toStdout ? process.stderr : process.stdout;
      try {
        const result = await diff(base, next, toStdout ? process.stdout : opts.output, {
          blockSize: opts.blockSize,
          reversible: opts.reversible === true,
          compress: opts.compress ?? 'none',
          signal: intr.signal,
          ...(onProgress ? { onProgress } : {}),
        });
        bar?.clear();
        if (opts.json === true) report.write(`${JSON.stringify(result)}\n`);
        else if (opts.quiet !== true) report.write(`${diffSummary(result)}\n`);
      } catch (err) {
        bar?.clear();
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
