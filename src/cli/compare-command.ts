/** `blksync compare A B`: cmp for images. */

import type { Command } from '@commander-js/extra-typings';
import type { CompareResult } from '../engine/compare.js';
import { formatBytes } from '../size.js';
import { blockSizeOption, type SetExit, runOperation } from './common.js';

function compareSummary(r: CompareResult): string {
  const lines: string[] = [];
  for (const range of r.ranges) {
    lines.push(`${range.start}-${range.end} (${range.end - range.start} bytes)`);
  }
  if (r.rangeCount > r.ranges.length)
    lines.push(`... ${r.rangeCount - r.ranges.length} more ranges`);
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

export function registerCompare(program: Command, setExit: SetExit): void {
  program
    .command('compare')
    .description('report the byte ranges where A and B differ (exit 0 same, 1 different, 2 error)')
    .argument('<a>', 'first image file or block device')
    .argument('<b>', 'second image file or block device')
    .addOption(blockSizeOption())
    .option('--json', 'print one JSON object on stdout')
    .option('-q, --quiet', 'print nothing; the exit status tells')
    .option('--debug', 'show stack traces on errors')
    .action((a, b, opts) =>
      runOperation(
        opts,
        setExit,
        async ({ signal, onProgress }) =>
          (await import('../engine/compare.js')).compare(a, b, {
            blockSize: opts.blockSize,
            signal,
            ...(onProgress ? { onProgress } : {}),
          }),
        compareSummary,
        // cmp's convention: 1 different, 2 trouble of any kind
        { exitCode: (r) => (r.same ? 0 : 1), errorExit: (status) => (status === 0 ? 0 : 2) },
      ),
    );
}
