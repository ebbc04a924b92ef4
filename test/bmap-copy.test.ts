/** bmap-aware copy: src/engine/copy-source.ts, src/engine/bmap-verify.ts, with the real bmaptool. */

import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFile, mkdir, open, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it, type TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { gzipSync } from 'node:zlib';
import { createBmap } from '../src/engine/bmap-create.js';
import { VerifyingSource } from '../src/engine/bmap-verify.js';
import { SharedBufferPool } from '../src/io/buffer-pool.js';
import { NoTarget } from '../src/engine/knowledge.js';
import { runPipeline } from '../src/engine/pipeline.js';
import { bmapCandidates } from '../src/engine/find-bmap.js';
import type { Sink, Source } from '../src/types.js';
import { BlksyncError, copy, type Progress } from '../src/index.js';
import { runCli } from './helpers/cli.js';
import { attachLoop, ioStat, mkfsExt4, mountLoop, needLoop, readDevice } from './helpers/loop.js';
import { IS_ROOT, need } from './helpers/resources.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

const run = promisify(execFile);
const FIXTURES = fileURLToPath(new URL('./fixtures/bmaptool-compat/', import.meta.url));
const HAVE_BMAPTOOL = spawnSync('bmaptool', ['--version']).status === 0;

function needBmaptool(t: TestContext): boolean {
  return need(t, HAVE_BMAPTOOL, 'bmaptool is not installed (apt-get install bmap-tools)');
}
const BS = 4096;
const MiB = 1024 * 1024;

/** A 8 MiB sparse image with a few extents, its bytes, and its bmap beside it. */
async function sparseImage(dir: string, name = 'img', seed = 1) {
  const path = join(dir, name);
  const size = 8 * MiB + 1000;
  const pieces = [
    { offset: 0, data: seededBytes(3 * BS, seed) },
    { offset: MiB + 5 * BS, data: seededBytes(300 * BS, seed + 1) },
    { offset: 6 * MiB, data: seededBytes(BS, seed + 2) },
    { offset: 8 * MiB, data: seededBytes(1000, seed + 3) },
  ];
  await writeSparseFile(path, size, pieces);
  const image = Buffer.alloc(size);
  for (const p of pieces) p.data.copy(image, p.offset);
  return { path, size, image, pieces };
}

/** Bytes of `path` that are allocated (not holes). */
async function allocated(path: string): Promise<number> {
  return (await stat(path)).blocks * 512;
}

