/**
 * `--index FILE` with a remote DST (push) over a real OpenSSH server on 127.0.0.1: the index
 * is kept here; when it is used the agent reads only the sample that defends against a stale
 * index; a DST changed behind blksync's back is caught by that sample; an interrupted copy
 * leaves an index that vouches only for what was durable, and a rerun converges.
 */

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { copy, type CopyResult } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import { readIndexFile } from '../src/formats/index-file.js';
import type { RemoteCopyResult } from '../src/copy.js';
import { runCli } from './helpers/cli.js';
import { sharedSshd, type Sshd } from './helpers/sshd.js';
import { seededBytes, tempDir } from './helpers/tmp.js';
import { rejectsWith } from './helpers/assert-error.js';

const MiB = 1024 * 1024;
const INDEX_BS = 64 * 1024;

function flip(data: Buffer, offsets: number[]): Buffer {
  const out = Buffer.from(data);
  for (const o of offsets) out[o] = out[o]! ^ 0xff;
  return out;
}

describe('push with --index kept here', () => {
  /** Skips (or fails under strict) without sshd; returns the server. */
  const server = sharedSshd();
  const at = (s: Sshd, path: string): string => `${s.host}:${path}`;

  test('created, then used: the agent reads only the sample of DST', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 24 * MiB + 5000;
    const v1 = seededBytes(size, 1);
    await writeFile(join(dir, 'src.img'), v1);
    await writeFile(join(dir, 'dst.img'), flip(v1, [3, 9 * MiB]));
    const idx = join(dir, 'dst.idx');
    const opts = { remote: { ssh: s.ssh }, index: idx };
    const first = (await copy(
      join(dir, 'src.img'),
      at(s, join(dir, 'dst.img')),
      opts,
    )) as RemoteCopyResult;
    assert.equal(first.index?.mode, 'created');
    assert.equal(first.bytesWritten, 2 * 4096);
    assert.ok((await readFile(join(dir, 'dst.img'))).equals(v1));
    assert.equal((await readIndexFile(idx)).state.kind, 'clean');

    const v2 = flip(v1, [100, 20 * MiB, size - 1]);
    await writeFile(join(dir, 'src.img'), v2);
    const r = await runCli([
      'copy',
      '--json',
      '--index',
      idx,
      '--ssh',
      s.ssh,
      join(dir, 'src.img'),
      at(s, join(dir, 'dst.img')),
    ]);
    assert.equal(r.code, 0, r.stderr);
    const used = JSON.parse(r.stdout) as RemoteCopyResult;
    assert.equal(used.index?.mode, 'used');
    assert.equal(used.index?.sampleBlocks, 16);
    assert.equal(used.blockSize, INDEX_BS);
    assert.equal(used.bytesWritten, 2 * INDEX_BS + (size % INDEX_BS));
    // the sample and nothing else: 16 blocks of 64 KiB
    assert.ok(used.bytesRead <= 16 * INDEX_BS, `the agent read ${used.bytesRead}`);
    assert.ok((await readFile(join(dir, 'dst.img'))).equals(v2));
    assert.equal((await readIndexFile(idx)).state.kind, 'clean');

    // the index now describes v2: a rerun writes nothing
    const again = await copy(join(dir, 'src.img'), at(s, join(dir, 'dst.img')), opts);
    assert.equal(again.index?.mode, 'used');
    assert.equal(again.bytesWritten, 0);
  });

  test("a DST changed behind blksync's back is caught by the sample (EINDEX_STALE)", async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 8 * MiB;
    const data = seededBytes(size, 3);
    const dst = join(dir, 'dst.img');
    await writeFile(join(dir, 'src.img'), data);
    const idx = join(dir, 'dst.idx');
    const opts = { remote: { ssh: s.ssh }, index: idx };
    await copy(join(dir, 'src.img'), at(s, dst), opts);
    // change the first block (always sampled) and keep the mtime, so only the sample can tell
    execFileSync('touch', ['-r', dst, join(dir, 'stamp')]);
    const fh = await open(dst, 'r+');
    await fh.write(Buffer.from('changed'), 0, 7, 10);
    await fh.close();
    execFileSync('touch', ['-r', join(dir, 'stamp'), dst]);
    const changed = await readFile(dst);
    // its ctime moved: nothing vouches for the index (engine/index-policy.ts)
    await rejectsWith(copy(join(dir, 'src.img'), at(s, dst), opts), 'EINDEX_STALE', /ctime moved/);
    // vouched for by the user, the sample still catches the first block
    await rejectsWith(
      copy(join(dir, 'src.img'), at(s, dst), { ...opts, trustIndex: true }),
      'EINDEX_STALE',
      /block at byte 0 .*does not match its hash/,
    );
    assert.ok((await readFile(dst)).equals(changed), 'nothing written');
    const rebuilt = await copy(join(dir, 'src.img'), at(s, dst), { ...opts, rebuildIndex: true });
    assert.equal(rebuilt.index?.mode, 'rebuilt');
    assert.ok((await readFile(dst)).equals(data));
    // an index made for another file
    await writeFile(join(dir, 'other.img'), data);
    await rejectsWith(
      copy(join(dir, 'src.img'), at(s, join(dir, 'other.img')), opts),
      'EINDEX_MISMATCH',
    );
  });

  test('an interrupted copy leaves the index in progress; a rerun converges', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 48 * MiB;
    const v1 = seededBytes(size, 5);
    const v2 = seededBytes(size, 6);
    const dst = join(dir, 'dst.img');
    await writeFile(join(dir, 'src.img'), v1);
    const idx = join(dir, 'dst.idx');
    const opts = { remote: { ssh: s.ssh }, index: idx };
    await copy(join(dir, 'src.img'), at(s, dst), opts);
    await writeFile(join(dir, 'src.img'), v2);
    const controller = new AbortController();
    await assert.rejects(
      copy(join(dir, 'src.img'), at(s, dst), {
        ...opts,
        signal: controller.signal,
        onProgress: (p) => {
          if (p.bytesScanned >= 8 * MiB) controller.abort();
        },
      }),
      (err: unknown) => {
        assert.ok(err instanceof BlksyncError && err.code === 'EINTERRUPTED', String(err));
        assert.ok((err.partial as CopyResult).bytesWritten > 0);
        return true;
      },
    );
    const marked = await readIndexFile(idx);
    assert.equal(marked.state.kind, 'in-progress');
    // DST's identity after the interrupted run's last writes is not known here (no SUMMARY),
    // so nothing vouches for the rest of the index: DST is compared by hashes once
    const rerun = await copy(join(dir, 'src.img'), at(s, dst), opts);
    assert.equal(rerun.index?.mode, 'rebuilt');
    assert.match(rerun.index.reason ?? '', /interrupted/);
    assert.ok((await readFile(dst)).equals(v2));
    assert.equal((await readIndexFile(idx)).state.kind, 'clean');
  });

  test('--index kept here with two remote ends, or on another host than DST, is refused', async (t) => {
    const dir = await tempDir(t);
    await writeFile(join(dir, 'src.img'), seededBytes(4096, 1));
    const both = await runCli(['copy', '--index', join(dir, 'i'), 'h:/x', 'g:/y']);
    assert.equal(both.code, 2, both.stderr);
    assert.match(
      both.stderr,
      /with two remote ends the index is kept beside DST by its agent; use --index g:FILE or --index auto \[EUSAGE\]/,
    );
    const other = await runCli(['copy', '--index', 'g:/i', join(dir, 'src.img'), 'h:/x']);
    assert.equal(other.code, 2, other.stderr);
    assert.match(other.stderr, /--index g:\/i is on g, .* beside DST on h.*\[EUSAGE\]/);
    const pull = await runCli(['copy', '--index', 'h:/i', 'h:/x', join(dir, 'y')]);
    assert.equal(pull.code, 2, pull.stderr);
    assert.match(pull.stderr, /a pull's index describes the local DST.*\[EUSAGE\]/);
  });
});

