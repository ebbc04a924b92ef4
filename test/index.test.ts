/**
 * Hash indexes on regular files: `blksync index`, `copy --index`, `info`, the stale-index
 * defences, hostile and damaged index files, and a copy killed mid-way then rerun.
 */

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readdir, readFile, stat, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import { apply } from '../src/engine/apply.js';
import { copy, type CopyResult } from '../src/copy.js';
import { DEFAULT_CHUNK_SIZE } from '../src/engine/block-size.js';
import { diff } from '../src/engine/diff.js';
import { indexAsBase } from '../src/engine/index-target.js';
import { HashPool, hashBlocksSync } from '../src/engine/hash-pool.js';
import { makeIndex, type IndexInfo, type MakeIndexResult } from '../src/engine/make-index.js';
import { BlksyncError } from '../src/errors.js';
import {
  INDEX_HEADER_BYTES,
  MAX_INDEX_BLOCKS,
  parseIndex,
  readIndexFile,
  type IndexFile,
} from '../src/formats/index-file.js';
import { sha256 } from '../src/hash.js';
import { runCli } from './helpers/cli.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const KIB = 1024;
const MIB = 1024 * KIB;

/** Overwrites `length` bytes at each offset with fresh seeded bytes. */
function changed(data: Buffer, offsets: number[], length: number, seed: number): Buffer {
  const out = Buffer.from(data);
  for (const o of offsets) seededBytes(length, seed + o).copy(out, o);
  return out;
}

function isIndexError(code: string) {
  return (err: unknown): boolean => err instanceof BlksyncError && err.code === code;
}

/** The fields that must agree between an index kept up to date and a fresh one. */
function essentials(i: IndexFile) {
  return {
    blockSize: i.blockSize,
    imageSize: i.imageSize,
    blockCount: i.blockCount,
    algorithm: i.algorithm,
    state: i.state,
    identity: { ...i.identity, path: undefined },
    hashes: sha256(i.hashes).toString('hex'),
  };
}

async function setup(t: TestContext, size = 8 * MIB + 12345) {
  const dir = await tempDir(t);
  const old = seededBytes(size, 7);
  const neu = changed(old, [0, 100_000, 3 * MIB + 5, size - 50_000], 40_000, 99);
  const paths = {
    dir,
    src: join(dir, 'new.img'),
    dst: join(dir, 'dst.img'),
    index: join(dir, 'dst.blkidx'),
  };
  await writeFile(paths.src, neu);
  await writeFile(paths.dst, old);
  return { ...paths, old, neu, size };
}

test('copy --index writes the differing blocks, reads only the sample, and keeps the index exact', async (t) => {
  const s = await setup(t);
  const made = await runCli(['index', s.dst, '-o', s.index, '--json']);
  assert.equal(made.code, 0, made.stderr);
  assert.equal((JSON.parse(made.stdout) as MakeIndexResult).blockSize, 64 * KIB);

  const run = await runCli(['copy', s.src, s.dst, '--index', s.index, '--json']);
  assert.equal(run.code, 0, run.stderr);
  const r = JSON.parse(run.stdout) as CopyResult;
  assert.deepEqual(await readFile(s.dst), s.neu);
  assert.equal(r.index?.mode, 'used');
  assert.equal(r.index.sampleBlocks, 16);
  assert.ok(r.bytesRead <= 16 * 64 * KIB, 'DST is read only for the 16-block sample');
  assert.ok(r.bytesWritten > 0 && r.bytesWritten <= 8 * 64 * KIB, `wrote ${r.bytesWritten}`);

  const fresh = join(s.dir, 'fresh.blkidx');
  await makeIndex(s.dst, fresh);
  assert.deepEqual(
    essentials(await readIndexFile(s.index)),
    essentials(await readIndexFile(fresh)),
  );

  const again = await copy(s.src, s.dst, { index: s.index });
  assert.equal(again.bytesWritten, 0);
  const none = await copy(s.src, s.dst, { index: s.index, verifySample: 0 });
  assert.equal(none.bytesRead, 0, '--verify-sample 0 reads nothing of DST');
});

