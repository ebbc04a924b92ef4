/**
 * Section `remote`: `blksync copy` over ssh, push (local SRC → host:DST) and pull
 * (host:SRC → local DST), against `rsync --inplace --no-whole-file -I -e ssh` and
 * `dd | ssh dd`, through a private sshd on 127.0.0.1 (test/helpers/sshd.ts).
 *
 * Every tool's ssh goes through a small counting wrapper that relays ssh's stdin and stdout
 * and logs the bytes each way: that is what crossed the ssh channel (payload, before ssh's
 * own encryption and framing). The wrapper costs a node start-up (~40 ms) and a copy per
 * byte, the same for every tool; blksync and rsync are also timed without it.
 *
 * The issue's bar: bytes on the wire ≤ 1.1 × the differing bytes + 64 KiB, and wall time
 * ≤ 0.5 × rsync's. The same copies run three ways: warm (both files in the page cache), cold
 * (both evicted: read from this machine's one disk) and on two disks (SRC and DST on separate
 * throttled loop devices, as on two hosts; see twoDisks).
 *
 * Between two hosts (both the same sshd here) blksync relays through this machine or, with
 * --direct, lets SRC's host send to DST's host itself; rsync cannot copy between two remotes.
 * Those rows run without the wrapper (with --direct the ssh command is also run on SRC's
 * host, so the wrapper would count both channels in one log) and take the bytes from
 * blksync's own --json channel counts: this machine's channel, and for --direct the one
 * between the hosts.
 */

import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { startSshd } from '../../test/helpers/sshd.js';
import { ensureImages } from '../data.js';
import {
  assertSameFiles,
  formatBytes,
  formatRss,
  formatSeconds,
  freshCopy,
  measure,
  renderTable,
  run as runCommand,
  runTrials,
  sh,
  summarize,
  warm,
  type Trial,
} from '../measure.js';
import type { BenchOptions, Section } from '../section.js';
import { CLI, ensureBuilt, ensureCommands } from '../setup.js';
import { canThrottle, throttleDevice, type Throttle } from '../throttle.js';
import type { ChannelStats } from '../../src/copy.js';

const PEERS = { rsync: 'rsync', ssh: 'openssh-client', sshd: 'openssh-server', dd: 'coreutils' };

/** Relays stdin → ssh → stdout, appending "<bytes in> <bytes out>" to LOG when ssh ends. */
const COUNTER = `
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const [log, cmd, ...args] = process.argv.slice(2);
const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'inherit'] });
let up = 0;
let down = 0;
process.stdin.on('data', (d) => {
  up += d.length;
  if (!child.stdin.write(d)) {
    process.stdin.pause();
    child.stdin.once('drain', () => process.stdin.resume());
  }
});
process.stdin.on('end', () => child.stdin.end());
child.stdin.on('error', () => {});
child.stdout.on('data', (d) => {
  down += d.length;
  if (!process.stdout.write(d)) {
    child.stdout.pause();
    process.stdout.once('drain', () => child.stdout.resume());
  }
});
child.on('close', (code) => {
  fs.appendFileSync(log, up + ' ' + down + '\\n');
  process.stdout.end(() => process.exit(code === null ? 1 : code));
});
`;

interface Row {
  label: string;
  direction: 'push' | 'pull' | 'between' | 'login';
  tool: string;
  counted: boolean;
  /** The wire bytes come from blksync's --json summary instead of the wrapper. */
  json?: boolean;
  command: string;
  /** Run with the page cache dropped (both files read from the disk), as a nightly backup is. */
  cold?: boolean;
}

/**
 * Drops SRC's and DST's pages from the page cache (GNU dd: nocache with count=0 advises the
 * whole file), so the next run reads them from the disk. Only the data: node, rsync and ssh
 * stay cached, as they would be next to a device of terabytes.
 */
async function evictFromCache(files: readonly string[]): Promise<void> {
  await runCommand('sync', []);
  for (const f of files)
    await runCommand('dd', [`if=${f}`, 'iflag=nocache', 'count=0', 'status=none']);
}

/** Read speed of each host's disk in the two-disk rows: a hard disk's, or a SATA SSD's share. */
const DISK_READ_BPS = 200_000_000;

/**
 * Each host its own disk: SRC on one ext4 file system and DST on another, each on a loop device
 * whose reads are throttled to DISK_READ_BPS, with both files evicted from the page cache before
 * every run. On one shared disk (the cold-cache rows) reading SRC and DST at once cannot be
 * faster than one after the other; on two hosts it is. rsync reads DST (its checksums) before
 * it reads SRC; blksync's agent reads DST while this end reads SRC.
 */