describe('push with the index kept beside the remote DST (--index host:FILE, auto)', () => {
  /** Skips (or fails under strict) without sshd; returns the server. */
  const server = sharedSshd();
  const at = (s: Sshd, path: string): string => `${s.host}:${path}`;

  test('host:FILE: created, then used without reading DST; a dry run changes nothing', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 24 * MiB + 5000;
    const v1 = seededBytes(size, 21);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await writeFile(src, v1);
    await writeFile(dst, flip(v1, [3, 9 * MiB]));
    const idx = join(dir, 'dst.blkidx');
    const opts = { remote: { ssh: s.ssh }, index: at(s, idx) };
    const first = (await copy(src, at(s, dst), opts)) as RemoteCopyResult;
    assert.equal(first.index?.mode, 'created');
    assert.equal(first.index.path, idx);
    assert.equal(first.bytesWritten, 2 * 4096);
    assert.ok((await readFile(dst)).equals(v1));
    assert.equal((await readIndexFile(idx)).state.kind, 'clean');

    const v2 = flip(v1, [100, 20 * MiB, size - 1]);
    await writeFile(src, v2);
    const indexBefore = await readFile(idx);
    const args = ['copy', '--json', '--index', at(s, idx), '--ssh', s.ssh, src, at(s, dst)];
    const dry = await runCli([...args.slice(0, 2), '-n', ...args.slice(2)]);
    assert.equal(dry.code, 0, dry.stderr);
    const planned = JSON.parse(dry.stdout) as RemoteCopyResult;
    assert.equal(planned.index?.mode, 'used');
    assert.equal(planned.bytesDiffering, 2 * INDEX_BS + (size % INDEX_BS));
    assert.ok((await readFile(dst)).equals(v1), 'a dry run writes nothing');
    assert.ok((await readFile(idx)).equals(indexBefore), 'nor the index');

    const r = await runCli(args);
    assert.equal(r.code, 0, r.stderr);
    const used = JSON.parse(r.stdout) as RemoteCopyResult;
    assert.equal(used.index?.mode, 'used');
    assert.equal(used.index?.sampleBlocks, 16);
    assert.equal(used.blockSize, INDEX_BS);
    assert.equal(used.bytesWritten, 2 * INDEX_BS + (size % INDEX_BS));
    // the agent read the sample and nothing else: 16 blocks of 64 KiB
    assert.ok(used.bytesRead <= 16 * INDEX_BS, `the agent read ${used.bytesRead}`);
    assert.ok((await readFile(dst)).equals(v2));
    assert.equal((await readIndexFile(idx)).state.kind, 'clean');

    const again = (await copy(src, at(s, dst), opts)) as RemoteCopyResult;
    assert.equal(again.index?.mode, 'used');
    assert.equal(again.bytesWritten, 0);
    assert.ok(again.bytesRead <= 16 * INDEX_BS);
    // one 16-byte digest per 4 MiB chunk from the index, not one hash per 64 KiB block (6 KiB)
    assert.ok(again.channel.bytesReceived < 2048, `received ${again.channel.bytesReceived}`);
  });

  test("host:FILE: a DST changed behind blksync's back is EINDEX_STALE; another, EINDEX_MISMATCH", async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const data = seededBytes(8 * MiB, 23);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await writeFile(src, data);
    const idx = join(dir, 'dst.blkidx');
    const opts = { remote: { ssh: s.ssh }, index: at(s, idx) };
    await copy(src, at(s, dst), opts);
    execFileSync('touch', ['-r', dst, join(dir, 'stamp')]);
    const fh = await open(dst, 'r+');
    await fh.write(Buffer.from('changed'), 0, 7, 10);
    await fh.close();
    execFileSync('touch', ['-r', join(dir, 'stamp'), dst]);
    const changed = await readFile(dst);
    await rejectsWith(copy(src, at(s, dst), opts), 'EINDEX_STALE', /ctime moved/);
    await rejectsWith(
      copy(src, at(s, dst), { ...opts, trustIndex: true }),
      'EINDEX_STALE',
      /block at byte 0 /,
    );
    assert.ok((await readFile(dst)).equals(changed), 'nothing written');
    const rebuilt = await copy(src, at(s, dst), { ...opts, rebuildIndex: true });
    assert.equal(rebuilt.index?.mode, 'rebuilt');
    assert.ok((await readFile(dst)).equals(data));
    assert.equal((await readIndexFile(idx)).state.kind, 'clean');
    await writeFile(join(dir, 'other.img'), data);
    await rejectsWith(copy(src, at(s, join(dir, 'other.img')), opts), 'EINDEX_MISMATCH');
    // an index path that is DST itself would be renamed over it
    await rejectsWith(
      copy(src, at(s, dst), { ...opts, index: at(s, dst) }),
      'ESAME_FILE',
      /is the destination/,
    );
    assert.ok((await readFile(dst)).equals(data), 'DST is intact');
  });

  test('host:FILE: an interrupted copy leaves the index in progress; a rerun converges', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 48 * MiB;
    const v1 = seededBytes(size, 31);
    const v2 = seededBytes(size, 32);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await writeFile(src, v1);
    const idx = join(dir, 'dst.blkidx');
    const opts = { remote: { ssh: s.ssh }, index: at(s, idx) };
    await copy(src, at(s, dst), opts);
    await writeFile(src, v2);
    const controller = new AbortController();
    await assert.rejects(
      copy(src, at(s, dst), {
        ...opts,
        signal: controller.signal,
        onProgress: (p) => {
          if (p.bytesScanned >= 8 * MiB) controller.abort();
        },
      }),
      (err: unknown) => {
        assert.ok(err instanceof BlksyncError && err.code === 'EINTERRUPTED', String(err));
        assert.ok((err.partial as CopyResult).bytesWritten > 0);
        return true;
      },
    );
    assert.equal((await readIndexFile(idx)).state.kind, 'in-progress');
    // the agent synced DST and stamped the in-progress index again as it exited: the rest of
    // the index still vouches, only the marked range is compared
    const rerun = await copy(src, at(s, dst), opts);
    assert.equal(rerun.index?.mode, 'used');
    assert.ok((await readFile(dst)).equals(v2));
    assert.equal((await readIndexFile(idx)).state.kind, 'clean');
    // and the clean index describes v2: nothing to write, DST read only for the sample
    const again = await copy(src, at(s, dst), opts);
    assert.equal(again.bytesWritten, 0);
    assert.ok(again.bytesRead <= 16 * INDEX_BS);
  });

  test("--index auto: the remote's cache, keyed by the remote DST", async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const cache = join(dir, 'remote-cache');
    const v1 = seededBytes(12 * MiB, 27);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await writeFile(src, v1);
    // the agent's environment, through sshd's AcceptEnv
    const ssh = `${s.ssh} -o SetEnv=XDG_CACHE_HOME=${cache}`;
    const args = ['copy', '--json', '--index', 'auto', '--ssh', ssh, src, at(s, dst)];
    const first = await runCli(args);
    assert.equal(first.code, 0, first.stderr);
    const made = JSON.parse(first.stdout) as RemoteCopyResult;
    assert.equal(made.created, true);
    assert.equal(made.index?.mode, 'created');
    assert.ok(made.index.path.startsWith(join(cache, 'blksync')), made.index.path);
    await writeFile(src, flip(v1, [5 * MiB]));
    const second = await runCli(args);
    assert.equal(second.code, 0, second.stderr);
    const used = JSON.parse(second.stdout) as RemoteCopyResult;
    assert.equal(used.index?.mode, 'used');
    assert.equal(used.index.path, made.index.path);
    assert.equal(used.bytesWritten, INDEX_BS);
    assert.ok(used.bytesRead <= 16 * INDEX_BS, `the agent read ${used.bytesRead}`);
    assert.ok((await readFile(dst)).equals(flip(v1, [5 * MiB])));
  });
});

