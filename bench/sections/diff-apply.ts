/**
 * Section `diff-apply`: differential images. Making a patch of new.img against old.img and
 * applying it to a fresh copy of old.img, with blksync, xdelta3 and rsync's batch mode:
 *
 *   blksync diff BASE NEW -o P                     blksync apply P DST
 *   xdelta3 -e -s BASE NEW P                       xdelta3 -d -s DST P OUT (a new file)
 *   rsync --only-write-batch=P ... NEW BASECOPY    rsync --read-batch=P --inplace -I DST
 *
 * plus `blksync diff -o - | blksync apply -`, both in one pipe. The table puts the times and
 * the patch sizes side by side; the bar (issue 4) is a patch within 1% of the changed bytes
 * plus headers, and diff + apply faster than each peer.
 */

import { copyFile, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ensureImages, type ImagePair } from '../data.js';
import {
  assertSameFiles,
  formatBytes,
  formatRss,
  formatSeconds,
  freshCopy,
  measure,
  renderTable,
  runTrials,
  sh,
  summarize,
  warm,
  type Measurement,
  type Trial,
  type TrialResult,
} from '../measure.js';
import type { BenchOptions, Section } from '../section.js';
import { CLI, ensureBuilt, ensureCommands } from '../setup.js';

const PEERS = { xdelta3: 'xdelta3', rsync: 'rsync' };

interface Tool {
  label: string;
  /** Makes the patch: BASE, NEW and OUT are placeholders. */
  make: string;
  /** Applies PATCH to DST, leaving the result in DST. */
  apply: string;
  /** Where the patch is kept for the apply trials. */
  file: string;
}

function toolsIn(dir: string): Tool[] {
  const blksync = sh(CLI);
  return [
    {
      label: 'blksync',
      make: `node ${blksync} diff BASE NEW -o OUT`,
      apply: `node ${blksync} apply PATCH DST`,
      file: path.join(dir, 'da-patch.bsp'),
    },
    {
      label: 'xdelta3',
      make: 'xdelta3 -e -f -s BASE NEW OUT',
      // xdelta3 writes the result as a new file, which then replaces DST
      apply: 'xdelta3 -d -f -s DST PATCH DST.out && mv DST.out DST',
      file: path.join(dir, 'da-patch.vcdiff'),
    },
    {
      label: 'rsync batch',
      // rsync reads the destination (a copy of BASE) to make the batch, and leaves it as it is
      make: 'rsync --only-write-batch=OUT --inplace --no-whole-file -I NEW BASECOPY',
      apply: 'rsync --read-batch=PATCH --inplace -I DST',
      file: path.join(dir, 'da-patch.rsync'),
    },
  ];
}

function fill(template: string, vars: Record<string, string>): string {
  return template.replace(/\b(BASECOPY|BASE|NEW|OUT|PATCH|DST)\b/g, (k) => sh(vars[k] ?? k));
}

function failure(label: string, command: string, m: Measurement, why: string): Error {
  return new Error(`CHECK FAILED: ${label}: ${why}\n$ ${command}\n${m.stdout}${m.stderr}`);
}

