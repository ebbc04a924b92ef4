/** `blksync bmap create IMAGE [-o FILE]`: bmaptool-compatible block maps. */

import type { Command } from '@commander-js/extra-typings';
import { BlksyncError } from '../errors.js';
import { formatBytes } from '../size.js';
import { interruptible, printText, progressFor, reportError, type SetExit } from './common.js';

export function registerBmap(program: Command, setExit: SetExit): void {
  const bmap = program
    .command('bmap')
    .description('bmap files (block maps of sparse images, as bmaptool)');
  bmap
    .command('create')
    .description('write the block map of a sparse IMAGE (stdout unless -o)')
    .argument('<image>', 'sparse image file')
    .option('-o, --output <file>', 'write the bmap to FILE')
    .option('--detect-zeros', 'also leave out allocated blocks that hold only zeros')
    .option('--checksum <type>', 'range checksum: sha256 (default), sha512, sha1', 'sha256')
    .option('--json', 'print a JSON summary on stdout (needs -o)')
    .option('-q, --quiet', 'print nothing but errors')
    .option('--debug', 'show stack traces on errors')
    .action(async (image, opts) => {
      const intr = interruptible();
      const { onProgress, bar } = progressFor(opts);
      try {
        const { createBmap } = await import('../engine/bmap-create.js');
        const result = await createBmap(image, {
          detectZeros: opts.detectZeros === true,
          checksumType: opts.checksum.toLowerCase(),
          signal: intr.signal,
          ...(opts.output !== undefined ? { output: opts.output } : {}),
          ...(onProgress ? { onProgress } : {}),
        });
        bar?.clear();
        if (opts.output === undefined) {
          process.stdout.write(result.text);
        } else if (opts.json === true) {
          process.stdout.write(`${JSON.stringify({ ...result, text: undefined })}\n`);
        } else if (opts.quiet !== true) {
          printText(
            process.stderr,
            `${result.output}: ${result.mappedBlocks} of ${result.blocksCount} blocks of ` +
              `${formatBytes(result.blockSize)} mapped (${formatBytes(result.mappedBlocks * result.blockSize)}) ` +
              `in ${result.ranges} ranges, ${result.seconds.toFixed(2)} s`,
          );
        }
      } catch (err) {
        bar?.clear();
        const status = reportError(err, opts);
        const interrupted = err instanceof BlksyncError && err.code === 'EINTERRUPTED';
        setExit(interrupted ? intr.exitCode() : status);
      } finally {
        intr.dispose();
      }
    });
}
