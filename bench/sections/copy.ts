/**
 * Section `copy`: `blksync copy NEW DST` where DST holds the old image, against the peers
 * doing the same job on the same files (cmp only reads, as the floor for reading both
 * sides), then blksync at several block sizes (how the default block size is chosen).
 *
 * Every run starts from a fresh, fsynced copy of the old image with SRC and DST read once
 * (warm page cache), and ends with `cmp` proving DST equals SRC.
 */

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

/** Peer commands and the Debian packages that provide them. */
export const PEERS = { cmp: 'diffutils', ddpt: 'ddpt', rsync: 'rsync', dd: 'coreutils' };
const BLOCK_SIZES = ['4K', '64K', '1M'];

export interface CommandSpec {
  label: string;
  /** The command with SRC and DST as placeholders (shown in the table as is). */
  template: string;
  /**
   * How a run is checked: `writes` must leave DST equal to SRC; `reads` (cmp) must report
   * every differing byte; `reference` (start-up cost) must just succeed.
   */
  kind: 'writes' | 'reads' | 'reference';
}

export const PEER_COMMANDS: readonly CommandSpec[] = [
  { label: 'blksync copy', template: 'node bin/blksync.js copy SRC DST', kind: 'writes' },
  // what every blksync command pays before it reads a byte: Node and the module graph
  { label: 'blksync start-up', template: 'node bin/blksync.js --version', kind: 'reference' },
  // -l makes cmp read both files to the end (it stops at the first difference otherwise,
  // and also when its output is /dev/null); one line per differing byte
  { label: 'cmp -l', template: 'cmp -l SRC DST | wc -l', kind: 'reads' },
  { label: 'ddpt sparing', template: 'ddpt if=SRC of=DST bs=4096 oflag=sparing', kind: 'writes' },
  {
    label: 'rsync --inplace',
    template: 'rsync --inplace --no-whole-file -I SRC DST',
    kind: 'writes',
  },
  {
    label: 'dd notrunc',
    template: 'dd if=SRC of=DST bs=4M conv=notrunc status=none',
    kind: 'writes',
  },
];

const BLOCK_SIZE_COMMANDS: readonly CommandSpec[] = BLOCK_SIZES.map((bs) => ({
  label: `blksync -b ${bs}`,
  template: `node bin/blksync.js copy --block-size ${bs} SRC DST`,
  kind: 'writes' as const,
}));

/** A trial running one of the commands above on the image pair, writing onto `dst`. */
export function copyTrial(spec: CommandSpec, pair: ImagePair, dst: string): Trial {
  const command = spec.template
    .replace('bin/blksync.js', sh(CLI))
    .replace('SRC', sh(pair.newPath))
    .replace('DST', sh(dst));
  const fail = (m: Measurement, why: string): Error =>
    new Error(`CHECK FAILED: ${spec.label}: ${why}\n$ ${command}\n${m.stdout}${m.stderr}`);
  return {
    label: spec.label,
    command,
    run: () => measure(command),
    check: async (m) => {
      if (spec.kind === 'reads') {
        // cmp exits 1 when the files differ, and must have found every differing byte
        if (m.status !== 1) throw fail(m, `exit status ${m.status}, expected 1`);
        const lines = Number(m.stdout.trim());
        if (lines !== pair.differingBytes) {
          throw fail(m, `found ${lines} differing bytes, expected ${pair.differingBytes}`);
        }
        return;
      }
      if (m.status !== 0) throw fail(m, `exit status ${m.status}`);
      if (spec.kind === 'writes') {
        await assertSameFiles(pair.newPath, dst).catch((err: Error) => {
          throw fail(m, err.message.replace(/^CHECK FAILED: /, ''));
        });
      }
    },
  };
}

interface Row {
  result: TrialResult;
  spec: CommandSpec;
}

function tableOf(rows: readonly Row[], cmpMedian: number, first: string): string {
  return renderTable(
    [
      first,
      'median s (min–max)',
      '× cmp',
      'cpu s',
      'peak RSS',
      'then fsync s',
      'write_bytes',
      'wchar',
      'command',
    ],
    rows.map(({ result, spec }) => {
      const s = summarize(result.seconds);
      return [
        result.label,
        formatSeconds(s),
        (s.median / cmpMedian).toFixed(2),
        summarize(result.cpuSeconds).median.toFixed(3),
        formatRss(result.peakRss),
        spec.kind !== 'writes' ? '—' : summarize(result.fsyncSeconds).median.toFixed(3),
        formatBytes(summarize(result.io.map((io) => io.writeBytes)).median),
        formatBytes(summarize(result.io.map((io) => io.wchar)).median),
        spec.template,
      ];
    }),
    ['left', 'right', 'right', 'right', 'right', 'right', 'right', 'right', 'left'],
  );
}

async function run(options: BenchOptions): Promise<void> {
  const { log } = options;
  await ensureCommands(PEERS, log);
  await ensureBuilt(log);
  const pair = await ensureImages(options.imageSize, undefined, log);
  const dst = path.join(pair.dir, 'copy-dst.img');

  log(
    `SRC = ${pair.newPath}\nDST = fresh fsynced copy of ${pair.oldPath} before every run\n` +
      `${formatBytes(pair.size)} image, ${pair.changes.length} unaligned changes: ` +
      `${pair.differingBytes} bytes differ, in ${pair.differingBlocks} blocks of 4 KiB ` +
      `(${formatBytes(pair.differingBlocks * 4096)})\n` +
      `${options.runs} runs each, round robin, warm page cache; ${os.cpus().length} CPUs, ` +
      `load average ${os.loadavg()[0]!.toFixed(2)}, node ${process.version}, ` +
      `kernel ${os.release()}\n`,
  );

  const specs = [...PEER_COMMANDS, ...BLOCK_SIZE_COMMANDS];
  const results = await runTrials(
    specs.map((spec) => copyTrial(spec, pair, dst)),
    {
      runs: options.runs,
      file: dst,
      log,
      prepare: async () => {
        await freshCopy(pair.oldPath, dst);
        await warm([pair.newPath, dst]);
      },
    },
  );
  const rows = results.map((result, i) => ({ result, spec: specs[i]! }));
  const cmpRow = rows.find((r) => r.spec.kind === 'reads')!;
  const cmpMedian = summarize(cmpRow.result.seconds).median;

  log(
    `\nwarm ${formatBytes(pair.size)} copy, ${options.runs} runs (load average now ${os.loadavg()[0]!.toFixed(2)})\n`,
  );
  log(tableOf(rows.slice(0, PEER_COMMANDS.length), cmpMedian, 'tool'));
  log(`\nblksync block size (the default is chosen from this)\n`);
  log(tableOf(rows.slice(PEER_COMMANDS.length), cmpMedian, 'block size'));
  log(
    [
      '',
      'median s: wall seconds of the command; × cmp: its median over the median of cmp -l',
      'cpu s: user + system CPU of the command and its children, all threads (less load-sensitive)',
      'then fsync: fsync of DST after the command, not in its time (blksync fsyncs inside it)',
      'write_bytes: page-cache bytes dirtied, from /proc/PID/io (whole folios: 64 KiB per 4 KiB write here)',
      'wchar: bytes passed to write(2), pipes included (cmp -l prints a line per differing byte)',
    ].join('\n'),
  );
}

export const copySection: Section = {
  name: 'copy',
  description: 'blksync copy vs cmp, ddpt, rsync and dd on a 1 GiB image with ~1 MiB changed',
  default: true,
  run,
};