async function twoDisks(
  options: BenchOptions,
  pair: { oldPath: string; newPath: string; size: number },
  host: string,
  ssh: string,
  work: string,
): Promise<void> {
  const { log } = options;
  if (process.getuid?.() !== 0 || !existsSync('/dev/loop-control') || !canThrottle()) {
    log('\nnot root, or no loop devices or blkio throttling: no two-disk rows');
    return;
  }
  const disks: { dev: string; mount: string; backing: string; throttle?: Throttle }[] = [];
  try {
    for (const name of ['src-disk', 'dst-disk']) {
      const backing = path.join(path.dirname(pair.newPath), `${name}.img`);
      const fh = await open(backing, 'w');
      await fh.truncate(Math.ceil((pair.size * 1.1) / 1048576) * 1048576 + 256 * 1048576);
      await fh.close();
      const dev = (await runCommand('losetup', ['-f', '--show', backing])).trim();
      const mount = path.join(work, name);
      disks.push({ dev, mount, backing });
      await runCommand('mkfs.ext4', ['-q', '-F', dev]);
      await mkdir(mount);
      await runCommand('mount', [dev, mount]);
      disks[disks.length - 1]!.throttle = await throttleDevice(dev);
    }
    const src = path.join(disks[0]!.mount, 'new.img');
    const dst = path.join(disks[1]!.mount, 'dst.img');
    await freshCopy(pair.newPath, src);
    const cli = `node ${sh(CLI)}`;
    const rows = (['push', 'pull'] as const).flatMap((direction) => {
      const [from, to] = direction === 'push' ? [src, `${host}:${dst}`] : [`${host}:${src}`, dst];
      return [
        {
          label: `blksync ${direction}`,
          command: `${cli} copy -q --ssh ${sh(ssh)} ${sh(from)} ${sh(to)}`,
        },
        {
          label: `rsync ${direction}`,
          command: `rsync --inplace --no-whole-file -I -e ${sh(ssh)} ${sh(from)} ${sh(to)}`,
        },
      ];
    });
    const trials: Trial[] = rows.map((row) => ({
      label: row.label,
      command: row.command,
      run: () => measure(row.command),
      check: async (m) => {
        if (m.status !== 0) {
          throw new Error(
            `CHECK FAILED: ${row.label}: exit ${m.status}\n$ ${row.command}\n${m.stderr}`,
          );
        }
        await assertSameFiles(src, dst);
      },
    }));
    log(
      `\ntwo disks: SRC and DST on separate ext4 file systems, each on a loop device read at ` +
        `${DISK_READ_BPS / 1e6} MB/s, both files out of the page cache at the start of each run`,
    );
    const results = await runTrials(trials, {
      runs: options.runs,
      file: dst,
      log,
      prepare: async () => {
        for (const d of disks) await d.throttle!.set(0, 0);
        await freshCopy(pair.oldPath, dst);
        await evictFromCache([src, dst]);
        for (const d of disks) await d.throttle!.set(0, DISK_READ_BPS);
      },
    });
    const median = (label: string): number =>
      summarize(results.find((r) => r.label === label)!.seconds).median;
    log(
      '\n' +
        renderTable(
          ['tool, two disks', 'median s (min–max)', '× rsync', 'local cpu s', 'local peak RSS'],
          rows.map((row, i) => {
            const r = results[i]!;
            const s = summarize(r.seconds);
            const rsync = median(`rsync ${row.label.split(' ')[1]}`);
            return [
              row.label,
              formatSeconds(s),
              (s.median / rsync).toFixed(2),
              summarize(r.cpuSeconds).median.toFixed(3),
              formatRss(r.peakRss),
            ];
          }),
          ['left'],
        ),
    );
  } finally {
    for (const d of disks.reverse()) {
      await d.throttle?.dispose();
      await runCommand('umount', [d.mount]).catch(() => {});
      await runCommand('losetup', ['-d', d.dev]).catch(() => {});
      await rm(d.backing, { force: true });
    }
  }
}

