/**
 * --src-index with a remote end, over a real OpenSSH server on 127.0.0.1. A push keeps an
 * index of its local SRC here under the local copy's policy: made while SRC is read for the
 * first push, used by the next (SRC read only where DST's index differs, DST only for its
 * sample), rebuilt when SRC changed, refused or rebuilt when it is corrupt or lies. A remote
 * SRC (pull, relay) is hashed by its agent, and --src-index there stays a usage error.
 */

import assert from 'node:assert/strict';
import { open, readdir, readFile, stat, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test, type TestContext } from 'node:test';
import type { RemoteCopyResult } from '../src/copy.js';
import { readIndexFile, writeNewIndex } from '../src/formats/index-file.js';
import { runCli } from './helpers/cli.js';
import { sharedSshd, type Sshd } from './helpers/sshd.js';
import { seededBytes, tempDir, writeRandomFile } from './helpers/tmp.js';

const MiB = 1024 * 1024;
const INDEX_BS = 64 * 1024;

function flip(data: Buffer, offsets: number[]): Buffer {
  const out = Buffer.from(data);
  for (const o of offsets) out[o] = out[o]! ^ 0xff;
  return out;
}

interface Run {
  code: number | null;
  stderr: string;
  result: RemoteCopyResult | undefined;
}

describe('push with --src-index', () => {
  const server = sharedSshd();

  /** A temp dir with a local cache (SRC's index) and the remote's cache (DST's index). */
  async function setup(t: TestContext, s: Sshd) {
    const dir = await tempDir(t);
    const local = join(dir, 'local-cache');
    const ssh = `${s.ssh} -o SetEnv=XDG_CACHE_HOME=${join(dir, 'remote-cache')}`;
    const push = async (src: string, dst: string, extra: string[] = []): Promise<Run> => {
      const r = await runCli(['copy', '--json', '--ssh', ssh, ...extra, src, `${s.host}:${dst}`], {
        env: { XDG_CACHE_HOME: local },
      });
      const result = r.code === 0 ? (JSON.parse(r.stdout) as RemoteCopyResult) : undefined;
      return { code: r.code, stderr: r.stderr, result };
    };
    const cached = async (): Promise<string[]> =>
      (await readdir(join(local, 'blksync')).catch(() => [] as string[])).map((f) =>
        join(local, 'blksync', f),
      );
    return { dir, push, cached };
  }

  const BOTH = ['--index', 'auto', '--src-index', 'auto'];

  test('made on the first push, used on the next: neither SRC nor DST read whole', async (t) => {
    const s = server(t);
    if (!s) return;
    const { dir, push, cached } = await setup(t, s);
    const size = 24 * MiB + 5000;
    const v1 = seededBytes(size, 1);
    const v2 = flip(v1, [100, 9 * MiB, 20 * MiB + 7, size - 1]);
    const src = join(dir, 'src.img');
    const old = join(dir, 'old.img');
    const dstA = join(dir, 'dst-a.img');
    const dstB = join(dir, 'dst-b.img');
    await writeFile(src, v2);
    await writeFile(old, v1);
    await writeFile(dstA, v1);

    const first = await push(src, dstA, BOTH);
    assert.equal(first.code, 0, first.stderr);
    assert.equal(first.result!.index?.source?.mode, 'created');
    assert.equal(first.result!.index?.source?.bytesRead, size, 'SRC read whole to make it');
    assert.ok((await readFile(dstA)).equals(v2));
    const [srcIdx] = await cached();
    assert.ok(srcIdx !== undefined, 'the index of SRC is in the local cache');
    assert.equal((await readIndexFile(srcIdx)).state.kind, 'clean');

    // unchanged rerun: both indexes used; SRC and DST read only for their samples
    const again = await push(src, dstA, BOTH);
    assert.equal(again.code, 0, again.stderr);
    const r = again.result!;
    assert.equal(r.index?.mode, 'used');
    assert.equal(r.index?.source?.mode, 'used');
    assert.equal(r.index?.source?.sampleBlocks, 16);
    assert.equal(r.index?.source?.bytesRead, 0);
    assert.ok(r.bytesRead <= 16 * INDEX_BS, `the agent read ${r.bytesRead} of DST`);
    assert.equal(r.bytesWritten, 0);
    assert.ok((await readFile(dstA)).equals(v2));

    // a DST holding v1, indexed by its agent: only the differing blocks of SRC are read
    const made = await push(old, dstB, ['--index', 'auto']);
    assert.equal(made.code, 0, made.stderr);
    const used = await push(src, dstB, BOTH);
    assert.equal(used.code, 0, used.stderr);
    const u = used.result!;
    assert.equal(u.index?.mode, 'used');
    assert.equal(u.index?.source?.mode, 'used');
    assert.equal(u.bytesWritten, 3 * INDEX_BS + (size % INDEX_BS));
    assert.equal(u.index?.source?.bytesRead, u.bytesWritten, 'SRC read only where it differs');
    assert.ok(u.bytesRead <= 16 * INDEX_BS, `the agent read ${u.bytesRead} of DST`);
    assert.ok((await readFile(dstB)).equals(v2));
  });

  test('SRC changed since its index: rebuilt, never trusted, DST correct', async (t) => {
    const s = server(t);
    if (!s) return;
    const { dir, push, cached } = await setup(t, s);
    const size = 12 * MiB + 300;
    const v1 = seededBytes(size, 2);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await writeFile(src, v1);
    assert.equal((await push(src, dst, BOTH)).code, 0);

    const v2 = flip(v1, [5 * MiB + 1, size - 2]);
    await writeFile(src, v2);
    const r = await push(src, dst, BOTH);
    assert.equal(r.code, 0, r.stderr);
    assert.notEqual(r.result!.index?.source?.mode, 'used');
    assert.equal(r.result!.bytesWritten, INDEX_BS + (size % INDEX_BS));
    assert.ok((await readFile(dst)).equals(v2));
    // rewritten for v2, and used next
    assert.equal((await cached()).length, 1);
    const next = await push(src, dst, BOTH);
    assert.equal(next.code, 0, next.stderr);
    assert.equal(next.result!.index?.source?.mode, 'used');
    assert.equal(next.result!.bytesWritten, 0);
    assert.ok((await readFile(dst)).equals(v2));

    // changed in place with its mtime put back (touch -r): the ctime still tells
    const before = await stat(src);
    const fh = await open(src, 'r+');
    await fh.write(Buffer.from([v2[7 * MiB]! ^ 0xff]), 0, 1, 7 * MiB);
    await fh.close();
    await utimes(src, before.atime, before.mtime);
    const v3 = flip(v2, [7 * MiB]);
    const touched = await push(src, dst, BOTH);
    assert.equal(touched.code, 0, touched.stderr);
    assert.equal(touched.result!.index?.source?.mode, 'rebuilt');
    assert.match(touched.result!.index.source.reason!, /SRC was modified/);
    assert.equal(touched.result!.bytesWritten, INDEX_BS);
    assert.ok((await readFile(dst)).equals(v3));
  });

  test('--src-index FILE with --index FILE (both kept here): only differing blocks read', async (t) => {
    const s = server(t);
    if (!s) return;
    const { dir, push } = await setup(t, s);
    const size = 16 * MiB;
    const v1 = seededBytes(size, 3);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    const idxs = ['--index', join(dir, 'dst.idx'), '--src-index', join(dir, 'src.idx')];
    await writeFile(src, v1);
    const first = await push(src, dst, idxs);
    assert.equal(first.code, 0, first.stderr);
    assert.equal(first.result!.index?.source?.mode, 'created');
    assert.ok((await readFile(dst)).equals(v1));

    // DST changed through blksync (another SRC): its index follows; SRC's is still good
    const other = join(dir, 'other.img');
    const v0 = flip(v1, [7, 11 * MiB]);
    await writeFile(other, v0);
    assert.equal((await push(other, dst, ['--index', join(dir, 'dst.idx')])).code, 0);
    const r = await push(src, dst, idxs);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.result!.index?.mode, 'used');
    assert.equal(r.result!.index?.source?.mode, 'used');
    assert.equal(r.result!.bytesWritten, 2 * INDEX_BS);
    assert.equal(r.result!.index?.source?.bytesRead, 2 * INDEX_BS);
    assert.ok((await readFile(dst)).equals(v1));
  });

  test('a corrupt index of SRC: FILE refused before writing, the cached one rebuilt', async (t) => {
    const s = server(t);
    if (!s) return;
    const { dir, push, cached } = await setup(t, s);
    const size = 8 * MiB;
    const v1 = seededBytes(size, 4);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await writeFile(src, v1);
    const bad = join(dir, 'src.idx');
    await writeFile(bad, Buffer.from('not an index, just some hostile bytes'.repeat(50)));
    await writeFile(dst, flip(v1, [1]));
    const refused = await push(src, dst, ['--index', 'auto', '--src-index', bad]);
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /\[EINDEX_FORMAT\]/);
    assert.ok((await readFile(dst)).equals(flip(v1, [1])), 'nothing written');

    assert.equal((await push(src, dst, BOTH)).code, 0);
    const [idx] = await cached();
    await writeFile(idx!, Buffer.alloc(4096, 0x41));
    const r = await push(src, dst, BOTH);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.result!.index?.source?.mode, 'rebuilt');
    assert.ok((await readFile(dst)).equals(v1));
    assert.equal((await readIndexFile(idx!)).state.kind, 'clean', 'written anew');
  });

  test('an index of SRC that lies (right identity, wrong hashes): never a wrong DST', async (t) => {
    const s = server(t);
    if (!s) return;
    const { dir, push, cached } = await setup(t, s);
    const size = 24 * MiB;
    const v1 = seededBytes(size, 5);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await writeFile(src, v1);
    assert.equal((await push(src, dst, BOTH)).code, 0);
    // DST moves on through blksync, so the next push has blocks to send
    const v0 = flip(v1, [3 * MiB, 17 * MiB]);
    await writeFile(join(dir, 'other.img'), v0);
    assert.equal((await push(join(dir, 'other.img'), dst, ['--index', 'auto'])).code, 0);
    // forge SRC's index: the block at 3 MiB claims content that is neither SRC's nor DST's
    // (a hash forged to equal DST's is indistinguishable from the truth, for a local copy too:
    // what vouches for an index of SRC is SRC's identity, mtime and ctime, and the sample)
    const [idx] = await cached();
    const index = await readIndexFile(idx!);
    index.hashes.fill(0x5a, ((3 * MiB) / INDEX_BS) * 32, ((3 * MiB) / INDEX_BS + 1) * 32);
    await writeNewIndex(idx!, index);
    const r = await push(src, dst, BOTH);
    if (r.code === 0) {
      // the sample caught it: rebuilt from SRC
      assert.equal(r.result!.index?.source?.mode, 'rebuilt');
    } else {
      // or the block was read and checked: refused, the cached index removed
      assert.match(r.stderr, /of SRC is stale.*\[EINDEX_STALE\]/);
      assert.ok(!(await cached()).includes(idx!), 'the lying index is gone');
      const rerun = await push(src, dst, BOTH);
      assert.equal(rerun.code, 0, rerun.stderr);
    }
    assert.ok((await readFile(dst)).equals(v1));
  });

  test('refusals before ssh: without --index, an index on the wrong host, --direct, --full', async (t) => {
    const dir = await tempDir(t);
    const src = join(dir, 'src.img');
    await writeRandomFile(src, 65536, 1);
    const h = 'blksync-no-such-host';
    // a host that does not exist: each refusal must come before ssh is tried
    const cases: [string[], RegExp][] = [
      [['--src-index', 'auto', src, `${h}:/tmp/dst.img`], /works with --index.*\[EUSAGE\]/],
      [
        ['--index', 'auto', '--src-index', 'h:/x.idx', src, `${h}:/tmp/d.img`],
        /a push's SRC is on this machine, and so is its index.*\[EUSAGE\]/,
      ],
      [['--src-index', 'auto', `${h}:/s.img`, join(dir, 'd')], /add --index \[EUSAGE\]/],
      [
        ['--index', 'auto', '--src-index', join(dir, 's.idx'), `${h}:/s.img`, join(dir, 'd')],
        /kept on its host by its agent; use blksync-no-such-host:FILE or auto \[EUSAGE\]/,
      ],
      [
        ['--index', 'auto', '--src-index', 'other:/s.idx', `${h}:/s`, 'x:/d'],
        /use blksync-no-such-host:FILE or auto \[EUSAGE\]/,
      ],
      [
        ['--direct', '--index', 'auto', '--src-index', 'auto', `${h}:/s`, 'x:/d'],
        /drop --direct \[EUSAGE\]/,
      ],
      [
        ['--full', '--index', 'auto', '--src-index', 'auto', `${h}:/s`, join(dir, 'd')],
        /--full reads and sends all of SRC.*\[EUSAGE\]/,
      ],
    ];
    for (const [args, expected] of cases) {
      const r = await runCli(['copy', ...args]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, expected);
    }
  });
});

