/**
 * Section `bmap`: `blksync copy` against `bmaptool copy` on a sparse image with its bmap.
 *
 * The image is SIZE bytes with ~30% data in 20 extents (300 MiB of 1 GiB), about 2:1
 * compressible, as .img and as .img.gz, .img.xz and .img.zst; its bmap (made by bmaptool,
 * identical to blksync's) sits beside it as new.bmap, where both tools find it. Each source
 * is copied to a file and to a loop device (when root), and the raw image also to loop devices
 * throttled like a USB stick and an SD card (MEDIA), from an empty destination (a new file; a
 * zeroed device) and from one holding the previous version of the image (~1 MiB of the mapped
 * data differs). Every run is checked with cmp against the image.
 *
 * The goals (issue 5): blksync at most 1.0× bmaptool's time from empty, and at least 3×
 * faster than bmaptool when the destination holds the previous version.
 */

import { createCipheriv, createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, open, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { makeIndex } from '../../src/engine/make-index.js';
import { DATA_DIR } from '../data.js';
import {
  assertSameFiles,
  formatBytes,
  formatRss,
  formatSeconds,
  measure,
  renderTable,
  run,
  runTrials,
  sh,
  summarize,
  warm,
  type Trial,
} from '../measure.js';
import type { BenchOptions, Section } from '../section.js';
import { canThrottle, throttleDevice } from '../throttle.js';
import { CLI, ensureBuilt, ensureCommands } from '../setup.js';

const PEERS = { bmaptool: 'bmap-tools', xz: 'xz-utils', zstd: 'zstd', gzip: 'gzip' };
const EXTENTS = 20;
/** Share of the image that is data. */
const MAPPED_SHARE = 0.3;
/** Changes between the previous and the new version, inside the mapped extents. */
const CHANGES = 10;
const CHANGE_BYTES = 100_000;
const GENERATOR_VERSION = 1;
const MiB = 1024 * 1024;

interface BmapData {
  dir: string;
  size: number;
  mappedBytes: number;
  oldPath: string;
  newPath: string;
  /** new.img and its compressed forms. */
  sources: { label: string; path: string }[];
}

function keystream(purpose: string): (n: number) => Buffer {
  const key = createHash('sha256').update(`bmap-bench/${purpose}`).digest();
  const cipher = createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
  return (n) => cipher.update(Buffer.alloc(n));
}

/** Random bytes with every other 512-byte run zeroed: compresses about 2:1, like a disk. */
function halfCompressible(buf: Buffer): Buffer {
  for (let i = 512; i < buf.length; i += 1024) buf.fill(0, i, Math.min(i + 512, buf.length));
  return buf;
}

async function ensureData(size: number, log: (line: string) => void): Promise<BmapData> {
  const dir = path.join(DATA_DIR, `bmap-${size}`);
  const oldPath = path.join(dir, 'old.img');
  const newPath = path.join(dir, 'new.img');
  const sources = [
    { label: '.img', path: newPath },
    { label: '.img.gz', path: `${newPath}.gz` },
    { label: '.img.xz', path: `${newPath}.xz` },
    { label: '.img.zst', path: `${newPath}.zst` },
  ];
  const extentBytes = Math.floor((size * MAPPED_SHARE) / EXTENTS / MiB) * MiB;
  const mappedBytes = extentBytes * EXTENTS;
  const metaPath = path.join(dir, 'meta.json');
  const meta = JSON.stringify({ version: GENERATOR_VERSION, size, extentBytes });
  const cached = await readFile(metaPath, 'utf8').catch(() => '');
  if (cached === meta && sources.every((s) => existsSync(s.path))) {
    return { dir, size, mappedBytes, oldPath, newPath, sources };
  }
  log(`generating the bmap benchmark images in ${dir} ...`);
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  const data = keystream('data');
  const slot = Math.floor(size / EXTENTS / MiB) * MiB;
  const fh = await open(oldPath, 'w');
  try {
    await fh.truncate(size);
    for (let e = 0; e < EXTENTS; e++) {
      for (let done = 0; done < extentBytes; done += 16 * MiB) {
        const chunk = halfCompressible(data(Math.min(16 * MiB, extentBytes - done)));
        await fh.write(chunk, 0, chunk.length, e * slot + done);
      }
    }
  } finally {
    await fh.close();
  }
  await run('cp', ['--sparse=always', oldPath, newPath]);
  const changes = keystream('changes');
  const nf = await open(newPath, 'r+');
  try {
    for (let i = 0; i < CHANGES; i++) {
      const e = i % EXTENTS;
      const at = e * slot + 4096 * (1 + (changes(4).readUInt32LE(0) % (extentBytes / 4096 - 40)));
      await nf.write(changes(CHANGE_BYTES), 0, CHANGE_BYTES, at + 17);
    }
  } finally {
    await nf.close();
  }
  await run('bmaptool', ['create', newPath, '-o', path.join(dir, 'new.bmap')]);
  await run('bash', ['-c', `gzip -1 -c ${sh(newPath)} > ${sh(newPath)}.gz`]);
  await run('bash', ['-c', `xz -0 -T0 -c ${sh(newPath)} > ${sh(newPath)}.xz`]);
  await run('bash', ['-c', `zstd -q -T0 -c ${sh(newPath)} > ${sh(newPath)}.zst`]);
  await writeFile(metaPath, meta);
  return { dir, size, mappedBytes, oldPath, newPath, sources };
}

interface Destination {
  label: string;
  /** What the tools write to. */
  path: string;
  /** Only raw images are copied to it. */
  rawOnly?: boolean;
  /** Resets it: empty (new file, zeroed device) or holding the previous image. */
  reset(start: 'empty' | 'previous', then?: () => Promise<void>): Promise<void>;
  dispose(): Promise<void>;
}

function fileDestination(data: BmapData): Destination {
  const dst = path.join(data.dir, 'dst.img');
  return {
    label: 'file',
    path: dst,
    reset: async (start, then) => {
      await rm(dst, { force: true });
      if (start === 'previous') {
        await run('cp', ['--sparse=always', data.oldPath, dst]);
        await run('sync', ['-f', dst]);
      }
      await then?.();
    },
    dispose: () => rm(dst, { force: true }),
  };
}

async function loopDestination(
  data: BmapData,
  backingName = 'loop-backing.img',
): Promise<Destination | undefined> {
  if (process.getuid?.() !== 0 || !existsSync('/dev/loop-control')) return undefined;
  const backing = path.join(data.dir, backingName);
  const fh = await open(backing, 'w');
  await fh.truncate(data.size);
  await fh.close();
  const dev = (await run('losetup', ['-f', '--show', backing])).trim();
  return {
    label: 'loop device',
    path: dev,
    reset: async (start, then) => {
      if (start === 'empty')
        await run('blkdiscard', ['-f', dev]).catch(() => run('blkdiscard', [dev]));
      else
        await run('dd', [`if=${data.oldPath}`, `of=${dev}`, 'bs=4M', 'conv=fsync', 'status=none']);
      await then?.();
      // drops the device's page cache: the run reads DST from the device
      await run('blockdev', ['--flushbufs', dev]);
    },
    dispose: async () => {
      await run('losetup', ['-d', dev]).catch(() => {});
      await rm(backing, { force: true });
    },
  };
}

/** Flash media as the bench throttles a loop device: what flashing looks like, unlike the page cache. */
interface MediumProfile {
  /** For BENCH_BMAP_DESTINATIONS. */
  key: string;
  name: string;
  writeBps: number;
  readBps: number;
}

/**
 * Two kinds of media people flash. Rewriting only what differs pays off by the medium's read
 * speed over its write speed: when DST holds the previous version blksync reads all mapped
 * data once where bmaptool writes it, so read/write bounds the speed-up without an index.
 */
const MEDIA: readonly MediumProfile[] = [
  // a USB 3 flash stick, roughly
  { key: 'usb', name: 'USB stick', writeBps: 40_000_000, readBps: 120_000_000 },
  // a UHS-I class 10 SD card (a Raspberry Pi's, a camera's): writes 10-30, reads 80-95 MB/s
  { key: 'sd', name: 'SD card', writeBps: 20_000_000, readBps: 90_000_000 },
];

/**
 * A loop device throttled like a flash medium (through the blkio controller), its page cache
 * dropped before each run as for a medium just plugged in. Only raw images are copied to it:
 * the time is the device's, not the decoder's.
 */
async function slowLoopDestination(
  data: BmapData,
  medium: MediumProfile,
): Promise<Destination | undefined> {
  if (!canThrottle()) return undefined;
  const loop = await loopDestination(data, `${medium.key}-backing.img`);
  if (loop === undefined) return undefined;
  const throttle = await throttleDevice(loop.path);
  return {
    label: `${medium.name}: loop at ${medium.writeBps / 1e6}/${medium.readBps / 1e6} MB/s w/r`,
    path: loop.path,
    rawOnly: true,
    reset: async (start, then) => {
      await throttle.set(0, 0);
      await loop.reset(start, then); // ends with the device's page cache dropped
      await throttle.set(medium.writeBps, medium.readBps);
    },
    dispose: async () => {
      await throttle.dispose();
      await loop.dispose();
    },
  };
}

function trial(label: string, command: string, image: string, dst: string): Trial {
  return {
    label,
    command,
    run: () => measure(command),
    check: async (m) => {
      if (m.status !== 0) {
        throw new Error(
          `CHECK FAILED: ${label}: exit ${m.status}\n$ ${command}\n${m.stdout}${m.stderr}`,
        );
      }
      await assertSameFiles(image, dst);
    },
  };
}

async function runSection(options: BenchOptions): Promise<void> {
  const { log } = options;
  await ensureCommands(PEERS, log);
  await ensureBuilt(log);
  const data = await ensureData(options.imageSize, log);
  // BENCH_BMAP_DESTINATIONS=file,loop,usb,sd limits the destinations (for quicker iterations)
  const wanted = process.env.BENCH_BMAP_DESTINATIONS?.split(',');
  const want = (key: string): boolean => wanted === undefined || wanted.includes(key);
  const destinations: Destination[] = want('file') ? [fileDestination(data)] : [];
  const loop = want('loop') ? await loopDestination(data) : undefined;
  if (loop !== undefined) destinations.push(loop);
  else if (want('loop')) log('not root or no loop devices: file destinations only');
  for (const medium of MEDIA.filter((m) => want(m.key))) {
    const slow = await slowLoopDestination(data, medium);
    if (slow !== undefined) destinations.push(slow);
    else log(`no blkio throttling (cgroup v1) here: no ${medium.name} rows`);
  }
  log(
    `${formatBytes(data.size)} image, ${formatBytes(data.mappedBytes)} mapped in ${EXTENTS} extents; ` +
      `previous version differs in ${CHANGES} × ${CHANGE_BYTES} bytes\n` +
      `${options.runs} runs each, round robin, warm page cache; ${os.cpus().length} CPUs, ` +
      `load average ${os.loadavg()[0]!.toFixed(2)}, node ${process.version}\n`,
  );

  const rows: string[][] = [];
  try {
    // BENCH_BMAP_SOURCES=.img,.img.gz limits the sources (for quicker iterations)
    const only = process.env.BENCH_BMAP_SOURCES?.split(',');
    const sources = data.sources.filter((s) => only === undefined || only.includes(s.label));
    for (const dst of destinations) {
      for (const src of sources) {
        if (dst.rawOnly === true && src.label !== '.img') continue;
        for (const start of ['empty', 'previous'] as const) {
          // with an index of DST made beforehand (untimed): DST is then not read at all
          const withIndex = src.label === '.img' && start === 'previous';
          const indexPath = path.join(data.dir, 'dst.blkidx');
          const trials = [
            trial(
              'blksync',
              `node ${sh(CLI)} copy -q ${sh(src.path)} ${sh(dst.path)}`,
              data.newPath,
              dst.path,
            ),
            trial(
              'bmaptool',
              `bmaptool -q copy ${sh(src.path)} ${sh(dst.path)}`,
              data.newPath,
              dst.path,
            ),
            ...(withIndex
              ? [
                  trial(
                    'blksync --index',
                    `node ${sh(CLI)} copy -q --index ${sh(indexPath)} ${sh(src.path)} ${sh(dst.path)}`,
                    data.newPath,
                    dst.path,
                  ),
                ]
              : []),
          ];
          const results = await runTrials(trials, {
            runs: options.runs,
            file: dst.path,
            log,
            prepare: async () => {
              await dst.reset(
                start,
                withIndex
                  ? () => makeIndex(dst.path, indexPath, { blockSize: 4096 }).then(() => {})
                  : undefined,
              );
              await warm([src.path, path.join(data.dir, 'new.bmap')]);
            },
          });
          const [ours, theirs] = results.map((r) => summarize(r.seconds));
          const ratio = theirs!.median / ours!.median;
          const goal = start === 'empty' ? ratio >= 1.0 : ratio >= 3.0;
          rows.push([
            src.label,
            dst.label,
            start === 'empty' ? 'empty' : 'previous version',
            formatSeconds(ours!),
            formatSeconds(theirs!),
            `${ratio.toFixed(2)}×`,
            `${start === 'empty' ? '≥ 1.0' : '≥ 3.0'} ${goal ? 'met' : 'MISSED'}`,
            `${summarize(results[0]!.cpuSeconds).median.toFixed(2)} / ${summarize(results[1]!.cpuSeconds).median.toFixed(2)}`,
            `${formatRss(results[0]!.peakRss)} / ${formatRss(results[1]!.peakRss)}`,
            `${formatBytes(summarize(results[0]!.io.map((io) => io.writeBytes)).median)} / ${formatBytes(summarize(results[1]!.io.map((io) => io.writeBytes)).median)}`,
          ]);
          const indexed = results[2];
          if (indexed !== undefined) {
            const s = summarize(indexed.seconds);
            const r = theirs!.median / s.median;
            rows.push([
              src.label,
              dst.label,
              'previous, --index',
              formatSeconds(s),
              formatSeconds(theirs!),
              `${r.toFixed(2)}×`,
              `≥ 3.0 ${r >= 3.0 ? 'met' : 'MISSED'}`,
              `${summarize(indexed.cpuSeconds).median.toFixed(2)} / ${summarize(results[1]!.cpuSeconds).median.toFixed(2)}`,
              `${formatRss(indexed.peakRss)} / ${formatRss(results[1]!.peakRss)}`,
              `${formatBytes(summarize(indexed.io.map((io) => io.writeBytes)).median)} / ${formatBytes(summarize(results[1]!.io.map((io) => io.writeBytes)).median)}`,
            ]);
          }
        }
      }
    }
  } finally {
    for (const d of destinations) await d.dispose();
  }
  log('');
  log(
    renderTable(
      [
        'source',
        'destination',
        'destination holds',
        'blksync s',
        'bmaptool s',
        'speed-up',
        'goal',
        'cpu s (b/bt)',
        'peak RSS (b/bt)',
        'write_bytes (b/bt)',
      ],
      rows,
      ['left', 'left', 'left'],
    ),
  );
  log(
    [
      '',
      'blksync s, bmaptool s: wall seconds, median (min–max); speed-up: bmaptool median / blksync median',
      'both tools fsync the destination before exiting; cpu s: user + system of all processes',
      'peak RSS: the largest resident set of one process (GNU time), the highest of the runs',
      'write_bytes: page-cache bytes dirtied (/proc/PID/io), blksync / bmaptool',
    ].join('\n'),
  );
}

export const bmapSection: Section = {
  name: 'bmap',
  description:
    'blksync copy vs bmaptool copy: sparse image with a bmap, raw and compressed, to a file and a loop device',
  default: true,
  run: runSection,
};
