/** `blksync copy SRC DST [DST…]` */

import type { Command } from '@commander-js/extra-typings';
import {
  copy,
  copyMany,
  type ChannelStats,
  type CopyManyResult,
  type CopyManyOptions,
  type CopyResult,
} from '../copy.js';
import { BlksyncError } from '../errors.js';
import type { SignatureReport } from '../io/signature.js';
import { formatBytes, parseSize } from '../size.js';
import { hashThreadsOption, verifySampleOption } from './index-command.js';
import { blockSizeOption, printText, type SetExit, runOperation, timeoutOption } from './common.js';
import { EXIT_ERROR } from './exit-codes.js';

function copySummary(r: CopyResult): string {
  const verb = r.dryRun ? 'would write' : 'wrote';
  const lines = [
    `${r.dryRun ? 'dry run: ' : ''}scanned ${formatBytes(r.bytesScanned)} in ${r.seconds.toFixed(2)} s; ` +
      `${r.blocksDiffering} blocks of ${formatBytes(r.blockSize)} differ; ` +
      `${verb} ${formatBytes(r.dryRun ? r.bytesDiffering : r.bytesWritten)} in ${r.rangesWritten} ranges` +
      (r.created ? ` (${r.dryRun ? 'would create' : 'created'} ${r.destination}, sparse)` : ''),
  ];
  if (r.container !== undefined) {
    const c = r.container;
    lines.push(
      `decoded ${c.name}${c.entry !== undefined ? ` entry ${c.entry}` : ''}` +
        (c.decoder === 'qemu-img'
          ? c.temporary !== undefined
            ? ` with qemu-img (through a temporary raw file in ${c.temporary})`
            : ' with qemu-img map'
          : '') +
        (c.backing !== undefined ? `, backing file ${c.backing}` : '') +
        (c.overlayOfDestination === true
          ? ` (${r.destination} itself: only the overlay's own clusters were compared)`
          : ''),
    );
  }
  if (r.index !== undefined) lines.push(indexSummary(r));
  if (r.index?.source !== undefined) lines.push(sourceIndexSummary(r));
  if (r.bmap !== undefined) {
    const b = r.bmap;
    lines.push(
      `bmap ${b.path} (version ${b.version}): ${formatBytes(b.mappedBytes)} of ${formatBytes(r.bytesTotal)} mapped in ${b.ranges} ranges; ` +
        `${b.rangesVerified} range checksums verified`,
    );
    if (r.bytesPunched !== undefined && r.bytesPunched > 0) {
      lines.push(
        `${r.dryRun ? 'would punch' : 'punched'} holes over ${formatBytes(r.bytesPunched)} of ${r.destination}'s data in the unmapped areas (they read as zeros, as in the image)`,
      );
    }
    if (r.bytesZeroed !== undefined && r.bytesZeroed > 0) {
      lines.push(
        `wrote ${formatBytes(r.bytesZeroed)} of zeros over ${r.destination}'s data in the unmapped areas (its file system cannot punch holes; they read as zeros, as in the image)`,
      );
    }
    const sig = b.signature;
    if (sig !== undefined) {
      lines.push(
        `signature ${sig.kind === 'clearsigned' ? '(clearsigned) ' : `${sig.path} `}good, by ${sig.signers.join(', ')} ` +
          `(key ${signingKeysText(sig)}; checked with ${sig.verifiedWith})`,
      );
    }
  }
  if (r.http !== undefined) {
    const h = r.http;
    lines.push(
      `published ${h.index}: fetched ${formatBytes(h.bytesFetched)} in ${h.requests} requests ` +
        `(${h.chunksFetched} of ${h.chunksDiffering} differing chunks of ${formatBytes(h.chunkSize)} stored, ` +
        (h.chunksSeeded > 0 ? `${h.chunksSeeded} read where DST already holds them, ` : '') +
        `the rest zeros); chunk hashes add up to the published root`,
    );
  }
  if (r.verify !== undefined) {
    const v = r.verify;
    lines.push(
      `verified ${formatBytes(v.bytesVerified)} of ${r.destination} in ${v.seconds.toFixed(2)} s: read back ` +
        (v.direct
          ? 'bypassing the page cache (O_DIRECT)'
          : 'after fsync, through the page cache (no O_DIRECT here)') +
        (v.against === 'written'
          ? `, the bytes written match what was sent (${v.ranges} ${v.algorithm} segment digests)`
          : `, ${v.ranges} ranges match ${v.against === 'bmap' ? "the bmap's" : "the source's"} ${v.algorithm} checksums`),
    );
  }
  const channel = (r as { channel?: ChannelStats }).channel;
  if (channel !== undefined) {
    lines.push(
      `ssh ${channel.host}: sent ${formatBytes(channel.bytesSent)}, received ${formatBytes(channel.bytesReceived)}` +
        ` (remote node ${channel.remoteNode}${channel.encoding !== '' ? `, ${channel.encoding}` : ''})`,
    );
    if (channel.direct !== undefined) {
      lines.push(
        `ssh ${channel.direct.host} (between the hosts): sent ${formatBytes(channel.direct.bytesSent)}, received ${formatBytes(channel.direct.bytesReceived)}`,
      );
    }
  }
  if (r.destinationExtraBytes > 0) {
    lines.push(
      `${r.destination} is ${formatBytes(r.destinationExtraBytes)} larger than the source; the rest was left untouched`,
    );
  }
  return lines.join('\n');
}

