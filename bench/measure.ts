/**
 * Timing, I/O accounting, statistics and tables for the benchmark sections.
 *
 * A command is timed as `bash -c` reading its own /proc/$$/io before and after the command:
 * the kernel folds the I/O counters of reaped children into their parent, so the difference
 * is what the command and all its children did. Wall time comes from bash's $EPOCHREALTIME
 * around the command, so bash's own start-up is not counted.
 *
 * Peak RSS comes from GNU time (`/usr/bin/time`, apt package `time`) run around that bash: the
 * largest resident set any one process of the command reached (the kernel's ru_maxrss of the
 * reaped children; worker threads count with their process, an ssh peer's processes do not).
 *
 * write_bytes counts page-cache bytes when they become dirty (on this kernel, whole large
 * folios, e.g. 64 KiB for a 4 KiB write), so the file a command writes must be clean first:
 * `freshCopy` fsyncs it. wchar counts bytes passed to write(2), pipes included.
 */

import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { copyFile, open, readFile, rm } from 'node:fs/promises';

/** GNU time, for peak RSS; without it the RSS columns say "?". */
const GNU_TIME = '/usr/bin/time';
const HAVE_GNU_TIME = existsSync(GNU_TIME);
const RSS_TAG = '@bench-peak-rss-kib ';

export interface IoCounters {
  /** Bytes passed to read(2) and friends, from any file or pipe. */
  rchar: number;
  /** Bytes passed to write(2) and friends, to any file or pipe. */
  wchar: number;
  /** Bytes fetched from storage (0 when the page cache is warm). */
  readBytes: number;
  /** Page-cache bytes dirtied: what writeback will send to storage. */
  writeBytes: number;
}

export interface Measurement {
  seconds: number;
  /** CPU seconds (user + system) of the command and all its children, every thread. */
  cpuSeconds: number;
  status: number;
  stdout: string;
  stderr: string;
  io: IoCounters;
  /**
   * Peak resident set of the largest process of the command, in bytes (NaN when unknown;
   * for a library call, the whole bench process's peak so far).
   */
  peakRss: number;
}

