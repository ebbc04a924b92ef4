/**
 * Section `fanout` (root: loop devices): `blksync copy SRC T1 T2 T3 T4`, SRC on a loop device
 * and four loop-device targets holding different older states (the old version, zeros, already
 * up to date, another old version). Reported from the kernel's counters
 * (/sys/block/loopN/stat): SRC's reads (once: ≤ 1.1× its size is the goal) and each target's
 * writes against its own differing bytes (≤ 1.1× + 1 MiB); wall time against the slowest
 * single-target copy (≤ 1.5× is the goal) and the floor, a parallel `cat` of SRC and the four
 * targets (what reading them all at once costs on this machine). Then the peak RSS of a dry
 * run to 16 targets, the memory bound the README states; then four ssh destinations (one
 * local sshd) pushed at once against a single push to each.
 *
 * The image is the bench's new.img (at most 256 MiB of it: five loop devices are backed by
 * copies, reset eight times a run), targets reset between runs (untimed); the loop devices' own page cache is dropped
 * before each run (`blockdev --flushbufs`) so that their read counters count every read.
 */

import { existsSync } from 'node:fs';
import { copyFile, open, readFile, rm, truncate } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { startSshd } from '../../test/helpers/sshd.js';
import { ensureImages } from '../data.js';
import {
  formatBytes,
  formatRss,
  measure,
  renderTable,
  run,
  sh,
  summarize,
  type Measurement,
} from '../measure.js';
import type { BenchOptions, Section } from '../section.js';
import { CLI, ensureBuilt, ensureCommands } from '../setup.js';

const MIB = 1024 * 1024;
const MAX_SIZE = 256 * MIB;
/** The image pushed to the four ssh destinations (each reset twice a run). */
const MAX_REMOTE_SIZE = 128 * MIB;
const WIDE = 16;
/** The image pushed to 16 ssh destinations for their peak RSS. */
const WIDE_REMOTE_SIZE = 64 * MIB;

interface Loop {
  label: string;
  backing: string;
  dev: string;
  /** Writes the target's older state into its backing file. */
  reset(): Promise<void>;
}

async function sectors(dev: string): Promise<{ read: number; written: number }> {
  const f = (await readFile(`/sys/class/block/${path.basename(dev)}/stat`, 'utf8'))
    .trim()
    .split(/\s+/)
    .map(Number);
  return { read: (f[2] ?? 0) * 512, written: (f[6] ?? 0) * 512 };
}

/** Overwrites [offset, offset + length) of `file` with bytes that differ from anything there. */
async function scribble(file: string, offset: number, length: number, seed: number): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    const buf = Buffer.alloc(Math.min(length, 4 * MIB), seed & 0xff);
    for (let o = 0; o < length; o += buf.length) {
      buf.writeUInt32LE(o ^ seed, 0);
      await fh.write(buf, 0, Math.min(buf.length, length - o), offset + o);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
}

interface FanoutJson {
  sourceBytesRead: number;
  failed: number;
  destinations: { destination: string; bytesWritten: number }[];
}

