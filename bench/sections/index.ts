/**
 * Section `index`: `blksync copy --index` against its floor, `cat SRC > /dev/null` (reading
 * the source once), and against `blksync copy` without an index; and `blksync index` of the
 * image. The index of the old DST is made before every run, untimed.
 *
 * Two page-cache states: everything warm (the bar: copy --index ≤ 1.5× cat), and DST
 * cold with SRC warm, which is what flashing a device looks like — DST is not in the page
 * cache, so a plain copy reads it from the medium and an index copy does not.
 */

import os from 'node:os';
import path from 'node:path';
import { makeIndex } from '../../src/engine/make-index.js';
import { readIndexFile } from '../../src/formats/index-file.js';
import { ensureImages, type ImagePair } from '../data.js';
import {
  assertSameFiles,
  formatBytes,
  formatRss,
  formatSeconds,
  freshCopy,
  measure,
  renderTable,
  run as runProgram,
  runTrials,
  sh,
  summarize,
  warm,
  type Measurement,
  type Trial,
  type TrialResult,
} from '../measure.js';
import type { BenchOptions, Section } from '../section.js';
import { CLI, ensureBuilt } from '../setup.js';

function commandTrial(
  label: string,
  command: string,
  check: (m: Measurement) => Promise<void>,
): Trial {
  return {
    label,
    command,
    run: () => measure(command),
    check: async (m) => {
      if (m.status !== 0) {
        throw new Error(`CHECK FAILED: ${label}: exit ${m.status}\n$ ${command}\n${m.stderr}`);
      }
      await check(m);
    },
  };
}

function trials(
  pair: ImagePair,
  dst: string,
  index: string,
  scratchIndex: string,
  srcIndex: string,
) {
  const cli = `node ${sh(CLI)}`;
  const same = () => assertSameFiles(pair.newPath, dst).then(() => {});
  return {
    cat: commandTrial('cat SRC > /dev/null', `cat ${sh(pair.newPath)} > /dev/null`, async () => {}),
    makeIndex: commandTrial(
      'blksync index SRC',
      `${cli} index ${sh(pair.newPath)} -o ${sh(scratchIndex)}`,
      async () => {
        const idx = await readIndexFile(scratchIndex);
        if (idx.imageSize !== pair.size) throw new Error('CHECK FAILED: index of the wrong size');
      },
    ),
    withIndex: commandTrial(
      'blksync copy --index',
      `${cli} copy ${sh(pair.newPath)} ${sh(dst)} --index ${sh(index)}`,
      same,
    ),
    withBoth: commandTrial(
      'blksync copy --index --src-index',
      `${cli} copy ${sh(pair.newPath)} ${sh(dst)} --index ${sh(index)} --src-index ${sh(srcIndex)}`,
      same,
    ),
    plain: commandTrial('blksync copy', `${cli} copy ${sh(pair.newPath)} ${sh(dst)}`, same),
  };
}

function table(results: readonly TrialResult[], floor: number, copyMedian: number): string {
  return renderTable(
    [
      'command',
      'median s (min–max)',
      '× cat',
      '× copy',
      'cpu s',
      'peak RSS',
      'rchar',
      'write_bytes',
    ],
    results.map((r) => {
      const s = summarize(r.seconds);
      return [
        r.label,
        formatSeconds(s),
        (s.median / floor).toFixed(2),
        (s.median / copyMedian).toFixed(2),
        summarize(r.cpuSeconds).median.toFixed(3),
        formatRss(r.peakRss),
        formatBytes(summarize(r.io.map((io) => io.rchar)).median),
        formatBytes(summarize(r.io.map((io) => io.writeBytes)).median),
      ];
    }),
    ['left', 'right', 'right', 'right', 'right', 'right', 'right', 'right'],
  );
}

async function run(options: BenchOptions): Promise<void> {
  const { log } = options;
  await ensureBuilt(log);
  const pair = await ensureImages(options.imageSize, undefined, log);
  const dst = path.join(pair.dir, 'index-dst.img');
  const index = path.join(pair.dir, 'index-dst.blkidx');
  const scratchIndex = path.join(pair.dir, 'index-src.blkidx');
  // SRC's index, made once (untimed): what flashing the same image again has at hand
  const srcIndex = path.join(pair.dir, 'index-src-kept.blkidx');
  await makeIndex(pair.newPath, srcIndex);
  const t = trials(pair, dst, index, scratchIndex, srcIndex);
  log(
    `SRC = ${pair.newPath}; DST = fresh fsynced copy of ${pair.oldPath} before every run, ` +
      `its index made then (untimed); SRC's index made once (untimed)\n${formatBytes(pair.size)} image, ${pair.differingBytes} ` +
      `bytes differ; ${options.runs} runs each, round robin; ${os.cpus().length} CPUs, load ` +
      `average ${os.loadavg()[0]!.toFixed(2)}, node ${process.version}\n`,
  );
  const prepare = async (dstCold: boolean): Promise<void> => {
    await freshCopy(pair.oldPath, dst);
    await makeIndex(dst, index);
    await warm(dstCold ? [pair.newPath] : [pair.newPath, dst]);
    // drops DST's pages from the page cache (posix_fadvise DONTNEED over the whole file)
    if (dstCold) await runProgram('dd', [`if=${dst}`, 'iflag=nocache', 'count=0', 'status=none']);
  };

  const warmResults = await runTrials([t.cat, t.makeIndex, t.withIndex, t.withBoth, t.plain], {
    runs: options.runs,
    file: dst,
    log,
    prepare: () => prepare(false),
  });
  log('\nDST cold (not in the page cache), SRC warm\n');
  const coldResults = await runTrials([t.cat, t.withIndex, t.withBoth, t.plain], {
    runs: options.runs,
    file: dst,
    log,
    prepare: () => prepare(true),
  });

  const median = (rs: readonly TrialResult[], label: string): number =>
    summarize(rs.find((r) => r.label === label)!.seconds).median;
  log(`\nwarm page cache (load average now ${os.loadavg()[0]!.toFixed(2)})\n`);
  log(table(warmResults, median(warmResults, t.cat.label), median(warmResults, t.plain.label)));
  log(`\nDST cold, SRC warm\n`);
  log(table(coldResults, median(coldResults, t.cat.label), median(coldResults, t.plain.label)));
  const cat = median(warmResults, t.cat.label);
  const goal = (label: string): string => {
    const ratio = median(warmResults, label) / cat;
    return `${label}: ${ratio.toFixed(2)}× ${ratio <= 1.5 ? '(met)' : '(not met)'}`;
  };
  log(
    [
      '',
      `goal: copy --index ≤ 1.5× cat with a warm cache: ${goal(t.withIndex.label)}; ${goal(t.withBoth.label)}`,
      'median s: wall seconds, Node start-up included for blksync; cpu s: user + system, all threads',
      'rchar: bytes the command read (SRC, DST, the index); write_bytes: page-cache bytes dirtied',
    ].join('\n'),
  );
}

export const indexSection: Section = {
  name: 'index',
  description: 'blksync copy --index vs cat SRC (the floor) and copy without index; blksync index',
  default: true,
  run,
};
