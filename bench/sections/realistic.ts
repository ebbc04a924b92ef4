/**
 * Section `realistic`: the races of a real OS image update, on two 1 GiB ext4 images built
 * from real files with one byte appended to one file (bench/realistic.ts). Mostly holes, a
 * few blocks changed — what flashing the next release looks like.
 *
 *   local   blksync copy vs ddpt's fastest correct settings and cmp, onto a file holding v1
 *   bmap    blksync copy --bmap vs bmaptool copy, onto a file holding v1
 *   SD card the same onto a loop device holding v1 whose writes are throttled to 20 MiB/s
 *           (cgroup v1 blkio, bench/throttle.ts), as an SD card flashed with the next
 *           release; the floor: dd writing only the differing 4 KiB blocks (oflag=direct)
 *   ssh     blksync push and pull vs rsync --inplace over ssh (a private sshd on 127.0.0.1),
 *           and the floor: an ssh login that starts node and exits (cpu s counts only this
 *           machine's side of each, as for every row: the sshd's children are not ours);
 *           "push, both indexes kept": --index auto --src-index auto, DST's index made by an
 *           untimed push of v1 before each run and SRC's by one push before the first
 *
 * DST is a fresh sparse copy of v1 before every run (as a previous flash leaves a file), both
 * files warm in the page cache; every run ends with cmp proving DST equals v2.
 */

import { existsSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import os from 'node:os';
import { startSshd } from '../../test/helpers/sshd.js';
import path from 'node:path';
import type { BenchOptions, Section } from '../section.js';
import { differingBlockOffsets, ensureRealisticPair, type RealisticPair } from '../realistic.js';
import { canThrottle, throttleDevice } from '../throttle.js';
import {
  assertSameFiles,
  formatBytes,
  formatRss,
  formatSeconds,
  measure,
  renderTable,
  run as runCommand,
  runTrials,
  sh,
  summarize,
  warm,
  type Trial,
  type TrialResult,
} from '../measure.js';
import { CLI, ensureBuilt, ensureCommands } from '../setup.js';

const PEERS = {
  cmp: 'diffutils',
  ddpt: 'ddpt',
  bmaptool: 'bmap-tools',
  rsync: 'rsync',
  ssh: 'openssh-client',
  sshd: 'openssh-server',
};

function trial(
  label: string,
  command: string,
  check: (status: number, stdout: string) => Promise<void>,
): Trial {
  return {
    label,
    command,
    run: () => measure(command),
    check: async (m) => {
      try {
        await check(m.status, m.stdout);
      } catch (err) {
        throw new Error(
          `CHECK FAILED: ${label}: ${(err as Error).message}\n$ ${command}\n${m.stdout}${m.stderr}`,
        );
      }
    },
  };
}

function table(results: readonly TrialResult[], reference: TrialResult): string {
  const ref = summarize(reference.seconds).median;
  const refCpu = summarize(reference.cpuSeconds).median;
  return renderTable(
    [
      'tool',
      'median s (min–max)',
      `× ${reference.label}`,
      'cpu s',
      `cpu × ${reference.label}`,
      'peak RSS',
      'rchar',
      'wchar',
      'command',
    ],
    results.map((r) => {
      const s = summarize(r.seconds);
      const cpu = summarize(r.cpuSeconds).median;
      return [
        r.label,
        formatSeconds(s),
        (s.median / ref).toFixed(2),
        cpu.toFixed(3),
        (cpu / refCpu).toFixed(2),
        formatRss(r.peakRss),
        formatBytes(summarize(r.io.map((io) => io.rchar)).median),
        formatBytes(summarize(r.io.map((io) => io.wchar)).median),
        r.command,
      ];
    }),
    ['left', 'right', 'right', 'right', 'right', 'right', 'right', 'left'],
  );
}

/** An SD card's sustained writes (UHS-I class 10: 10-30 MB/s); reads are left unthrottled. */
const SD_WRITE_BPS = 20 * 1024 * 1024;
const BLOCK = 4096;

/**
 * The bmap race onto an emulated SD card: a loop device holding v1, writes throttled. Its page
 * cache is dropped before each run, as for a card just plugged in. Undefined when this machine
 * cannot (not root, no loop devices, no cgroup v1 blkio).
 */
async function sdCardRace(
  options: BenchOptions,
  pair: RealisticPair,
  bmap: string,
  node: string,
): Promise<TrialResult[] | undefined> {
  const { log } = options;
  if (process.getuid?.() !== 0 || !existsSync('/dev/loop-control') || !canThrottle()) {
    log('not root, no loop devices or no cgroup v1 blkio: no SD card rows');
    return undefined;
  }
  const backing = path.join(pair.dir, 'sd-backing.img');
  await runCommand('cp', ['--sparse=always', pair.oldPath, backing]);
  const dev = (await runCommand('losetup', ['-f', '--show', backing])).trim();
  const throttle = await throttleDevice(dev);
  try {
    const S = sh(pair.newPath);
    const D = sh(dev);
    const blocks = await differingBlockOffsets(pair.oldPath, pair.newPath, pair.size);
    const dd = (from: string): string =>
      blocks
        .map(
          (o) =>
            `dd if=${sh(from)} of=${D} bs=${BLOCK} skip=${o / BLOCK} seek=${o / BLOCK} count=1 ` +
            'conv=notrunc oflag=direct status=none',
        )
        .join(' && ');
    const writes = async (status: number): Promise<void> => {
      if (status !== 0) throw new Error(`exit status ${status}`);
      await assertSameFiles(pair.newPath, dev);
    };
    const trials = [
      trial('bmaptool copy, SD card', `bmaptool -q copy --bmap ${sh(bmap)} ${S} ${D}`, writes),
      trial('blksync copy --bmap, SD card', `${node} copy -q --bmap ${sh(bmap)} ${S} ${D}`, writes),
      trial('floor: dd of the differing blocks', dd(pair.newPath), writes),
    ];
    return await runTrials(trials, {
      runs: options.runs,
      file: dev,
      log,
      prepare: async () => {
        await throttle.set(0, 0);
        // back to v1: the runs wrote v2 over it, which differs only in these blocks
        await runCommand('bash', ['-c', dd(pair.oldPath)]);
        await assertSameFiles(pair.oldPath, dev);
        await runCommand('blockdev', ['--flushbufs', dev]);
        await warm([pair.newPath, bmap]);
        await throttle.set(SD_WRITE_BPS, 0);
      },
    });
  } finally {
    await throttle.dispose();
    await runCommand('losetup', ['-d', dev]).catch(() => {});
    await rm(backing, { force: true });
  }
}

async function run(options: BenchOptions): Promise<void> {
  const { log } = options;
  await ensureCommands(PEERS, log);
  await ensureBuilt(log);
  const pair = await ensureRealisticPair(log);
  const dst = path.join(pair.dir, 'dst.img');
  const bmap = path.join(pair.dir, 'new.img.bmap');
  await runCommand('bash', ['-c', `bmaptool -q create -o ${sh(bmap)} ${sh(pair.newPath)}`]);

  log(
    `SRC = ${pair.newPath} (ext4 of ${pair.files} real files, ${formatBytes(pair.treeBytes)}; ` +
      `${formatBytes(pair.allocatedBytes)} allocated in ${formatBytes(pair.size)})\n` +
      `DST = fresh sparse copy of ${pair.oldPath} before every run; v1 → v2 appends one byte to ` +
      `${pair.changedFile}: ${pair.differingBytes} bytes differ in ${pair.differingBlocks} blocks of 4 KiB\n` +
      `${options.runs} runs each, round robin, warm page cache; ${os.cpus().length} CPUs, ` +
      `load average ${os.loadavg()[0]!.toFixed(2)}, node ${process.version}\n`,
  );

  const writes = async (status: number): Promise<void> => {
    if (status !== 0) throw new Error(`exit status ${status}`);
    await assertSameFiles(pair.newPath, dst);
  };
  const reads = (status: number, stdout: string): Promise<void> => {
    if (status !== 1) throw new Error(`exit status ${status}, expected 1`);
    const lines = Number(stdout.trim());
    if (lines !== pair.differingBytes) {
      throw new Error(`found ${lines} differing bytes, expected ${pair.differingBytes}`);
    }
    return Promise.resolve();
  };
  const S = sh(pair.newPath);
  const D = sh(dst);
  const node = `node ${sh(CLI)}`;
  const prepare = async (): Promise<void> => {
    await runCommand('bash', [
      '-c',
      `rm -f ${D} && cp --sparse=always ${sh(pair.oldPath)} ${D} && sync ${D}`,
    ]);
    await warm([pair.newPath, dst]);
  };

  const local = [
    trial('ddpt sparing', `ddpt if=${S} of=${D} bs=4096 bpt=128 oflag=sparing`, writes),
    // the bench keeps new.img.bmap beside SRC for the bmap race: without --no-bmap blksync
    // would find it (as bmaptool does) and verify its checksums, which ddpt does not
    trial('blksync copy', `${node} copy -q --no-bmap ${S} ${D}`, writes),
    trial('cmp -l', `cmp -l ${S} ${D} | wc -l`, reads),
  ];
  const localResults = await runTrials(local, { runs: options.runs, file: dst, log, prepare });

  const bmapTrials = [
    trial('bmaptool copy', `bmaptool -q copy --bmap ${sh(bmap)} ${S} ${D}`, writes),
    trial('blksync copy --bmap', `${node} copy -q --bmap ${sh(bmap)} ${S} ${D}`, writes),
  ];
  const bmapResults = await runTrials(bmapTrials, { runs: options.runs, file: dst, log, prepare });
  const sdResults = await sdCardRace(options, pair, bmap, node);

  const sshd = await startSshd();
  let sshResults: TrialResult[];
  try {
    const ssh = `ssh -F ${sshd.config}`;
    const to = sh(`${sshd.host}:${dst}`);
    const from = sh(`${sshd.host}:${pair.newPath}`);
    // --no-bmap as in the local race: the bmap race left new.img.bmap beside SRC, and with it
    // blksync would verify its checksums (SHA-256 of the mapped 272 MiB), which rsync does not;
    // that push has a row of its own
    // both ends' caches (--index auto) in the bench's dir: this machine's by the environment,
    // the agent's by ssh's SetEnv (the test sshd accepts XDG_CACHE_HOME)
    const cache = path.join(pair.dir, 'index-cache');
    const cached = `XDG_CACHE_HOME=${sh(cache)} `;
    const sshCached = `${ssh} -o SetEnv=XDG_CACHE_HOME=${sh(cache)}`;
    const indexed = `${cached}${node} copy -q --no-bmap --index auto --ssh ${sh(sshCached)}`;
    let srcIndexed = false;
    const bothKept: Trial = {
      ...trial('blksync push, both indexes kept', `${indexed} --src-index auto ${S} ${to}`, writes),
      // untimed: DST (v1, just copied) gets its index from a push of v1 onto it, and SRC its
      // index once, from a push of v2 to a scratch file
      prepare: async () => {
        if (!srcIndexed) {
          const scratch = sh(`${sshd.host}:${path.join(pair.dir, 'scratch.img')}`);
          await runCommand('bash', ['-c', `${indexed} --src-index auto ${S} ${scratch}`]);
          srcIndexed = true;
        }
        await runCommand('bash', ['-c', `${indexed} ${sh(pair.oldPath)} ${to}`]);
        await warm([pair.newPath, dst]);
      },
    };
    const sshTrials = [
      trial('rsync push', `rsync --inplace --no-whole-file -I -e ${sh(ssh)} ${S} ${to}`, writes),
      trial('blksync push', `${node} copy -q --no-bmap --ssh ${sh(ssh)} ${S} ${to}`, writes),
      trial('blksync push, bmap', `${node} copy -q --ssh ${sh(ssh)} ${S} ${to}`, writes),
      bothKept,
      trial('rsync pull', `rsync --inplace --no-whole-file -I -e ${sh(ssh)} ${from} ${D}`, writes),
      trial('blksync pull', `${node} copy -q --ssh ${sh(ssh)} ${from} ${D}`, writes),
      trial('ssh host node -e 0', `${ssh} ${sshd.host} node -e 0`, (status) =>
        status === 0 ? Promise.resolve() : Promise.reject(new Error(`exit status ${status}`)),
      ),
    ];
    sshResults = await runTrials(sshTrials, { runs: options.runs, file: dst, log, prepare });
  } finally {
    await sshd.stop();
  }

  log(`\nlocal copy onto a file holding v1 (realistic pair)\n`);
  log(table(localResults, localResults[0]!));
  log(`\nbmap copy onto a file holding v1 (realistic pair)\n`);
  log(table(bmapResults, bmapResults[0]!));
  if (sdResults !== undefined) {
    log(
      `\nbmap copy onto an emulated SD card holding v1: loop device, writes throttled to ` +
        `${SD_WRITE_BPS / 1024 ** 2} MiB/s, its page cache dropped before each run (realistic pair)\n`,
    );
    log(table(sdResults, sdResults[0]!));
  }
  log(`\npush and pull over ssh to 127.0.0.1 onto a file holding v1 (realistic pair)\n`);
  log(table(sshResults.slice(0, 4), sshResults[0]!));
  log('');
  log(table(sshResults.slice(4), sshResults[4]!));
}

export const realisticSection: Section = {
  name: 'realistic',
  description:
    'a real OS-image update (ext4 of real files, one byte changed): local copy vs ddpt, bmap vs bmaptool, push vs rsync',
  default: true,
  run,
};
