/** `blksync diff BASE NEW -o PATCH` */

import { Option, type Command } from '@commander-js/extra-typings';
import type { DiffResult } from '../engine/diff.js';
import { BlksyncError } from '../errors.js';
import { formatBytes, parseSize } from '../size.js';
import { blockSizeOption, type SetExit, runOperation, timeoutOption } from './common.js';

function diffSummary(r: DiffResult): string {
  const head =
    `scanned ${formatBytes(r.bytesScanned)} in ${r.seconds.toFixed(2)} s; ` +
    `${formatBytes(r.bytesDiffering)} differ; wrote ${r.output === '-' ? 'a patch' : r.output} of `;
  if (r.format === 'simg') {
    return `${head}${formatBytes(r.patchBytes)} (Android sparse image, ${r.records} chunks)`;
  }
  return (
    head +
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
    .argument(
      '<new>',
      'the image the patch turns BASE into, read whole (no bmap): file or block device, compressed (gzip, xz, zstd, bzip2, lz4), - for stdin, or an http(s) URL',
    )
    .requiredOption('-o, --output <patch>', 'the patch file, or - for stdout')
    .addOption(blockSizeOption())
    .addOption(timeoutOption())
    .option('--reversible', 'also store the replaced blocks, so apply --reverse can undo the patch')
    .addOption(
      new Option(
        '--compress <method>',
        'compress the payload (zstd needs the optional zstd-napi package)',
      ).choices(['none', 'gzip', 'zstd'] as const),
    )
    .addOption(
      new Option(
        '--format <format>',
        "patch: a blksync patch (default); simg: an Android sparse image of NEW with its differing blocks and don't-care elsewhere, for fastboot or simg2img (needs -o FILE)",
      ).choices(['patch', 'simg'] as const),
    )
    .option(
      '--size <size>',
      'size of NEW, for compressed stdin or URL sources (checked at the end)',
      (v: string) => parseSize(v, 'image size'),
    )
    .option('--json', 'print one JSON summary object (on stderr with -o -)')
    .option('-q, --quiet', 'print nothing but errors')
    .option('--debug', 'show stack traces on errors')
    .action(async (base, next, opts) => {
      const toStdout = opts.output === '-';
      await runOperation(
        opts,
        setExit,
        async ({ signal, onProgress }) => {
          if (toStdout && process.stdout.isTTY)
            throw new BlksyncError(
              'EUSAGE',
              'refusing to write a binary patch to a terminal; redirect stdout or use -o FILE',
            );
          // loaded when used, so other commands do not pay for its modules at start-up
          const { diff } = await import('../engine/diff.js');
          return diff(base, next, toStdout ? process.stdout : opts.output, {
            blockSize: opts.blockSize,
            reversible: opts.reversible === true,
            compress: opts.compress ?? 'none',
            format: opts.format ?? 'patch',
            size: opts.size,
            ...(opts.timeout !== undefined ? { timeout: opts.timeout } : {}),
            signal,
            ...(onProgress ? { onProgress } : {}),
          });
        },
        diffSummary,
        { out: toStdout ? process.stderr : process.stdout },
      );
    });
}
