/**
 * `npm run bench [-- [--runs N] [--size 1G] [SECTION...]]`: the benchmark, every speed claim
 * of the project measured side by side with its peers, in one run, on the same data.
 *
 *   bench/run.ts          this file: picks the sections and runs them in order
 *   bench/data.ts         seeded test images, cached in bench/.data/ (gitignored)
 *   bench/measure.ts      timing, /proc I/O accounting, medians, tables
 *   bench/section.ts      what a section is and the options it is run with
 *   bench/setup.ts        builds dist/ and installs peer tools (apt-get) when missing
 *   bench/sections/*.ts   one file per section; add yours to SECTIONS below
 *
 * With no SECTION it runs every default section; naming sections runs only those
 * (non-default ones such as copy-tuning too). `--size 64M` makes a quick smoke run.
 */

import os from 'node:os';
import { parseArgs } from 'node:util';
import { parseSize } from '../src/size.js';
import { DEFAULT_IMAGE_SIZE } from './data.js';
import { bmapSection } from './sections/bmap.js';
import { copySection } from './sections/copy.js';
import { copyTuningSection } from './sections/copy-tuning.js';
import { deltaSection } from './sections/delta.js';
import { diffApplySection } from './sections/diff-apply.js';
import { fanoutSection } from './sections/fanout.js';
import { indexSection } from './sections/index.js';
import { realisticSection } from './sections/realistic.js';
import { remoteSection } from './sections/remote.js';
import type { BenchOptions, Section } from './section.js';

const SECTIONS: readonly Section[] = [
  copySection,
  copyTuningSection,
  indexSection,
  diffApplySection,
  bmapSection,
  remoteSection,
  fanoutSection,
  realisticSection,
  deltaSection,
];

/** At least this many runs, so a median means something. */
const MIN_RUNS = 3;

async function main(): Promise<void> {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      runs: { type: 'string', default: String(MIN_RUNS) },
      size: { type: 'string', default: String(DEFAULT_IMAGE_SIZE) },
      list: { type: 'boolean', default: false },
    },
  });
  if (values.list) {
    for (const s of SECTIONS) {
      console.log(`${s.name.padEnd(14)} ${s.default ? '(default) ' : ''}${s.description}`);
    }
    return;
  }
  const runs = Number(values.runs);
  if (!Number.isInteger(runs) || runs < MIN_RUNS) {
    throw new Error(`--runs must be an integer >= ${MIN_RUNS}`);
  }
  const unknown = positionals.filter((name) => !SECTIONS.some((s) => s.name === name));
  if (unknown.length > 0) {
    throw new Error(
      `unknown section ${unknown.join(', ')}; sections: ${SECTIONS.map((s) => s.name).join(', ')}`,
    );
  }
  const chosen = SECTIONS.filter((s) =>
    positionals.length > 0 ? positionals.includes(s.name) : s.default,
  );
  const options: BenchOptions = {
    runs,
    imageSize: parseSize(values.size, 'image size'),
    log: (line) => console.log(line),
  };
  const load = os.loadavg()[0]!;
  if (load > os.cpus().length / 2) {
    // other work on the box slows the tools unevenly; CPU seconds suffer less than wall time
    console.log(
      `WARNING: load average ${load.toFixed(2)} on ${os.cpus().length} CPUs: something else is ` +
        'running, so wall times are noisy; compare the cpu s columns, or rerun on a quiet machine',
    );
  }
  for (const section of chosen) {
    console.log(`\n## ${section.name}: ${section.description}\n`);
    await section.run(options);
  }
}

try {
  await main();
} catch (err) {
  console.error(`bench: ${err instanceof Error ? err.message : String(err)}`);
  process.exitCode = 1;
}
