/**
 * engine/equal-scan.ts: SRC and DST compared on every core before the pipeline, which then
 * reads only the chunks found to differ. Real files; the worker threads run for real (the
 * tests ask for them where the files are too small for the default to start one).
 */

import assert from 'node:assert/strict';
import { open, readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { describe, test } from 'node:test';
import { copy } from '../src/copy.js';
import { narrowToDiffering, RereadCheck, type EqualScanOptions } from '../src/engine/equal-scan.js';
import type { Plan } from '../src/types.js';
import type { Range } from '../src/ranges.js';
import { FileSource } from '../src/io/file-source.js';
import { wholeImagePlan } from '../src/engine/pipeline.js';
import { createBmap } from '../src/engine/bmap-create.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

const MiB = 1024 * 1024;
const CHUNK = MiB;

/** SRC of `size` seeded bytes, and DST a copy of it with `changes` applied. */
async function pair(
  dir: string,
  size: number,
  changes: readonly { offset: number; bytes: Buffer }[],
): Promise<{ src: string; dst: string; data: Buffer }> {
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  const data = seededBytes(size, 7);
  await writeFile(src, data);
  const old = Buffer.from(data);
  for (const c of changes) c.bytes.copy(old, c.offset);
  await writeFile(dst, old);
  return { src, dst, data };
}

async function scan(src: string, dst: string, size: number, workers: number) {
  const s = await open(src, 'r');
  const d = await open(dst, 'r');
  try {
    return await narrowToDiffering(wholeImagePlan(size), s.fd, d.fd, {
      chunkSize: CHUNK,
      workers,
    });
  } finally {
    await s.close();
    await d.close();
  }
}

/** narrowToDiffering over the files `src` and `dst`, open for it alone. */
async function scanFiles(src: string, dst: string, plan: Plan, options: EqualScanOptions) {
  const s = await open(src, 'r');
  const d = await open(dst, 'r');
  try {
    return await narrowToDiffering(plan, s.fd, d.fd, options);
  } finally {
    // closing the descriptors under a read or hash still running would fail it, or worse
    await s.close();
    await d.close();
  }
}

for (const workers of [0, 1, 3]) {
  test(`the scan keeps exactly the chunks that differ (${workers} workers)`, async (t) => {
    const dir = await tempDir(t);
    // a partial last chunk, a change in it, one on a chunk boundary, one in the first byte
    const size = 40 * MiB + 12345;
    const { src, dst } = await pair(dir, size, [
      { offset: 0, bytes: Buffer.from([0x55 ^ 0xff]) },
      { offset: 17 * MiB - 2, bytes: Buffer.from('four') }, // chunks 16 and 17
      { offset: 40 * MiB + 12000, bytes: Buffer.from('tail') },
    ]);
    // the first byte must really differ: flip whatever SRC holds there
    const first = (await readFile(src)).subarray(0, 1);
    const fh = await open(dst, 'r+');
    await fh.write(Buffer.from([first[0]! ^ 0xff]), 0, 1, 0);
    await fh.close();

    const r = await scan(src, dst, size, workers);
    assert.deepEqual(r.plan.ranges, [
      { start: 0, end: MiB },
      { start: 16 * MiB, end: 18 * MiB },
      { start: 40 * MiB, end: size },
    ]);
    assert.equal(r.bytesEqual, size - 2 * MiB - 12345 - MiB);
  });
}

test('a DST shorter than the plan: the chunks past its end count as differing', async (t) => {
  const dir = await tempDir(t);
  const size = 8 * MiB;
  const { src, dst } = await pair(dir, size, []);
  await truncate(dst, 5 * MiB + 100);
  const r = await scan(src, dst, size, 1);
  assert.deepEqual(r.plan.ranges, [{ start: 5 * MiB, end: size }]);
});

test('a copy scanned on all cores writes only what differs and ends equal to SRC', async (t) => {
  const dir = await tempDir(t);
  // above the size where a worker starts by default
  const size = 80 * MiB + 4096 * 3;
  const changes = [3 * MiB + 5, 33 * MiB, 79 * MiB + 4095, 80 * MiB + 8000].map((offset, i) => ({
    offset,
    bytes: Buffer.from(`change ${i}`),
  }));
  const { src, dst, data } = await pair(dir, size, changes);
  const r = await copy(src, dst);
  assert.deepEqual(await readFile(dst), data);
  // every byte compared, DST read once and its 4 differing chunks again (the last one 12 KiB);
  // only the changed blocks written
  assert.equal(r.bytesScanned, size);
  assert.equal(r.bytesRead, size + 3 * MiB + 4096 * 3);
  assert.equal(r.blocksDiffering, 5); // 79 MiB + 4095 straddles two blocks
  assert.equal(r.bytesWritten, 5 * 4096);

  const again = await copy(src, dst);
  assert.equal(again.bytesWritten, 0);
  assert.equal(again.bytesScanned, size);
});

test('progress during the scan counts toward the whole plan and ends at its size', async (t) => {
  const dir = await tempDir(t);
  const size = 70 * MiB;
  const { src, dst } = await pair(dir, size, [{ offset: 69 * MiB, bytes: Buffer.from('x!') }]);
  const seen: { bytesScanned: number; bytesTotal: number }[] = [];
  await copy(src, dst, { onProgress: (p) => seen.push(p) });
  assert.ok(seen.length > 2, `only ${seen.length} progress events`);
  for (const p of seen) assert.equal(p.bytesTotal, size);
  for (let i = 1; i < seen.length; i++) {
    assert.ok(seen[i]!.bytesScanned >= seen[i - 1]!.bytesScanned, 'progress went backwards');
  }
  assert.equal(seen[seen.length - 1]!.bytesScanned, size);
});

test('an interruption during the scan writes nothing and says to rerun', async (t) => {
  const dir = await tempDir(t);
  const size = 96 * MiB;
  const { src, dst, data } = await pair(dir, size, [
    { offset: 90 * MiB, bytes: Buffer.from('late change') },
  ]);
  const before = await readFile(dst);
  const ac = new AbortController();
  await assert.rejects(
    copy(src, dst, {
      signal: ac.signal,
      onProgress: (p) => {
        if (p.bytesScanned > 0) ac.abort();
      },
    }),
    (err: Error & { code?: string }) => err.code === 'EINTERRUPTED',
  );
  assert.deepEqual(await readFile(dst), before);
  // the rerun finishes the job
  const r = await copy(src, dst);
  assert.equal(r.bytesWritten, 4096);
  assert.deepEqual(await readFile(dst), data);
});

/** Bytes this process has read through read(2) and pread(2) so far, its threads included. */
async function bytesReadSoFar(): Promise<number> {
  const io = await readFile('/proc/self/io', 'latin1');
  return Number(/^rchar: (\d+)$/m.exec(io)![1]);
}

test('a DST unlike SRC is not read twice: the scan gives up and the pipeline reads it once', async (t) => {
  const dir = await tempDir(t);
  const size = 96 * MiB;
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  const data = seededBytes(size, 3);
  await writeFile(src, data);
  await writeFile(dst, seededBytes(size, 4));
  const before = await bytesReadSoFar();
  const r = await copy(src, dst);
  const read = (await bytesReadSoFar()) - before;
  assert.deepEqual(await readFile(dst), data);
  assert.equal(r.bytesWritten, size);
  // both files once (2 × size), and the few chunks compared before the scan gave up again
  assert.ok(read < 2.5 * size, `read ${read} bytes for two files of ${size}`);
});

describe('with a bmap: each range hashed as it is compared', () => {
  /**
   * A 100 MiB sparse image with two 40 MiB extents (two large bmap ranges, so two threads
   * take one each), its bmap, and DST holding the previous version: `flips` bytes changed.
   */
  async function bmapPair(dir: string, flips: readonly number[]) {
    const path = join(dir, 'new.img');
    const size = 100 * MiB;
    const extents = [
      { offset: 4 * MiB, data: seededBytes(40 * MiB, 11) },
      { offset: 56 * MiB, data: seededBytes(40 * MiB, 12) },
    ];
    await writeSparseFile(path, size, extents);
    await createBmap(path, { output: `${path}.bmap` });
    const image = await readFile(path);
    const previous = Buffer.from(image);
    for (const at of flips) previous[at] = previous[at]! ^ 0xff;
    const dst = join(dir, 'dst.img');
    await writeSparseFile(
      dst,
      size,
      extents.map((e) => ({
        offset: e.offset,
        data: previous.subarray(e.offset, e.offset + e.data.length),
      })),
    );
    return { path, dst, image };
  }

  test('the digests are those of the ranges, on one thread or two, or on the thread pool', async (t) => {
    const dir = await tempDir(t);
    const { path, dst, image } = await bmapPair(dir, [5 * MiB + 1, 90 * MiB]);
    const ranges = [
      { start: 4 * MiB, end: 44 * MiB },
      { start: 56 * MiB, end: 96 * MiB },
    ];
    const ways = [
      { hashOn: 'threads', workers: 0 },
      { hashOn: 'threads', workers: 1 },
      { hashOn: 'pool', workers: 0 },
    ] as const;
    for (const { hashOn, workers } of ways) {
      const s = await open(path, 'r');
      const d = await open(dst, 'r');
      try {
        const r = await narrowToDiffering({ imageSize: 100 * MiB, ranges }, s.fd, d.fd, {
          chunkSize: CHUNK,
          workers,
          hashOn,
          hash: { algorithm: 'sha256', ranges },
        });
        assert.ok(r !== undefined);
        // the pool hashes the two ranges side by side (lanes: one per core, at most 3)
        assert.equal(r.poolLanes > 0, hashOn === 'pool', hashOn);
        // (whether the worker took a range depends on its start: the test below checks that)
        if (hashOn === 'pool') assert.equal(r.chunksByWorkers, 0);
        assert.deepEqual(
          r.digests,
          ranges.map((x) =>
            createHash('sha256').update(image.subarray(x.start, x.end)).digest('hex'),
          ),
        );
        assert.deepEqual(r.plan.ranges, [
          { start: 5 * MiB, end: 6 * MiB },
          { start: 90 * MiB, end: 91 * MiB },
        ]);
      } finally {
        await s.close();
        await d.close();
      }
    }
  });

  test('onto the previous version: every range verified, only the differing blocks written', async (t) => {
    const dir = await tempDir(t);
    const { path, dst, image } = await bmapPair(dir, [4 * MiB, 30 * MiB + 5, 95 * MiB + 4095]);
    const r = await copy(path, dst);
    assert.deepEqual(await readFile(dst), image);
    assert.equal(r.bmap?.rangesVerified, r.bmap?.ranges);
    assert.equal(r.blocksDiffering, 3);
    assert.equal(r.bytesWritten, 3 * 4096);
  });

  test('a range whose checksum fails: refused before anything is written, the other range too', async (t) => {
    const dir = await tempDir(t);
    // the first range differs from DST; the second's SRC bytes are damaged after the bmap
    const { path, dst } = await bmapPair(dir, [10 * MiB]);
    const fh = await open(path, 'r+');
    await fh.write(Buffer.from('BAD'), 0, 3, 80 * MiB);
    await fh.close();
    const before = await readFile(dst);
    await assert.rejects(copy(path, dst), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'EBMAP_CHECKSUM');
      assert.match(err.message, /bytes 58720256-100663295\) .*nothing of this range was written/);
      return true;
    });
    assert.deepEqual(await readFile(dst), before, 'DST unchanged');
  });

  test('a DST unlike the image: the scan gives up and the copy verifies as it reads', async (t) => {
    const dir = await tempDir(t);
    const { path, dst, image } = await bmapPair(dir, []);
    await writeFile(dst, seededBytes(100 * MiB, 99));
    const r = await copy(path, dst);
    assert.deepEqual(await readFile(dst), image);
    assert.equal(r.bmap?.rangesVerified, r.bmap?.ranges);
  });
});