test('copy --index FILE that does not exist compares DST as usual and writes FILE', async (t) => {
  const s = await setup(t);
  const r = await copy(s.src, s.dst, { index: s.index });
  assert.equal(r.index?.mode, 'created');
  assert.equal(r.bytesRead, s.size, 'DST was read once');
  assert.deepEqual(await readFile(s.dst), s.neu);
  const fresh = join(s.dir, 'fresh.blkidx');
  await makeIndex(s.dst, fresh);
  assert.deepEqual(
    essentials(await readIndexFile(s.index)),
    essentials(await readIndexFile(fresh)),
  );
  // and onto a DST that does not exist yet
  const created = join(s.dir, 'created.img');
  const idx2 = join(s.dir, 'created.blkidx');
  const r2 = await copy(s.src, created, { index: idx2 });
  assert.equal(r2.created, true);
  await makeIndex(created, fresh);
  assert.deepEqual(essentials(await readIndexFile(idx2)), essentials(await readIndexFile(fresh)));
});

test('--index auto keeps the index in $XDG_CACHE_HOME/blksync, keyed by DST; index --list shows it', async (t) => {
  const s = await setup(t, 2 * MIB);
  const cache = join(s.dir, 'cache');
  const saved = process.env.XDG_CACHE_HOME;
  process.env.XDG_CACHE_HOME = cache;
  t.after(() => {
    if (saved === undefined) delete process.env.XDG_CACHE_HOME;
    else process.env.XDG_CACHE_HOME = saved;
  });
  const first = await copy(s.src, s.dst, { index: 'auto' });
  assert.equal(first.index?.mode, 'created');
  assert.ok(first.index.path.startsWith(join(cache, 'blksync')));
  const second = await copy(s.src, s.dst, { index: 'auto' });
  assert.equal(second.index?.mode, 'used');
  assert.equal(second.index.path, first.index.path);
  const list = await runCli(['index', '--list', '--json']);
  assert.equal(list.code, 0, list.stderr);
  const entries = JSON.parse(list.stdout) as { path: string; identity: { path: string } }[];
  // DST's, and SRC's (--index auto keeps an index of SRC too: see source-index.test.ts)
  assert.deepEqual(entries.map((e) => e.identity.path).sort(), [s.dst, s.src].sort());
  assert.equal(entries.find((e) => e.identity.path === s.dst)?.path, first.index.path);
});

test('info describes an index, as text and JSON, and refuses files it does not know', async (t) => {
  const s = await setup(t, 1 * MIB + 1);
  await writeFile(s.dst, Buffer.alloc(s.size)); // all zeros
  await makeIndex(s.dst, s.index);
  const json = await runCli(['info', s.index, '--json']);
  assert.equal(json.code, 0, json.stderr);
  const info = JSON.parse(json.stdout) as IndexInfo;
  assert.equal(info.type, 'index');
  assert.equal(info.blockCount, 17);
  assert.equal(info.zeroBlocks, 17);
  assert.equal(info.distinctBlocks, 2, 'a full zero block and the short last one');
  assert.equal(info.state, 'clean');
  const text = await runCli(['info', s.index]);
  assert.match(text.stdout, /blksync index, version 1\.2, checksum ok/);
  assert.match(text.stdout, /state\s+clean/);
  assert.match(text.stdout, /made for\s+file \S*dst\.img \(file:\d+:\d+\)/);
  const unknown = await runCli(['info', s.src]);
  assert.equal(unknown.code, 1);
  assert.match(unknown.stderr, /not a file blksync knows.*EINFO_UNKNOWN/);
});

test('an index of another target is refused (EINDEX_MISMATCH) unless --rebuild-index', async (t) => {
  const s = await setup(t, 2 * MIB);
  const other = join(s.dir, 'other.img');
  await writeFile(other, s.old);
  await makeIndex(other, s.index);
  const before = await stat(s.dst);
  const run = await runCli(['copy', s.src, s.dst, '--index', s.index]);
  assert.equal(run.code, 1);
  assert.match(run.stderr, /does not describe this destination.*--rebuild-index.*EINDEX_MISMATCH/);
  assert.deepEqual(await readFile(s.dst), s.old, 'nothing written');
  assert.equal((await stat(s.dst)).mtimeMs, before.mtimeMs);

  const r = await copy(s.src, s.dst, { index: s.index, rebuildIndex: true });
  assert.equal(r.index?.mode, 'rebuilt');
  assert.deepEqual(await readFile(s.dst), s.neu);
  const used = await copy(s.src, s.dst, { index: s.index });
  assert.equal(used.index?.mode, 'used');
});

