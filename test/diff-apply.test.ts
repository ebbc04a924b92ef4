/** diff() and apply() and their commands: round trips, refusals, idempotency, reverse, pipes. */

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import { apply } from '../src/engine/apply.js';
import { diff } from '../src/engine/diff.js';
import { makeIndex } from '../src/engine/make-index.js';
import type { TargetKnowledge } from '../src/types.js';
import { BlksyncError } from '../src/errors.js';
import { HASH_BYTES, sha256 } from '../src/hash.js';
import { describePatch } from '../src/formats/patch-info.js';
import { HEADER_BYTES } from '../src/formats/patch.js';
import { cliCommand, runCli } from './helpers/cli.js';
import { attachLoop, mkfsExt4, mountLoop, needLoop } from './helpers/loop.js';
import { seededBytes, tempDir } from './helpers/tmp.js';
import { rejectsWith } from './helpers/assert-error.js';

const BS = 4096;

/** A pseudo-random generator (xorshift32) for change patterns that reproduce. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
}

/** A copy of `data` resized to `size` with some random runs overwritten. */
function changed(data: Buffer, size: number, seed: number): Buffer {
  const out = Buffer.alloc(size);
  data.copy(out, 0, 0, Math.min(size, data.length));
  if (size > data.length) seededBytes(size - data.length, seed + 1).copy(out, data.length);
  const r = rng(seed);
  const runs = 1 + Math.floor(r() * 6);
  for (let i = 0; i < runs && size > 0; i++) {
    const at = Math.floor(r() * size);
    const len = Math.min(size - at, 1 + Math.floor(r() * 3 * BS));
    for (let k = 0; k < len; k++) out[at + k] = (out[at + k]! + 1 + Math.floor(r() * 255)) & 0xff;
  }
  return out;
}

interface Files {
  base: string;
  next: string;
  patch: string;
  target: string;
}

async function setup(dir: string, base: Buffer, next: Buffer): Promise<Files> {
  const f = {
    base: join(dir, 'base.img'),
    next: join(dir, 'new.img'),
    patch: join(dir, 'p.bsp'),
    target: join(dir, 'target.img'),
  };
  await writeFile(f.base, base);
  await writeFile(f.next, next);
  await writeFile(f.target, base);
  return f;
}

const EDGE_SIZES = [1, BS - 1, BS, BS + 1, 3 * BS + 17, 1024 * 1024 + 3];

for (const size of EDGE_SIZES) {
  test(`round trip of ${size} bytes: apply gives NEW, again is a no-op, reverse gives BASE`, async (t) => {
    const dir = await tempDir(t);
    const base = seededBytes(size, size);
    const next = changed(base, size, size + 7);
    const f = await setup(dir, base, next);
    const d = await diff(f.base, f.next, f.patch, { reversible: true });
    assert.equal(d.resultSize, size);
    const a = await apply(f.patch, f.target);
    assert.deepEqual(await readFile(f.target), next);
    assert.equal(a.alreadyApplied, false);
    const again = await apply(f.patch, f.target);
    assert.equal(again.alreadyApplied, true);
    assert.equal(again.bytesWritten, 0);
    await apply(f.patch, f.target, { reverse: true });
    assert.deepEqual(await readFile(f.target), base);
  });
}

test('random sizes, size changes and change patterns, every compression', async (t) => {
  const dir = await tempDir(t);
  const r = rng(99);
  for (let i = 0; i < 14; i++) {
    const baseSize = 1 + Math.floor(r() * 300_000);
    const resultSize = i % 3 === 0 ? baseSize : 1 + Math.floor(r() * 300_000);
    const base = seededBytes(baseSize, 500 + i);
    const next = changed(base, resultSize, 600 + i);
    const f = await setup(dir, base, next);
    const compress = i % 2 === 0 ? 'gzip' : 'none';
    const blockSize = [512, 4096, 65536][i % 3]!;
    const d = await diff(f.base, f.next, f.patch, { reversible: i % 4 !== 1, compress, blockSize });
    const a = await apply(f.patch, f.target);
    assert.deepEqual(await readFile(f.target), next, `case ${i}: ${baseSize} -> ${resultSize}`);
    assert.equal((await apply(f.patch, f.target)).alreadyApplied, true, `case ${i}: again`);
    assert.ok(a.bytesWritten <= d.newBytes);
    if (d.reversible) {
      await apply(f.patch, f.target, { reverse: true });
      assert.deepEqual(await readFile(f.target), base, `case ${i}: reverse`);
    }
  }
});