test('a differing chunk read again is checked against what the scan hashed (RereadCheck)', async (t) => {
  const dir = await tempDir(t);
  const size = 8 * MiB;
  const { src, dst } = await pair(dir, size, [
    { offset: 2 * MiB + 9, bytes: Buffer.from('old') },
    { offset: 6 * MiB, bytes: Buffer.from('old') },
  ]);
  const ranges = [{ start: 0, end: size }];
  const s = await open(src, 'r+');
  const d = await open(dst, 'r');
  try {
    const r = await narrowToDiffering({ imageSize: size, ranges }, s.fd, d.fd, {
      chunkSize: CHUNK,
      hash: { algorithm: 'sha256', ranges },
    });
    assert.ok(r?.rereads !== undefined);
    assert.ok(r.poolLanes > 0, 'hashed on the thread pool by default');
    // each differing chunk is its own range, so the pipeline reads each as the scan did
    assert.deepEqual(r.plan.ranges, [
      { start: 2 * MiB, end: 3 * MiB },
      { start: 6 * MiB, end: 7 * MiB },
    ]);
    // another program writes SRC after the scan: the second read of that chunk is refused
    await s.write(Buffer.from('EVIL'), 0, 4, 6 * MiB + 100);
    const again = new RereadCheck(new FileSource(s, src, size, false), r.rereads, src);
    const buf = Buffer.alloc(CHUNK);
    assert.equal(await again.read(buf, 2 * MiB, CHUNK), CHUNK);
    await assert.rejects(again.read(buf, 6 * MiB, CHUNK), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'ESRC_CHANGED');
      assert.match(err.message, /changed after its bmap checksums were verified/);
      return true;
    });
  } finally {
    await s.close();
    await d.close();
  }
});