/** The signers' primary keys, each with the subkey that signed when it is another. */
function signingKeysText(sig: SignatureReport): string {
  return sig.fingerprints
    .map((primary, i) => {
      const signing = sig.signingKeys[i];
      return signing !== undefined && signing !== primary
        ? `${primary}, signing subkey ${signing}`
        : primary;
    })
    .join('; ');
}

function indexSummary(r: CopyResult): string {
  // DST written meanwhile is a warning (WDST_WRITTEN_MEANWHILE, src/copy.ts), printed as it comes
  return indexLine(r);
}

function indexLine(r: CopyResult): string {
  const i = r.index!;
  const hashed = `hashed ${formatBytes(i.bytesHashed)}`;
  if (i.mode === 'used') {
    const reread =
      i.bytesReread > 0
        ? `, re-read ${formatBytes(i.bytesReread)} an earlier copy left unsure`
        : '';
    const word = i.trustedOnWord === true ? ' (trusted on your word: --trust-index)' : '';
    return `index ${i.path}: used${word}, ${r.dryRun ? '' : 'updated; '}read ${formatBytes(r.bytesRead)} of ${r.destination} (${i.sampleBlocks} sample blocks${reread}); ${hashed}`;
  }
  const why = i.reason !== undefined ? ` (${i.reason})` : '';
  return `index ${i.path}: ${r.dryRun ? 'would be ' : ''}${i.mode}${why}; ${hashed}`;
}

function sourceIndexSummary(r: CopyResult): string {
  const s = r.index!.source!;
  if (s.mode === 'used') {
    return `index of SRC ${s.path}: used; read ${formatBytes(s.bytesRead ?? r.bytesScanned)} of ${r.source} (${s.sampleBlocks} sample blocks)`;
  }
  const why = s.reason !== undefined ? ` (${s.reason})` : '';
  if (s.notWritten !== undefined) {
    return `index of SRC ${s.path}: not written${why}: ${s.notWritten}; read all of ${r.source}`;
  }
  return `index of SRC ${s.path}: ${r.dryRun ? 'would be ' : ''}${s.mode}${why}; read all of ${r.source}`;
}