test('the patch holds only the changed blocks plus headers', async (t) => {
  const dir = await tempDir(t);
  const size = 4 * 1024 * 1024;
  const base = seededBytes(size, 1);
  const next = Buffer.from(base);
  // ten changes of about 10 KB, each in its own region
  for (let i = 0; i < 10; i++) next.fill(i + 1, i * 400_000 + 100, i * 400_000 + 10_100);
  const f = await setup(dir, base, next);
  const d = await diff(f.base, f.next, f.patch);
  assert.equal(d.records, 10);
  const changedBlocks = d.bytesDiffering;
  assert.equal(d.newBytes, changedBlocks);
  // the payload is the changed bytes, not the changed blocks
  assert.ok(d.payloadBytes <= 10 * 10_000, `${d.payloadBytes} bytes of payload`);
  assert.ok(d.payloadBytes > 10 * 9_900, `${d.payloadBytes} bytes of payload`);
  assert.ok(d.patchBytes <= d.payloadBytes + 64 + 80 + 10 * 136, `${d.patchBytes} bytes`);
  assert.ok(changedBlocks > d.payloadBytes);
  assert.equal((await stat(f.patch)).size, d.patchBytes);
  const info = await describePatch(f.patch, { verify: true });
  assert.equal(info.records, 10);
  assert.equal(info.newBytes, d.newBytes);
});

test('a dry run writes nothing and says what it would: bytesWritten 0 as for copy, bytesToWrite the rest', async (t) => {
  const dir = await tempDir(t);
  const base = seededBytes(1024 * 1024, 5);
  const next = changed(base, base.length, 6);
  const f = await setup(dir, base, next);
  await diff(f.base, f.next, f.patch);
  const r = await runCli(['apply', '-n', '--json', f.patch, f.target]);
  assert.equal(r.code, 0, r.stderr);
  const dry = JSON.parse(r.stdout) as {
    bytesWritten: number;
    bytesToWrite: number;
    recordsToWrite: number;
  };
  assert.equal(dry.bytesWritten, 0);
  assert.ok(dry.bytesToWrite > 0 && dry.recordsToWrite > 0);
  assert.deepEqual(await readFile(f.target), base);
  const real = await apply(f.patch, f.target);
  assert.equal(real.bytesWritten, dry.bytesToWrite);
  assert.equal(real.bytesToWrite, dry.bytesToWrite);
  assert.deepEqual(await readFile(f.target), next);
});

test('a wrong base is refused with EBASE_MISMATCH and TARGET is untouched; --force writes', async (t) => {
  const dir = await tempDir(t);
  const base = seededBytes(200_000, 3);
  const next = changed(base, 200_000, 4);
  const f = await setup(dir, base, next);
  await diff(f.base, f.next, f.patch);
  const other = seededBytes(200_000, 5);
  await writeFile(f.target, other);
  await rejectsWith(apply(f.patch, f.target), 'EBASE_MISMATCH');
  assert.deepEqual(await readFile(f.target), other);
  const cli = await runCli(['apply', f.patch, f.target]);
  assert.equal(cli.code, 1);
  assert.match(cli.stderr, /^blksync: .*\[EBASE_MISMATCH\]\n$/);
  assert.deepEqual(await readFile(f.target), other);
  const forced = await apply(f.patch, f.target, { force: true });
  assert.ok(forced.recordsForced > 0);
});

test('a TARGET with the first records applied and the rest base is finished', async (t) => {
  const dir = await tempDir(t);
  const base = seededBytes(600_000, 8);
  const next = Buffer.from(base);
  next.fill(1, 10_000, 20_000);
  next.fill(2, 300_000, 310_000);
  next.fill(3, 500_000, 510_000);
  const f = await setup(dir, base, next);
  await diff(f.base, f.next, f.patch);
  const half = Buffer.from(base);
  next.copy(half, 0, 0, 200_000);
  await writeFile(f.target, half);
  const a = await apply(f.patch, f.target);
  assert.equal(a.recordsAlreadyApplied, 1);
  assert.equal(a.recordsWritten, 2);
  assert.deepEqual(await readFile(f.target), next);
});

