/**
 * An index of SRC with `copy --index` (src/engine/source-index.ts): only the blocks whose
 * hashes differ are read from SRC; an index that cannot be trusted is rebuilt, never believed.
 */

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { copy, type CopyResult } from '../src/copy.js';
import { makeIndex } from '../src/engine/make-index.js';
import { BlksyncError } from '../src/errors.js';
import { newIndex, readIndexFile, writeIndexFile } from '../src/formats/index-file.js';
import { identityOf } from '../src/io/identity.js';
import { runCli } from './helpers/cli.js';
import { needMapWrites, SharedMap } from './helpers/shared-map.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const KIB = 1024;
const MIB = 1024 * KIB;
const BLOCK = 64 * KIB; // the index's default block size

/** `data` with `length` fresh bytes at each offset. */
function changed(data: Buffer, offsets: number[], length: number, seed: number): Buffer {
  const out = Buffer.from(data);
  for (const o of offsets) seededBytes(length, seed + o).copy(out, o);
  return out;
}

/** Writes `data` over `path` and puts its mtime back, to the nanosecond: a write behind mtime's back. */
async function overwriteKeepingMtime(path: string, data: Buffer): Promise<void> {
  const before = await stat(path, { bigint: true });
  await writeFile(path, data);
  const ns = before.mtimeNs;
  const stamp = `@${ns / 1_000_000_000n}.${(ns % 1_000_000_000n).toString().padStart(9, '0')}`;
  execFileSync('touch', ['-m', '-d', stamp, path]);
  const after = await stat(path, { bigint: true });
  assert.equal(after.mtimeNs, ns, 'touch restored the mtime');
}

function code(c: string) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof BlksyncError, String(err));
    assert.equal(err.code, c, err.message);
    return true;
  };
}

async function setup(t: TestContext, size = 6 * MIB + 12345) {
  const dir = await tempDir(t);
  const old = seededBytes(size, 11);
  // three changed places: in block 1, across blocks 40/41, and in the short last block
  const neu = changed(old, [BLOCK + 100, 41 * BLOCK - 10, size - 100], 50, 77);
  const p = {
    dir,
    src: join(dir, 'new.img'),
    dst: join(dir, 'dst.img'),
    index: join(dir, 'dst.blkidx'),
    srcIndex: join(dir, 'new.blkidx'),
  };
  await writeFile(p.src, neu);
  await writeFile(p.dst, old);
  return { ...p, old, neu, size };
}

/** Bytes of the blocks that hold a change: what a copy with both indexes reads of SRC. */
function changedBlockBytes(size: number): number {
  const lastBlock = size - Math.floor((size - 1) / BLOCK) * BLOCK;
  return 3 * BLOCK + lastBlock;
}

test('with an index of SRC, copy --index reads only the blocks whose hashes differ', async (t) => {
  const s = await setup(t);
  await makeIndex(s.dst, s.index);
  const made = await runCli(['index', s.src, '-o', s.srcIndex]);
  assert.equal(made.code, 0, made.stderr);

  const run = await runCli([
    'copy',
    s.src,
    s.dst,
    '--index',
    s.index,
    '--src-index',
    s.srcIndex,
    '--json',
  ]);
  assert.equal(run.code, 0, run.stderr);
  const r = JSON.parse(run.stdout) as CopyResult;
  assert.deepEqual(await readFile(s.dst), s.neu);
  assert.equal(r.index?.source?.mode, 'used');
  assert.equal(r.bytesScanned, changedBlockBytes(s.size), 'read only the changed blocks of SRC');
  assert.equal(r.bytesWritten, changedBlockBytes(s.size));
  // the index of DST now describes DST, as a fresh one does
  const kept = await readIndexFile(s.index);
  const fresh = await readIndexFile(s.srcIndex);
  assert.ok(kept.hashes.equals(fresh.hashes));

  // the text summary says what was read
  await writeFile(s.dst, s.old);
  await makeIndex(s.dst, s.index);
  const text = await runCli(['copy', s.src, s.dst, '--index', s.index, '--src-index', s.srcIndex]);
  assert.equal(text.code, 0, text.stderr);
  assert.match(
    text.stdout + text.stderr,
    /index of SRC .*new\.blkidx: used; read 204\.1 KiB of .*new\.img/,
  );
});

test('a change to SRC outside the differing blocks, its mtime put back, is caught by its ctime', async (t) => {
  // blocks of SRC outside the differing ones are not read: only what vouches for the index
  // (mtime and ctime) can tell that the unchanged middle of SRC was rewritten behind its back
  const s = await setup(t);
  await makeIndex(s.dst, s.index);
  await makeIndex(s.src, s.srcIndex);
  const sneaky = changed(s.neu, [20 * BLOCK], 10, 5);
  await overwriteKeepingMtime(s.src, sneaky);
  const r = await copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex, verifySample: 0 });
  assert.equal(r.index?.source?.mode, 'rebuilt');
  assert.match(r.index.source.reason ?? '', /ctime moved/);
  assert.deepEqual(await readFile(s.dst), sneaky, 'block 20 of SRC was read and copied');
});