describe('copy with a bmap', () => {
  for (const v of ['1.2', '1.3', '1.4', '2.0']) {
    it(`copies bmaptool's compressed fixture with its ${v} bmap to the same image`, async (t) => {
      const dir = await tempDir(t);
      const out = join(dir, 'out');
      const r = await copy(`${FIXTURES}test.image.gz`, out, {
        bmap: `${FIXTURES}test.image.bmap.v${v}`,
      });
      assert.equal(r.bmap?.version, v);
      assert.equal(r.bmap?.rangesVerified, 48);
      assert.equal(r.bytesScanned, 117 * BS);
      const { gunzipSync } = await import('node:zlib');
      const expected = gunzipSync(await readFile(`${FIXTURES}test.image.gz`));
      assert.ok((await readFile(out)).equals(expected));
    });
  }

  it('finds the bmap as bmaptool does and follows bmaptool create → blksync copy', async (t) => {
    if (!needBmaptool(t)) return;
    const dir = await tempDir(t);
    const { path, image } = await sparseImage(dir, 'disk.img');
    await run('bmaptool', ['create', path, '-o', join(dir, 'disk.bmap')]);
    await writeFile(join(dir, 'disk.img.gz'), gzipSync(image));
    const out = join(dir, 'out');
    // disk.img.gz → disk.img.gz.bmap (none), disk.img.bmap (none), disk.bmap
    const r = await copy(join(dir, 'disk.img.gz'), out);
    assert.equal(r.bmap?.path, join(dir, 'disk.bmap'));
    assert.ok((await readFile(out)).equals(image));
    // only the mapped extents were written: the rest are holes
    assert.ok((await allocated(out)) <= 400 * BS, `allocated ${await allocated(out)}`);
    const again = await copy(join(dir, 'disk.img.gz'), out);
    assert.equal(again.bytesWritten, 0);
    assert.deepEqual(bmapCandidates('/a/x.img.xz'), [
      '/a/x.img.xz.bmap',
      '/a/x.img.bmap',
      '/a/x.bmap',
    ]);
    assert.deepEqual(bmapCandidates('http://h/d.v/x.gz?s=1'), [
      'http://h/d.v/x.gz.bmap?s=1',
      'http://h/d.v/x.bmap?s=1',
    ]);
  });

  it('writes only differing mapped blocks; --full writes all mapped ones; progress counts mapped bytes', async (t) => {
    const dir = await tempDir(t);
    const { path, image } = await sparseImage(dir);
    await createBmap(path, { output: `${path}.bmap` });
    const mapped = 3 * BS + 300 * BS + BS + 1000;
    const out = join(dir, 'out');
    const first = await copy(path, out);
    assert.equal(first.bmap?.mappedBytes, mapped);
    // a new version: one block changed
    const fh = await open(path, 'r+');
    await fh.write(Buffer.alloc(BS, 7), 0, BS, MiB + 10 * BS);
    await fh.close();
    Buffer.alloc(BS, 7).copy(image, MiB + 10 * BS);
    await createBmap(path, { output: `${path}.bmap` });
    let last: Progress | undefined;
    const r = await copy(path, out, { onProgress: (p) => (last = p) });
    assert.equal(r.bytesWritten, BS);
    assert.equal(last?.bytesTotal, mapped);
    assert.equal(last?.bytesScanned, mapped);
    assert.ok((await readFile(out)).equals(image));
    const full = await copy(path, out, { full: true });
    assert.equal(full.bytesWritten, mapped);
    // without the bmap the whole image is considered: where both files are holes they are
    // equal without reading (engine/sparse-plan.ts), so only the data is scanned
    const none = await copy(path, out, { noBmap: true });
    assert.equal(none.bmap, undefined);
    assert.equal(none.bytesWritten, 0);
    assert.ok((await readFile(out)).equals(image));
  });

  it('makes the unmapped areas of an existing file destination holes', async (t) => {
    const dir = await tempDir(t);
    const { path, image } = await sparseImage(dir);
    await createBmap(path, { output: `${path}.bmap` });
    const out = join(dir, 'out');
    await writeFile(out, seededBytes(image.length, 99));
    // the dry run says what the real run punches, not "would write" the mapped blocks alone
    const unmapped = image.length - (3 * BS + 300 * BS + BS + 1000);
    const dry = await runCli(['copy', '--dry-run', '--json', path, out]);
    assert.equal(dry.code, 0, dry.stderr);
    assert.equal((JSON.parse(dry.stdout) as { bytesPunched?: number }).bytesPunched, unmapped);
    const said = await runCli(['copy', '--dry-run', path, out]);
    assert.match(said.stdout + said.stderr, /would punch holes over 6\.81 MiB of .*out's data/);
    assert.ok((await readFile(out)).equals(seededBytes(image.length, 99)), 'the dry run wrote');
    const r = await copy(path, out);
    assert.equal(r.bmap?.unmappedPunched, true);
    assert.equal(r.bytesPunched, unmapped);
    assert.equal((await copy(path, out)).bytesPunched, 0, 'nothing left to punch');
    assert.ok((await readFile(out)).equals(image));
    assert.ok((await allocated(out)) <= 310 * BS, `allocated ${await allocated(out)}`);
  });

  it('punches the unmapped data of a destination that is partly holes there, and only it', async (t) => {
    const dir = await tempDir(t);
    const { path, size, image, pieces } = await sparseImage(dir);
    await createBmap(path, { output: `${path}.bmap` });
    const out = join(dir, 'out');
    // DST: the image, plus stray data in two unmapped areas, holes in the others
    const stray = [
      { offset: 3 * MiB, data: seededBytes(7 * BS, 41) },
      { offset: 7 * MiB + 3 * BS, data: seededBytes(2 * BS, 42) },
    ];
    await writeSparseFile(out, size, [...pieces, ...stray]);
    const r = await copy(path, out);
    assert.equal(r.bmap?.unmappedPunched, true);
    assert.equal(r.bytesPunched, 9 * BS);
    assert.equal(r.bytesWritten, 0);
    assert.ok((await readFile(out)).equals(image), 'the stray data still reads back');
    assert.equal((await copy(path, out)).bytesPunched, 0, 'nothing left to punch');
  });

  it('a destination whose file system cannot punch holes (ramfs): zeros written over its unmapped data', async (t) => {
    if (!need(t, IS_ROOT, 'mounting a ramfs needs root')) return;
    const dir = await tempDir(t);
    const { path, size, image, pieces } = await sparseImage(dir);
    await createBmap(path, { output: `${path}.bmap` });
    const mnt = join(dir, 'ramfs');
    await mkdir(mnt);
    const mounted = spawnSync('mount', ['-t', 'ramfs', 'ramfs', mnt]).status === 0;
    if (!need(t, mounted, 'mount -t ramfs failed')) return;
    try {
      // two DSTs on the ramfs and one on the temporary directory's file system, in one copy
      const outs = [join(mnt, 'a'), join(mnt, 'b'), join(dir, 'c')];
      const stray = { offset: 3 * MiB + 100, data: seededBytes(5000, 45) };
      for (const out of outs) await writeSparseFile(out, size, [...pieces, stray]);
      const r = await runCli(['copy', '--json', path, ...outs]);
      assert.equal(r.code, 0, r.stderr);
      for (const out of outs) assert.ok((await readFile(out)).equals(image), out);
      const one = await copy(path, outs[0]!);
      assert.equal(one.bytesZeroed, undefined, 'nothing left to zero');
      await writeSparseFile(outs[0]!, size, [...pieces, stray]);
      const again = await copy(path, outs[0]!);
      assert.equal(again.bmap?.unmappedPunched, false);
      assert.equal(again.bytesPunched, 0);
      assert.equal(again.bytesZeroed, 2 * BS, 'the two blocks holding the stray bytes');
      assert.ok((await readFile(outs[0]!)).equals(image));
      // interrupted, the copy stops: no zeros are written after it (on slow media, minutes)
      await writeSparseFile(outs[0]!, size, [...pieces, stray]);
      const ac = new AbortController();
      ac.abort();
      await assert.rejects(copy(path, outs[0]!, { signal: ac.signal }), {
        code: 'EINTERRUPTED',
      });
      const left = await readFile(outs[0]!);
      assert.ok(left.subarray(stray.offset, stray.offset + 5000).equals(stray.data));
      const said = await runCli(['copy', path, outs[1]!]);
      assert.equal(said.code, 0, said.stderr);
      await writeSparseFile(outs[1]!, size, [...pieces, stray]);
      const told = await runCli(['copy', path, outs[1]!]);
      assert.match(told.stdout + told.stderr, /wrote 8\.00 KiB of zeros over .*cannot punch holes/);
    } finally {
      spawnSync('umount', [mnt]);
    }
  });

  it('interrupted while the writes of a range are held for its checksum: it says what reached DST, not what was held', async (t) => {
    const dir = await tempDir(t);
    const img = join(dir, 'img');
    // one 48 MiB range: a new DST gets its writes held until the range's checksum passed
    await writeSparseFile(img, 64 * MiB, [{ offset: 0, data: seededBytes(48 * MiB, 5) }]);
    await createBmap(img, { output: `${img}.bmap` });
    const out = join(dir, 'out');
    const ac = new AbortController();
    const err: unknown = await copy(img, out, {
      signal: ac.signal,
      onProgress: (p) => {
        if (p.bytesWritten > 8 * MiB) ac.abort();
      },
    }).then(
      () => undefined,
      (e: unknown) => e,
    );
    assert.ok(err instanceof BlksyncError && err.code === 'EINTERRUPTED', String(err));
    const said = (err.partial as { bytesWritten: number }).bytesWritten;
    // nothing written: the DST this run created is removed again
    const held = await readFile(out).catch(() => Buffer.alloc(0));
    let reached = 0;
    for (let b = 0; b < held.length; b += BS) {
      if (held.subarray(b, b + BS).some((x) => x !== 0)) reached += BS;
    }
    assert.equal(said, reached, `said ${said} bytes written, DST holds ${reached}`);
  });

  it('a copy onto several destinations punches the unmapped data of each, by its own map', async (t) => {
    const dir = await tempDir(t);
    const { path, size, image, pieces } = await sparseImage(dir);
    await createBmap(path, { output: `${path}.bmap` });
    // stray data in an unmapped area of the first destination only, then of the second only:
    // what one destination holds must not decide where another is punched
    const strays = [
      [{ offset: 3 * MiB, data: seededBytes(7 * BS, 43) }],
      [{ offset: 7 * MiB, data: seededBytes(2 * BS, 44) }],
    ];
    const outs = [join(dir, 'a'), join(dir, 'b')];
    for (const order of [
      [0, 1],
      [1, 0],
    ]) {
      for (let k = 0; k < 2; k++) await writeSparseFile(outs[k]!, size, [...pieces, ...strays[k]!]);
      const r = await runCli(['copy', '--json', path, ...order.map((k) => outs[k]!)]);
      assert.equal(r.code, 0, r.stderr);
      for (const out of outs) {
        assert.ok(
          (await readFile(out)).equals(image),
          `${out}, destinations in the order ${order.join(', ')}`,
        );
      }
    }
    // a destination whose unmapped areas were not cleared by this copy (created here, so
    // they are holes) reports nothing of another destination's clearing
    await writeSparseFile(outs[0]!, size, [...pieces, ...strays[0]!]);
    const created = join(dir, 'new');
    const many = await runCli(['copy', '--json', path, outs[0]!, created]);
    assert.equal(many.code, 0, many.stderr);
    const results = (
      JSON.parse(many.stdout) as {
        destinations: { destination: string; result: { bmap: { unmappedPunched?: boolean } } }[];
      }
    ).destinations;
    assert.equal(results.find((d) => d.destination === outs[0])?.result.bmap.unmappedPunched, true);
    assert.equal(
      results.find((d) => d.destination === created)?.result.bmap.unmappedPunched,
      undefined,
    );
    assert.ok((await readFile(created)).equals(image));
    // the summary says it for each destination, as a copy onto one does
    await writeSparseFile(outs[0]!, size, [...pieces, ...strays[0]!]);
    const told = await runCli(['copy', path, ...outs]);
    assert.equal(told.code, 0, told.stderr);
    const said = told.stdout + told.stderr;
    assert.match(said, /\/a: .*; punched holes over 28\.0 KiB of its data in the unmapped areas/);
    assert.doesNotMatch(said, /\/b: .*punched/);
  });

  it('catches a corrupted image by its range checksum and writes nothing of the bad range', async (t) => {
    const dir = await tempDir(t);
    const { path } = await sparseImage(dir);
    await createBmap(path, { output: `${path}.bmap` });
    const fh = await open(path, 'r+');
    await fh.write(Buffer.from('BAD'), 0, 3, MiB + 7 * BS + 11);
    await fh.close();
    const out = join(dir, 'out');
    const r = await runCli(['copy', path, out]);
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /blocks 261-560 .*do not match.*nothing of this range was written.*EBMAP_CHECKSUM/,
    );
    const written = await readFile(out);
    assert.ok(
      written.subarray(MiB, 3 * MiB).equals(Buffer.alloc(2 * MiB)),
      'bad range not written',
    );
    // the first range was good and is there
    assert.ok(written.subarray(0, 3 * BS).equals(seededBytes(3 * BS, 1)));
  });

  it('verifies a range too large to buffer before writing any of it (file source)', async (t) => {
    const dir = await tempDir(t);
    const path = join(dir, 'big.img');
    const extent = seededBytes(34 * MiB, 21);
    await writeSparseFile(path, 40 * MiB, [{ offset: 2 * MiB, data: extent }]);
    await createBmap(path, { output: `${path}.bmap` });
    const fh = await open(path, 'r+');
    await fh.write(Buffer.from('BAD'), 0, 3, 30 * MiB);
    await fh.close();
    const out = join(dir, 'out');
    await assert.rejects(copy(path, out), (err: unknown) => {
      assert.ok(err instanceof BlksyncError && err.code === 'EBMAP_CHECKSUM', String(err));
      assert.match(err.message, /blocks 512-9215 .*nothing of this range was written/);
      return true;
    });
    // nothing was written, so the DST this run created is removed
    await assert.rejects(stat(out), /ENOENT/);
  });

  it('refuses a large range whose checksum fails onto the previous version: DST left as it was', async (t) => {
    // one read of SRC feeds the compare and the checksum: the range's differing blocks
    // (near its start, compared long before its end is hashed) must be held, not written
    const dir = await tempDir(t);
    const path = join(dir, 'new.img');
    const extent = seededBytes(40 * MiB, 31);
    await writeSparseFile(path, 48 * MiB, [{ offset: 4 * MiB, data: extent }]);
    await createBmap(path, { output: `${path}.bmap` });
    const dst = join(dir, 'dst.img');
    const previous = Buffer.from(extent);
    for (let at = 0; at < previous.length; at += 4 * MiB)
      previous[at + 100] = previous[at + 100]! ^ 0xff;
    await writeSparseFile(dst, 48 * MiB, [{ offset: 4 * MiB, data: previous }]);
    const before = await readFile(dst);
    const fh = await open(path, 'r+');
    await fh.write(Buffer.from('BAD'), 0, 3, 4 * MiB + 40 * MiB - 5000);
    await fh.close();
    await assert.rejects(copy(path, dst), (err: unknown) => {
      assert.ok(err instanceof BlksyncError && err.code === 'EBMAP_CHECKSUM', String(err));
      assert.match(err.message, /blocks 1024-11263 .*nothing of this range was written/);
      return true;
    });
    assert.ok((await readFile(dst)).equals(before), 'DST unchanged');
  });

  it('copies a large range read once onto the previous version, compared and verified', async (t) => {
    const dir = await tempDir(t);
    const path = join(dir, 'new.img');
    const extent = seededBytes(70 * MiB, 41); // ≥ 64 MiB verified: hashed on a worker
    await writeSparseFile(path, 80 * MiB, [{ offset: 2 * MiB, data: extent }]);
    await createBmap(path, { output: `${path}.bmap` });
    const dst = join(dir, 'dst.img');
    const previous = Buffer.from(extent);
    for (let at = 0; at < previous.length; at += MiB) previous[at + 7] = previous[at + 7]! ^ 0xff; // 70 blocks
    await writeSparseFile(dst, 80 * MiB, [{ offset: 2 * MiB, data: previous }]);
    const r = await copy(path, dst);
    assert.equal(r.bmap?.rangesVerified, 1);
    assert.equal(r.blocksDiffering, 70);
    assert.equal(r.bytesWritten, 70 * BS);
    const got = await readFile(dst);
    assert.ok(got.subarray(2 * MiB, 72 * MiB).equals(extent), 'DST holds the new image');
  });

  it('a held write read again from SRC at the end is covered by the check for writes to SRC', async (t) => {
    // the writes into a large range beyond what memory keeps are read from SRC again once
    // its checksum passed; when its last chunk differs from nothing, that is in the sink's
    // finish(): a write to SRC before then must fail ESRC_CHANGED, not reach DST unverified
    const dir = await tempDir(t);
    const path = join(dir, 'new.img');
    const image = seededBytes(24 * MiB, 51);
    await writeFile(path, image);
    await createBmap(path, { output: `${path}.bmap` });
    const dst = join(dir, 'dst.img');
    // 16 MiB differ (held writes beyond 8 MiB are not kept), the last 8 MiB not: nothing is
    // written after the range's last read, so the held writes are flushed by finish()
    await writeFile(dst, Buffer.concat([seededBytes(16 * MiB, 52), image.subarray(16 * MiB)]));
    const srcIno = (await stat(path)).ino;
    // SRC is written just after the first look at its stamps once the pipeline is done
    const proto = Object.getPrototypeOf(
      await open(path, 'r').then(async (fh) => {
        await fh.close();
        return fh;
      }),
    ) as { stat: (this: unknown, ...args: unknown[]) => Promise<{ ino: number | bigint }> };
    const realStat = proto.stat;
    let armed = false;
    proto.stat = async function (this: unknown, ...args: unknown[]) {
      const st = await realStat.apply(this, args);
      if (armed && Number(st.ino) === srcIno && (args[0] as { bigint?: boolean })?.bigint) {
        armed = false;
        const fh = await open(path, 'r+');
        await fh.write(Buffer.from('EVIL'), 0, 4, 12 * MiB);
        await fh.close();
      }
      return st;
    };
    t.after(() => void (proto.stat = realStat));
    try {
      await copy(path, dst, {
        onProgress: (p) => {
          if (p.bytesScanned === p.bytesTotal) armed = true;
        },
      });
    } catch (err) {
      assert.ok(err instanceof BlksyncError && err.code === 'ESRC_CHANGED', String(err));
      return;
    }
    const got = await readFile(dst);
    assert.ok(got.equals(image), 'exit 0: DST holds the image whose checksum was verified');
  });

  it('an interrupted copy counts only the range checksums it verified', async (t) => {
    const dir = await tempDir(t);
    const img = await sparseImage(dir);
    const bmap = join(dir, 'img.bmap');
    await createBmap(img.path, { output: bmap });
    const stop = new AbortController();
    const err = await copy(img.path, join(dir, 'out'), {
      bmap,
      chunkSize: 64 * 1024,
      signal: stop.signal,
      onProgress: () => stop.abort(),
    }).then(
      () => assert.fail('must be interrupted'),
      (e: unknown) => e,
    );
    assert.ok(err instanceof BlksyncError && err.code === 'EINTERRUPTED', String(err));
    const partial = err.partial as { bmap: { ranges: number; rangesVerified: number } };
    assert.ok(partial.bmap.ranges >= 4);
    assert.ok(
      partial.bmap.rangesVerified < partial.bmap.ranges,
      `${partial.bmap.rangesVerified} of ${partial.bmap.ranges} ranges claimed verified`,
    );
    // run to its end, every one is
    const whole = await copy(img.path, join(dir, 'out'), { bmap });
    assert.equal(whole.bmap?.rangesVerified, whole.bmap?.ranges);
  });

  it('refuses a bmap made for another image before writing', async (t) => {
    const dir = await tempDir(t);
    const { path } = await sparseImage(dir);
    await createBmap(path, { output: join(dir, 'other.bmap') });
    const fh = await open(path, 'r+');
    await fh.truncate(9 * MiB);
    await fh.close();
    const out = join(dir, 'out');
    await assert.rejects(
      copy(path, out, { bmap: join(dir, 'other.bmap') }),
      (err: unknown) => err instanceof BlksyncError && err.code === 'EBMAP_MISMATCH',
    );
    await assert.rejects(stat(out), { code: 'ENOENT' });
    await assert.rejects(
      copy(path, out, { bmap: join(dir, 'missing.bmap') }),
      (err: unknown) => err instanceof BlksyncError && err.code === 'EBMAP_OPEN',
    );
    const r = await runCli(['copy', '--bmap', join(dir, 'other.bmap'), '--no-bmap', path, out]);
    // contradictory: refused, not "the last one wins" (test/cli-errors.test.ts)
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /contradict each other.*\[EUSAGE\]/);
  });

  it('refuses a stale bmap that calls data unmapped, before writing; a non-sparse image passes', async (t) => {
    const dir = await tempDir(t);
    const { path } = await sparseImage(dir);
    await createBmap(path, { output: `${path}.bmap` });
    // the image changes after its bmap was made: a block written where the bmap says "hole"
    const fh = await open(path, 'r+');
    await fh.write(seededBytes(BS, 77), 0, BS, 4 * MiB);
    await fh.close();
    const stale = (err: unknown): boolean => {
      assert.ok(err instanceof BlksyncError, String(err));
      assert.equal(err.code, 'EBMAP_MISMATCH', err.message);
      assert.match(err.message, /marks byte 4194304 of .* as unmapped .* stale/);
      return true;
    };
    const out = join(dir, 'out');
    await assert.rejects(copy(path, out), stale);
    await assert.rejects(stat(out), { code: 'ENOENT' });
    // streamed: compressed beside the bmap, and from a pipe
    const changed = await readFile(path);
    await writeFile(join(dir, 'z.img.gz'), gzipSync(changed));
    await copyFile(`${path}.bmap`, join(dir, 'z.img.bmap'));
    await assert.rejects(copy(join(dir, 'z.img.gz'), join(dir, 'out-gz')), stale);
    const piped = await runCli(['copy', '--bmap', `${path}.bmap`, '-', join(dir, 'out-pipe')], {
      input: changed,
    });
    assert.equal(piped.code, 1, piped.stderr);
    assert.match(piped.stderr, /stdin as unmapped .*\[EBMAP_MISMATCH\]/);
    // the same bytes, allocated (not sparse) but zero where unmapped: read, checked, copied
    const { path: fresh, image: bytes } = await sparseImage(dir, 'fresh');
    await createBmap(fresh, { output: join(dir, 'fresh.bmap') });
    await writeFile(join(dir, 'full.img'), bytes);
    const r = await copy(join(dir, 'full.img'), join(dir, 'out-full'), {
      bmap: join(dir, 'fresh.bmap'),
    });
    assert.equal(r.bmap?.unmappedBytesChecked, bytes.length - (304 * BS + 1000));
    assert.ok((await readFile(join(dir, 'out-full'))).equals(bytes));
  });

  it('refuses options that only turn off a bmap check when no bmap is used', async (t) => {
    const dir = await tempDir(t);
    const src = join(dir, 'plain.img');
    await writeFile(src, seededBytes(MiB, 5));
    for (const args of [
      ['--no-verify-checksums'],
      ['--no-sig-verify'],
      ['--no-bmap', '--no-verify-checksums'],
    ]) {
      const out = join(dir, 'out');
      const r = await runCli(['copy', ...args, src, out]);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, /turns off a bmap's checks, but no bmap is used.*\[EUSAGE\]/);
      await assert.rejects(stat(out), { code: 'ENOENT' });
    }
  });

  it('blksync bmap create → bmaptool copy of the gzip image', async (t) => {
    if (!needBmaptool(t)) return;
    const dir = await tempDir(t);
    const { path, image } = await sparseImage(dir, 'x.img', 5);
    await createBmap(path, { output: `${path}.bmap` });
    await writeFile(`${path}.gz`, gzipSync(image));
    await copyFile(`${path}.bmap`, `${path}.gz.bmap`);
    const out = join(dir, 'out');
    await run('bmaptool', ['copy', `${path}.gz`, out]);
    assert.ok((await readFile(out)).equals(image));
  });
});