test("a DST changed behind blksync's back is caught: by its mtime, else by the sample", async (t) => {
  const s = await setup(t, 4 * MIB);
  await makeIndex(s.dst, s.index);
  // another tool writes the last block (where a backup GPT lives) and DST's mtime moves
  const tampered = changed(s.old, [s.size - 100], 50, 5);
  await writeFile(s.dst, tampered);
  await assert.rejects(copy(s.src, s.dst, { index: s.index }), (err: unknown) => {
    assert.ok(isIndexError('EINDEX_STALE')(err));
    assert.match((err as Error).message, /modified after the index was written/);
    return true;
  });
  // even with the mtime put back, the sample (first and last block always) catches it
  const idx = await readIndexFile(s.index);
  const ns = BigInt(idx.identity.mtimeNs!);
  const sec = Number(ns / 1_000_000_000n) + Number(ns % 1_000_000_000n) / 1e9;
  await utimes(s.dst, sec, sec);
  const now = await stat(s.dst, { bigint: true });
  if (now.mtimeNs.toString() === idx.identity.mtimeNs) {
    await assert.rejects(copy(s.src, s.dst, { index: s.index }), (err: unknown) => {
      assert.ok(isIndexError('EINDEX_STALE')(err));
      assert.match((err as Error).message, /does not match its hash/);
      return true;
    });
  }
  assert.deepEqual(await readFile(s.dst), tampered, 'nothing written');
  // a change in the middle is found when every block is sampled
  await makeIndex(s.dst, s.index);
  const mid = changed(tampered, [2 * MIB], 10, 3);
  await writeFile(s.dst, mid);
  const fresh = await readIndexFile(s.index);
  const t0 = BigInt(fresh.identity.mtimeNs!);
  await utimes(s.dst, Number(t0) / 1e9, Number(t0) / 1e9);
  await assert.rejects(
    copy(s.src, s.dst, { index: s.index, verifySample: 1000 }),
    isIndexError('EINDEX_STALE'),
  );
  const fixed = await copy(s.src, s.dst, {
    index: s.index,
    rebuildIndex: true,
    verifySample: 1000,
  });
  assert.equal(fixed.index?.mode, 'rebuilt');
  assert.deepEqual(await readFile(s.dst), s.neu);
});

/** A valid small index to damage. */
async function sampleIndex(dir: string): Promise<{ bytes: Buffer; path: string }> {
  const img = join(dir, 'small.img');
  await writeFile(img, seededBytes(20 * 4096 + 100, 3));
  const path = join(dir, 'small.blkidx');
  await makeIndex(img, path, { blockSize: 4096 });
  return { bytes: await readFile(path), path };
}

/** Recomputes the trailing checksum, so that the header's own checks are what is tested. */
function resealed(bytes: Buffer): Buffer {
  const out = Buffer.from(bytes);
  sha256(out, 0, out.length - 32).copy(out, out.length - 32);
  return out;
}