/** Quotes one word for bash. */
export function sh(word: string): string {
  return /^[\w./=:,+-]+$/.test(word) ? word : `'${word.replaceAll("'", `'\\''`)}'`;
}

function parseIo(text: string): IoCounters {
  const field = (name: string): number => {
    const m = new RegExp(`^${name}: (\\d+)$`, 'm').exec(text);
    if (!m) throw new Error(`no ${name} in /proc/PID/io: ${text}`);
    return Number(m[1]);
  };
  return {
    rchar: field('rchar'),
    wchar: field('wchar'),
    readBytes: field('read_bytes'),
    writeBytes: field('write_bytes'),
  };
}

/**
 * Reads the children's user + system seconds from bash's `times`, printed after `tag`: a line
 * "0m0.001s 0m0.002s" for the shell itself, then one for its reaped children.
 */
function childrenCpu(report: string, tag: string): number | undefined {
  const line = new RegExp(`^${tag}\\n.*\\n(.*)$`, 'm').exec(report)?.[1] ?? '';
  const t = [...line.matchAll(/(\d+)m([\d.]+)s/g)].map((m) => 60 * Number(m[1]) + Number(m[2]));
  return t.length === 2 ? t[0]! + t[1]! : undefined;
}

/** Runs a bash command line and measures its wall time and I/O (see the header). */
export async function measure(command: string, cwd?: string): Promise<Measurement> {
  const script = [
    'set -o pipefail',
    'cat /proc/$$/io >&3',
    'echo @c0 >&3; times >&3',
    'echo "@t0 $EPOCHREALTIME" >&3',
    command,
    's=$?',
    'echo "@t1 $EPOCHREALTIME" >&3',
    'echo @c1 >&3; times >&3',
    'echo @io >&3',
    'cat /proc/$$/io >&3',
    'exit $s',
  ].join('\n');
  // GNU time reports the children's peak RSS as the last line of stderr, after bash ended
  // (node's stdio pipes are sockets, which /proc/self/fd/N cannot reopen for its -o)
  const [program, args] = HAVE_GNU_TIME
    ? [GNU_TIME, ['-f', RSS_TAG + '%M', 'bash', '-c', script]]
    : ['bash', ['-c', script]];
  const child = spawn(program, args, {
    cwd,
    env: { ...process.env, LC_ALL: 'C' },
    stdio: ['ignore', 'pipe', 'pipe', 'pipe'],
  });
  const collect = (stream: NodeJS.ReadableStream | null): Promise<string> =>
    new Promise((resolve, reject) => {
      const parts: Buffer[] = [];
      stream?.on('data', (b: Buffer) => parts.push(b));
      stream?.on('error', reject);
      stream?.on('end', () => resolve(Buffer.concat(parts).toString()));
      if (stream === null) resolve('');
    });
  const [stdout, stderrAndRss, report, status] = await Promise.all([
    collect(child.stdout),
    collect(child.stderr),
    collect(child.stdio[3] as NodeJS.ReadableStream | null),
    new Promise<number>((resolve, reject) => {
      child.on('error', reject);
      child.on('close', (code, signal) => resolve(code ?? (signal !== null ? 128 : 1)));
    }),
  ]);
  const t0 = /^@t0 ([\d.]+)$/m.exec(report);
  const t1 = /^@t1 ([\d.]+)$/m.exec(report);
  const c0 = childrenCpu(report, '@c0');
  const c1 = childrenCpu(report, '@c1');
  const [before, after] = report.split('@io');
  // GNU time's lines end stderr: "Command exited with non-zero status N" (for one that
  // failed), then the RSS; they are not the command's
  const rss = new RegExp(
    `(?:^Command (?:exited with non-zero status|terminated by signal) \\d+\n)?^${RSS_TAG}(\\d+)\n?$(?![^]*\n${RSS_TAG})`,
    'm',
  ).exec(stderrAndRss);
  const stderr = rss !== null ? stderrAndRss.slice(0, rss.index) : stderrAndRss;
  if (!t0 || !t1 || c0 === undefined || c1 === undefined || !before || !after) {
    throw new Error(`could not measure ${command}: ${report} ${stderr}`);
  }
  const a = parseIo(before);
  const b = parseIo(after);
  const rssKib = rss?.[1];
  return {
    seconds: Number(t1[1]) - Number(t0[1]),
    cpuSeconds: c1 - c0,
    status,
    stdout,
    stderr,
    peakRss: rssKib !== undefined ? Number(rssKib) * 1024 : NaN,
    io: {
      rchar: b.rchar - a.rchar,
      wchar: b.wchar - a.wchar,
      readBytes: b.readBytes - a.readBytes,
      writeBytes: b.writeBytes - a.writeBytes,
    },
  };
}

async function ownIo(): Promise<IoCounters> {
  return parseIo(await readFile('/proc/self/io', 'utf8'));
}

/**
 * Times a call in this process, with this process's I/O counters (all its threads, so
 * libuv's pool too) before and after. Nothing else in the process may do I/O meanwhile.
 */
export async function measureCall(call: () => Promise<unknown>): Promise<Measurement> {
  const a = await ownIo();
  const cpu = process.cpuUsage();
  const started = performance.now();
  await call();
  const seconds = (performance.now() - started) / 1000;
  const { user, system } = process.cpuUsage(cpu);
  const b = await ownIo();
  return {
    seconds,
    cpuSeconds: (user + system) / 1e6,
    status: 0,
    stdout: '',
    stderr: '',
    peakRss: process.resourceUsage().maxRSS * 1024,
    io: {
      rchar: b.rchar - a.rchar,
      wchar: b.wchar - a.wchar,
      readBytes: b.readBytes - a.readBytes,
      writeBytes: b.writeBytes - a.writeBytes,
    },
  };
}

/** Runs a program to completion, untimed; rejects with its stderr when it fails. */
export function run(program: string, args: readonly string[], cwd?: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(program, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code === 0) resolve(Buffer.concat(out).toString());
      else {
        // tsc, for one, reports on stdout
        const why = Buffer.concat([...out, ...err])
          .toString()
          .trim()
          .slice(-2000);
        reject(new Error(`${program} ${args.join(' ')} exited with ${code}: ${why}`));
      }
    });
  });
}

/** Makes `to` a fresh copy of `from`, fsynced so that it has no dirty pages. */
export async function freshCopy(from: string, to: string): Promise<void> {
  await rm(to, { force: true });
  await copyFile(from, to);
  await fsyncSeconds(to);
}

/** Fsyncs a file and returns how long that took: the cost of making a run's writes durable. */
export async function fsyncSeconds(file: string): Promise<number> {
  const fh = await open(file, 'r');
  try {
    const started = performance.now();
    await fh.sync();
    return (performance.now() - started) / 1000;
  } finally {
    await fh.close();
  }
}

/** Reads files once so that every timed command starts with the same, warm, page cache. */
export async function warm(files: readonly string[]): Promise<void> {
  await run('bash', ['-c', `cat ${files.map(sh).join(' ')} > /dev/null`]);
}

/** Checks byte for byte that two files are equal; returns how long `cmp` took. */
export async function assertSameFiles(expected: string, actual: string): Promise<number> {
  const m = await measure(`cmp ${sh(expected)} ${sh(actual)}`);
  if (m.status !== 0) {
    throw new Error(
      `CHECK FAILED: ${actual} differs from ${expected} after the run: ${m.stdout}${m.stderr}`,
    );
  }
  return m.seconds;
}

export interface Summary {
  median: number;
  min: number;
  max: number;
}

export function summarize(values: readonly number[]): Summary {
  if (values.length === 0) throw new Error('no values to summarize');
  const sorted = [...values].sort((x, y) => x - y);
  const mid = sorted.length >> 1;
  const median = sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
  return { median, min: sorted[0]!, max: sorted[sorted.length - 1]! };
}

/** "0.213 (0.201–0.240)" */
export function formatSeconds(s: Summary): string {
  return `${s.median.toFixed(3)} (${s.min.toFixed(3)}–${s.max.toFixed(3)})`;
}

/** Bytes for people, binary units: 1638400 → "1.56 MiB". */
export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (Math.abs(v) >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${n} B` : `${v.toFixed(2)} ${units[u]}`;
}