test('SRC written through a shared map during a copy that made its index is not trusted after', async (t) => {
  const s = await setup(t);
  if (!(await needMapWrites(t, s.dir))) return;
  const map = await SharedMap.open(s.src, s.size);
  try {
    // the first write faults and moves the mtime before the copy; the copy stamps SRC's
    // index with SRC as it then is
    map.write(20 * BLOCK, Buffer.alloc(16, 0x41));
    const first = await copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex });
    assert.equal(first.index?.source?.mode, 'created');
    // the page is still dirty and writable unless the copy synced SRC: no fault, no mtime
    map.write(20 * BLOCK, Buffer.alloc(16, 0x42));
  } finally {
    await map.close();
  }
  const r = await copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex, verifySample: 0 });
  assert.equal(r.index?.source?.mode, 'rebuilt');
  assert.ok((await readFile(s.dst)).equals(await readFile(s.src)), 'DST holds SRC');
});

test('a missing index of SRC is written after the copy, and used by the next one', async (t) => {
  const s = await setup(t);
  await makeIndex(s.dst, s.index);
  const first = await copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex });
  assert.equal(first.index?.source?.mode, 'created');
  assert.equal(first.bytesScanned, s.size);
  const written = await readIndexFile(s.srcIndex);
  const fresh = join(s.dir, 'fresh.blkidx');
  await makeIndex(s.src, fresh);
  assert.ok(written.hashes.equals((await readIndexFile(fresh)).hashes));

  await writeFile(s.dst, s.old);
  await makeIndex(s.dst, s.index);
  const second = await copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex });
  assert.equal(second.index?.source?.mode, 'used');
  assert.equal(second.bytesScanned, changedBlockBytes(s.size));
  assert.deepEqual(await readFile(s.dst), s.neu);

  // a dry run uses it and writes nothing
  await writeFile(s.dst, s.old);
  await makeIndex(s.dst, s.index);
  const before = await readFile(s.index);
  const dry = await copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex, dryRun: true });
  assert.equal(dry.bytesDiffering, changedBlockBytes(s.size));
  assert.deepEqual(await readFile(s.dst), s.old);
  assert.deepEqual(await readFile(s.index), before);
});

test('an index of SRC that cannot be trusted is rebuilt, not believed', async (t) => {
  const s = await setup(t);
  await makeIndex(s.src, s.srcIndex);

  // SRC rewritten since (mtime moved): SRC is read whole, the index rewritten
  const v2 = changed(s.neu, [30 * BLOCK], 10, 9);
  await writeFile(s.src, v2);
  await makeIndex(s.dst, s.index);
  const moved = await copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex });
  assert.equal(moved.index?.source?.mode, 'rebuilt');
  assert.match(moved.index.source.reason ?? '', /modified after the index was written/);
  assert.deepEqual(await readFile(s.dst), v2);
  assert.equal(
    (await copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex })).index?.source?.mode,
    'used',
  );

  // rewritten with the mtime put back: the sample (first and last block always) catches it
  const v3 = changed(v2, [10], 10, 10);
  await overwriteKeepingMtime(s.src, v3);
  const sampled = await copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex });
  assert.equal(sampled.index?.source?.mode, 'rebuilt');
  assert.match(sampled.index.source.reason ?? '', /ctime moved/);
  assert.deepEqual(await readFile(s.dst), v3);

  // made for DST's block size only: another block size is rebuilt with DST's
  await makeIndex(s.src, s.srcIndex, { blockSize: 4 * KIB });
  const other = await copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex });
  assert.equal(other.index?.source?.mode, 'rebuilt');
  assert.match(other.index.source.reason ?? '', /4096-byte blocks/);
  assert.equal((await readIndexFile(s.srcIndex)).blockSize, BLOCK);
});

test('a block read from SRC that does not match its index stops the copy with EINDEX_STALE', async (t) => {
  const s = await setup(t);
  await makeIndex(s.dst, s.index);
  await makeIndex(s.src, s.srcIndex);
  // an index of SRC that its identity vouches for but that is wrong about block 1 (which
  // differs from DST anyway): the sample is off, so only the block's own hash can tell
  const good = await readIndexFile(s.srcIndex);
  const hashes = Buffer.from(good.hashes);
  hashes[32] = hashes[32]! ^ 0xff;
  await writeIndexFile(s.srcIndex, { ...good, hashes });
  await assert.rejects(
    copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex, verifySample: 0 }),
    (err: unknown) => {
      code('EINDEX_STALE')(err);
      assert.match((err as Error).message, /of SRC is stale: the block at byte 65536/);
      return true;
    },
  );
  assert.deepEqual(await readFile(s.dst), s.old, 'checked before the block was written');
});

