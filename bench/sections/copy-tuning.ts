/**
 * Section `copy-tuning` (not run by default; ~5 minutes): the library's `copy()` called in
 * this process with every chunkSize × depth, on the same data and state as section `copy`,
 * beside cmp, ddpt and the CLI at its defaults. This is how DEFAULT_CHUNK_SIZE and
 * DEFAULT_DEPTH are chosen. Library times exclude Node's start-up; CLI times include it.
 */

import os from 'node:os';
import path from 'node:path';
import { copy } from '../../src/copy.js';
import { DEFAULT_CHUNK_SIZE, DEFAULT_DEPTH } from '../../src/engine/block-size.js';
import { ensureImages } from '../data.js';
import {
  assertSameFiles,
  formatBytes,
  formatRss,
  formatSeconds,
  freshCopy,
  measureCall,
  renderTable,
  runTrials,
  summarize,
  warm,
  type Trial,
} from '../measure.js';
import type { BenchOptions, Section } from '../section.js';
import { ensureBuilt, ensureCommands } from '../setup.js';
import { copyTrial, PEER_COMMANDS, PEERS } from './copy.js';

const MIB = 1024 * 1024;
const CHUNK_SIZES = [1, 2, 4, 8, 16].map((n) => n * MIB);
const DEPTHS = [2, 4, 8];
const REFERENCES = ['blksync copy', 'blksync start-up', 'cmp -l', 'ddpt sparing'];

async function run(options: BenchOptions): Promise<void> {
  const { log } = options;
  await ensureCommands(PEERS, log);
  await ensureBuilt(log);
  const pair = await ensureImages(options.imageSize, undefined, log);
  const dst = path.join(pair.dir, 'tuning-dst.img');

  const library: Trial[] = CHUNK_SIZES.flatMap((chunkSize) =>
    DEPTHS.map((depth) => ({
      label: `chunk ${chunkSize / MIB} MiB × depth ${depth}`,
      command: `copy(SRC, DST, { chunkSize: ${chunkSize / MIB} MiB, depth: ${depth} })`,
      run: () => measureCall(() => copy(pair.newPath, dst, { chunkSize, depth })),
      check: () => assertSameFiles(pair.newPath, dst).then(() => {}),
    })),
  );
  const references = PEER_COMMANDS.filter((spec) => REFERENCES.includes(spec.label)).map((spec) =>
    copyTrial(spec, pair, dst),
  );
  log(
    `${formatBytes(pair.size)} image, ${pair.differingBytes} bytes differ; ${options.runs} runs ` +
      `each, round robin, warm page cache; load average ${os.loadavg()[0]!.toFixed(2)}\n`,
  );
  const results = await runTrials([...references, ...library], {
    runs: options.runs,
    file: dst,
    log,
    prepare: async () => {
      await freshCopy(pair.oldPath, dst);
      await warm([pair.newPath, dst]);
    },
  });

  const median = (label: string): number =>
    summarize(results.find((r) => r.label === label)!.seconds).median;
  const cmp = median('cmp -l');
  const ddpt = median('ddpt sparing');
  const defaults = `chunk ${DEFAULT_CHUNK_SIZE / MIB} MiB × depth ${DEFAULT_DEPTH}`;
  const rows = results
    .map((r) => ({ r, s: summarize(r.seconds) }))
    .sort((a, b) => a.s.median - b.s.median)
    .map(({ r, s }) => [
      r.label + (r.label === defaults ? ' (default)' : ''),
      formatSeconds(s),
      (s.median / cmp).toFixed(2),
      (s.median / ddpt).toFixed(2),
      summarize(r.cpuSeconds).median.toFixed(3),
      // library calls run in the bench process: its peak so far, not the call's
      REFERENCES.includes(r.label) ? formatRss(r.peakRss) : `(${formatRss(r.peakRss)})`,
      formatBytes(summarize(r.io.map((io) => io.writeBytes)).median),
    ]);
  log(`\nfastest first (load average now ${os.loadavg()[0]!.toFixed(2)})\n`);
  log(
    renderTable(
      ['', 'median s (min–max)', '× cmp', '× ddpt', 'cpu s', 'peak RSS', 'write_bytes'],
      rows,
      ['left'],
    ),
  );
  log('peak RSS in parentheses: the bench process itself, which ran the library calls');
}

export const copyTuningSection: Section = {
  name: 'copy-tuning',
  description: 'library copy() over chunkSize × depth, beside cmp and ddpt (not in the default)',
  default: false,
  run,
};