describe("pull and relay with --src-index (kept on SRC's host by its agent)", () => {
  const server = sharedSshd();

  async function setup(t: TestContext, s: Sshd) {
    const dir = await tempDir(t);
    const remoteCache = join(dir, 'remote-cache');
    const ssh = `${s.ssh} -o SetEnv=XDG_CACHE_HOME=${remoteCache}`;
    const copy = async (src: string, dst: string, extra: string[] = []): Promise<Run> => {
      const r = await runCli(['copy', '--json', '--ssh', ssh, ...extra, src, dst], {
        env: { XDG_CACHE_HOME: join(dir, 'local-cache') },
      });
      const result = r.code === 0 ? (JSON.parse(r.stdout) as RemoteCopyResult) : undefined;
      return { code: r.code, stderr: r.stderr, result };
    };
    const at = (p: string): string => `${s.host}:${p}`;
    return { dir, copy, at, remoteCache };
  }

  const BOTH = ['--index', 'auto', '--src-index', 'auto'];

  for (const kind of ['pull', 'relay'] as const) {
    test(`${kind}: made on the first run, used on the next; SRC changed: rebuilt`, async (t) => {
      const s = server(t);
      if (!s) return;
      const { dir, copy, at, remoteCache } = await setup(t, s);
      const size = 20 * MiB + 700;
      const v1 = seededBytes(size, 11);
      const v2 = flip(v1, [64, 6 * MiB, size - 3]);
      const src = join(dir, 'src.img');
      const old = join(dir, 'old.img');
      const dstPath = join(dir, 'dst.img');
      const dst = kind === 'pull' ? dstPath : at(dstPath);
      await writeFile(src, v2);
      await writeFile(old, v1);
      // DST holds v1 and is indexed (here for a pull, by DST's agent for a relay)
      assert.equal((await copy(at(old), dst, ['--index', 'auto'])).code, 0);

      const made = await copy(at(src), dst, BOTH);
      assert.equal(made.code, 0, made.stderr);
      assert.equal(made.result!.index?.source?.mode, 'created');
      assert.ok(made.result!.index.source.path.startsWith(join(remoteCache, 'blksync')));
      assert.ok((await readFile(dstPath)).equals(v2));
      assert.equal((await readIndexFile(made.result!.index.source.path)).state.kind, 'clean');

      // DST back to v1 through blksync; then both indexes are used
      assert.equal((await copy(at(old), dst, ['--index', 'auto'])).code, 0);
      const used = await copy(at(src), dst, BOTH);
      assert.equal(used.code, 0, used.stderr);
      const u = used.result!;
      assert.equal(u.index?.mode, 'used');
      assert.equal(u.index?.source?.mode, 'used');
      assert.equal(u.index?.source?.sampleBlocks, 16);
      // a pull fetches whole blocks of DST's index; a relay refines them to -b's 4 KiB
      const unit = kind === 'pull' ? INDEX_BS : 4096;
      assert.equal(u.bytesWritten, 2 * unit + (size % unit));
      // SRC read by its agent only around what differs (the sample aside), DST only for its
      // sample: a relay's agent reads the 64 KiB blocks to hash them in 4 KiB
      const srcRead = u.index.source.bytesRead!;
      assert.ok(srcRead >= u.bytesWritten && srcRead <= 4 * INDEX_BS, `SRC read: ${srcRead}`);
      // (a relay's DST agent also reads the differing 64 KiB blocks to hash them in 4 KiB)
      const dstRead = (kind === 'pull' ? 16 : 20) * INDEX_BS;
      assert.ok(u.bytesRead <= dstRead, `DST read: ${u.bytesRead}`);
      assert.ok((await readFile(dstPath)).equals(v2));

      // SRC changed behind the index: never trusted
      const v3 = flip(v2, [9 * MiB + 5]);
      await writeFile(src, v3);
      const changed = await copy(at(src), dst, BOTH);
      assert.equal(changed.code, 0, changed.stderr);
      assert.equal(changed.result!.index?.source?.mode, 'rebuilt');
      assert.equal(changed.result!.bytesWritten, unit);
      assert.ok((await readFile(dstPath)).equals(v3));
      const next = await copy(at(src), dst, BOTH);
      assert.equal(next.code, 0, next.stderr);
      assert.equal(next.result!.index?.source?.mode, 'used');
      assert.equal(next.result!.bytesWritten, 0);
      assert.ok((await readFile(dstPath)).equals(v3));
    });
  }

  test("an index of SRC naming SRC, DST or DST's index is refused before anything is written", async (t) => {
    const s = server(t);
    if (!s) return;
    const { dir, copy, at } = await setup(t, s);
    const v1 = seededBytes(2 * MiB, 13);
    const v0 = flip(v1, [5]);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await writeFile(src, v1);
    await writeFile(dst, v0);
    const cases: [string, string, string[], RegExp][] = [
      // the index would be renamed over SRC itself: on this machine, or on SRC's host
      [src, at(dst), ['--index', 'auto', '--src-index', src], /is the source.*\[ESAME_FILE\]/],
      [at(src), dst, ['--index', 'auto', '--src-index', at(src)], /is the source.*\[ESAME_FILE\]/],
      [
        src,
        at(dst),
        ['--index', join(dir, 'x.idx'), '--src-index', join(dir, 'x.idx')],
        /name the same file.*\[EUSAGE\]/,
      ],
      [at(src), at(dst), ['--index', 'auto', '--src-index', at(dst)], /names DST too.*\[EUSAGE\]/],
      [
        at(src),
        at(dst),
        ['--index', at(join(dir, 'i')), '--src-index', at(join(dir, 'i'))],
        /names DST's index too.*\[EUSAGE\]/,
      ],
    ];
    for (const [from, to, extra, expected] of cases) {
      const r = await copy(from, to, extra);
      assert.notEqual(r.code, 0, `${extra.join(' ')}: accepted`);
      assert.match(r.stderr, expected);
      assert.ok((await readFile(src)).equals(v1), 'SRC untouched');
      assert.ok((await readFile(dst)).equals(v0), 'DST untouched');
    }
  });

  test('pull: an index of SRC that lies is refused (EINDEX_STALE) or rebuilt; a corrupt one rebuilt', async (t) => {
    const s = server(t);
    if (!s) return;
    const { dir, copy, at } = await setup(t, s);
    const size = 24 * MiB;
    const v1 = seededBytes(size, 12);
    const src = join(dir, 'src.img');
    const old = join(dir, 'old.img');
    const dst = join(dir, 'dst.img');
    await writeFile(src, v1);
    const v0 = flip(v1, [3 * MiB]);
    await writeFile(old, v0);
    assert.equal((await copy(at(old), dst, ['--index', 'auto'])).code, 0);
    const made = await copy(at(src), dst, BOTH);
    assert.equal(made.code, 0, made.stderr);
    const idx = made.result!.index!.source!.path;
    assert.equal((await copy(at(old), dst, ['--index', 'auto'])).code, 0);
    // the block at 3 MiB: neither SRC's nor DST's content, so it is fetched and checked
    const index = await readIndexFile(idx);
    index.hashes.fill(0x5a, ((3 * MiB) / INDEX_BS) * 32, ((3 * MiB) / INDEX_BS + 1) * 32);
    await writeNewIndex(idx, index);
    const r = await copy(at(src), dst, BOTH);
    if (r.code === 0) assert.equal(r.result!.index?.source?.mode, 'rebuilt');
    else {
      assert.match(r.stderr, /of SRC is stale.*\[EINDEX_STALE\]/);
      const rerun = await copy(at(src), dst, BOTH);
      assert.equal(rerun.code, 0, rerun.stderr);
      assert.notEqual(rerun.result!.index?.source?.mode, 'used', 'the lying index was removed');
    }
    assert.ok((await readFile(dst)).equals(v1));

    await writeFile(idx, Buffer.alloc(1000, 0x41));
    const corrupt = await copy(at(src), dst, BOTH);
    assert.equal(corrupt.code, 0, corrupt.stderr);
    assert.equal(corrupt.result!.index?.source?.mode, 'rebuilt');
    assert.ok((await readFile(dst)).equals(v1));
    assert.equal((await readIndexFile(idx)).state.kind, 'clean');
  });
});