test('an index made for another file is refused (EINDEX_MISMATCH) unless --rebuild-index', async (t) => {
  const s = await setup(t);
  await makeIndex(s.dst, s.index);
  await makeIndex(s.dst, s.srcIndex); // of DST, not SRC
  await assert.rejects(
    copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex }),
    code('EINDEX_MISMATCH'),
  );
  assert.deepEqual(await readFile(s.dst), s.old, 'nothing written');
  const r = await copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex, rebuildIndex: true });
  assert.equal(r.index?.source?.mode, 'rebuilt');
  assert.deepEqual(await readFile(s.dst), s.neu);
  assert.equal((await readIndexFile(s.srcIndex)).identity.path, s.src);
});

test('--index auto also keeps an index of SRC in the cache; --no-src-index leaves it out', async (t) => {
  const s = await setup(t, 2 * MIB);
  const cache = join(s.dir, 'cache');
  const env = { XDG_CACHE_HOME: cache };
  const run = async (...extra: string[]): Promise<CopyResult> => {
    const r = await runCli(['copy', s.src, s.dst, '--index', 'auto', '--json', ...extra], { env });
    assert.equal(r.code, 0, r.stderr);
    return JSON.parse(r.stdout) as CopyResult;
  };
  const first = await run();
  assert.equal(first.index?.mode, 'created');
  assert.equal(first.index.source?.mode, 'created');
  assert.equal((await readdir(join(cache, 'blksync'))).length, 2);

  // DST back to the old image, and its cached index with it
  await writeFile(s.dst, s.old);
  const primed = await runCli(['index', s.dst, '-o', 'auto'], { env });
  assert.equal(primed.code, 0, primed.stderr);
  const fast = await run();
  assert.equal(fast.index?.mode, 'used');
  assert.equal(fast.index.source?.mode, 'used');
  assert.ok(fast.bytesScanned < s.size / 4, `read ${fast.bytesScanned} of SRC`);
  assert.deepEqual(await readFile(s.dst), s.neu);

  const off = await run('--no-src-index');
  assert.equal(off.index?.source, undefined);
});

test('--src-index is refused where it cannot work, before anything is written', async (t) => {
  const s = await setup(t, 1 * MIB);
  await assert.rejects(copy(s.src, s.dst, { srcIndex: s.srcIndex }), code('EUSAGE'));
  await assert.rejects(copy(s.src, s.dst, { index: s.index, srcIndex: s.index }), code('EUSAGE'));
  await assert.rejects(copy(s.src, s.dst, { index: s.index, srcIndex: s.src }), code('ESAME_FILE'));
  const gz = join(s.dir, 'new.img.gz');
  execFileSync('sh', ['-c', `gzip -c < '${s.src}' > '${gz}'`]);
  await assert.rejects(copy(gz, s.dst, { index: s.index, srcIndex: s.srcIndex }), (err) => {
    code('EUSAGE')(err);
    assert.match((err as Error).message, /gzip-compressed/);
    return true;
  });
  assert.deepEqual(await readFile(s.dst), s.old);
});

test("DST's range an interrupted copy left unsure is read and fixed even where SRC's and DST's hashes agree", async (t) => {
  const s = await setup(t);
  await makeIndex(s.dst, s.index);
  await makeIndex(s.src, s.srcIndex);
  // an interrupted copy wrote block 50 of DST (marked dirty) before its index caught up
  const idx = await readIndexFile(s.index);
  const half = changed(s.old, [50 * BLOCK + 7], 20, 3);
  await writeFile(s.dst, half);
  const st = await stat(s.dst);
  await writeIndexFile(
    s.index,
    newIndex({
      blockSize: idx.blockSize,
      imageSize: idx.imageSize,
      state: { kind: 'in-progress', dirty: { start: 48 * BLOCK, end: 52 * BLOCK } },
      identity: await identityOf(s.dst, st, st.size),
      hashes: idx.hashes,
    }),
  );
  const r = await copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex });
  assert.equal(r.index?.source?.mode, 'used');
  assert.equal(r.index.bytesReread, 4 * BLOCK, 'the unsure range was read back');
  assert.deepEqual(await readFile(s.dst), s.neu);
});

test('a damaged index of SRC is refused with EINDEX_FORMAT before writing, unless --rebuild-index', async (t) => {
  const s = await setup(t);
  await makeIndex(s.dst, s.index);
  await makeIndex(s.src, s.srcIndex);
  const whole = await readFile(s.srcIndex);
  await writeFile(s.srcIndex, whole.subarray(0, whole.length - 100)); // truncated
  await assert.rejects(
    copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex }),
    code('EINDEX_FORMAT'),
  );
  assert.deepEqual(await readFile(s.dst), s.old, 'nothing written');
  const flipped = Buffer.from(whole);
  flipped[flipped.length - 5]! ^= 0x40; // a bit flipped in the checksum
  await writeFile(s.srcIndex, flipped);
  await assert.rejects(
    copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex }),
    code('EINDEX_FORMAT'),
  );
  const r = await copy(s.src, s.dst, { index: s.index, srcIndex: s.srcIndex, rebuildIndex: true });
  assert.equal(r.index?.source?.mode, 'rebuilt');
  assert.deepEqual(await readFile(s.dst), s.neu);
  assert.ok((await readIndexFile(s.srcIndex)).hashes.length > 0);
});