async function runSection(options: BenchOptions): Promise<void> {
  const { log } = options;
  if (process.getuid?.() !== 0 || !existsSync('/dev/loop-control')) {
    log('skipped: loop devices need root and /dev/loop-control');
    return;
  }
  await ensureCommands({ ssh: 'openssh-client', sshd: 'openssh-server' }, log);
  await ensureBuilt(log);
  const full = await ensureImages(options.imageSize, undefined, log);
  const size = Math.min(full.size, MAX_SIZE);
  const dir = path.join(full.dir, 'fanout');
  await run('mkdir', ['-p', dir]);
  const attached: string[] = [];
  const made: string[] = [];
  const loopOf = async (label: string, fill: (file: string) => Promise<void>): Promise<Loop> => {
    const backing = path.join(dir, `${label}.img`);
    made.push(backing);
    const reset = async (): Promise<void> => {
      await fill(backing);
      await truncate(backing, size);
    };
    await reset();
    const dev = (await run('losetup', ['-f', '--show', backing])).trim();
    attached.push(dev);
    return { label, backing, dev, reset };
  };
  try {
    const src = await loopOf('src', (f) => copyFile(full.newPath, f));
    const targets = [
      await loopOf('old version', (f) => copyFile(full.oldPath, f)),
      // rewritten in place: a loop device keeps the inode it was given
      await loopOf('zeros', (f) => open(f, 'w').then((fh) => fh.close())),
      await loopOf('up to date', (f) => copyFile(full.newPath, f)),
      await loopOf('another old version', async (f) => {
        await copyFile(full.oldPath, f);
        await scribble(f, Math.floor(size / 3 / 4096) * 4096, Math.floor(size / 8), 77);
      }),
    ];
    const all = [src, ...targets];
    const flush = async (): Promise<void> => {
      for (const l of all) await run('blockdev', ['--flushbufs', l.dev]);
    };
    const resetAll = async (): Promise<void> => {
      for (const t of targets) await t.reset();
      await flush();
    };
    const blksync = (dsts: readonly Loop[]): string =>
      `node ${sh(CLI)} copy --json ${sh(src.dev)} ${dsts.map((d) => sh(d.dev)).join(' ')}`;

    log(
      `${formatBytes(size)} image on a loop device, 4 loop-device targets; ${options.runs} runs ` +
        `each; load average ${os.loadavg()[0]!.toFixed(2)}\n`,
    );
    const fanWall: number[] = [];
    const fanRss: number[] = [];
    const singleRss: number[] = [];
    const slowestSingle: number[] = [];
    const floor: number[] = [];
    const srcReads: number[] = [];
    const writes = targets.map(() => [] as { kernel: number; own: number }[]);
    for (let r = 1; r <= options.runs; r++) {
      await resetAll();
      const before = await Promise.all(all.map((l) => sectors(l.dev)));
      const m = await measure(blksync(targets));
      if (m.status !== 0) throw new Error(`fan-out failed: ${m.stderr}`);
      const after = await Promise.all(all.map((l) => sectors(l.dev)));
      const summary = JSON.parse(m.stdout) as FanoutJson;
      if (summary.failed !== 0) throw new Error(`fan-out: ${summary.failed} targets failed`);
      for (const t of targets) {
        const cmp = await measure(`cmp -n ${size} ${sh(src.dev)} ${sh(t.dev)}`);
        if (cmp.status !== 0) throw new Error(`CHECK FAILED: ${t.label} differs: ${cmp.stdout}`);
      }
      fanWall.push(m.seconds);
      fanRss.push(m.peakRss);
      srcReads.push(after[0]!.read - before[0]!.read);
      targets.forEach((_, i) =>
        writes[i]!.push({
          kernel: after[i + 1]!.written - before[i + 1]!.written,
          own: summary.destinations[i]!.bytesWritten,
        }),
      );

      let slowest = 0;
      for (const t of targets) {
        await t.reset();
        await flush();
        const one: Measurement = await measure(blksync([t]));
        if (one.status !== 0) throw new Error(`single copy failed: ${one.stderr}`);
        slowest = Math.max(slowest, one.seconds);
        singleRss.push(one.peakRss);
      }
      slowestSingle.push(slowest);

      await flush();
      const cat = await measure(
        `${all.map((l) => `cat ${sh(l.dev)} > /dev/null &`).join(' ')} wait`,
      );
      floor.push(cat.seconds);
      log(
        `run ${r}/${options.runs}  fan-out ${m.seconds.toFixed(3)} s  slowest single ${slowest.toFixed(3)} s  ` +
          `parallel cat ${cat.seconds.toFixed(3)} s  SRC read ${formatBytes(srcReads[srcReads.length - 1]!)}`,
      );
    }
    const med = (xs: number[]): number => summarize(xs).median;
    log('');
    log(
      renderTable(
        ['', 'median s', '× slowest single', '× parallel cat', 'peak RSS'],
        [
          [
            'fan-out to 4',
            med(fanWall),
            med(fanWall) / med(slowestSingle),
            med(fanWall) / med(floor),
            formatRss(fanRss),
          ],
          [
            'slowest single copy',
            med(slowestSingle),
            1,
            med(slowestSingle) / med(floor),
            formatRss(singleRss),
          ],
          ['floor: parallel cat of SRC + 4', med(floor), med(floor) / med(slowestSingle), 1, '—'],
        ].map(([l, s, a, b, rss]) => [
          String(l),
          (s as number).toFixed(3),
          (a as number).toFixed(2),
          (b as number).toFixed(2),
          String(rss),
        ]),
        ['left'],
      ),
    );
    log('');
    log(
      `SRC read (kernel): ${formatBytes(med(srcReads))} for a ${formatBytes(size)} image ` +
        `(${(med(srcReads) / size).toFixed(3)}×; goal ≤ 1.1×)`,
    );
    log(
      renderTable(
        ['target', 'own differing', 'kernel writes', 'ratio', 'goal ≤ 1.1× + 1 MiB'],
        targets.map((t, i) => {
          const own = med(writes[i]!.map((w) => w.own));
          const kernel = med(writes[i]!.map((w) => w.kernel));
          return [
            t.label,
            formatBytes(own),
            formatBytes(kernel),
            own > 0 ? (kernel / own).toFixed(3) : kernel === 0 ? '-' : '∞',
            kernel <= 1.1 * own + MIB ? 'met' : 'MISSED',
          ];
        }),
        ['left'],
      ),
    );

    // memory: a dry run to 16 targets (sparse files: reading them costs nothing), peak RSS
    const wide: string[] = [];
    for (let i = 0; i < WIDE; i++) {
      const f = path.join(dir, `wide-${i}.img`);
      await rm(f, { force: true });
      await open(f, 'w').then((fh) => fh.close());
      await truncate(f, size);
      wide.push(f);
      made.push(f);
    }
    const rss = await measure(
      `/usr/bin/time -f '@rss %M' node ${sh(CLI)} copy --dry-run --json ${sh(full.newPath)} ${wide.map(sh).join(' ')} 2>&1 >/dev/null | grep '^@rss'`,
    );
    const kib = Number(/@rss (\d+)/.exec(rss.stdout)?.[1] ?? NaN);
    log(
      `\npeak RSS of a dry run to ${WIDE} targets: ${(kib / 1024).toFixed(0)} MiB (goal ≤ 300 MB)`,
    );
    await remoteHosts(options, full, dir, made);
  } finally {
    for (const dev of attached) await run('losetup', ['-d', dev]).catch(() => {});
    for (const f of made) await rm(f, { force: true });
  }
}

