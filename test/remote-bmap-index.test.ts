/**
 * A push with a bmap and `--index`, over a real OpenSSH server on 127.0.0.1: only the mapped
 * ranges are compared, by the index's hashes, and the index still describes all of the remote
 * DST afterwards (unmapped areas as the push left them: untouched on an existing DST), as a
 * local bmap copy with --index does (test/bmap-index.test.ts).
 */

import assert from 'node:assert/strict';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { copy } from '../src/copy.js';
import { makeIndex } from '../src/engine/make-index.js';
import { BlksyncError } from '../src/errors.js';
import { readIndexFile } from '../src/formats/index-file.js';
import { sharedSshd } from './helpers/sshd.js';
import { BS, KiB, MiB, SIZE, bmapImage } from './helpers/bmap-image.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

/** `bytes` with the image's mapped pieces laid over it: a bmap push onto an existing DST. */
function over(bytes: Buffer, img: Buffer): Buffer {
  const out = Buffer.from(bytes);
  for (const [s, e] of [
    [0, 3 * BS],
    [MiB + 5 * BS, MiB + 305 * BS],
    [6 * MiB, 6 * MiB + BS],
    [8 * MiB, SIZE],
  ] as const) {
    img.copy(out, s, s, e);
  }
  return out;
}

/** The index is clean and its hashes are those of a fresh 4 KiB index of DST. */
async function assertIndexDescribes(index: string, dst: string, dir: string): Promise<void> {
  const fresh = join(dir, 'fresh.blkidx');
  await makeIndex(dst, fresh, { blockSize: BS });
  const kept = await readIndexFile(index);
  assert.equal(kept.state.kind, 'clean');
  assert.equal(kept.blockSize, BS);
  assert.ok(kept.hashes.equals((await readIndexFile(fresh)).hashes), 'index describes DST');
}

describe('push with a bmap and --index', () => {
  const server = sharedSshd();

  test('index kept here, new DST: made in the bmap blocks, then used; DST not read beyond the sample', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const v1 = await bmapImage(dir, 1);
    const v2 = await bmapImage(dir, 2);
    const dst = join(dir, 'dst.img');
    const index = join(dir, 'dst.blkidx');
    const opts = { remote: { ssh: s.ssh }, index };

    const first = await copy(v1.path, `${s.host}:${dst}`, opts);
    assert.equal(first.index?.mode, 'created');
    assert.equal(first.index.blockSize, BS, "the bmap's block size");
    assert.ok(first.bmap !== undefined);
    assert.deepEqual(await readFile(dst), v1.bytes);
    await assertIndexDescribes(index, dst, dir);

    const second = await copy(v2.path, `${s.host}:${dst}`, opts);
    assert.equal(second.index?.mode, 'used');
    assert.ok(second.bytesRead <= 16 * BS, `the agent read ${second.bytesRead} bytes of DST`);
    assert.equal(second.bytesWritten, 2 * BS);
    assert.deepEqual(await readFile(dst), v2.bytes);
    await assertIndexDescribes(index, dst, dir);
  });

  test('index beside DST (host:FILE), existing DST: unmapped areas untouched and indexed', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const v1 = await bmapImage(dir, 1);
    const v2 = await bmapImage(dir, 2);
    const dst = join(dir, 'dst.img');
    const index = join(dir, 'dst.blkidx');
    const junk = seededBytes(SIZE, 9);
    await writeFile(dst, junk);
    const opts = { remote: { ssh: s.ssh }, index: `${s.host}:${index}` };

    const first = await copy(v1.path, `${s.host}:${dst}`, opts);
    assert.equal(first.index?.mode, 'created');
    assert.equal(first.index.blockSize, BS);
    assert.deepEqual(await readFile(dst), over(junk, v1.bytes));
    await assertIndexDescribes(index, dst, dir);

    const second = await copy(v2.path, `${s.host}:${dst}`, opts);
    assert.equal(second.index?.mode, 'used');
    assert.equal(second.bytesWritten, 2 * BS);
    assert.ok(second.bytesRead <= 16 * BS, `the agent read ${second.bytesRead} bytes of DST`);
    assert.deepEqual(await readFile(dst), over(junk, v2.bytes));
    await assertIndexDescribes(index, dst, dir);
  });

  test('refusals before writing: an index kept here for an existing DST; -b not dividing the bmap blocks', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const v1 = await bmapImage(dir, 1);
    const dst = join(dir, 'dst.img');
    const index = join(dir, 'dst.blkidx');
    const junk = seededBytes(SIZE, 9);
    await writeFile(dst, junk);
    const mtime = (await stat(dst)).mtimeMs;
    const rejects = (p: Promise<unknown>, text: RegExp): Promise<void> =>
      assert.rejects(p, (err: unknown) => {
        assert.ok(err instanceof BlksyncError && err.code === 'EUSAGE', String(err));
        assert.match(err.message, text);
        return true;
      });
    await rejects(
      copy(v1.path, `${s.host}:${dst}`, { remote: { ssh: s.ssh }, index }),
      /outside the bmap's ranges.*--index blksync-test:FILE or --index auto, or make this one with --no-bmap/,
    );
    await rejects(
      copy(v1.path, `${s.host}:${dst}`, { remote: { ssh: s.ssh }, index, blockSize: 8 * KiB }),
      /-b 8192 does not divide the bmap's 4096-byte blocks/,
    );
    assert.deepEqual(await readFile(dst), junk, 'nothing written');
    assert.equal((await stat(dst)).mtimeMs, mtime);
    await assert.rejects(stat(index), /ENOENT/, 'no index written');

    // the way out the message names: made once without the bmap, then used with it
    const made = await copy(v1.path, `${s.host}:${dst}`, {
      remote: { ssh: s.ssh },
      index,
      noBmap: true,
      blockSize: BS,
    });
    assert.equal(made.index?.mode, 'created');
    const used = await copy(v1.path, `${s.host}:${dst}`, { remote: { ssh: s.ssh }, index });
    assert.equal(used.index?.mode, 'used');
    assert.equal(used.bytesWritten, 0);
    assert.deepEqual(await readFile(dst), v1.bytes);
  });
});