test('truncated, bit-flipped and hostile index files are refused with a clear error', async (t) => {
  const dir = await tempDir(t);
  const { bytes } = await sampleIndex(dir);
  assert.ok(parseIndex(bytes).blockCount === 21);

  const cases: [string, Buffer, RegExp][] = [
    ['empty', Buffer.alloc(0), /no index magic/],
    ['truncated header', bytes.subarray(0, 40), /no index magic/],
    ['truncated hashes', bytes.subarray(0, bytes.length - 50), /length is .* header declares/],
    ['padded', Buffer.concat([bytes, Buffer.alloc(1)]), /length is .* header declares/],
    [
      'bit flip in a hash',
      (() => {
        const b = Buffer.from(bytes);
        b[b.length - 100]! ^= 1;
        return b;
      })(),
      /checksum does not match/,
    ],
    [
      'unknown major version',
      resealed(
        (() => {
          const b = Buffer.from(bytes);
          b.writeUInt16LE(2, 8);
          return b;
        })(),
      ),
      /version 2\.\d+ is not supported/,
    ],
    [
      'block count for a huge image in a small file',
      resealed(
        (() => {
          const b = Buffer.from(bytes);
          b.writeBigUInt64LE(BigInt(MAX_INDEX_BLOCKS) * 4096n, 24);
          b.writeBigUInt64LE(BigInt(MAX_INDEX_BLOCKS), 32);
          return b;
        })(),
      ),
      /length is .* header declares/,
    ],
    [
      'more blocks than allowed',
      resealed(
        (() => {
          const b = Buffer.from(bytes);
          b.writeBigUInt64LE(2n ** 40n * 4096n, 24);
          b.writeBigUInt64LE(2n ** 40n, 32);
          return b;
        })(),
      ),
      /more than the .* allowed/,
    ],
    [
      'block count not matching the size',
      resealed(
        (() => {
          const b = Buffer.from(bytes);
          b.writeBigUInt64LE(22n, 32);
          return b;
        })(),
      ),
      /does not match the image size/,
    ],
    [
      'odd block size',
      resealed(
        (() => {
          const b = Buffer.from(bytes);
          b.writeUInt32LE(4097, 16);
          return b;
        })(),
      ),
      /block size 4097 is invalid/,
    ],
    [
      'huge identity',
      resealed(
        (() => {
          const b = Buffer.from(bytes);
          b.writeUInt32LE(0xffffffff, 64);
          return b;
        })(),
      ),
      /identity is too long/,
    ],
    [
      'dirty range past the end',
      resealed(
        (() => {
          const b = Buffer.from(bytes);
          b.writeUInt8(1, 22);
          b.writeBigUInt64LE(0n, 40);
          b.writeBigUInt64LE(1n << 50n, 48);
          return b;
        })(),
      ),
      /dirty range is out of bounds/,
    ],
    [
      'garbage identity',
      resealed(
        (() => {
          const b = Buffer.from(bytes);
          b.write('!', INDEX_HEADER_BYTES, 'latin1');
          return b;
        })(),
      ),
      /identity record is not valid JSON/,
    ],
  ];
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  await writeFile(src, seededBytes(20 * 4096 + 100, 4));
  const dstBytes = seededBytes(20 * 4096 + 100, 5);
  await writeFile(dst, dstBytes);
  for (const [name, bad, message] of cases) {
    assert.throws(
      () => parseIndex(bad, 'x'),
      (err: unknown) => {
        assert.ok(isIndexError('EINDEX_FORMAT')(err), `${name}: ${String(err)}`);
        assert.match((err as Error).message, message, name);
        return true;
      },
    );
    const path = join(dir, 'bad.blkidx');
    await writeFile(path, bad);
    const run = await copy(src, dst, { index: path }).then(
      () => assert.fail(`${name}: copy accepted it`),
      (err: unknown) => err,
    );
    assert.ok(isIndexError('EINDEX_FORMAT')(run), `${name}: ${String(run)}`);
    assert.match((run as Error).message, /rebuild it/);
    assert.deepEqual(await readFile(dst), dstBytes, `${name}: nothing written`);
  }
  const cli = await runCli(['copy', src, dst, '--index', join(dir, 'bad.blkidx')]);
  assert.equal(cli.code, 1);
  assert.match(cli.stderr, /^blksync: .* is not a usable blksync index: .*\[EINDEX_FORMAT\]\n$/);
});

const FUZZ_ITERATIONS = 20_000;