async function run(options: BenchOptions): Promise<void> {
  const { log } = options;
  await ensureCommands(PEERS, log);
  await ensureBuilt(log);
  const pair = await ensureImages(options.imageSize, undefined, log);
  const work = await mkdtemp(path.join(os.tmpdir(), 'blksync-bench-remote-'));
  const sshd = await startSshd();
  try {
    const counter = path.join(work, 'count.cjs');
    const countLog = path.join(work, 'count.log');
    await writeFile(counter, COUNTER);
    const plainSsh = `ssh -F ${sshd.config}`;
    const countedSsh = `node ${counter} ${countLog} ${plainSsh}`;
    const host = sshd.host;
    const dst = path.join(pair.dir, 'remote-dst.img');
    const src = pair.newPath;
    const cli = `node ${sh(CLI)}`;

    const rows: Row[] = [];
    for (const counted of [true, false]) {
      const ssh = counted ? countedSsh : plainSsh;
      const tag = counted ? '' : ' (no counter)';
      for (const direction of ['push', 'pull'] as const) {
        const [from, to] = direction === 'push' ? [src, `${host}:${dst}`] : [`${host}:${src}`, dst];
        rows.push({
          label: `blksync ${direction}${tag}`,
          direction,
          tool: 'blksync',
          counted,
          command: `${cli} copy -q --ssh ${sh(ssh)} ${sh(from)} ${sh(to)}`,
        });
        rows.push({
          label: `rsync ${direction}${tag}`,
          direction,
          tool: 'rsync',
          counted,
          command: `rsync --inplace --no-whole-file -I -e ${sh(ssh)} ${sh(from)} ${sh(to)}`,
        });
        if (!counted) continue;
        const ddRemote = (cmd: string): string => `${ssh} ${host} ${sh(cmd)}`;
        rows.push({
          label: `dd | ssh dd ${direction}`,
          direction,
          tool: 'dd',
          counted,
          command:
            direction === 'push'
              ? `dd if=${sh(src)} bs=4M status=none | ${ddRemote(`dd of=${sh(dst)} bs=4M conv=notrunc status=none`)}`
              : `${ddRemote(`dd if=${sh(src)} bs=4M status=none`)} | dd of=${sh(dst)} bs=4M conv=notrunc status=none`,
        });
      }
    }

    // a nightly backup of a device finds little of it in the page cache: the same copies with
    // SRC and DST evicted from it before each run
    for (const direction of ['push', 'pull'] as const) {
      const [from, to] = direction === 'push' ? [src, `${host}:${dst}`] : [`${host}:${src}`, dst];
      for (const tool of ['blksync', 'rsync']) {
        rows.push({
          label: `${tool} ${direction}, cold cache`,
          direction,
          tool,
          counted: false,
          cold: true,
          command:
            tool === 'blksync'
              ? `${cli} copy -q --ssh ${sh(plainSsh)} ${sh(from)} ${sh(to)}`
              : `rsync --inplace --no-whole-file -I -e ${sh(plainSsh)} ${sh(from)} ${sh(to)}`,
        });
      }
    }

    for (const direct of [false, true]) {
      rows.push({
        label: `blksync ${direct ? '--direct' : 'relay'} host → host`,
        direction: 'between',
        tool: 'blksync',
        counted: false,
        json: true,
        command: `${cli} copy --json ${direct ? '--direct ' : ''}--ssh ${sh(plainSsh)} ${sh(`${host}:${src}`)} ${sh(`${host}:${dst}`)}`,
      });
    }

    // what every tool pays once before it can do anything: ssh's connection and the remote
    // user's shell start-up (here root's .bashrc runs `pyenv init`)
    rows.push({
      label: 'ssh HOST true (login only)',
      direction: 'login',
      tool: 'ssh',
      counted: false,
      command: `${plainSsh} ${host} true`,
    });

    const wire = new Map<string, [number, number][]>();
    /** --direct: bytes on the channel between the two hosts. */
    const between = new Map<string, [number, number][]>();
    const trials: Trial[] = rows.map((row) => ({
      label: row.label,
      command: row.command,
      ...(row.cold === true ? { prepare: () => evictFromCache([src, dst]) } : {}),
      run: () => measure(row.command),
      check: async (m) => {
        if (m.status !== 0) {
          throw new Error(
            `CHECK FAILED: ${row.label}: exit ${m.status}\n$ ${row.command}\n${m.stderr}`,
          );
        }
        if (row.direction === 'login') return;
        await assertSameFiles(src, dst);
        if (row.json === true) {
          const channel = (JSON.parse(m.stdout) as { channel: ChannelStats }).channel;
          const list = wire.get(row.label) ?? [];
          list.push([channel.bytesSent, channel.bytesReceived]);
          wire.set(row.label, list);
          if (channel.direct !== undefined) {
            const b = between.get(row.label) ?? [];
            b.push([channel.direct.bytesSent, channel.direct.bytesReceived]);
            between.set(row.label, b);
          }
          return;
        }
        if (!row.counted) return;
        const lines = (await readFile(countLog, 'utf8')).trim().split('\n');
        let up = 0;
        let down = 0;
        for (const line of lines) {
          const [u, d] = line.split(' ').map(Number);
          up += u ?? 0;
          down += d ?? 0;
        }
        const list = wire.get(row.label) ?? [];
        list.push([up, down]);
        wire.set(row.label, list);
      },
    }));

    log(
      `SRC = ${src}, DST = fresh fsynced copy of ${pair.oldPath}; the remote is sshd on 127.0.0.1\n` +
        `${formatBytes(pair.size)} image, ${pair.differingBytes} bytes differ in ` +
        `${pair.differingBlocks} blocks of 4 KiB; goal: wire ≤ 1.1 × ${pair.differingBytes} + 64 KiB = ` +
        `${formatBytes(1.1 * pair.differingBytes + 65536)}, time ≤ 0.5 × rsync\n` +
        `${options.runs} runs each, round robin, warm page cache; ${os.cpus().length} CPUs, ` +
        `load average ${os.loadavg()[0]!.toFixed(2)}, node ${process.version}\n`,
    );
    const results = await runTrials(trials, {
      runs: options.runs,
      file: dst,
      log,
      prepare: async () => {
        await freshCopy(pair.oldPath, dst);
        await warm([src, dst]);
        await rm(countLog, { force: true });
      },
    });

    const goal = 1.1 * pair.differingBytes + 65536;
    const median = (label: string): number =>
      summarize(results.find((r) => r.label === label)!.seconds).median;
    const table = rows.map((row, i) => {
      const result = results[i]!;
      const s = summarize(result.seconds);
      const rsync =
        row.direction === 'between' || row.direction === 'login'
          ? undefined
          : median(
              `rsync ${row.direction}${row.cold === true ? ', cold cache' : row.counted ? '' : ' (no counter)'}`,
            );
      const w = wire.get(row.label);
      const up = w ? summarize(w.map((x) => x[0])).median : undefined;
      const down = w ? summarize(w.map((x) => x[1])).median : undefined;
      const total = up !== undefined && down !== undefined ? up + down : undefined;
      return [
        row.label,
        formatSeconds(s),
        rsync === undefined ? '—' : (s.median / rsync).toFixed(2),
        summarize(result.cpuSeconds).median.toFixed(3),
        formatRss(result.peakRss),
        up === undefined ? '—' : formatBytes(up),
        down === undefined ? '—' : formatBytes(down),
        total === undefined ? '—' : `${formatBytes(total)} (${(total / goal).toFixed(2)})`,
      ];
    });
    log(
      `\nremote copy over ssh to 127.0.0.1, ${options.runs} runs (load average now ${os.loadavg()[0]!.toFixed(2)})\n`,
    );
    log(
      renderTable(
        [
          'tool',
          'median s (min–max)',
          '× rsync',
          'local cpu s',
          'local peak RSS',
          'to ssh',
          'from ssh',
          'wire total (× goal)',
        ],
        table,
        ['left'],
      ),
    );
    log(
      [
        '',
        'to ssh / from ssh: bytes written into / read out of the ssh process by the local side',
        '(push: to the remote / from it; pull likewise), counted by the wrapper; × goal: over 1.1 × differing + 64 KiB',
        'local cpu s: user + system of the local command and its children (ssh, the counter), not the remote side',
        "host → host rows: to / from ssh are blksync's own counts of its channel(s) (--json), no wrapper",
        ...(['push', 'pull'] as const).map((d) => {
          const login = median('ssh HOST true (login only)');
          const ours = median(`blksync ${d} (no counter)`) - login;
          const theirs = median(`rsync ${d} (no counter)`) - login;
          return `${d} less the ssh login (${login.toFixed(3)} s, paid once by every tool): blksync ${ours.toFixed(3)} s, rsync ${theirs.toFixed(3)} s, ${(ours / theirs).toFixed(2)}×`;
        }),
        ...[...between].map(([label, list]) => {
          const up = summarize(list.map((x) => x[0])).median;
          const down = summarize(list.map((x) => x[1])).median;
          return `${label}: between the two hosts ${formatBytes(up)} sent, ${formatBytes(down)} received (not through here)`;
        }),
        ...rows.filter((r) => r.counted).map((r) => `${r.label}: ${r.command}`),
      ].join('\n'),
    );
    await twoDisks(options, pair, host, plainSsh, work);
  } finally {
    await sshd.stop();
    await rm(work, { recursive: true, force: true });
    await rm(path.join(pair.dir, 'remote-dst.img'), { force: true });
  }
}

export const remoteSection: Section = {
  name: 'remote',
  description:
    'blksync copy over ssh (push, pull) vs rsync -e ssh and dd | ssh dd, with bytes on the wire',
  default: true,
  run,
};