export function registerCopy(program: Command, setExit: SetExit): void {
  program
    .command('copy')
    .description('write SRC onto DST, writing only the blocks that differ')
    .argument('<src>', 'source image file or block device, or [user@]host:path')
    .argument(
      '[dst...]',
      'destination file or block device (a missing file is created, sparse), or [user@]host:path; ' +
        'several: SRC is read once and each written where it differs',
    )
    .option(
      '--jobs <n>',
      'with several host:path destinations: ssh links open at once (default: all, at most 16); fewer means waves, each reading SRC again',
      (v: string) => Number(v),
    )
    .option(
      '--targets <file>',
      'more destinations, one per line (# starts a comment line), after those given as arguments',
    )
    .addOption(blockSizeOption())
    .option('-n, --dry-run', 'scan and report what would be written; write nothing')
    .option('--full', 'write everything without reading DST (like dd)')
    .option(
      '--index <file>',
      'know DST from this index instead of reading it, and update it ("auto": cached)',
    )
    .option(
      '--src-index <file>',
      'with --index: an index of SRC, so only blocks whose hashes differ are read; written when missing or stale ("auto": cached, the default with --index auto for a local copy; a remote SRC\'s is kept on its host: host:FILE or auto)',
    )
    .option('--no-src-index', 'with --index auto: do not keep or use an index of SRC')
    .option(
      '--bmap <file>',
      "SRC's bmap (file or URL; default: found beside a local SRC as bmaptool does)",
    )
    .option('--no-bmap', 'ignore any bmap; consider the whole image')
    .option('--no-verify-checksums', "do not verify the bmap's range checksums")
    .option('--bmap-sig <file>', "the bmap's detached signature (default: BMAP.asc, then BMAP.sig)")
    .option('--no-sig-verify', "do not check the bmap's signature")
    .option('--fingerprint <fpr>', 'require the bmap to be signed by this key (full fingerprint)')
    .option('--keyring <file>', "check the bmap's signature with the keys in this file only")
    .option(
      '--verify',
      'read back what was written (bypassing the page cache) and compare checksums',
    )
    .option(
      '--size <size>',
      'image size, for compressed stdin or URL sources without a bmap (checked at the end)',
      (v: string) => parseSize(v, 'image size'),
    )
    .option('--raw', 'write SRC as it is even when it is a container (zip, tar, qcow2, ...)')
    .option('--entry <name>', 'the file of a zip or tar SRC that holds the image')
    .option('--rebuild-index', 'read DST once and write a fresh index, whatever the old one says')
    .option(
      '--trust-index',
      'use the index although nothing vouches that DST is unchanged since it was written (you do)',
    )
    .addOption(verifySampleOption())
    .addOption(hashThreadsOption())
    .option('--ssh <command>', "ssh command for host:path ends, e.g. 'ssh -p 2222 -i key'")
    .option('--remote-node <path>', 'node on the remote host (default: node on its PATH)')
    .option(
      '--sudo',
      'run the remote agent as root: ssh runs `sudo -n NODE -e BOOTSTRAP`, and that root node ' +
        'runs the agent code this blksync sends over the ssh channel; the agent opens only the ' +
        'paths given (DST or SRC, and the index) but is full root, so sudo must allow NODE ' +
        'without a password (NOPASSWD), which gives this login root on that host; with --direct, ' +
        "SRC's agent also runs ssh to DST's host as root (root's ssh keys and config)",
    )
    .option(
      '--direct',
      "between two hosts: SRC's host sends to DST's host over ssh itself, not through here",
    )
    .addOption(timeoutOption())
    .option('--json', 'print one JSON summary object on stdout')
    .option('-q, --quiet', 'print nothing but errors and warnings')
    .option('--debug', 'show stack traces on errors')
    .action(async (src, dstArgs, opts) => {
      const dsts = [
        ...dstArgs,
        ...(opts.targets !== undefined
          ? await import('../fanout/targets.js').then((t) => t.readTargets(opts.targets!))
          : []),
      ];
      if (dsts.length === 0) {
        throw new BlksyncError('EUSAGE', "missing required argument 'dst' (or --targets FILE)");
      }
      const options = (ctx: RunContext): CopyManyOptions => ({
        blockSize: opts.blockSize,
        dryRun: opts.dryRun === true,
        full: opts.full === true,
        ...(typeof opts.bmap === 'string' ? { bmap: opts.bmap } : {}),
        noBmap: opts.bmap === false,
        noVerifyChecksums: opts.verifyChecksums === false,
        ...(opts.bmapSig !== undefined ? { bmapSig: opts.bmapSig } : {}),
        noSigVerify: opts.sigVerify === false,
        ...(opts.fingerprint !== undefined ? { fingerprint: opts.fingerprint } : {}),
        ...(opts.keyring !== undefined ? { keyring: opts.keyring } : {}),
        verify: opts.verify === true,
        ...(opts.size !== undefined ? { size: opts.size } : {}),
        raw: opts.raw === true,
        ...(opts.entry !== undefined ? { entry: opts.entry } : {}),
        ...(opts.index !== undefined ? { index: opts.index } : {}),
        ...(opts.srcIndex !== undefined ? { srcIndex: opts.srcIndex } : {}),
        rebuildIndex: opts.rebuildIndex === true,
        ...(opts.trustIndex === true ? { trustIndex: true } : {}),
        ...(opts.verifySample !== undefined ? { verifySample: opts.verifySample } : {}),
        ...(opts.hashThreads !== undefined ? { hashThreads: opts.hashThreads } : {}),
        remote: { ssh: opts.ssh, remoteNode: opts.remoteNode, sudo: opts.sudo === true },
        direct: opts.direct === true,
        ...(opts.jobs !== undefined ? { jobs: opts.jobs } : {}),
        ...(opts.timeout !== undefined ? { timeout: opts.timeout } : {}),
        signal: ctx.signal,
        onWarning: ctx.onWarning,
        ...(ctx.onProgress ? { onProgress: ctx.onProgress } : {}),
      });
      if (dsts.length === 1) {
        await runOperation(opts, setExit, (ctx) => copy(src, dsts[0]!, options(ctx)), copySummary);
        return;
      }
      await runOperation(
        opts,
        setExit,
        async (ctx) => {
          // on a terminal one line per destination and the total, instead of the one bar
          const lines =
            ctx.onProgress !== undefined
              ? new (await import('./fanout-progress.js')).FanoutProgress(process.stderr, dsts)
              : undefined;
          const many = await copyMany(src, dsts, {
            ...options(ctx),
            ...(lines !== undefined
              ? {
                  onProgress: (p) => lines.total(p),
                  onDestinationProgress: (i, p) => lines.destination(i, p),
                }
              : {}),
          })
            .finally(() => lines?.clear())
            .catch((err: unknown) => {
              // an interrupted fan-out's partial result, summarized and printed as a finished one's
              if (
                err instanceof BlksyncError &&
                err.code === 'EINTERRUPTED' &&
                isMany(err.partial)
              ) {
                throw new BlksyncError(err.code, err.message, {
                  cause: err,
                  partial: manyJson(err.partial),
                });
              }
              throw err;
            });
          // one line per dropped destination on stderr, as every error is printed
          for (const d of many.destinations) {
            if (d.error === undefined) continue;
            const { code, message } = errorObject(d.error);
            printText(process.stderr, `blksync: ${d.destination}: ${message} [${code}]`);
          }
          return manyJson(many);
        },
        manySummary,
        { exitCode: (r) => (r.failed > 0 ? EXIT_ERROR : 0) },
      );
    });
}