test('fuzz: thousands of mutated index files parse cleanly or fail with EINDEX_FORMAT', async (t) => {
  const dir = await tempDir(t);
  const { bytes } = await sampleIndex(dir);
  const rand = seededBytes(4 * 1_000_003, 12345);
  let r = 0;
  const next = (n: number): number => {
    const v = rand.readUInt32LE((r++ * 4) % (rand.length - 4));
    return v % n;
  };
  let accepted = 0;
  const started = performance.now();
  for (let i = 0; i < FUZZ_ITERATIONS; i++) {
    let b: Buffer = Buffer.from(bytes);
    const kind = next(5);
    if (kind === 0) b = b.subarray(0, next(b.length));
    else {
      // mutate 1-8 bytes, mostly in the header where the parser makes decisions
      const n = 1 + next(8);
      for (let k = 0; k < n; k++) {
        const at = next(3) === 0 ? next(b.length) : next(INDEX_HEADER_BYTES + 80);
        b[at] = next(256);
      }
      if (kind >= 3) b = resealed(b); // a hostile writer computes the checksum too
      if (kind === 4) b = Buffer.concat([b, randomBytes(next(64))]);
    }
    try {
      const idx = parseIndex(b, 'fuzz');
      accepted++;
      assert.equal(idx.hashes.length, idx.blockCount * idx.hashBytes);
      assert.equal(idx.blockCount, Math.ceil(idx.imageSize / idx.blockSize));
      assert.ok(idx.blockCount <= MAX_INDEX_BLOCKS);
    } catch (err) {
      assert.ok(isIndexError('EINDEX_FORMAT')(err), `iteration ${i}: ${String(err)}`);
    }
  }
  assert.ok(performance.now() - started < 20_000);
  assert.ok(accepted < FUZZ_ITERATIONS);
});

const KILLER = `
import { copy } from ${JSON.stringify(fileURLToPath(new URL('../src/copy.ts', import.meta.url)))};
const [src, dst, index, at] = process.argv.slice(1);
await copy(src, dst, {
  index, chunkSize: 1 << 20, indexCheckpointBytes: 2 << 20,
  onProgress: (p) => { if (p.bytesScanned >= Number(at)) process.kill(process.pid, 'SIGKILL'); },
});
`;