test('reverse needs a reversible patch and checks TARGET holds the result', async (t) => {
  const dir = await tempDir(t);
  const base = seededBytes(100_000, 11);
  const next = changed(base, 100_000, 12);
  const f = await setup(dir, base, next);
  await diff(f.base, f.next, f.patch);
  await rejectsWith(apply(f.patch, f.target, { reverse: true }), 'EPATCH_NOT_REVERSIBLE');
  await diff(f.base, f.next, f.patch, { reversible: true });
  // TARGET still holds the base: reverse of it is "already applied" (it holds the base)
  assert.equal((await apply(f.patch, f.target, { reverse: true })).alreadyApplied, true);
  const other = seededBytes(100_000, 13);
  await writeFile(f.target, other);
  await rejectsWith(apply(f.patch, f.target, { reverse: true }), 'EBASE_MISMATCH');
  assert.deepEqual(await readFile(f.target), other);
});

test('truncated and bit-flipped patch files are refused before anything is written', async (t) => {
  const dir = await tempDir(t);
  const base = seededBytes(300_000, 21);
  const next = changed(base, 300_000, 22);
  const f = await setup(dir, base, next);
  await diff(f.base, f.next, f.patch, { compress: 'gzip', reversible: true });
  const good = await readFile(f.patch);
  const bad = join(dir, 'bad.bsp');
  const cuts = [0, 10, HEADER_BYTES, HEADER_BYTES + 50, good.length - 49, good.length - 1];
  for (const cut of cuts) {
    await writeFile(bad, good.subarray(0, cut));
    await assert.rejects(apply(bad, f.target), (err: unknown) => err instanceof BlksyncError);
    assert.deepEqual(await readFile(f.target), base, `cut at ${cut}`);
  }
  const r = rng(5);
  for (let i = 0; i < 40; i++) {
    const flipped = Buffer.from(good);
    const at = Math.floor(r() * good.length);
    flipped[at] = flipped[at]! ^ (1 << Math.floor(r() * 8));
    await writeFile(bad, flipped);
    await assert.rejects(
      apply(bad, f.target),
      (err: unknown) => err instanceof BlksyncError,
      `flip at ${at}`,
    );
    assert.deepEqual(await readFile(f.target), base, `flip at ${at}`);
  }
  // trailing bytes are refused too
  await writeFile(bad, Buffer.concat([good, Buffer.from([0])]));
  await rejectsWith(apply(bad, f.target), 'EPATCH_FORMAT');
  await writeFile(bad, good.subarray(0, good.length - 10));
  await rejectsWith(apply(bad, f.target), 'EPATCH_TRUNCATED');
});