describe('copy with a bmap to a block device', () => {
  it('writes only mapped blocks, then only what differs; refuses a mounted device', async (t) => {
    if (!needLoop(t)) return;
    const dir = await tempDir(t);
    const { path, image } = await sparseImage(dir, 'disk.img', 11);
    await createBmap(path, { output: join(dir, 'disk.bmap') });
    await writeFile(`${path}.gz`, gzipSync(image));
    const backing = join(dir, 'backing');
    await writeSparseFile(backing, 10 * MiB, []);
    const dev = await attachLoop(t, backing);
    const before = await ioStat(dev);
    const r = await copy(`${path}.gz`, dev);
    assert.equal(r.bmap?.path, join(dir, 'disk.bmap'));
    const mapped = 3 * BS + 300 * BS + BS + 1000;
    assert.equal(r.bytesWritten, mapped);
    const written = (await ioStat(dev)).writeSectors - before.writeSectors;
    assert.ok(written * 512 <= mapped + BS, `device wrote ${written} sectors`);
    assert.ok((await readDevice(dev, image.length)).equals(image));
    // rerun with DST out of the page cache: only the mapped ranges are read back, not the
    // gaps that the kernel's readahead would add after each range
    await run('blockdev', ['--flushbufs', dev]);
    const beforeAgain = await ioStat(dev);
    const again = await copy(`${path}.gz`, dev);
    assert.equal(again.bytesWritten, 0);
    const reread = ((await ioStat(dev)).readSectors - beforeAgain.readSectors) * 512;
    assert.ok(reread <= mapped + 4 * BS * 4, `read ${reread} bytes of DST for ${mapped} mapped`);

    const other = join(dir, 'other');
    await writeSparseFile(other, 10 * MiB, []);
    const mounted = await attachLoop(t, other);
    await mkfsExt4(mounted);
    await mountLoop(t, mounted);
    await assert.rejects(
      copy(`${path}.gz`, mounted),
      (err: unknown) => err instanceof BlksyncError && err.code === 'EDEST_MOUNTED',
    );
  });
});

