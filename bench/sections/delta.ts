/**
 * Section `delta`: updating from a plain web server (blksync publish, then copy from the URL)
 * on the realistic pair (bench/realistic.ts: two 1 GiB ext4 images, one byte appended to one
 * file). v2 is published and served by nginx; the bytes and requests are what nginx's access
 * log records ($bytes_sent: headers, multipart boundaries and bodies, every request).
 *
 *   update    DST holds v1                    goal ≤ 0.25 MB on the wire, ≤ 5 requests
 *   dry-run   the same with --dry-run         fetches no more than the update
 *   rerun     DST already holds v2            goal ≤ 64 KiB, nothing written
 *   fresh     DST does not exist              goal ≤ 1.0× gzip -6 of v2 (never > 1.15×)
 *   local     blksync copy v2.img DST(v1)     the wall-time reference (goal: update ≤ 1.5×)
 *   zsync, casync extract: the peers, seeded with a copy of v1 (they write a new file)
 */

import os from 'node:os';
import path from 'node:path';
import { link, mkdir, rm, stat } from 'node:fs/promises';
import { startNginx } from '../../test/helpers/nginx.js';
import {
  assertSameFiles,
  formatBytes,
  formatRss,
  measure,
  renderTable,
  run as runCommand,
  sh,
  summarize,
  warm,
} from '../measure.js';
import { ensureRealisticPair } from '../realistic.js';
import type { BenchOptions, Section } from '../section.js';
import { CLI, ensureBuilt, ensureCommands } from '../setup.js';

const PEERS = { zsync: 'zsync', zsyncmake: 'zsync', casync: 'casync' };

interface Row {
  label: string;
  requests: number;
  wire: number;
  written: number;
  seconds: number[];
  cpuSeconds: number[];
  peakRss: number[];
  command: string;
}

