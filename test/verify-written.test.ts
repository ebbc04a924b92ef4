/** copy --verify: src/engine/verify-written.ts, on files and a loop device. */

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { createBmap } from '../src/engine/bmap-create.js';
import { makeIndex } from '../src/engine/make-index.js';
import {
  ALIGN_BYTES,
  alignedBuffer,
  SourceDigests,
  verifyWritten,
} from '../src/engine/verify-written.js';
import { parseBmap, rangeEnd } from '../src/formats/bmap.js';
import { BlksyncError, copy } from '../src/index.js';
import { runCli } from './helpers/cli.js';
import { attachLoop, needLoop, readDevice } from './helpers/loop.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

const BS = 4096;
const MiB = 1024 * 1024;

/** A sparse image whose size is not a multiple of 4096, its bytes, and its bmap. */
async function image(dir: string) {
  const path = join(dir, 'disk.img');
  const size = 3 * MiB + 1000;
  const pieces = [
    { offset: 0, data: seededBytes(2 * BS, 1) },
    { offset: MiB + BS, data: seededBytes(100 * BS, 2) },
    { offset: 3 * MiB, data: seededBytes(1000, 3) },
  ];
  await writeSparseFile(path, size, pieces);
  const bytes = Buffer.alloc(size);
  for (const p of pieces) p.data.copy(bytes, p.offset);
  await createBmap(path, { output: `${path}.bmap` });
  return { path, size, bytes, mapped: 2 * BS + 100 * BS + 1000 };
}

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