/** A Source over a buffer. */
function bufferSource(data: Buffer): Source {
  return {
    size: data.length,
    read: (buf, offset, length) => {
      const n = Math.max(0, Math.min(length, data.length - offset));
      data.copy(buf, 0, offset, offset + n);
      return Promise.resolve(n);
    },
    close: () => Promise.resolve(),
  };
}

describe('VerifyingSource', () => {
  const data = seededBytes(64 * 1024, 3);
  const sum = (a: number, b: number): string =>
    createHash('sha256').update(data.subarray(a, b)).digest('hex');

  it('streams ranges larger than its memory limit and names the bad one at its end', async () => {
    const ranges = [
      { start: 0, end: 32768, checksum: sum(0, 32768), label: 'blocks 0-7' },
      { start: 32768, end: 65536, checksum: '0'.repeat(64), label: 'blocks 8-15' },
    ];
    const v = new VerifyingSource(bufferSource(data), ranges, 'sha256', 'img', {
      maxInMemory: 8192,
    });
    const reads = [];
    for (let o = 0; o < 65536; o += 8192) reads.push(v.read(Buffer.alloc(8192), o, 8192));
    for (const p of reads) p.catch(() => {});
    for (let i = 0; i < 7; i++) assert.equal(await reads[i], 8192);
    await assert.rejects(reads[7]!, /blocks 8-15 .*too large to check before writing/);
    assert.equal(v.verified, 1);
  });

  it('hashes on a worker thread, reusing range buffers, and still catches a bad range', async () => {
    const ranges = [0, 1, 2, 3].map((i) => ({
      start: i * 16384,
      end: (i + 1) * 16384,
      checksum: i === 2 ? 'f'.repeat(64) : sum(i * 16384, (i + 1) * 16384),
      label: `range ${i}`,
    }));
    const v = new VerifyingSource(bufferSource(data), ranges, 'sha256', 'img', {
      prefetch: true,
      workerThreads: 2,
    });
    try {
      for (let o = 0; o < 32768; o += 4096) {
        const buf = Buffer.alloc(4096);
        assert.equal(await v.read(buf, o, 4096), 4096);
        assert.ok(buf.equals(data.subarray(o, o + 4096)));
      }
      await assert.rejects(
        v.read(Buffer.alloc(4096), 32768, 4096),
        /range 2 .*nothing of this range/,
      );
      assert.ok(v.verified >= 2); // range 3 may be verified already, read ahead
    } finally {
      await v.close();
    }
  });

  it('verifies a large range of a file source before handing any of it on', async () => {
    const ranges = [
      { start: 0, end: 32768, checksum: sum(0, 32768), label: 'blocks 0-7' },
      { start: 32768, end: 65536, checksum: '0'.repeat(64), label: 'blocks 8-15' },
    ];
    const v = new VerifyingSource(bufferSource(data), ranges, 'sha256', 'img', {
      maxInMemory: 8192,
      rereadable: true,
    });
    const buf = Buffer.alloc(8192);
    assert.equal(await v.read(buf, 0, 8192), 8192);
    assert.ok(buf.equals(data.subarray(0, 8192)));
    for (let o = 8192; o < 32768; o += 8192) assert.equal(await v.read(buf, o, 8192), 8192);
    await assert.rejects(v.read(buf, 32768, 8192), /blocks 8-15 .*nothing of this range/);
    assert.equal(v.verified, 1);
  });

  /** Runs the pipeline over `v` into a sink recording its writes; `held`: the writes held. */
  function copyThrough(v: VerifyingSource, maxHeld: number, chunk = 4096, shared = false) {
    const writes: { offset: number; data: Buffer }[] = [];
    const sink: Sink = {
      write: (d, offset) => {
        writes.push({ offset, data: Buffer.from(d) });
        return Promise.resolve();
      },
      finish: () => Promise.resolve(),
    };
    const held = v.holdWrites(maxHeld)(sink);
    const plan = { imageSize: data.length, ranges: [{ start: 0, end: data.length }] };
    const run = runPipeline(plan, v, new NoTarget(), [held], {
      blockSize: 4096,
      chunkSize: chunk,
      depth: 4,
      // shared memory: a worker hashes the chunks in the pipeline's own buffers, no copy
      ...(shared ? { buffers: new SharedBufferPool(chunk) } : {}),
    });
    return { writes, run, finish: () => held.finish() };
  }

  for (const [workerThreads, shared] of [
    [1, false],
    [1, true],
    [0, false],
  ] as const) {
    const where =
      workerThreads > 0
        ? `on a worker (${shared ? "in the pipeline's shared buffers" : 'from copies'})`
        : 'on this thread';
    it(`reads a large range once, hashed ${where} chunk by chunk, writes held until it passed`, async () => {
      const ranges = [{ start: 0, end: 65536, checksum: sum(0, 65536), label: 'blocks 0-15' }];
      const inner = bufferSource(data);
      let bytesRead = 0;
      const counting: Source = {
        ...inner,
        read: (buf, offset, length) => {
          bytesRead += length;
          return inner.read(buf, offset, length);
        },
      };
      const v = new VerifyingSource(counting, ranges, 'sha256', 'img', {
        maxInMemory: 8192,
        workerThreads,
        rereadable: true,
      });
      try {
        // 8 KiB of held data kept: the rest of the range is read again after it passed
        const { writes, run, finish } = copyThrough(v, 8192, 4096, shared);
        await run;
        await finish();
        assert.equal(v.verified, 1);
        const out = Buffer.alloc(data.length);
        for (const w of writes) w.data.copy(out, w.offset);
        assert.ok(out.equals(data));
        // read once, plus the held writes whose data was not kept (at most the range less the
        // 8 KiB kept; fewer when the range passed before the pipeline reached its last chunks)
        assert.ok(bytesRead > 65536 && bytesRead <= 65536 + 65536 - 8192, String(bytesRead));
      } finally {
        await v.close();
      }
    });
  }

  it('writes nothing of a large range read once whose checksum fails', async () => {
    const ranges = [
      { start: 0, end: 16384, checksum: sum(0, 16384), label: 'blocks 0-3' },
      { start: 16384, end: 65536, checksum: 'e'.repeat(64), label: 'blocks 4-15' },
    ];
    for (const [workerThreads, shared] of [
      [0, false],
      [1, false],
      [1, true],
    ] as const) {
      const v = new VerifyingSource(bufferSource(data), ranges, 'sha256', 'img', {
        maxInMemory: 8192,
        workerThreads,
        rereadable: true,
      });
      try {
        const { writes, run } = copyThrough(v, 1 << 20, 4096, shared);
        await assert.rejects(run, (err: unknown) => {
          assert.ok(err instanceof BlksyncError && err.code === 'EBMAP_CHECKSUM', String(err));
          assert.match(err.message, /blocks 4-15 .*nothing of this range was written/);
          return true;
        });
        assert.ok(
          writes.every((w) => w.offset < 16384),
          `wrote ${writes.map((w) => w.offset).join()}`,
        );
      } finally {
        await v.close();
      }
    }
  });

  it('verifies a large range read once whose reads skip part of it (the whole range read first)', async () => {
    const ranges = [{ start: 0, end: 65536, checksum: sum(0, 65536), label: 'blocks 0-15' }];
    const v = new VerifyingSource(bufferSource(data), ranges, 'sha256', 'img', {
      maxInMemory: 8192,
      workerThreads: 1,
      rereadable: true,
    });
    try {
      v.holdWrites();
      const buf = Buffer.alloc(4096);
      assert.equal(await v.read(buf, 0, 4096), 4096);
      assert.equal(await v.read(buf, 16384, 4096), 4096); // skips 12 KiB
      assert.ok(buf.equals(data.subarray(16384, 20480)));
      assert.equal(v.verified, 1);
    } finally {
      await v.close();
    }
  });

  it('passes a short source on as short, not as a checksum error', async () => {
    const ranges = [{ start: 0, end: 65536, checksum: sum(0, 65536), label: 'blocks 0-15' }];
    const v = new VerifyingSource(bufferSource(data.subarray(0, 40000)), ranges, 'sha256', 'img');
    assert.equal(await v.read(Buffer.alloc(32768), 0, 32768), 32768);
    assert.equal(await v.read(Buffer.alloc(32768), 32768, 32768), 40000 - 32768);
  });
});