interface PushJson {
  seconds: number;
  channel: { bytesSent: number; bytesReceived: number };
}

/**
 * Four ssh destinations (one local sshd, four links) pushed at once from one read of SRC,
 * against a single push to each: wall time and what crossed each link.
 */
async function remoteHosts(
  options: BenchOptions,
  full: { oldPath: string; newPath: string; size: number },
  dir: string,
  made: string[],
): Promise<void> {
  const { log } = options;
  const size = Math.min(full.size, MAX_REMOTE_SIZE);
  const src = path.join(dir, 'remote-src.img');
  made.push(src);
  await copyFile(full.newPath, src);
  await truncate(src, size);
  const dsts = [0, 1, 2, 3].map((i) => path.join(dir, `remote-${i}.img`));
  made.push(...dsts);
  const reset = async (f: string): Promise<void> => {
    await copyFile(full.oldPath, f);
    await truncate(f, size);
  };
  const sshd = await startSshd();
  try {
    const at = (f: string): string => `${sshd.host}:${f}`;
    const cli = (targets: readonly string[]): string =>
      `node ${sh(CLI)} copy --json --ssh ${sh(`ssh -F ${sshd.config}`)} ${sh(src)} ${targets.map((f) => sh(at(f))).join(' ')}`;
    const fanWall: number[] = [];
    const singleWall: number[] = [];
    const fanRss: number[] = [];
    const singleRss: number[] = [];
    const fanWire: number[] = [];
    const singleWire: number[] = [];
    for (let r = 1; r <= options.runs; r++) {
      for (const f of dsts) await reset(f);
      const m = await measure(cli(dsts));
      const summary = JSON.parse(m.stdout) as FanoutJson & {
        destinations: { result?: PushJson }[];
      };
      if (m.status !== 0 || summary.failed !== 0)
        throw new Error(`push fan-out failed: ${m.stderr}`);
      fanWall.push(m.seconds);
      fanRss.push(m.peakRss);
      for (const d of summary.destinations) {
        fanWire.push(d.result!.channel.bytesSent + d.result!.channel.bytesReceived);
      }
      let slowest = 0;
      for (const f of dsts) {
        await reset(f);
        const one = await measure(cli([f]));
        if (one.status !== 0) throw new Error(`single push failed: ${one.stderr}`);
        const res = JSON.parse(one.stdout) as PushJson;
        singleWire.push(res.channel.bytesSent + res.channel.bytesReceived);
        slowest = Math.max(slowest, one.seconds);
        singleRss.push(one.peakRss);
      }
      singleWall.push(slowest);
      for (const f of dsts) {
        const cmp = await measure(`cmp ${sh(src)} ${sh(f)}`);
        if (cmp.status !== 0) throw new Error(`CHECK FAILED: ${f} differs from SRC`);
      }
      log(
        `run ${r}/${options.runs}  push to 4 at once ${m.seconds.toFixed(3)} s  slowest single push ${slowest.toFixed(3)} s`,
      );
    }
    const med = (xs: number[]): number => summarize(xs).median;
    log(
      `\n4 ssh destinations (${formatBytes(size)} image, one sshd on 127.0.0.1): at once ` +
        `${med(fanWall).toFixed(3)} s, ${(med(fanWall) / med(singleWall)).toFixed(2)}× the slowest ` +
        `single push (goal ≤ 1.5×); on the wire per host ${formatBytes(med(fanWire))} against ` +
        `${formatBytes(med(singleWire))} for a single push; peak RSS ${formatRss(fanRss)} at once, ` +
        `${formatRss(singleRss)} single`,
    );

    // memory with 16 hosts at once (each push holds fewer chunks in flight then)
    const wideSize = Math.min(size, WIDE_REMOTE_SIZE);
    const wide = Array.from({ length: WIDE }, (_, i) => path.join(dir, `remote-wide-${i}.img`));
    made.push(...wide);
    for (const f of wide) {
      await copyFile(full.oldPath, f);
      await truncate(f, wideSize);
    }
    await truncate(src, wideSize);
    const rss = await measure(
      `/usr/bin/time -f '@rss %M' ${cli(wide)} 2>&1 >/dev/null | grep '^@rss'`,
    );
    const kib = Number(/@rss (\d+)/.exec(rss.stdout)?.[1] ?? NaN);
    log(
      `peak RSS pushing to ${WIDE} ssh destinations at once: ${(kib / 1024).toFixed(0)} MiB (goal ≤ 300 MB)`,
    );
  } finally {
    await sshd.stop();
  }
}

export const fanoutSection: Section = {
  name: 'fanout',
  description: 'one SRC to 4 loop devices: SRC reads, per-target writes, wall; RSS for 16 targets',
  default: true,
  run: runSection,
};