test('a copy killed mid-way leaves the index in progress; a rerun converges', async (t) => {
  const size = 24 * MIB + 4096;
  const dir = await tempDir(t);
  const src = join(dir, 'new.img');
  const dst = join(dir, 'dst.img');
  const index = join(dir, 'dst.blkidx');
  const old = seededBytes(size, 1);
  const neu = seededBytes(size, 2); // every block differs
  await writeFile(src, neu);
  await writeFile(dst, old);
  await makeIndex(dst, index);

  const child = spawn(
    process.execPath,
    ['--import', 'tsx', '--input-type=module', '-e', KILLER, src, dst, index, String(13 * MIB)],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const signal = await new Promise((resolve) => child.on('close', (_c, sig) => resolve(sig)));
  assert.equal(signal, 'SIGKILL', stderr);

  const left = await readIndexFile(index);
  assert.equal(left.state.kind, 'in-progress');
  if (left.state.kind === 'in-progress') {
    assert.ok(left.state.dirty.start >= 10 * MIB, `dirty from ${left.state.dirty.start}`);
    assert.ok(left.state.dirty.end <= 16 * MIB, `dirty to ${left.state.dirty.end}`);
  }
  const partly = await readFile(dst);
  assert.ok(!partly.equals(old) && !partly.equals(neu), 'the kill came mid-way');
  assert.ok(
    (await readdir(dir)).every((n) => !n.endsWith('.blksync-partial')),
    'no temporary file left',
  );

  const rerun = await runCli(['copy', src, dst, '--index', index, '--json']);
  assert.equal(rerun.code, 0, rerun.stderr);
  const r = JSON.parse(rerun.stdout) as CopyResult;
  // killed outright, the run's own writes moved DST's ctime after the last mark: nothing
  // vouches for the rest of the index either, so DST is read and compared once
  assert.equal(r.index?.mode, 'rebuilt');
  assert.match(r.index.reason ?? '', /interrupted/);
  assert.deepEqual(await readFile(dst), neu);
  const fresh = join(dir, 'fresh.blkidx');
  await makeIndex(dst, fresh);
  assert.deepEqual(essentials(await readIndexFile(index)), essentials(await readIndexFile(fresh)));
});

test('an index of a larger DST, or of a shorter image, trusts only the blocks it covers', async (t) => {
  const dir = await tempDir(t);
  const dstBytes = seededBytes(6 * MIB + 777, 21);
  const dst = join(dir, 'dst.img');
  const index = join(dir, 'dst.blkidx');
  await writeFile(dst, dstBytes);
  await makeIndex(dst, index); // covers all of DST

  // a shorter SRC: its last, short block is compared with DST's bytes, not a hash
  const short = changed(dstBytes.subarray(0, 3 * MIB + 100), [3 * MIB + 10], 20, 1);
  const src = join(dir, 'src.img');
  await writeFile(src, short);
  const r1 = await copy(src, dst, { index });
  assert.equal(r1.index?.mode, 'used');
  // the chunk (4 MiB) holding the short block is read back; here that is the whole image
  assert.equal(r1.index.bytesReread, short.length);
  assert.equal(r1.bytesWritten, 100);
  const after1 = await readFile(dst);
  assert.deepEqual(after1.subarray(0, short.length), short);
  assert.deepEqual(after1.subarray(short.length), dstBytes.subarray(short.length));
  const idx1 = await readIndexFile(index);
  assert.equal(idx1.imageSize, short.length);

  // a longer SRC again: what the index no longer covers is read back
  const long = changed(after1, [5 * MIB], 1000, 2);
  await writeFile(src, long);
  const r2 = await copy(src, dst, { index });
  assert.deepEqual(await readFile(dst), long);
  assert.ok(r2.index !== undefined && r2.index.bytesReread >= 3 * MIB, 'uncovered blocks read');
  const fresh = join(dir, 'fresh.blkidx');
  await makeIndex(dst, fresh);
  assert.deepEqual(essentials(await readIndexFile(index)), essentials(await readIndexFile(fresh)));
});

test('copy --index --dry-run reports from the index and changes neither DST nor the index', async (t) => {
  const s = await setup(t, 2 * MIB);
  await makeIndex(s.dst, s.index);
  const before = await readFile(s.index);
  const r = await copy(s.src, s.dst, { index: s.index, dryRun: true });
  assert.equal(r.index?.mode, 'used');
  assert.ok(r.bytesDiffering > 0);
  assert.equal(r.bytesWritten, 0);
  assert.deepEqual(await readFile(s.dst), s.old);
  assert.deepEqual(await readFile(s.index), before);
});

test('copy --index auto --dry-run creates no cache directory', async (t) => {
  const s = await setup(t, 2 * MIB);
  const cache = join(s.dir, 'cache');
  const saved = process.env.XDG_CACHE_HOME;
  process.env.XDG_CACHE_HOME = cache;
  t.after(() => {
    if (saved === undefined) delete process.env.XDG_CACHE_HOME;
    else process.env.XDG_CACHE_HOME = saved;
  });
  const r = await copy(s.src, s.dst, { index: 'auto', dryRun: true });
  assert.equal(r.index?.mode, 'created');
  assert.ok(r.index.path.startsWith(join(cache, 'blksync')));
  assert.equal(r.index.source?.mode, 'created');
  await assert.rejects(stat(cache), { code: 'ENOENT' });
  assert.deepEqual(await readFile(s.dst), s.old);
});

test('worker-thread hashing gives the same hashes as the main thread, short last block included', async () => {
  const length = 3 * 65536 + 1234;
  const shared = Buffer.from(new SharedArrayBuffer(4 * 65536));
  seededBytes(length, 77).copy(shared);
  const expected = Buffer.alloc(4 * 32);
  hashBlocksSync(shared, 0, length, 65536, expected, 0);
  assert.deepEqual(expected.subarray(96), sha256(shared, 3 * 65536, length));
  for (const threads of [0, 1, 3]) {
    const pool = new HashPool(threads);
    try {
      const out = Buffer.alloc(5 * 32);
      await pool.hashBlocks(shared, 0, length, 65536, out, 32);
      assert.deepEqual(out.subarray(32), expected, `${threads} threads`);
      assert.equal(pool.bytesHashed, length);
    } finally {
      await pool.close();
    }
  }
});

test('an index stands in for BASE: diff INDEX NEW makes a patch that apply accepts', async (t) => {
  const s = await setup(t, 3 * MIB + 5000);
  await makeIndex(s.dst, s.index);
  const base = await indexAsBase(s.index, DEFAULT_CHUNK_SIZE);
  const patch = join(s.dir, 'p.bsp');
  try {
    const d = await diff(base, s.src, patch);
    assert.equal(d.bytesRead, 0, 'BASE is not read');
  } finally {
    await base.knowledge.close();
  }
  await apply(patch, s.dst);
  assert.deepEqual(await readFile(s.dst), s.neu);
});