async function run(options: BenchOptions): Promise<void> {
  const { log } = options;
  await ensureBuilt(log);
  const pair = await ensureRealisticPair(log);
  const www = path.join(pair.dir, 'delta-www');
  await rm(www, { recursive: true, force: true });
  await mkdir(www);
  const img = path.join(www, 'os.img');
  await link(pair.newPath, img);
  const node = `node ${sh(CLI)}`;

  const pub = await measure(`${node} publish --json ${sh(img)}`);
  if (pub.status !== 0) throw new Error(`publish failed: ${pub.stderr}`);
  const published = JSON.parse(pub.stdout) as { dataBytes: number; indexBytes: number };
  await ensureCommands(PEERS, log);
  await runCommand('bash', [
    '-c',
    `cd ${sh(www)} && zsyncmake -u os.img -o os.img.zsync os.img && ` +
      `casync make --store=store.castr os.caibx os.img >/dev/null`,
  ]);
  const gzip = Number(
    (await runCommand('bash', ['-c', `gzip -6 -c ${sh(pair.newPath)} | wc -c`])).trim(),
  );

  const cleanups: (() => Promise<void>)[] = [];
  const server = await startNginx(
    { after: (fn) => cleanups.push(fn) },
    www,
    path.join(pair.dir, 'delta-nginx'),
  );
  try {
    const url = `${server.url}/os.img`;
    const dst = path.join(pair.dir, 'delta-dst.img');
    const fromV1 = async (): Promise<void> => {
      await runCommand('bash', [
        '-c',
        `rm -f ${sh(dst)} && cp --sparse=always ${sh(pair.oldPath)} ${sh(dst)} && sync ${sh(dst)}`,
      ]);
      await warm([dst]);
    };
    const rows: Row[] = [];
    /** Runs `command` `runs` times after `prepare`, counting what nginx logged for the last run. */
    const trial = async (
      label: string,
      command: string,
      runs: number,
      prepare: () => Promise<void>,
      check: (written: number) => Promise<void>,
    ): Promise<Row> => {
      const row: Row = {
        label,
        requests: 0,
        wire: 0,
        written: 0,
        seconds: [],
        cpuSeconds: [],
        peakRss: [],
        command,
      };
      for (let i = 0; i < runs; i++) {
        await prepare();
        const before = (await server.log()).length;
        const m = await measure(command);
        if (m.status !== 0) throw new Error(`${label}: exit ${m.status}: ${m.stderr}`);
        const logged = (await server.log()).slice(before);
        const out =
          m.stdout.trim() === '' ? {} : (JSON.parse(m.stdout) as { bytesWritten?: number });
        row.requests = logged.length;
        row.wire = logged.reduce((n, l) => n + l.bytesSent, 0);
        row.written = out.bytesWritten ?? 0;
        row.seconds.push(m.seconds);
        row.cpuSeconds.push(m.cpuSeconds);
        row.peakRss.push(m.peakRss);
        await check(row.written);
      }
      rows.push(row);
      return row;
    };
    const same = async (): Promise<void> => {
      await assertSameFiles(pair.newPath, dst);
    };
    const copyCmd = `${node} copy --json ${sh(url)} ${sh(dst)}`;
    await trial('update (DST holds v1)', copyCmd, options.runs, fromV1, same);
    await trial(
      'rerun (nothing to do)',
      copyCmd,
      1,
      async () => {},
      async (w) => {
        if (w !== 0) throw new Error(`a rerun wrote ${w} bytes`);
        await same();
      },
    );
    await trial(
      '--dry-run',
      `${node} copy --json --dry-run ${sh(url)} ${sh(dst)}`,
      1,
      fromV1,
      async (w) => {
        if (w !== 0) throw new Error('a dry run wrote');
        await assertSameFiles(pair.oldPath, dst);
      },
    );
    const fresh = await trial('fresh (no DST)', copyCmd, 1, () => rm(dst, { force: true }), same);
    const local = await trial(
      'local copy v2.img → DST(v1)',
      // --no-bmap: the realistic section keeps a bmap beside v2, which a local copy would
      // find and verify; the URL copy reads none
      `${node} copy --json --no-bmap ${sh(pair.newPath)} ${sh(dst)}`,
      options.runs,
      fromV1,
      same,
    );
    // the peers, each from the same server: zsync (whole-file rolling checksums, the image
    // seeded from a copy of v1) and casync (content-defined chunks in a store, seeded the same)
    const out = path.join(pair.dir, 'delta-peer-out.img');
    const seed = async (): Promise<void> => {
      await rm(out, { force: true });
      await rm(`${out}.part`, { force: true });
      await fromV1();
    };
    const outSame = async (): Promise<void> => {
      await assertSameFiles(pair.newPath, out);
    };
    await trial(
      'zsync (seeded with v1)',
      `zsync -q -i ${sh(dst)} -o ${sh(out)} ${sh(`${server.url}/os.img.zsync`)}`,
      1,
      seed,
      outSame,
    );
    await trial(
      'casync extract (seeded with v1)',
      `casync extract --seed=${sh(dst)} --store=${sh(`${server.url}/store.castr`)} ${sh(`${server.url}/os.caibx`)} ${sh(out)}`,
      1,
      seed,
      outSame,
    );
    await rm(out, { force: true });
    const localMedian = summarize(local.seconds).median;
    const localCpu = summarize(local.cpuSeconds).median;
    log(
      `SRC = ${url} (${pair.newPath} published: index ${formatBytes(published.indexBytes)}, ` +
        `data ${formatBytes(published.dataBytes)} in ${pub.seconds.toFixed(1)} s; gzip -6 of the image ` +
        `${formatBytes(gzip)}); nginx ${os.loadavg()[0]!.toFixed(2)} load average\n`,
    );
    log(
      renderTable(
        [
          'run',
          'requests',
          'bytes on the wire',
          'bytes written',
          'median s',
          '× local',
          'cpu s',
          'cpu × local',
          'peak RSS',
          'command',
        ],
        rows.map((r) => {
          const s = summarize(r.seconds).median;
          const cpu = summarize(r.cpuSeconds).median;
          return [
            r.label,
            r.label.startsWith('local') ? '' : String(r.requests),
            r.label.startsWith('local') ? '' : `${r.wire} (${formatBytes(r.wire)})`,
            String(r.written),
            s.toFixed(3),
            (s / localMedian).toFixed(2),
            cpu.toFixed(3),
            (cpu / localCpu).toFixed(2),
            formatRss(r.peakRss),
            r.command,
          ];
        }),
        ['left', 'right', 'right', 'right', 'right', 'right', 'right', 'right', 'right', 'left'],
      ),
    );
    log(
      `fresh copy: ${formatBytes(fresh.wire)} on the wire = ${(fresh.wire / gzip).toFixed(3)}× gzip -6 ` +
        `(${formatBytes(gzip)}); published data ${(published.dataBytes / gzip).toFixed(3)}× gzip -6\n`,
    );
    const dstStat = await stat(dst).catch(() => undefined);
    if (dstStat !== undefined) await rm(dst, { force: true });
  } finally {
    for (const c of cleanups) await c();
  }
}

export const deltaSection: Section = {
  name: 'delta',
  description: 'blksync publish + copy from a web server (nginx): bytes on the wire, requests',
  default: true,
  run,
};
