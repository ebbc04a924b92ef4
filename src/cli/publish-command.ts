/** `blksync publish IMG [-o DIR]`: the files a web server serves for `copy https://…/IMG DST`. */

import { Option, type Command } from '@commander-js/extra-typings';
import { formatBytes, parseSize } from '../size.js';
import { runOperation, type SetExit } from './common.js';

export function registerPublish(program: Command, setExit: SetExit): void {
  program
    .command('publish')
    .description(
      'write IMG.blkpub and IMG.blkpub.data beside IMG (or into DIR): put them on a web server beside IMG, and `copy https://…/IMG DST` downloads only the chunks DST lacks',
    )
    .argument('<image>', 'image file or block device')
    .option('-o, --output-dir <dir>', 'directory to write into (default: beside IMG)')
    .addOption(
      new Option('--chunk-size <size>', 'bytes per chunk, a power of two (default 64K)').argParser(
        (v: string) => parseSize(v, 'chunk size'),
      ),
    )
    .addOption(
      new Option('--codec <codec>', 'chunk compression (default brotli)').choices([
        'brotli',
        'deflate',
      ] as const),
    )
    .option('--json', 'print one JSON object on stdout')
    .option('-q, --quiet', 'print nothing but errors')
    .option('--debug', 'show stack traces on errors')
    .action(async (image, opts) => {
      await runOperation(
        opts,
        setExit,
        async ({ signal, onProgress }) => {
          const [{ publish }, { CODEC_BROTLI, CODEC_DEFLATE }] = await Promise.all([
            import('../delta/publish.js'),
            import('../formats/published.js'),
          ]);
          return publish(image, {
            outputDir: opts.outputDir,
            chunkSize: opts.chunkSize,
            codec:
              opts.codec === 'deflate'
                ? CODEC_DEFLATE
                : opts.codec === 'brotli'
                  ? CODEC_BROTLI
                  : undefined,
            signal,
            ...(onProgress
              ? {
                  onProgress: (p: { bytesScanned: number; bytesTotal: number }) =>
                    onProgress({ ...p, bytesDiffering: 0, bytesWritten: 0 }),
                }
              : {}),
          });
        },
        (result) =>
          `${result.index} (${formatBytes(result.indexBytes)}) and ${result.data} ` +
          `(${formatBytes(result.dataBytes)}, ${result.codec}): ${result.chunks} chunks of ` +
          `${formatBytes(result.chunkSize)}, ${result.zeroChunks} of zeros, of ` +
          `${formatBytes(result.imageSize)} in ${result.seconds.toFixed(2)} s\nsha256 ${result.sha256}`,
      );
    });
}
