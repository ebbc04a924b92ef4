/** copy() and `blksync copy` between regular files: correctness, minimal writes, refusals. */

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, writeSync } from 'node:fs';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { copy } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import { runCli } from './helpers/cli.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

const BS = 4096;

/** Flips one byte at each offset (so the result surely differs). */
function mutate(data: Buffer, offsets: number[]): Buffer {
  const out = Buffer.from(data);
  for (const o of offsets) out[o] = (out[o]! ^ 0xff) & 0xff;
  return out;
}

const EDGE_SIZES = [1, BS - 1, BS, BS + 1, 3 * BS + 17, 4 * 1024 * 1024 + 1, 5_000_003];

for (const size of EDGE_SIZES) {
  test(`copy of ${size} bytes onto an existing file writes only the differing blocks`, async (t) => {
    const dir = await tempDir(t);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    const old = seededBytes(size, size);
    const offsets = [0, size - 1, Math.floor(size / 2)].filter((o) => o >= 0 && o < size);
    const neu = mutate(old, offsets);
    await writeFile(src, neu);
    await writeFile(dst, old);

    const r = await copy(src, dst);
    assert.deepEqual(await readFile(dst), neu);
    const blocks = new Set(offsets.map((o) => Math.floor(o / BS)));
    assert.equal(r.blocksDiffering, blocks.size);
    // every written byte lies in a block that holds a changed byte, and the last block is exact
    const expected = [...blocks].reduce((n, b) => n + Math.min(BS, size - b * BS), 0);
    assert.equal(r.bytesWritten, expected);
    assert.equal(r.bytesScanned, size);

    const again = await copy(src, dst);
    assert.equal(again.bytesWritten, 0, 'a second run writes nothing');
  });
}

test('random sizes and random change patterns converge', async (t) => {
  const dir = await tempDir(t);
  for (let i = 0; i < 12; i++) {
    const seed = 1000 + i;
    const rnd = seededBytes(8, seed);
    const size = 1 + (rnd.readUInt32LE(0) % (3 * 1024 * 1024));
    const old = seededBytes(size, seed);
    const changes = 1 + (rnd[4]! % 20);
    const offsets = Array.from(
      { length: changes },
      (_, k) => (rnd.readUInt32LE(0) * (k + 7)) % size,
    );
    const neu = mutate(old, offsets);
    const src = join(dir, `s${i}`);
    const dst = join(dir, `d${i}`);
    await writeFile(src, neu);
    await writeFile(dst, old);
    const r = await copy(src, dst, { blockSize: [512, 4096, 65536][i % 3]! });
    assert.deepEqual(await readFile(dst), neu, `seed ${seed}`);
    assert.ok(r.bytesWritten <= changes * r.blockSize);
  }
});

test('a missing destination is created sparse: zero blocks stay holes', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'sparse.img');
  const dst = join(dir, 'new.img');
  const size = 64 * 1024 * 1024;
  const a = seededBytes(100_000, 1);
  const b = seededBytes(5000, 2);
  await writeSparseFile(src, size, [
    { offset: 12345, data: a },
    { offset: size - 5000, data: b },
  ]);
  const r = await copy(src, dst);
  assert.equal(r.created, true);
  assert.deepEqual(await readFile(dst), await readFile(src));
  const st = await stat(dst);
  assert.equal(st.size, size);
  assert.ok(st.blocks * 512 < 1024 * 1024, `only the data is allocated (${st.blocks * 512} bytes)`);
  assert.ok(r.bytesWritten < 200_000);
});

test('a larger destination keeps its tail and the summary says so', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src');
  const dst = join(dir, 'dst');
  const neu = seededBytes(10_000, 5);
  const old = seededBytes(30_000, 6);
  await writeFile(src, neu);
  await writeFile(dst, old);
  const r = await copy(src, dst);
  const got = await readFile(dst);
  assert.deepEqual(got.subarray(0, 10_000), neu);
  assert.deepEqual(got.subarray(10_000), old.subarray(10_000));
  assert.equal(r.destinationExtraBytes, 20_000);
  const cli = await runCli(['copy', src, dst]);
  assert.equal(cli.code, 0);
  assert.match(cli.stdout, /larger than the source; the rest was left untouched/);
});

test('a smaller destination is refused before anything is written', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src');
  const dst = join(dir, 'dst');
  await writeFile(src, seededBytes(20_000, 1));
  const old = seededBytes(10_000, 2);
  await writeFile(dst, old);
  await assert.rejects(
    copy(src, dst),
    (e: unknown) => e instanceof BlksyncError && e.code === 'EDEST_TOO_SMALL',
  );
  assert.deepEqual(await readFile(dst), old);
  const cli = await runCli(['copy', src, dst]);
  assert.equal(cli.code, 1);
  assert.match(cli.stderr, /^blksync: .*10000 bytes.*20000 bytes.*\[EDEST_TOO_SMALL\]\n$/);
});