describe('copy --verify', () => {
  it('reads a file back and compares with the bmap, or with the source without one', async (t) => {
    const dir = await tempDir(t);
    const { path, size, bytes, mapped } = await image(dir);
    const out = join(dir, 'out');
    const r = await copy(path, out, { verify: true });
    assert.equal(r.verify?.against, 'bmap');
    assert.equal(r.verify?.algorithm, 'sha256');
    assert.equal(r.verify?.bytesVerified, mapped);
    assert.equal(r.verify?.ranges, 3);
    assert.equal(typeof r.verify?.direct, 'boolean');
    assert.ok((await readFile(out)).equals(bytes));

    const whole = await copy(path, join(dir, 'out2'), { verify: true, noBmap: true });
    assert.equal(whole.verify?.against, 'source');
    assert.equal(whole.verify?.bytesVerified, size);
    // a bmap without verified checksums: the source's digests, over the mapped ranges only
    const unchecked = await copy(path, join(dir, 'out3'), {
      verify: true,
      noVerifyChecksums: true,
    });
    assert.equal(unchecked.verify?.against, 'source');
    assert.equal(unchecked.verify?.bytesVerified, mapped);

    // beside an index, which hashes the same chunks
    const indexed = await copy(path, join(dir, 'out2'), {
      verify: true,
      noBmap: true,
      index: join(dir, 'out2.idx'),
    });
    assert.equal(indexed.verify?.bytesVerified, size);
    assert.ok(indexed.index !== undefined);

    const cli = await runCli(['copy', '--verify', '--json', path, join(dir, 'out4')]);
    assert.equal(cli.code, 0, cli.stderr);
    const json = JSON.parse(cli.stdout) as { verify: { bytesVerified: number } };
    assert.equal(json.verify.bytesVerified, mapped);
    const text = await runCli(['copy', '--verify', path, join(dir, 'out4')]);
    assert.match(text.stdout, /verified .* 3 ranges match the bmap's sha256 checksums/);
    const dry = await runCli(['copy', '--verify', '--dry-run', path, join(dir, 'out5')]);
    assert.equal(dry.code, 2);
    assert.match(dry.stderr, /EUSAGE/);
  });

  it('with an index of SRC: reads back the blocks it read, instead of failing internally', async (t) => {
    const dir = await tempDir(t);
    const src = join(dir, 'src');
    const dst = join(dir, 'dst');
    const size = 8 * MiB;
    const old = seededBytes(size, 41);
    await writeFile(src, old);
    await writeFile(dst, old);
    const idx = join(dir, 'dst.idx');
    const srcIdx = join(dir, 'src.idx');
    await copy(src, dst, { index: idx, srcIndex: srcIdx });
    const neu = Buffer.from(old);
    seededBytes(BS, 42).copy(neu, 100 * BS);
    await writeFile(src, neu);
    await makeIndex(src, srcIdx);
    const r = await copy(src, dst, { index: idx, srcIndex: srcIdx, verify: true });
    assert.equal(r.index?.source?.mode, 'used', JSON.stringify(r.index?.source));
    assert.equal(r.verify?.against, 'source');
    assert.ok(r.verify.bytesVerified > 0 && r.verify.bytesVerified < size);
    assert.ok((await readFile(dst)).equals(neu));
  });

  it('reads a loop device back with O_DIRECT', async (t) => {
    if (!needLoop(t)) return;
    const dir = await tempDir(t);
    const { path, size, bytes, mapped } = await image(dir);
    const backing = join(dir, 'backing');
    await writeSparseFile(backing, 4 * MiB, []);
    const dev = await attachLoop(t, backing);
    const r = await copy(path, dev, { verify: true });
    assert.equal(r.verify?.direct, true);
    assert.equal(r.verify?.bytesVerified, mapped);
    const whole = await copy(path, dev, { verify: true, noBmap: true, full: true });
    assert.equal(whole.verify?.direct, true);
    assert.equal(whole.verify?.bytesVerified, size);
    assert.ok((await readDevice(dev, size)).equals(bytes));
  });

  it('names the range whose read-back differs (EVERIFY)', async (t) => {
    const dir = await tempDir(t);
    const { path, bytes } = await image(dir);
    const bmap = parseBmap(await readFile(`${path}.bmap`));
    const units = bmap.ranges.map((r) => ({
      start: r.first * bmap.blockSize,
      end: rangeEnd(bmap, r),
      checksum: r.checksum!,
      label: `blocks ${r.first}-${r.last}`,
    }));
    const good = await verifyWritten(path, units, 'sha256');
    assert.equal(good.ranges, 3);
    // the image as "written", then damaged behind the copy's back
    const fh = await open(path, 'r+');
    await fh.write(Buffer.from('X'), 0, 1, MiB + 50 * BS + 7);
    await fh.close();
    await assert.rejects(verifyWritten(path, units, 'sha256'), (err: unknown) => {
      assert.ok(err instanceof BlksyncError && err.code === 'EVERIFY', String(err));
      assert.match(
        err.message,
        /blocks 257-356 \(bytes 1052672-1462271\) read back .*do not match/,
      );
      return true;
    });
    // shorter than what was written
    const short = join(dir, 'short');
    await writeSparseFile(short, 2 * MiB, [{ offset: 0, data: bytes.subarray(0, 2 * MiB) }]);
    await assert.rejects(
      verifyWritten(short, units, 'sha256'),
      /blocks 768-768 .*ended at byte 3145728/,
    );
  });

  it('hashes the source in segments across chunk boundaries', () => {
    const data = seededBytes(10_000, 9);
    const d = new SourceDigests([{ start: 1000, end: 9000 }], 4096);
    for (const [a, b] of [
      [1000, 3000],
      [3000, 5000],
      [5000, 9000],
    ] as const) {
      d.onChunk(a, data.subarray(a, b), b - a);
    }
    assert.deepEqual(
      d.units().map((u) => [u.start, u.end, u.checksum]),
      [
        [1000, 4096, sha256(data.subarray(1000, 4096))],
        [4096, 8192, sha256(data.subarray(4096, 8192))],
        [8192, 9000, sha256(data.subarray(8192, 9000))],
      ],
    );
    const buf = alignedBuffer(2 * ALIGN_BYTES);
    assert.equal(buf?.length, 2 * ALIGN_BYTES);
  });
});