type RunContext = Parameters<Parameters<typeof runOperation>[2]>[0];

function isMany(partial: unknown): partial is CopyManyResult {
  return typeof partial === 'object' && partial !== null && 'destinations' in partial;
}

function errorObject(err: Error): { code: string; message: string } {
  return { code: err instanceof BlksyncError ? err.code : 'EINTERNAL', message: err.message };
}

/** What `--json` prints for several destinations: each error as `{code, message}`. */
type ManyJson = Omit<CopyManyResult, 'destinations'> & {
  destinations: {
    destination: string;
    result?: CopyResult;
    bytesRead: number;
    bytesWritten: number;
    error?: { code: string; message: string; partial?: unknown };
  }[];
};

function manyJson(r: CopyManyResult): ManyJson {
  return {
    ...r,
    destinations: r.destinations.map((d) => ({
      destination: d.destination,
      ...(d.result !== undefined ? { result: d.result } : {}),
      bytesRead: d.bytesRead,
      bytesWritten: d.bytesWritten,
      ...(d.error !== undefined
        ? {
            error: {
              ...errorObject(d.error),
              ...(d.error instanceof BlksyncError && d.error.partial !== undefined
                ? { partial: d.error.partial }
                : {}),
            },
          }
        : {}),
    })),
  };
}

function manySummary(r: ManyJson): string {
  const n = r.destinations.length;
  const lines = [
    `${r.dryRun ? 'dry run: ' : ''}read ${r.source} once: ${formatBytes(r.sourceBytesRead)} in ${r.seconds.toFixed(2)} s ` +
      `for ${n} destinations (${formatBytes(r.bufferBytes)} shared buffer); ` +
      (r.failed > 0 ? `${r.failed} failed` : 'all done'),
  ];
  // SRC's bmap is the same for every destination: said once
  const bmap = r.destinations.find((d) => d.result?.bmap !== undefined)?.result?.bmap;
  if (bmap !== undefined) {
    lines.push(
      `bmap ${bmap.path}: ${formatBytes(bmap.mappedBytes)} of ${formatBytes(r.bytesTotal)} mapped in ${bmap.ranges} ranges; ` +
        `${bmap.rangesVerified} range checksums verified`,
    );
  }
  for (const d of r.destinations) {
    if (d.error !== undefined) {
      lines.push(
        `${d.destination}: ${d.error.code === 'EINTERRUPTED' ? 'interrupted' : `failed (${d.error.code})`}` +
          (d.bytesWritten > 0
            ? `, ${formatBytes(d.bytesWritten)} written before`
            : ', nothing written'),
      );
      continue;
    }
    const c = d.result!;
    lines.push(
      `${d.destination}: ${c.blocksDiffering} blocks of ${formatBytes(c.blockSize)} differ; ` +
        `${c.dryRun ? 'would write' : 'wrote'} ${formatBytes(c.dryRun ? c.bytesDiffering : c.bytesWritten)} in ${c.rangesWritten} ranges, ` +
        `read ${formatBytes(c.bytesRead)}` +
        (c.created ? ` (${c.dryRun ? 'would create' : 'created'}, sparse)` : '') +
        (c.index !== undefined ? `; index ${c.index.path}: ${c.index.mode}` : '') +
        (c.verify !== undefined ? `; verified ${formatBytes(c.verify.bytesVerified)}` : '') +
        // what a bmap copy did to this DST's data in the unmapped areas, as a single copy says
        (c.bytesPunched !== undefined && c.bytesPunched > 0
          ? `; ${c.dryRun ? 'would punch' : 'punched'} holes over ${formatBytes(c.bytesPunched)} of its data in the unmapped areas`
          : '') +
        (c.bytesZeroed !== undefined && c.bytesZeroed > 0
          ? `; wrote ${formatBytes(c.bytesZeroed)} of zeros over its data in the unmapped areas (no hole punching there)`
          : ''),
    );
  }
  return lines.join('\n');
}
