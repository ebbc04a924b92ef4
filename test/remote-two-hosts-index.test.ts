/**
 * `--index` with both ends remote, relayed and `--direct`, over a real OpenSSH server on
 * 127.0.0.1 (both "hosts" are that server): the index is kept beside DST by DST's agent
 * (`dsthost:FILE` or `auto`), made on the first copy and then used, so DST is read only for
 * the sample and inside the chunks that changed. An index kept here is refused.
 */

import assert from 'node:assert/strict';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { copy } from '../src/copy.js';
import { makeIndex } from '../src/engine/make-index.js';
import { BlksyncError } from '../src/errors.js';
import { readIndexFile } from '../src/formats/index-file.js';
import type { RemoteCopyResult } from '../src/copy.js';
import { runCli } from './helpers/cli.js';
import { sharedSshd } from './helpers/sshd.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const MiB = 1024 * 1024;
const INDEX_BS = 64 * 1024;

function flip(data: Buffer, offsets: number[]): Buffer {
  const out = Buffer.from(data);
  for (const o of offsets) out[o] = (out[o]! ^ 0x5a) & 0xff;
  return out;
}

/** The index is clean and holds the hashes of a fresh index of `dst`. */
async function assertIndexDescribes(index: string, dst: string, dir: string): Promise<void> {
  const fresh = join(dir, 'fresh.blkidx');
  await makeIndex(dst, fresh, { blockSize: INDEX_BS });
  const kept = await readIndexFile(index);
  assert.equal(kept.state.kind, 'clean');
  assert.ok(kept.hashes.equals((await readIndexFile(fresh)).hashes), 'index describes DST');
}

describe('--index with two remote ends', () => {
  const server = sharedSshd();

  test('relayed, dsthost:FILE: made, then used; DST read for the sample and changed chunks only', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 20 * MiB + 3000;
    const v1 = seededBytes(size, 31);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    const idx = join(dir, 'dst.blkidx');
    await writeFile(src, v1);
    await writeFile(dst, flip(v1, [7, 11 * MiB]));
    const args = ['copy', '--json', '--ssh', s.ssh, '--index', `${s.host}:${idx}`];
    const run = async (): Promise<RemoteCopyResult> => {
      const r = await runCli([...args, `${s.host}:${src}`, `${s.host}:${dst}`]);
      assert.equal(r.code, 0, r.stderr);
      return JSON.parse(r.stdout) as RemoteCopyResult;
    };

    const first = await run();
    assert.equal(first.index?.mode, 'created');
    assert.equal(first.bytesWritten, 2 * 4096);
    assert.ok((await readFile(dst)).equals(v1));
    await assertIndexDescribes(idx, dst, dir);

    const v2 = flip(v1, [100, 15 * MiB, size - 1]);
    await writeFile(src, v2);
    const used = await run();
    assert.equal(used.index?.mode, 'used');
    assert.equal(used.index.sampleBlocks, 16);
    assert.equal(used.bytesWritten, 3 * 4096 - (4096 - (size % 4096)));
    // the sample (16 blocks), and the 64 KiB units whose hashes differ, refined in 4 KiB
    // blocks there: far from the 20 MiB a copy without the index reads
    assert.ok(used.bytesRead <= 20 * INDEX_BS, `DST read: ${used.bytesRead} of ${size}`);
    assert.ok((await readFile(dst)).equals(v2));
    await assertIndexDescribes(idx, dst, dir);

    const again = await run();
    assert.equal(again.bytesWritten, 0);
    assert.ok(again.bytesRead <= 16 * INDEX_BS, `DST read: ${again.bytesRead}`);
  });

  test("--direct, auto: the index in DST host's cache, made then used", async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const cache = join(dir, 'remote-cache');
    const v1 = seededBytes(12 * MiB, 33);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await writeFile(src, v1);
    // the agents' environment, through sshd's AcceptEnv (agent A passes --ssh on to B)
    const ssh = `${s.ssh} -o SetEnv=XDG_CACHE_HOME=${cache}`;
    const opts = { remote: { ssh }, direct: true, index: 'auto' };
    const made = await copy(`${s.host}:${src}`, `${s.host}:${dst}`, opts);
    assert.equal(made.created, true);
    assert.equal(made.index?.mode, 'created');
    assert.ok(made.index.path.startsWith(join(cache, 'blksync')), made.index.path);
    assert.ok((await readFile(dst)).equals(v1));
    await assertIndexDescribes(made.index.path, dst, dir);

    const v2 = flip(v1, [5 * MiB]);
    await writeFile(src, v2);
    const used = await copy(`${s.host}:${src}`, `${s.host}:${dst}`, opts);
    assert.equal(used.index?.mode, 'used');
    assert.equal(used.index.path, made.index.path);
    assert.equal(used.bytesWritten, 4096);
    assert.ok(used.bytesRead <= 20 * INDEX_BS, `DST read: ${used.bytesRead}`);
    assert.ok((await readFile(dst)).equals(v2));
    await assertIndexDescribes(made.index.path, dst, dir);
  });

  test('an index kept here, or on another host than DST, is refused before anything is written', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    const old = seededBytes(2 * MiB, 35);
    await writeFile(src, seededBytes(2 * MiB, 34));
    await writeFile(dst, old);
    const idx = join(dir, 'dst.blkidx');
    for (const [index, text] of [
      [idx, /kept beside DST by its agent; use --index blksync-test:FILE or --index auto/],
      [`${s.unreachable}:${idx}`, /lives beside DST on blksync-test/],
    ] as const) {
      for (const direct of [false, true]) {
        await assert.rejects(
          copy(`${s.host}:${src}`, `${s.host}:${dst}`, { remote: { ssh: s.ssh }, index, direct }),
          (err: unknown) => {
            assert.ok(err instanceof BlksyncError && err.code === 'EUSAGE', String(err));
            assert.match(err.message, text);
            return true;
          },
        );
      }
    }
    assert.ok((await readFile(dst)).equals(old), 'nothing written');
    await assert.rejects(stat(idx), /ENOENT/);
  });
});