/** The highest of peak RSS figures, in MiB: "112 MiB" ("?" when unknown). */
export function formatRss(values: readonly number[]): string {
  const known = values.filter((v) => !Number.isNaN(v));
  return known.length > 0 ? `${(Math.max(...known) / 1024 ** 2).toFixed(0)} MiB` : '?';
}

export type Align = 'left' | 'right';

/** A plain-text table; columns are right-aligned unless told otherwise. */
export function renderTable(
  headers: readonly string[],
  rows: readonly (readonly string[])[],
  align: readonly Align[] = [],
): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]): string =>
    cells
      .map((c, i) => {
        const w = widths[i] ?? 0;
        return align[i] === 'left' ? c.padEnd(w) : c.padStart(w);
      })
      .join('  ')
      .trimEnd();
  return [line(headers), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n');
}

/** One thing to time, and how to tell that a run of it did its job. */
export interface Trial {
  label: string;
  /** What is timed, for people (a command line, or a library call). */
  command: string;
  /** Runs it once: `() => measure(command)`, or `measureCall` for a library call. */
  run(): Promise<Measurement>;
  /** Throws (loudly) when a run did not do its job; `m` is that run's measurement. */
  check(m: Measurement): Promise<void>;
  /** Run after the shared `prepare`, for this trial only (not timed). */
  prepare?: () => Promise<void>;
}

export interface TrialResult {
  label: string;
  command: string;
  seconds: number[];
  cpuSeconds: number[];
  /** Time to fsync the written file after each run (the durability the command skipped). */
  fsyncSeconds: number[];
  io: IoCounters[];
  /** Peak RSS of each run, bytes (Measurement.peakRss). */
  peakRss: number[];
}

/**
 * Times each trial `runs` times, round robin so that drifting machine load spreads evenly.
 * Before every run `prepare` resets the state (not timed); after it, `file` is fsynced
 * (timed apart) and the trial's check runs.
 */
export async function runTrials(
  trials: readonly Trial[],
  options: {
    runs: number;
    prepare: () => Promise<void>;
    file: string;
    log: (line: string) => void;
  },
): Promise<TrialResult[]> {
  const results: TrialResult[] = trials.map((t) => ({
    label: t.label,
    command: t.command,
    seconds: [],
    cpuSeconds: [],
    fsyncSeconds: [],
    io: [],
    peakRss: [],
  }));
  const width = Math.max(...trials.map((t) => t.label.length));
  for (let r = 1; r <= options.runs; r++) {
    for (const [i, trial] of trials.entries()) {
      await options.prepare();
      await trial.prepare?.();
      const m = await trial.run();
      const synced = await fsyncSeconds(options.file);
      await trial.check(m);
      const result = results[i]!;
      result.seconds.push(m.seconds);
      result.cpuSeconds.push(m.cpuSeconds);
      result.fsyncSeconds.push(synced);
      result.io.push(m.io);
      result.peakRss.push(m.peakRss);
      options.log(
        `run ${r}/${options.runs}  ${trial.label.padEnd(width)}  ${m.seconds.toFixed(3)} s` +
          `  cpu ${m.cpuSeconds.toFixed(3)} s  rss ${formatRss([m.peakRss])}` +
          `  write_bytes ${formatBytes(m.io.writeBytes)}  then fsync ${synced.toFixed(3)} s`,
      );
    }
  }
  return results;
}