test('a bmap range of 200 GiB: its chunks are listed, and an interruption stops the scan at once', async (t) => {
  const dir = await tempDir(t);
  const size = 200 * 1024 * MiB;
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  await writeSparseFile(src, size, []);
  await writeSparseFile(dst, size, []);
  const ranges = [
    { start: 0, end: size - MiB },
    { start: size - MiB, end: size },
  ];
  const s = await open(src, 'r');
  const d = await open(dst, 'r');
  const ac = new AbortController();
  ac.abort();
  try {
    for (const hashOn of ['threads', 'pool'] as const) {
      const r = await narrowToDiffering({ imageSize: size, ranges }, s.fd, d.fd, {
        chunkSize: CHUNK,
        workers: 1,
        hashOn,
        signal: ac.signal,
        hash: { algorithm: 'sha256', ranges },
      });
      // stopped before its end: with checksums the scan is all or nothing
      assert.equal(r, undefined, hashOn);
    }
  } finally {
    await s.close();
    await d.close();
  }
});

test('the worker threads take part in the scan, and none fails', async (t) => {
  const dir = await tempDir(t);
  // 1 GiB of holes on each side: the main thread alone takes far longer than a worker's start
  const size = 1024 * MiB;
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  await writeSparseFile(src, size, [{ offset: 700 * MiB, data: Buffer.from('new') }]);
  await writeSparseFile(dst, size, []);
  const ranges = [{ start: 0, end: size }];
  // with checksums a range is one thread's: two of them
  const halves = [
    { start: 0, end: size / 2 },
    { start: size / 2, end: size },
  ];
  for (const hash of [undefined, { algorithm: 'sha256', ranges: halves }]) {
    const s = await open(src, 'r');
    const d = await open(dst, 'r');
    try {
      const r = await narrowToDiffering({ imageSize: size, ranges }, s.fd, d.fd, {
        chunkSize: CHUNK,
        workers: 1,
        hashOn: 'threads',
        hash,
      });
      assert.ok(r !== undefined);
      assert.deepEqual(r.workerErrors, []);
      assert.ok(
        r.chunksByWorkers > 0,
        `the worker compared no chunk (${hash ? 'hashing' : 'plain'})`,
      );
      if (hash === undefined)
        assert.deepEqual(r.plan.ranges, [{ start: 700 * MiB, end: 701 * MiB }]);
    } finally {
      await s.close();
      await d.close();
    }
  }
});

