/** `blksync index SRC -o FILE` and `blksync index --list`. */

import { Option, type Command } from '@commander-js/extra-typings';
import type { CachedIndex } from '../engine/make-index.js';
import { BlksyncError } from '../errors.js';
import { cacheDir } from '../io/cache-dir.js';
import { formatBytes, parseSize } from '../size.js';
import {
  interruptible,
  printText,
  progressFor,
  reportError,
  type SetExit,
  timeoutOption,
} from './common.js';

/** --hash-threads N: worker threads hashing (0 hashes on the main thread). */
export function hashThreadsOption(): Option<'--hash-threads <n>', undefined, undefined, number> {
  return new Option('--hash-threads <n>', 'worker threads hashing (default: one per core, max 4)')
    .argParser((v: string) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 0 || n > 64) {
        throw new BlksyncError('EUSAGE', `invalid --hash-threads "${v}": use 0 to 64`);
      }
      return n;
    })
    .hideHelp();
}

/** --verify-sample N: blocks of DST checked against an index before trusting it. */
export function verifySampleOption(): Option<'--verify-sample <n>', undefined, undefined, number> {
  return new Option(
    '--verify-sample <n>',
    'with --index: blocks of DST read and checked before trusting the index (default 16, 0 skips)',
  ).argParser((v: string) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0 || n > 1_000_000) {
      throw new BlksyncError('EUSAGE', `invalid --verify-sample "${v}": use 0 to 1000000`);
    }
    return n;
  });
}

function listing(entries: CachedIndex[]): string {
  if (entries.length === 0) return `no cached indexes in ${cacheDir()}`;
  const lines = entries.map((e) => {
    if (e.error !== undefined) return `${e.path}\n  unreadable: ${e.error}`;
    const id = e.identity;
    const where = id?.path !== undefined ? `${id.path} ` : '';
    return (
      `${e.path}\n  ${where}(${id?.key ?? '?'}), ${formatBytes(e.imageSize ?? 0)} in ` +
      `${formatBytes(e.blockSize ?? 0)} blocks, ${e.state ?? '?'}, written ${e.writtenAt ?? '?'}`
    );
  });
  return lines.join('\n');
}

export function registerIndex(program: Command, setExit: SetExit): void {
  program
    .command('index')
    .description(
      'write an index of SRC (a SHA-256 per block of the whole image, no bmap) for `copy --index` or as BASE of `diff`; or list the cache',
    )
    .argument(
      '[src]',
      'image file or block device to index; compressed (gzip, xz, zstd, bzip2, lz4), - for stdin, or an http(s) URL',
    )
    .option(
      '-o, --output <file>',
      'index file to write ("auto": the cache, keyed by SRC; only for a file or device read as it is)',
    )
    .addOption(
      new Option('-b, --block-size <size>', 'bytes per hashed block (default 64K)').argParser(
        (v: string) => parseSize(v, 'block size'),
      ),
    )
    .option(
      '--size <size>',
      'image size, for compressed stdin or URL sources (checked at the end)',
      (v: string) => parseSize(v, 'image size'),
    )
    .option('--list', `list the indexes cached for --index auto (in ${cacheDir()})`)
    .addOption(hashThreadsOption())
    .addOption(timeoutOption())
    .option('--json', 'print one JSON object on stdout')
    .option('-q, --quiet', 'print nothing but errors')
    .option('--debug', 'show stack traces on errors')
    .action(async (src, opts) => {
      const intr = interruptible();
      const { onProgress, bar } = progressFor(opts);
      try {
        // loaded here, not at start-up: other commands do not pay for hashing's modules
        const { listCachedIndexes, makeIndex } = await import('../engine/make-index.js');
        if (opts.list === true) {
          const entries = await listCachedIndexes();
          if (opts.json === true) process.stdout.write(`${JSON.stringify(entries)}\n`);
          else printText(process.stdout, listing(entries));
          return;
        }
        if (src === undefined || opts.output === undefined) {
          throw new BlksyncError('EUSAGE', 'usage: blksync index SRC -o FILE (or --list)');
        }
        const result = await makeIndex(src, opts.output, {
          blockSize: opts.blockSize,
          size: opts.size,
          ...(opts.timeout !== undefined ? { timeout: opts.timeout } : {}),
          signal: intr.signal,
          ...(opts.hashThreads !== undefined ? { hashThreads: opts.hashThreads } : {}),
          ...(onProgress ? { onProgress } : {}),
        });
        bar?.clear();
        if (opts.json === true) process.stdout.write(`${JSON.stringify(result)}\n`);
        else if (opts.quiet !== true) {
          printText(
            process.stdout,
            `${result.output}: ${result.blockCount} blocks of ${formatBytes(result.blockSize)} ` +
              `(${result.algorithm}) of ${src}, ${formatBytes(result.imageSize)} in ` +
              `${result.seconds.toFixed(2)} s`,
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