test('from a stream: a cut-off patch applies the complete batches, and a rerun finishes', async (t) => {
  const dir = await tempDir(t);
  const size = 8 * 1024 * 1024;
  const big = seededBytes(size, 31);
  const next = Buffer.from(big);
  // 6 MiB of changes, in batches of 1 MiB
  for (let o = 0; o < 6 * 1024 * 1024; o += 8192) next[o] = next[o]! ^ 0x55;
  const f = await setup(dir, big, next);
  await diff(f.base, f.next, f.patch);
  const whole = await readFile(f.patch);
  const cut = whole.subarray(0, Math.floor(whole.length * 0.7));
  const err = await apply(Readable.from([cut]), f.target, { batchBytes: 1024 * 1024 }).then(
    () => assert.fail('a cut-off stream must fail'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof BlksyncError);
  assert.equal(err.code, 'EPATCH_TRUNCATED');
  assert.match(err.message, /were applied before; rerun with the complete patch/);
  const partial = err.partial as { recordsWritten: number };
  assert.ok(partial.recordsWritten > 0);
  const rerun = await apply(Readable.from([whole]), f.target, { batchBytes: 1024 * 1024 });
  assert.ok(rerun.recordsAlreadyApplied > 0);
  assert.ok(rerun.recordsWritten > 0);
  assert.ok((await readFile(f.target)).equals(next));
});

test('from a stream: a wrong base is refused before the first write', async (t) => {
  const dir = await tempDir(t);
  const base = seededBytes(500_000, 41);
  const next = changed(base, 500_000, 42);
  const f = await setup(dir, base, next);
  await diff(f.base, f.next, f.patch);
  const other = seededBytes(500_000, 43);
  await writeFile(f.target, other);
  await rejectsWith(apply(Readable.from([await readFile(f.patch)]), f.target), 'EBASE_MISMATCH');
  assert.deepEqual(await readFile(f.target), other);
});

test('refusals: same file, missing target, patch over its base or new image', async (t) => {
  const dir = await tempDir(t);
  await rejectsWith(diff('-', join(dir, 'none'), join(dir, 'p')), 'EUSAGE');
  const base = seededBytes(50_000, 51);
  const next = changed(base, 50_000, 52);
  const f = await setup(dir, base, next);
  await diff(f.base, f.next, f.patch);
  await rejectsWith(apply(f.patch, f.patch), 'ESAME_FILE');
  await rejectsWith(apply(f.patch, join(dir, 'missing.img')), 'EDEST_MISSING');
  await rejectsWith(diff(f.base, f.next, f.next), 'ESAME_FILE');
  await rejectsWith(diff(f.base, f.next, f.base), 'ESAME_FILE');
  assert.deepEqual(await readFile(f.next), next);
  const cli = await runCli(['diff', f.base, f.next]);
  assert.equal(cli.code, 2);
});

test('CLI: diff -o - | apply - through a pipe, info, --json', async (t) => {
  const dir = await tempDir(t);
  const base = seededBytes(2_000_000, 61);
  const next = changed(base, 2_100_000, 62);
  const f = await setup(dir, base, next);
  const node = (args: string[]): ReturnType<typeof spawn> =>
    spawn(...cliCommand(args), { stdio: ['pipe', 'pipe', 'pipe'] });
  const producer = node(['diff', f.base, f.next, '-o', '-', '--reversible', '--compress', 'gzip']);
  const consumer = node(['apply', '-', f.target, '--json']);
  producer.stdout!.pipe(consumer.stdin!);
  let out = '';
  let err = '';
  consumer.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  consumer.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  producer.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const exit = (c: ReturnType<typeof spawn>): Promise<number | null> =>
    new Promise((resolve) => c.on('close', (code) => resolve(code)));
  const [pc, cc] = await Promise.all([exit(producer), exit(consumer)]);
  assert.equal(pc, 0, err);
  assert.equal(cc, 0, err);
  const result = JSON.parse(out) as { streamed: boolean; resized: boolean };
  assert.equal(result.streamed, true);
  assert.equal(result.resized, true);
  assert.deepEqual(await readFile(f.target), next);

  const d = await runCli(['diff', f.base, f.next, '-o', f.patch, '--json']);
  assert.equal(d.code, 0, d.stderr);
  const info = await runCli(['info', f.patch, '--json']);
  assert.equal(info.code, 0, info.stderr);
  assert.equal((JSON.parse(info.stdout) as { format: string }).format, 'blksync-patch');
  const again = await runCli(['apply', f.patch, f.target]);
  assert.equal(again.code, 0);
  assert.match(again.stdout, /already holds the result/);
});

test('CLI: apply FIFO reads the patch once as a stream; a cut-off one is refused, nothing written', async (t) => {
  const dir = await tempDir(t);
  const base = seededBytes(3_000_000, 63);
  const next = changed(base, 3_000_000, 64);
  const f = await setup(dir, base, next);
  const d = await runCli(['diff', f.base, f.next, '-o', f.patch]);
  assert.equal(d.code, 0, d.stderr);
  const patch = await readFile(f.patch);
  const fifo = join(dir, 'patch.fifo');
  const mkfifo = spawn('mkfifo', [fifo]);
  assert.equal(await new Promise((resolve) => mkfifo.on('close', resolve)), 0);
  /** Writes `bytes` into the FIFO from another process, as `diff -o FIFO` would. */
  const feed = (bytes: Buffer): Promise<unknown> => {
    const writer = spawn('sh', ['-c', 'cat > "$1"', 'sh', fifo], {
      stdio: ['pipe', 'ignore', 'ignore'],
    });
    writer.stdin.end(bytes);
    return new Promise((resolve) => writer.on('close', resolve));
  };
  const cut = feed(patch.subarray(0, patch.length - 1000));
  const short = await runCli(['apply', fifo, f.target]);
  await cut;
  assert.equal(short.code, 1, short.stderr);
  assert.match(short.stderr, /\[EPATCH_TRUNCATED\]/);
  assert.deepEqual(await readFile(f.target), base);
  const whole = feed(patch);
  const r = await runCli(['apply', fifo, f.target, '--json']);
  await whole;
  assert.equal(r.code, 0, r.stderr);
  assert.equal((JSON.parse(r.stdout) as { streamed: boolean }).streamed, true);
  assert.deepEqual(await readFile(f.target), next);
});

test('a record torn by a killed apply (its new content begun, the rest old) is refused with what to do; --force finishes', async (t) => {
  const dir = await tempDir(t);
  const MIB = 1024 * 1024;
  const base = seededBytes(4 * MIB, 65);
  const next = Buffer.from(base);
  seededBytes(256 * 1024, 66).copy(next, MIB);
  const f = await setup(dir, base, next);
  const d = await runCli(['diff', f.base, f.next, '-o', f.patch]);
  assert.equal(d.code, 0, d.stderr);
  // what a kill -9 inside the record's write leaves: its first 128 KiB new, the rest old
  const torn = Buffer.from(base);
  next.copy(torn, MIB, MIB, MIB + 128 * 1024);
  await writeFile(f.target, torn);
  const r = await runCli(['apply', f.patch, f.target]);
  assert.equal(r.code, 1, r.stderr);
  assert.match(
    r.stderr,
    /begins with the patch's new content .*killed while writing.*--force to finish.*\[EBASE_MISMATCH\]/,
  );
  assert.deepEqual(await readFile(f.target), torn, 'nothing written');
  const forced = await runCli(['apply', f.patch, f.target, '--force']);
  assert.equal(forced.code, 0, forced.stderr);
  assert.deepEqual(await readFile(f.target), next);
  // a TARGET that is simply another image is not taken for a torn one
  await writeFile(f.target, seededBytes(4 * MIB, 67));
  const other = await runCli(['apply', f.patch, f.target]);
  assert.match(other.stderr, /use --force to write the records anyway \[EBASE_MISMATCH\]/);
});

test('round trip on a loop device', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const size = 8 * 1024 * 1024;
  const base = seededBytes(size, 71);
  const next = changed(base, size, 72);
  const f = await setup(dir, base, next);
  await diff(f.base, f.next, f.patch, { reversible: true });
  const dev = await attachLoop(t, f.target);
  const a = await apply(f.patch, dev);
  assert.ok(a.recordsWritten > 0);
  assert.equal((await apply(f.patch, dev)).alreadyApplied, true);
  const d2 = await diff(dev, f.next, join(dir, 'empty.bsp'));
  assert.equal(d2.records, 0, 'the device holds NEW');
  await apply(f.patch, dev, { reverse: true });
  const back = await diff(f.base, dev, join(dir, 'back.bsp'));
  assert.equal(back.records, 0, 'reverse restored the base on the device');
});