test('a DST path that cannot be looked at is refused as before (EDEST_OPEN), not as an internal error', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  await writeFile(src, seededBytes(80 * MiB, 5)); // large enough for a scan's workers
  const plain = join(dir, 'plain');
  await writeFile(plain, 'a file, not a directory');
  await assert.rejects(copy(src, join(plain, 'sub')), (err: Error & { code?: string }) => {
    assert.equal(err.code, 'EDEST_OPEN');
    return true;
  });
});

/** The scan of `ranges` (which cover the image) hashing them with `algorithm` on the pool. */
const poolScan = (
  src: string,
  dst: string,
  size: number,
  ranges: Range[],
  algorithm: string,
  more: Partial<EqualScanOptions> = {},
) =>
  scanFiles(
    src,
    dst,
    { imageSize: size, ranges },
    { chunkSize: CHUNK, hashOn: 'pool', hash: { algorithm, ranges }, ...more },
  );

describe('hashing on the thread pool', () => {
  test('an interruption in the middle: the scan stops, returns nothing, and leaves nothing running', async (t) => {
    const dir = await tempDir(t);
    const size = 64 * MiB;
    const { src, dst } = await pair(dir, size, []);
    const ranges = [
      { start: 0, end: 40 * MiB },
      { start: 40 * MiB, end: size },
    ];
    for (const hashOn of ['threads', 'pool'] as const) {
      const ac = new AbortController();
      let reports = 0;
      const r = await scanFiles(
        src,
        dst,
        { imageSize: size, ranges },
        {
          chunkSize: CHUNK,
          workers: 1,
          hashOn,
          signal: ac.signal,
          onProgress: () => {
            if (++reports === 3) ac.abort();
          },
          hash: { algorithm: 'sha256', ranges },
        },
      );
      assert.equal(r, undefined, hashOn);
      assert.ok(reports >= 3, hashOn);
    }
  });

  test('SRC shorter than a range: that range has no digest, the others theirs', async (t) => {
    const dir = await tempDir(t);
    const size = 24 * MiB;
    const { src, dst, data } = await pair(dir, size, [{ offset: MiB, bytes: Buffer.from('x') }]);
    // the plan says 24 MiB; SRC now ends in the middle of the second range
    await truncate(src, 20 * MiB + 5);
    const ranges = [
      { start: 0, end: 16 * MiB },
      { start: 16 * MiB, end: size },
    ];
    const r = await poolScan(src, dst, size, ranges, 'sha256');
    assert.ok(r !== undefined);
    assert.deepEqual(r.digests, [
      createHash('sha256')
        .update(data.subarray(0, 16 * MiB))
        .digest('hex'),
      undefined,
    ]);
    // the chunks SRC could not fill are left to the pipeline, which reports them
    assert.deepEqual(r.plan.ranges, [
      { start: 1 * MiB, end: 2 * MiB },
      { start: 20 * MiB, end: 21 * MiB },
      { start: 21 * MiB, end: 22 * MiB },
      { start: 22 * MiB, end: 23 * MiB },
      { start: 23 * MiB, end: 24 * MiB },
    ]);
  });

  for (const algorithm of ['sha1', 'sha512']) {
    test(`a bmap's ${algorithm} ranges: the digests are createHash's`, async (t) => {
      const dir = await tempDir(t);
      const size = 9 * MiB + 4096;
      const { src, dst, data } = await pair(dir, size, []);
      const ranges = [
        { start: 0, end: 4096 },
        { start: 4096, end: 5 * MiB },
        { start: 5 * MiB, end: size },
      ];
      const r = await poolScan(src, dst, size, ranges, algorithm);
      assert.ok(r !== undefined && r.poolLanes > 0);
      assert.deepEqual(
        r.digests,
        ranges.map((x) =>
          createHash(algorithm).update(data.subarray(x.start, x.end)).digest('hex'),
        ),
      );
      assert.equal(r.bytesEqual, size);
      assert.deepEqual(r.plan.ranges, []);
    });
  }
});