test('the same file as source and destination is refused', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src');
  await writeFile(src, seededBytes(5000, 1));
  const cli = await runCli(['copy', src, join(dir, '.', 'src')]);
  assert.equal(cli.code, 1);
  assert.match(cli.stderr, /\[ESAME_FILE\]/);
});

test('--dry-run reports what would be written and writes nothing, not even a new file', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src');
  const dst = join(dir, 'dst');
  const old = seededBytes(100_000, 1);
  const neu = mutate(old, [5, 50_000]);
  await writeFile(src, neu);
  await writeFile(dst, old);
  const before = await stat(dst);
  const cli = await runCli(['copy', '--dry-run', '--json', src, dst]);
  assert.equal(cli.code, 0, cli.stderr);
  const summary = JSON.parse(cli.stdout) as {
    bytesWritten: number;
    bytesDiffering: number;
    rangesWritten: number;
  };
  assert.equal(summary.bytesWritten, 0);
  assert.equal(summary.bytesDiffering, 2 * BS);
  assert.equal(summary.rangesWritten, 2);
  assert.deepEqual(await readFile(dst), old);
  assert.equal((await stat(dst)).mtimeMs, before.mtimeMs);

  const fresh = join(dir, 'fresh');
  const r = await copy(src, fresh, { dryRun: true });
  assert.equal(r.created, true);
  await assert.rejects(stat(fresh), /ENOENT/);
  // the summary does not claim a file it did not create
  const said = await runCli(['copy', '--dry-run', src, fresh]);
  assert.equal(said.code, 0, said.stderr);
  assert.match(said.stdout, /\(would create .*fresh, sparse\)/);
  await assert.rejects(stat(fresh), /ENOENT/);
});

test('--full writes every block without reading the destination', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src');
  const dst = join(dir, 'dst');
  const data = seededBytes(1_000_000, 3);
  await writeFile(src, data);
  await writeFile(dst, data);
  const r = await copy(src, dst, { full: true });
  assert.equal(r.bytesWritten, 1_000_000);
  assert.equal(r.bytesRead, 0);
  assert.deepEqual(await readFile(dst), data);
});

test('--json prints one summary object with the documented fields', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src');
  const dst = join(dir, 'dst');
  const old = seededBytes(3 * BS, 1);
  await writeFile(src, mutate(old, [BS, BS + 1, 2 * BS]));
  await writeFile(dst, old);
  const cli = await runCli(['copy', src, dst, '--json']);
  assert.equal(cli.code, 0, cli.stderr);
  const s = JSON.parse(cli.stdout) as Record<string, unknown>;
  for (const key of [
    'bytesScanned',
    'blocksDiffering',
    'bytesWritten',
    'rangesWritten',
    'seconds',
  ]) {
    assert.ok(key in s, `summary has ${key}`);
  }
  assert.equal(s.blocksDiffering, 2);
  assert.equal(s.rangesWritten, 1, 'neighbouring blocks are coalesced into one range');
  assert.deepEqual(s.ranges, [{ start: BS, end: 3 * BS }]);
  assert.equal(cli.stderr, '');
});

test('usage errors exit 2 with a one-line message; missing source exits 1', async (t) => {
  const dir = await tempDir(t);
  const bad = await runCli(['copy', '--block-size', '3K', 'a', 'b']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /invalid block size.*\[EUSAGE\]/);
  const missingArg = await runCli(['copy', 'a']);
  assert.equal(missingArg.code, 2);
  const noSrc = await runCli(['copy', join(dir, 'nope'), join(dir, 'dst')]);
  assert.equal(noSrc.code, 1);
  assert.match(
    noSrc.stderr,
    /^blksync: cannot open source .*nope: no such file or directory \(ENOENT\) \[ESRC_OPEN\]\n$/,
  );
  await assert.rejects(stat(join(dir, 'dst')), /ENOENT/);
  const unknown = await runCli(['frobnicate']);
  assert.equal(unknown.code, 2);
});

test('a missing /dev path is an error, not a new file', async () => {
  const r = await runCli(['copy', '/etc/hostname', '/dev/blksync-no-such-device']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /\[EDEST_MISSING\]/);
});

test('a directory or character device destination is refused', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src');
  await writeFile(src, 'x');
  const d = await runCli(['copy', src, dir]);
  assert.equal(d.code, 1);
  assert.match(d.stderr, /\[EDEST_KIND\]/);
  const c = await runCli(['copy', src, '/dev/null']);
  assert.equal(c.code, 1);
  assert.match(c.stderr, /\[EDEST_KIND\]/);
});