test('a TARGET file of another size than the base is refused, also by a patch without records', async (t) => {
  const dir = await tempDir(t);
  const base = seededBytes(40_000, 81);
  const f = await setup(dir, base, base);
  const d = await diff(f.base, f.next, f.patch);
  assert.equal(d.records, 0);
  const other = seededBytes(50_000, 82);
  await writeFile(f.target, other);
  await rejectsWith(apply(f.patch, f.target), 'EBASE_MISMATCH');
  assert.deepEqual(await readFile(f.target), other);
});

test('an interrupted diff leaves no patch; an interrupted apply is finished by a rerun', async (t) => {
  const dir = await tempDir(t);
  const size = 2 * 1024 * 1024;
  const base = seededBytes(size, 91);
  const next = Buffer.from(base);
  for (let o = 0; o < size; o += 3 * BS) next[o] = next[o]! ^ 1;
  const f = await setup(dir, base, next);
  const stop = new AbortController();
  await rejectsWith(
    diff(f.base, f.next, f.patch, {
      chunkSize: 64 * 1024,
      signal: stop.signal,
      onProgress: () => stop.abort(),
    }),
    'EINTERRUPTED',
  );
  await assert.rejects(stat(f.patch), { code: 'ENOENT' });
  assert.deepEqual(
    (await readdir(dirname(f.patch))).filter((n) => n.endsWith('.blksync-partial')),
    [],
    'no temporary left',
  );

  await diff(f.base, f.next, f.patch);
  const halt = new AbortController();
  const err = await apply(f.patch, f.target, {
    chunkSize: 64 * 1024,
    signal: halt.signal,
    // stopped while writing, not while TARGET is checked before
    onProgress: (p) => p.phase === undefined && halt.abort(),
  }).then(
    () => assert.fail('must be interrupted'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof BlksyncError && err.code === 'EINTERRUPTED', String(err));
  const partial = err.partial as { bytesWritten: number };
  assert.ok(partial.bytesWritten > 0);
  assert.notDeepEqual(await readFile(f.target), next);
  const rerun = await apply(f.patch, f.target);
  assert.ok(rerun.recordsAlreadyApplied > 0);
  assert.deepEqual(await readFile(f.target), next);
});

test('hook: a base known only by its block hashes (as from an index) makes a patch apply accepts', async (t) => {
  const dir = await tempDir(t);
  const size = 300_000;
  const base = seededBytes(size, 101);
  const next = changed(base, size, 102);
  const f = await setup(dir, base, next);
  // what an index of BASE holds: one SHA-256 per block
  const hashes = Buffer.concat(
    Array.from({ length: Math.ceil(size / BS) }, (_, i) =>
      sha256(base, i * BS, Math.min((i + 1) * BS, size)),
    ),
  );
  const knowledge: TargetKnowledge = {
    bytesRead: 0,
    load: (offset, _length) => {
      const first = (offset / BS) * HASH_BYTES;
      return Promise.resolve({
        diff: (data, len, bs, out) => {
          for (let s = 0; s < len; s += bs) {
            const h = sha256(data, s, Math.min(s + bs, len));
            if (
              h.compare(
                hashes,
                first + (s / bs) * HASH_BYTES,
                first + (s / bs + 1) * HASH_BYTES,
              ) === 0
            )
              continue;
            if (out.length > 0 && out[out.length - 1] === s)
              out[out.length - 1] = Math.min(s + bs, len);
            else out.push(s, Math.min(s + bs, len));
          }
        },
        heldHashes: (start, end) =>
          hashes.subarray(
            first + (start / BS) * HASH_BYTES,
            first + Math.ceil(end / BS) * HASH_BYTES,
          ),
        release: () => {},
      });
    },
    close: () => Promise.resolve(),
  };
  const d = await diff({ name: 'base.idx', size, blockSize: BS, knowledge }, f.next, f.patch);
  assert.equal(d.bytesRead, 0);
  const fromBytes = await diff(f.base, f.next, join(dir, 'bytes.bsp'));
  assert.equal(d.records, fromBytes.records);
  await apply(f.patch, f.target);
  assert.deepEqual(await readFile(f.target), next);
  await rejectsWith(
    diff({ name: 'base.idx', size, blockSize: BS, knowledge }, f.next, f.patch, {
      reversible: true,
    }),
    'EUSAGE',
  );
});

test('a mounted TARGET device is refused', async (t) => {
  if (!needLoop(t)) return;
  const dir = await tempDir(t);
  const size = 16 * 1024 * 1024;
  const f = await setup(dir, Buffer.alloc(size), Buffer.alloc(size, 1));
  const dev = await attachLoop(t, f.target);
  await mkfsExt4(dev);
  await diff(dev, f.next, f.patch);
  await mountLoop(t, dev);
  await rejectsWith(apply(f.patch, dev), 'EDEST_MOUNTED');
});

test('blksync diff INDEX NEW: an index stands for BASE, only NEW is read, and the patch applies', async (t) => {
  const dir = await tempDir(t);
  const base = seededBytes(3_000_000, 71);
  const next = Buffer.from(base);
  next.write('changed', 123_456);
  next.write('again', 2_900_000);
  await writeFile(join(dir, 'base.img'), base);
  await writeFile(join(dir, 'new.img'), next);
  await writeFile(join(dir, 'target.img'), base);
  const idx = await runCli(['index', join(dir, 'base.img'), '-o', join(dir, 'base.idx'), '-q']);
  assert.equal(idx.code, 0, idx.stderr);
  const d = await runCli([
    'diff',
    join(dir, 'base.idx'),
    join(dir, 'new.img'),
    '-o',
    join(dir, 'p'),
    '--json',
  ]);
  assert.equal(d.code, 0, d.stderr);
  const summary = JSON.parse(d.stdout) as { bytesRead: number; records: number };
  assert.equal(summary.bytesRead, 0, 'BASE is not read');
  assert.equal(summary.records, 2);
  const a = await runCli(['apply', join(dir, 'p'), join(dir, 'target.img')]);
  assert.equal(a.code, 0, a.stderr);
  assert.deepEqual(await readFile(join(dir, 'target.img')), next);
  // the index only knows hashes, so it cannot give the old bytes a reversible patch needs
  const rev = await runCli([
    'diff',
    '--reversible',
    join(dir, 'base.idx'),
    join(dir, 'new.img'),
    '-o',
    join(dir, 'r'),
  ]);
  assert.equal(rev.code, 2);
  assert.match(rev.stderr, /\[EUSAGE\]/);
});

test('diff INDEX NEW with NEW shorter, ending inside a block: the patch applies onto BASE', async (t) => {
  const dir = await tempDir(t);
  const base = seededBytes(3_000_000, 72);
  await writeFile(join(dir, 'base.img'), base);
  await makeIndex(join(dir, 'base.img'), join(dir, 'base.idx'), { blockSize: BS });
  for (const size of [1, 100, 2 * BS + 5, 2_999_000]) {
    const next = changed(base.subarray(0, size), size, size);
    // the last block changed: its record must describe BASE's whole block there
    next[size - 1] = next[size - 1]! ^ 0xff;
    const f = await setup(dir, base, next);
    f.base = join(dir, 'base.idx');
    await diff(f.base, f.next, f.patch);
    const a = await apply(f.patch, f.target);
    assert.equal(a.alreadyApplied, false);
    assert.deepEqual(await readFile(f.target), next, `NEW of ${size} bytes`);
    assert.equal((await apply(f.patch, f.target)).alreadyApplied, true);
  }
  // the index fixes the block size: another -b is refused, not silently ignored
  const f = await setup(dir, base, base);
  await rejectsWith(diff(join(dir, 'base.idx'), f.next, f.patch, { blockSize: 65536 }), 'EUSAGE');
  await diff(join(dir, 'base.idx'), f.next, f.patch, { blockSize: BS });
});

test('NEW the start of a longer BASE, cut at a block: the patch checks the last block, so another file is refused', async (t) => {
  const dir = await tempDir(t);
  const base = seededBytes(5 * BS + 100, 83);
  const f = await setup(dir, base, base.subarray(0, 4 * BS));
  const d = await diff(f.base, f.next, f.patch);
  assert.equal(d.records, 1, 'the last block of the result is a record');
  // a file of a size between the two that is not BASE: no record to check would let it be cut
  const other = seededBytes(5 * BS, 84);
  await writeFile(f.target, other);
  await rejectsWith(apply(f.patch, f.target), 'EBASE_MISMATCH');
  assert.deepEqual(await readFile(f.target), other);
  await writeFile(f.target, base);
  await apply(f.patch, f.target);
  assert.deepEqual(await readFile(f.target), base.subarray(0, 4 * BS));
});

test('a zstd patch applies and reverses (zstd-napi, a devDependency, loaded by require)', async (t) => {
  const dir = await tempDir(t);
  const base = Buffer.alloc(600_000, 'blksync patch text ');
  const next = changed(base, 600_000, 31);
  const f = await setup(dir, base, next);
  const made = await diff(f.base, f.next, f.patch, { compress: 'zstd', reversible: true });
  assert.equal(made.compression, 'zstd');
  assert.equal((await describePatch(f.patch)).compression, 'zstd');
  await apply(f.patch, f.target);
  assert.deepEqual(await readFile(f.target), next);
  await apply(f.patch, f.target, { reverse: true });
  assert.deepEqual(await readFile(f.target), base);
});