async function run(options: BenchOptions): Promise<void> {
  const { log } = options;
  await ensureCommands(PEERS, log);
  await ensureBuilt(log);
  const pair: ImagePair = await ensureImages(options.imageSize, undefined, log);
  const dir = pair.dir;
  const out = path.join(dir, 'da-out');
  const dst = path.join(dir, 'da-dst.img');
  const baseCopy = path.join(dir, 'da-base-copy.img');
  const tools = toolsIn(dir);
  const vars = { BASE: pair.oldPath, NEW: pair.newPath, OUT: out, DST: dst, BASECOPY: baseCopy };
  await freshCopy(pair.oldPath, baseCopy);

  log(
    `BASE = ${pair.oldPath}, NEW = ${pair.newPath}: ${formatBytes(pair.size)}, ` +
      `${pair.changes.length} unaligned changes, ${pair.differingBytes} bytes differ ` +
      `(${pair.differingBlocks} blocks of 4 KiB)\n` +
      `${options.runs} runs each, round robin, warm page cache; ${os.cpus().length} CPUs, ` +
      `load average ${os.loadavg()[0]!.toFixed(2)}, node ${process.version}\n`,
  );

  // making the patches; each run's patch is kept for the apply trials
  const sizes = new Map<string, number>();
  const makeTrials: Trial[] = tools.map((tool) => {
    const command = fill(tool.make, vars);
    return {
      label: `${tool.label} make`,
      command,
      run: () => measure(command),
      check: async (m) => {
        if (m.status !== 0) throw failure(tool.label, command, m, `exit status ${m.status}`);
        sizes.set(tool.label, (await stat(out)).size);
        await copyFile(out, tool.file);
        await assertSameFiles(pair.oldPath, baseCopy);
      },
    };
  });
  const made = await runTrials(makeTrials, {
    runs: options.runs,
    file: baseCopy,
    log,
    prepare: async () => {
      await rm(out, { force: true });
      await rm(`${out}.sh`, { force: true });
      await warm([pair.oldPath, pair.newPath, baseCopy]);
    },
  });

  const applyTrials: Trial[] = [
    ...tools.map((tool) => ({
      label: `${tool.label} apply`,
      template: tool.apply,
      file: tool.file,
    })),
    {
      label: 'blksync pipe',
      template: `node ${sh(CLI)} diff BASE NEW -o - | node ${sh(CLI)} apply - DST`,
      file: '',
    },
  ].map(({ label, template, file }) => {
    const command = fill(template, { ...vars, PATCH: file });
    return {
      label,
      command,
      run: () => measure(command),
      check: async (m: Measurement) => {
        if (m.status !== 0) throw failure(label, command, m, `exit status ${m.status}`);
        await assertSameFiles(pair.newPath, dst);
      },
    };
  });
  const applied = await runTrials(applyTrials, {
    runs: options.runs,
    file: dst,
    log,
    prepare: async () => {
      await freshCopy(pair.oldPath, dst);
      await warm([dst, pair.oldPath, pair.newPath, ...tools.map((t) => t.file)]);
    },
  });
  await rm(out, { force: true });
  await rm(`${out}.sh`, { force: true });

  const median = (r: TrialResult): number => summarize(r.seconds).median;
  const changed = pair.differingBytes;
  const blk = tools.findIndex((t) => t.label === 'blksync');
  const blkTotal = median(made[blk]!) + median(applied[blk]!);
  const extents = pair.changes.reduce((n, c) => n + c.length, 0);
  const blkSize = sizes.get('blksync') ?? NaN;
  const rows = tools.map((tool, i) => {
    const size = sizes.get(tool.label) ?? NaN;
    const total = median(made[i]!) + median(applied[i]!);
    return [
      tool.label,
      formatSeconds(summarize(made[i]!.seconds)),
      formatSeconds(summarize(applied[i]!.seconds)),
      total.toFixed(3),
      (total / blkTotal).toFixed(2),
      `${formatRss(made[i]!.peakRss)} / ${formatRss(applied[i]!.peakRss)}`,
      String(size),
      `${(((size - changed) / changed) * 100).toFixed(2)}%`,
    ];
  });
  const pipe = applied[tools.length]!;
  rows.push([
    'blksync pipe',
    '(in apply)',
    formatSeconds(summarize(pipe.seconds)),
    median(pipe).toFixed(3),
    (median(pipe) / blkTotal).toFixed(2),
    `— / ${formatRss(pipe.peakRss)}`,
    '(stream)',
    '',
  ]);
  log(
    `\nwarm ${formatBytes(pair.size)}: make a patch, then apply it to a fresh copy of BASE, ` +
      `${options.runs} runs (load average now ${os.loadavg()[0]!.toFixed(2)})\n`,
  );
  log(
    renderTable(
      [
        'tool',
        'make s (min–max)',
        'apply s (min–max)',
        'make+apply s',
        '× blksync',
        'peak RSS (make / apply)',
        'patch bytes',
        'over changed bytes',
      ],
      rows,
      ['left', 'right', 'right', 'right', 'right', 'right', 'right', 'right'],
    ),
  );
  log(
    [
      '',
      `changed bytes: ${changed} differing bytes in ${extents} bytes of changed regions ` +
        `(the ${pair.changes.length} changes; random new bytes equal the old ones 1 time in 256)`,
      `blksync's patch is the changed regions + ${blkSize - extents} bytes ` +
        `(${(((blkSize - extents) / extents) * 100).toFixed(2)}%); times are medians`,
      'over changed bytes: (patch bytes - changed bytes) / changed bytes; blksync carries 144 bytes',
      '  of header and trailer and 136 bytes per record, plus unchanged bytes between changes in one block',
      'xdelta3 apply writes a new file (the whole image) and renames it over DST; rsync and blksync',
      '  write in place; blksync apply fsyncs inside its time, the others do not; blksync apply and',
      '  rsync --read-batch read all of DST (blksync to check it between the records), xdelta3 all of BASE',
    ].join('\n'),
  );
}

export const diffApplySection: Section = {
  name: 'diff-apply',
  description: 'blksync diff + apply vs xdelta3 and rsync batch mode: times and patch sizes',
  default: true,
  run,
};