describe('threads or the pool', () => {
  test('long ranges are hashed on the pool, thousands of short ones on the threads', async (t) => {
    const dir = await tempDir(t);
    const size = 32 * MiB;
    const { src, dst, data } = await pair(dir, size, [
      { offset: 9 * MiB, bytes: Buffer.from('y') },
    ]);
    const long = [
      { start: 0, end: 20 * MiB },
      { start: 20 * MiB, end: size },
    ];
    // 64 KiB ranges: each a fraction of one chunk
    const short = Array.from({ length: size / (64 * 1024) }, (_, k) => ({
      start: k * 64 * 1024,
      end: (k + 1) * 64 * 1024,
    }));
    for (const [ranges, onPool] of [
      [long, true],
      [short, false],
    ] as const) {
      const r = await scanFiles(
        src,
        dst,
        { imageSize: size, ranges: [{ start: 0, end: size }] },
        { chunkSize: CHUNK, workers: 1, hash: { algorithm: 'sha256', ranges } },
      );
      assert.ok(r !== undefined);
      assert.equal(r.poolLanes > 0, onPool, `${ranges.length} ranges`);
      assert.deepEqual(
        r.digests,
        ranges.map((x) => createHash('sha256').update(data.subarray(x.start, x.end)).digest('hex')),
      );
      assert.equal(r.bytesTotal - r.bytesEqual, onPool ? MiB : 64 * 1024);
    }
  });

  test('a progress listener that throws ends the scan: nothing of it runs after it rejected', async (t) => {
    const dir = await tempDir(t);
    const size = 48 * MiB;
    const { src, dst } = await pair(dir, size, []);
    const ranges = [
      { start: 0, end: 16 * MiB },
      { start: 16 * MiB, end: 32 * MiB },
      { start: 32 * MiB, end: size },
    ];
    let calls = 0;
    await assert.rejects(
      poolScan(src, dst, size, ranges, 'sha256', {
        onProgress: () => {
          if (++calls === 5) throw new Error('listener failed');
        },
      }),
      /listener failed/,
    );
    const after = calls;
    await new Promise((resolve) => setTimeout(resolve, 200));
    assert.equal(calls, after, 'the other lanes went on reporting after the scan rejected');
  });
});