test('an aborted copy throws EINTERRUPTED with the partial result; a rerun converges', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src');
  const dst = join(dir, 'dst');
  const size = 32 * 1024 * 1024;
  const neu = seededBytes(size, 9);
  await writeFile(src, neu);
  await writeFile(dst, Buffer.alloc(size, 1));
  const ac = new AbortController();
  await assert.rejects(
    copy(src, dst, {
      signal: ac.signal,
      // once it has written something
      onProgress: (p) => {
        if (p.bytesWritten > 0) ac.abort();
      },
    }),
    (e: unknown) => {
      if (!(e instanceof BlksyncError)) return false;
      assert.equal(e.code, 'EINTERRUPTED');
      const partial = e.partial as { bytesScanned: number };
      assert.ok(partial.bytesScanned > 0 && partial.bytesScanned < size);
      return true;
    },
  );
  assert.notDeepEqual(await readFile(dst), neu);
  await copy(src, dst);
  assert.deepEqual(await readFile(dst), neu);
});

test('progress events count up to the total', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src');
  await writeFile(src, seededBytes(9 * 1024 * 1024, 4));
  const seen: number[] = [];
  await copy(src, join(dir, 'dst'), {
    onProgress: (p) => seen.push(p.bytesScanned / p.bytesTotal),
  });
  assert.ok(seen.length >= 3);
  assert.equal(seen.at(-1), 1);
  assert.deepEqual(
    seen,
    [...seen].sort((a, b) => a - b),
  );
});

test('SRC written by another program during the copy fails ESRC_CHANGED, not exit 0 with a mix', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src');
  const size = 16 * 1024 * 1024;
  await writeFile(src, seededBytes(size, 21));
  for (const dryRun of [false, true]) {
    const dst = join(dir, `dst-${dryRun}`);
    await writeFile(dst, Buffer.alloc(size, 1));
    let written = false;
    await assert.rejects(
      copy(src, dst, {
        dryRun,
        chunkSize: 1024 * 1024,
        depth: 1,
        onProgress: (p) => {
          if (written || p.bytesScanned === 0) return;
          written = true;
          // the start (read already) and the end (not yet) change: DST would get only the end
          const fd = openSync(src, 'r+');
          writeSync(fd, seededBytes(BS, 22), 0, BS, 0);
          writeSync(fd, seededBytes(BS, 23), 0, BS, size - BS);
          closeSync(fd);
        },
      }),
      (e: unknown) => {
        assert.ok(e instanceof BlksyncError, String(e));
        assert.equal(e.code, 'ESRC_CHANGED', e.message);
        assert.match(e.message, /was written while it was copied/);
        return true;
      },
    );
  }
  // SRC left alone, a rerun converges
  const dst = join(dir, 'dst-false');
  await copy(src, dst);
  assert.deepEqual(await readFile(dst), await readFile(src));
});

const STDIN_WRITER = `
import { openSync, writeSync, closeSync } from 'node:fs';
import { copy } from ${JSON.stringify(fileURLToPath(new URL('../src/copy.ts', import.meta.url)))};
const [src, dst, size] = process.argv.slice(1);
let written = false;
try {
  await copy('-', dst, { noBmap: true, chunkSize: 1 << 20, depth: 1, onProgress: (p) => {
    if (written || p.bytesScanned === 0) return;
    written = true;
    const fd = openSync(src, 'r+');
    writeSync(fd, Buffer.alloc(4096, 7), 0, 4096, Number(size) - 4096);
    closeSync(fd);
  } });
  console.log('exit 0');
} catch (err) {
  console.log(err.code);
}
`;

test('stdin redirected from a file that is written during the copy: ESRC_CHANGED', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src');
  const size = 8 * 1024 * 1024;
  await writeFile(src, seededBytes(size, 24));
  const input = openSync(src, 'r');
  t.after(() => closeSync(input));
  const out = execFileSync(
    process.execPath,
    [
      '--import',
      'tsx',
      '--input-type=module',
      '-e',
      STDIN_WRITER,
      src,
      join(dir, 'dst'),
      String(size),
    ],
    { stdio: [input, 'pipe', 'pipe'] },
  );
  assert.equal(out.toString().trim(), 'ESRC_CHANGED');
});

test('a FIFO SRC is refused (ESRC_KIND) at once, not after waiting for a writer no signal ends', async (t) => {
  const dir = await tempDir(t);
  const fifo = join(dir, 'fifo');
  execFileSync('mkfifo', [fifo]);
  let timer: NodeJS.Timeout | undefined;
  const waited = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error('still waiting for a writer after 5 s')), 5000);
  });
  try {
    await assert.rejects(
      Promise.race([copy(fifo, join(dir, 'dst')), waited]),
      (e: unknown) => e instanceof BlksyncError && e.code === 'ESRC_KIND',
    );
  } finally {
    clearTimeout(timer);
    // an open() still waiting returns once a writer comes (O_RDWR does not wait itself)
    closeSync(openSync(fifo, 'r+'));
  }
});