describe('pull with --index: the index of the local DST', () => {
  /** Skips (or fails under strict) without sshd; returns the server. */
  const server = sharedSshd();
  const at = (s: Sshd, path: string): string => `${s.host}:${path}`;

  test('created, then used: DST is read only for the sample; a dry run changes nothing', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 24 * MiB + 5000;
    const v1 = seededBytes(size, 11);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await writeFile(src, v1);
    await writeFile(dst, flip(v1, [3, 9 * MiB]));
    const idx = join(dir, 'dst.idx');
    const opts = { remote: { ssh: s.ssh }, index: idx };
    const first = (await copy(at(s, src), dst, opts)) as RemoteCopyResult;
    assert.equal(first.index?.mode, 'created');
    assert.equal(first.bytesWritten, 2 * 4096);
    assert.ok((await readFile(dst)).equals(v1));
    assert.equal((await readIndexFile(idx)).state.kind, 'clean');

    const v2 = flip(v1, [100, 20 * MiB, size - 1]);
    await writeFile(src, v2);
    const indexBefore = await readFile(idx);
    const dry = await runCli([
      'copy',
      '--json',
      '-n',
      '--index',
      idx,
      '--ssh',
      s.ssh,
      at(s, src),
      dst,
    ]);
    assert.equal(dry.code, 0, dry.stderr);
    const planned = JSON.parse(dry.stdout) as RemoteCopyResult;
    assert.equal(planned.index?.mode, 'used');
    assert.equal(planned.bytesDiffering, 2 * INDEX_BS + (size % INDEX_BS));
    assert.ok((await readFile(dst)).equals(v1), 'a dry run writes nothing');
    assert.ok((await readFile(idx)).equals(indexBefore), 'nor the index');

    const r = await runCli(['copy', '--json', '--index', idx, '--ssh', s.ssh, at(s, src), dst]);
    assert.equal(r.code, 0, r.stderr);
    const used = JSON.parse(r.stdout) as RemoteCopyResult;
    assert.equal(used.index?.mode, 'used');
    assert.equal(used.index?.sampleBlocks, 16);
    assert.equal(used.blockSize, INDEX_BS);
    assert.equal(used.bytesWritten, 2 * INDEX_BS + (size % INDEX_BS));
    // the sample and nothing else: 16 blocks of 64 KiB
    assert.ok(used.bytesRead <= 16 * INDEX_BS, `DST was read for ${used.bytesRead} bytes`);
    assert.ok((await readFile(dst)).equals(v2));
    assert.equal((await readIndexFile(idx)).state.kind, 'clean');

    // the index now describes v2: a rerun writes nothing and reads only the sample
    const again = (await copy(at(s, src), dst, opts)) as RemoteCopyResult;
    assert.equal(again.index?.mode, 'used');
    assert.equal(again.bytesWritten, 0);
    assert.ok(again.bytesRead <= 16 * INDEX_BS);
    // one 16-byte digest per 4 MiB chunk, not one hash per 64 KiB block (6 KiB)
    assert.ok(again.channel.bytesReceived < 2048, `received ${again.channel.bytesReceived}`);
  });

  test("a DST changed behind blksync's back: EINDEX_STALE; another DST: EINDEX_MISMATCH", async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const data = seededBytes(8 * MiB, 13);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await writeFile(src, data);
    const idx = join(dir, 'dst.idx');
    const opts = { remote: { ssh: s.ssh }, index: idx };
    await copy(at(s, src), dst, opts);
    execFileSync('touch', ['-r', dst, join(dir, 'stamp')]);
    const fh = await open(dst, 'r+');
    await fh.write(Buffer.from('changed'), 0, 7, 10);
    await fh.close();
    execFileSync('touch', ['-r', join(dir, 'stamp'), dst]);
    const changed = await readFile(dst);
    await rejectsWith(copy(at(s, src), dst, opts), 'EINDEX_STALE', /ctime moved/);
    await rejectsWith(
      copy(at(s, src), dst, { ...opts, trustIndex: true }),
      'EINDEX_STALE',
      /block at byte 0 /,
    );
    assert.ok((await readFile(dst)).equals(changed), 'nothing written');
    const rebuilt = await copy(at(s, src), dst, { ...opts, rebuildIndex: true });
    assert.equal(rebuilt.index?.mode, 'rebuilt');
    assert.ok((await readFile(dst)).equals(data));
    await writeFile(join(dir, 'other.img'), data);
    await rejectsWith(copy(at(s, src), join(dir, 'other.img'), opts), 'EINDEX_MISMATCH');
  });

  test('an interrupted pull leaves the index in progress; a rerun converges', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const size = 48 * MiB;
    const v1 = seededBytes(size, 41);
    const v2 = seededBytes(size, 42);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await writeFile(src, v1);
    const idx = join(dir, 'dst.idx');
    const opts = { remote: { ssh: s.ssh }, index: idx, indexCheckpointBytes: 8 * MiB };
    await copy(at(s, src), dst, opts);
    await writeFile(src, v2);
    const controller = new AbortController();
    await assert.rejects(
      copy(at(s, src), dst, {
        ...opts,
        signal: controller.signal,
        onProgress: (p) => {
          if (p.bytesScanned >= 8 * MiB) controller.abort();
        },
      }),
      (err: unknown) => {
        assert.ok(err instanceof BlksyncError && err.code === 'EINTERRUPTED', String(err));
        assert.ok((err.partial as CopyResult).bytesWritten > 0);
        return true;
      },
    );
    const left = await readIndexFile(idx);
    assert.equal(left.state.kind, 'in-progress');
    // outside the range marked in progress the index vouches only for what DST holds (the
    // refiner fetches chunks ahead of the writes: their hashes must not be in it yet)
    const held = await readFile(dst);
    const dirty = left.state.kind === 'in-progress' ? left.state.dirty : { start: 0, end: 0 };
    for (let b = 0; b < left.blockCount; b++) {
      const off = b * left.blockSize;
      if (off + left.blockSize > dirty.start && off < dirty.end) continue;
      const stored = left.hashes.subarray(b * left.hashBytes, (b + 1) * left.hashBytes);
      const actual = createHash('sha256')
        .update(held.subarray(off, off + left.blockSize))
        .digest();
      assert.ok(stored.equals(actual), `the index vouches for block ${b}, which DST does not hold`);
    }
    const rerun = await copy(at(s, src), dst, opts);
    assert.equal(rerun.index?.mode, 'used');
    assert.ok((rerun.index?.bytesReread ?? 0) > 0, 'the marked range was read and compared');
    assert.ok((await readFile(dst)).equals(v2));
    assert.equal((await readIndexFile(idx)).state.kind, 'clean');
    const again = await copy(at(s, src), dst, opts);
    assert.equal(again.bytesWritten, 0);
    assert.ok(again.bytesRead <= 16 * INDEX_BS);
  });

  test('--index auto keeps the index in the local cache, keyed by the local DST', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const cache = join(dir, 'cache');
    const v1 = seededBytes(12 * MiB, 17);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await writeFile(src, v1);
    const args = ['copy', '--json', '--index', 'auto', '--ssh', s.ssh, at(s, src), dst];
    // the CLI child inherits it
    const saved = process.env.XDG_CACHE_HOME;
    process.env.XDG_CACHE_HOME = cache;
    t.after(() => {
      if (saved === undefined) delete process.env.XDG_CACHE_HOME;
      else process.env.XDG_CACHE_HOME = saved;
    });
    const first = await runCli(args);
    assert.equal(first.code, 0, first.stderr);
    const made = JSON.parse(first.stdout) as RemoteCopyResult;
    assert.equal(made.created, true);
    assert.equal(made.index?.mode, 'created');
    assert.ok(made.index.path.startsWith(join(cache, 'blksync')), made.index.path);
    const v2 = flip(v1, [5 * MiB]);
    await writeFile(src, v2);
    const second = await runCli(args);
    assert.equal(second.code, 0, second.stderr);
    const used = JSON.parse(second.stdout) as RemoteCopyResult;
    assert.equal(used.index?.mode, 'used');
    assert.equal(used.index.path, made.index.path);
    assert.equal(used.bytesWritten, INDEX_BS);
    assert.ok(used.bytesRead <= 16 * INDEX_BS);
    assert.ok((await readFile(dst)).equals(v2));
  });
});
