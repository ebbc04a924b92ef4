/**
 * `copy --bmap FILE host:IMG DST` over a real OpenSSH server on 127.0.0.1: a local bmap
 * describing the remote image. Only its mapped ranges are compared and fetched, their
 * checksums are verified here on DST's new content, an existing file DST ends equal to the
 * image (unmapped areas punched, as a local bmap copy leaves it), a loop device keeps its
 * unmapped areas, and a bmap, --size or checksum that does not fit is refused before writing.
 * Relayed to another host, only the mapped ranges are compared and sent.
 */

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { createBmap } from '../src/engine/bmap-create.js';
import { copy, type CopyResult } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import type { RemoteCopyResult } from '../src/copy.js';
import { runCli } from './helpers/cli.js';
import { attachLoop, needLoop, readDevice } from './helpers/loop.js';
import { sharedSshd } from './helpers/sshd.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

const BS = 4096;
const MiB = 1024 * 1024;

/**
 * A 16 MiB image: data among zeros; one extent crosses two 4 MiB chunk boundaries, the last
 * one ends inside a block.
 */
function image(seed: number): { data: Buffer; pieces: { offset: number; data: Buffer }[] } {
  const size = 16 * MiB + 1000;
  const pieces = [
    { offset: 0, data: seededBytes(3 * BS, seed) },
    { offset: 3 * MiB + 5 * BS, data: seededBytes(6 * MiB, seed + 1) },
    { offset: 12 * MiB, data: seededBytes(BS, seed + 2) },
    { offset: 16 * MiB, data: seededBytes(1000, seed + 3) },
  ];
  const data = Buffer.alloc(size);
  for (const p of pieces) p.data.copy(data, p.offset);
  return { data, pieces };
}

const MAPPED = 3 * BS + 6 * MiB + BS + 1000;

/** The remote image (a sparse file) and its bmap, kept apart as a user would fetch it. */
async function setup(dir: string, seed: number) {
  const { data, pieces } = image(seed);
  const img = join(dir, 'remote.img');
  await writeSparseFile(img, data.length, pieces);
  const bmap = join(dir, 'local.bmap');
  await createBmap(img, { output: bmap });
  return { data, pieces, img, bmap };
}

function code(expected: string) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof BlksyncError, String(err));
    assert.equal(err.code, expected, err.message);
    return true;
  };
}

describe('pull with a local bmap of the remote image', () => {
  const server = sharedSshd();

  test('only the mapped ranges are compared and fetched; DST ends as a local bmap copy leaves it', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const { data, img, bmap } = await setup(dir, 1);
    const remote = `${s.host}:${img}`;
    const old = seededBytes(data.length + 3 * BS, 2);
    const dst = join(dir, 'dst.img');
    await writeFile(dst, old);
    const options = { remote: { ssh: s.ssh }, bmap };

    const dry = (await copy(remote, dst, { ...options, dryRun: true })) as RemoteCopyResult;
    assert.equal(dry.bytesScanned, MAPPED);
    assert.equal(dry.bytesWritten, 0);
    assert.ok(dry.bytesDiffering > 6 * MiB && dry.bytesDiffering <= MAPPED + BS);
    assert.deepEqual(await readFile(dst), old, 'a dry run writes nothing');
    // ... but says what the real run punches in DST's unmapped areas
    assert.equal(dry.bytesPunched, data.length - MAPPED);

    const r = (await copy(remote, dst, options)) as RemoteCopyResult;
    assert.equal(r.bmap?.path, bmap);
    assert.equal(r.bmap?.ranges, 4);
    assert.equal(r.bmap?.rangesVerified, 4, 'every range checked here');
    assert.equal(r.bmap?.unmappedPunched, true);
    assert.equal(r.bytesPunched, data.length - MAPPED);
    assert.equal(r.bytesScanned, MAPPED);
    assert.equal(r.bytesDiffering, dry.bytesDiffering);
    assert.equal(r.bytesWritten, dry.bytesDiffering);
    // DST was read only in the mapped ranges
    assert.equal(r.bytesRead, MAPPED);
    // the image exactly, its unmapped areas holes as in a local bmap copy; DST's tail kept
    const got = await readFile(dst);
    assert.ok(got.subarray(0, data.length).equals(data));
    assert.ok(got.subarray(data.length).equals(old.subarray(data.length)));
    const local = join(dir, 'local-copy.img');
    await writeFile(local, old);
    const l: CopyResult = await copy(img, local, { bmap });
    assert.deepEqual(await readFile(local), got, 'as a local bmap copy leaves it');
    assert.equal(l.bytesWritten, r.bytesWritten);

    // unchanged: one hash per mapped piece crosses the link, nothing is written
    const again = (await copy(remote, dst, options)) as RemoteCopyResult;
    assert.equal(again.bytesWritten, 0);
    assert.ok(again.channel.bytesReceived < 8 * 1024, `received ${again.channel.bytesReceived}`);

    // one changed byte in a mapped range (the bmap's checksum changes with it): one block
    const fh = await open(img, 'r+');
    await fh.write(Buffer.from([data[5 * MiB]! ^ 0xff]), 0, 1, 5 * MiB);
    await fh.close();
    await createBmap(img, { output: bmap });
    const changed = Buffer.from(data);
    changed[5 * MiB] = changed[5 * MiB]! ^ 0xff;
    const one = await runCli(['copy', '--json', '--ssh', s.ssh, '--bmap', bmap, remote, dst]);
    assert.equal(one.code, 0, one.stderr);
    const oneResult = JSON.parse(one.stdout) as RemoteCopyResult;
    assert.equal(oneResult.bytesWritten, BS);
    assert.ok(oneResult.channel.bytesReceived < 32 * 1024);
    assert.ok((await readFile(dst)).subarray(0, data.length).equals(changed));

    // --full fetches and writes every mapped byte; --verify reads them back against the bmap
    const full = (await copy(remote, dst, {
      ...options,
      full: true,
      verify: true,
    })) as RemoteCopyResult;
    assert.equal(full.bytesWritten, MAPPED);
    assert.equal(full.verify?.against, 'bmap');
    assert.equal(full.verify?.bytesVerified, MAPPED);

    // onto a new file: the image, unmapped areas never written
    const fresh = join(dir, 'fresh.img');
    const cli = await runCli(['copy', '--ssh', s.ssh, '--bmap', bmap, remote, fresh]);
    assert.equal(cli.code, 0, cli.stderr);
    assert.match(cli.stdout, /bmap .*4 range checksums verified/);
    assert.ok((await readFile(fresh)).equals(changed));
  });

  test('a loop device DST keeps its unmapped areas, as a local bmap copy leaves a device', async (t) => {
    const s = server(t);
    if (!s || !needLoop(t)) return;
    const dir = await tempDir(t);
    const { data, pieces, img, bmap } = await setup(dir, 3);
    const backing = join(dir, 'backing');
    const before = seededBytes(18 * MiB, 4);
    await writeFile(backing, before);
    const dev = await attachLoop(t, backing);
    const r = await runCli([
      'copy',
      '--json',
      '--ssh',
      s.ssh,
      '--bmap',
      bmap,
      `${s.host}:${img}`,
      dev,
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal((JSON.parse(r.stdout) as RemoteCopyResult).bytesScanned, MAPPED);
    const expected = Buffer.from(before);
    for (const p of pieces) p.data.copy(expected, p.offset);
    assert.ok((await readDevice(dev, before.length)).equals(expected));
    assert.equal(data.length, 16 * MiB + 1000);
  });

  test('a mapped range over 32 MiB is checked as it streams, as a local stream is', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const img = join(dir, 'big.img');
    const big = seededBytes(40 * MiB, 8);
    await writeSparseFile(img, 48 * MiB, [{ offset: 4 * MiB, data: big }]);
    const bmap = join(dir, 'big.bmap');
    await createBmap(img, { output: bmap });
    const expected = Buffer.alloc(48 * MiB);
    big.copy(expected, 4 * MiB);
    const dst = join(dir, 'dst.img');
    const old = Buffer.from(expected);
    old[30 * MiB] = old[30 * MiB]! ^ 1;
    await writeFile(dst, old);
    const r = (await copy(`${s.host}:${img}`, dst, {
      remote: { ssh: s.ssh },
      bmap,
    })) as RemoteCopyResult;
    assert.equal(r.bmap?.rangesVerified, 1);
    assert.equal(r.bytesWritten, BS);
    assert.ok((await readFile(dst)).equals(expected));
    // damaged on the host: the range is too large to hold, so it is found bad once written
    const fh = await open(img, 'r+');
    await fh.write(Buffer.from('BAD'), 0, 3, 20 * MiB);
    await fh.close();
    const bad = await runCli(['copy', '--ssh', s.ssh, '--bmap', bmap, `${s.host}:${img}`, dst]);
    assert.equal(bad.code, 1, bad.stderr);
    assert.match(bad.stderr, /too large to check before writing.*\[EBMAP_CHECKSUM\]$/m);
  });

  test('relayed to another host: only the mapped ranges, the unmapped areas left as they are', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const { data, pieces, img, bmap } = await setup(dir, 12);
    const old = seededBytes(data.length, 13);
    const dst = join(dir, 'dst.img');
    await writeFile(dst, old);
    const remote = (p: string): string => `${s.host}:${p}`;
    const args = ['copy', '--json', '--ssh', s.ssh, '--bmap', bmap, remote(img)];
    const r = await runCli([...args, remote(dst)]);
    assert.equal(r.code, 0, r.stderr);
    const result = JSON.parse(r.stdout) as RemoteCopyResult;
    assert.equal(result.bytesScanned, MAPPED);
    // the unchanged blocks never pass through here: no range checksum can be checked
    assert.equal(result.bmap?.rangesVerified, 0);
    // as a push leaves a remote DST: the mapped ranges the image's, the rest as it was
    const expected = Buffer.from(old);
    for (const p of pieces) p.data.copy(expected, p.offset);
    assert.ok((await readFile(dst)).equals(expected));
    const again = await runCli([...args, remote(dst)]);
    assert.equal((JSON.parse(again.stdout) as RemoteCopyResult).bytesWritten, 0);
    // onto a new remote file: the image
    const fresh = await runCli([...args, remote(join(dir, 'fresh.img'))]);
    assert.equal(fresh.code, 0, fresh.stderr);
    assert.ok((await readFile(join(dir, 'fresh.img'))).equals(data));
  });

  test('a bmap, --size or range checksum that does not fit is refused before writing', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const { img, bmap } = await setup(dir, 5);
    const remote = `${s.host}:${img}`;
    const options = { remote: { ssh: s.ssh } };
    const old = seededBytes(17 * MiB, 6);
    const dst = join(dir, 'dst.img');
    await writeFile(dst, old);
    const fresh = join(dir, 'fresh.img');
    const untouched = async (what: string): Promise<void> => {
      assert.deepEqual(await readFile(dst), old, `${what}: DST untouched`);
      assert.equal(existsSync(fresh), false, `${what}: no DST created`);
    };

    // the bmap of another image (another size)
    const other = join(dir, 'other.img');
    await writeSparseFile(other, 8 * MiB, [{ offset: 0, data: seededBytes(BS, 7) }]);
    await createBmap(other, { output: join(dir, 'other.bmap') });
    for (const to of [dst, fresh]) {
      await assert.rejects(
        copy(remote, to, { ...options, bmap: join(dir, 'other.bmap') }),
        code('EBMAP_MISMATCH'),
      );
    }
    await untouched('another image');

    // --size must be the remote image's (EUSAGE, exit 2), as a local SRC's
    const wrong = await runCli(['copy', '--ssh', s.ssh, '--size', '1M', remote, fresh]);
    assert.equal(wrong.code, 2, wrong.stderr);
    assert.match(wrong.stderr, /--size 1048576 contradicts the size 16778216 .*\[EUSAGE\]$/m);
    await untouched('--size');
    const right = await copy(remote, join(dir, 'sized.img'), { ...options, size: 16 * MiB + 1000 });
    assert.equal(right.bytesTotal, 16 * MiB + 1000);

    // a missing bmap, signature options without one, --index with one: usage errors
    await assert.rejects(
      copy(remote, dst, { ...options, bmap: join(dir, 'nope') }),
      code('EBMAP_OPEN'),
    );
    await assert.rejects(
      copy(remote, dst, { ...options, fingerprint: 'A'.repeat(40) }),
      code('EUSAGE'),
    );
    await assert.rejects(
      copy(remote, dst, { ...options, bmap, index: join(dir, 'x.idx') }),
      code('EUSAGE'),
    );
    // --direct: the copy would run on SRC's host, which has no bmap
    const direct = await runCli([
      'copy',
      '--direct',
      '--ssh',
      s.ssh,
      '--bmap',
      bmap,
      remote,
      `${s.host}:${fresh}`,
    ]);
    assert.equal(direct.code, 2, direct.stderr);
    assert.match(direct.stderr, /drop --direct .*\[EUSAGE\]$/m);
    // relayed, a bmap of another image is refused before DST's host is touched
    await assert.rejects(
      copy(remote, `${s.host}:${fresh}`, { ...options, bmap: join(dir, 'other.bmap') }),
      code('EBMAP_MISMATCH'),
    );
    await untouched('usage errors');

    // the remote image damaged in its first range: its checksum fails before it is written
    const fh = await open(img, 'r+');
    await fh.write(Buffer.from('BAD'), 0, 3, 11);
    await fh.close();
    for (const to of [dst, fresh]) {
      const r = await runCli(['copy', '--ssh', s.ssh, '--bmap', bmap, remote, to]);
      assert.equal(r.code, 1, r.stderr);
      assert.match(
        r.stderr,
        /block.*do not match the bmap's sha256 checksum.*\[EBMAP_CHECKSUM\]$/m,
      );
    }
    assert.deepEqual(await readFile(dst), old, 'a bad range is not written');
    assert.equal(existsSync(fresh), false, 'the DST the failed pull created is removed');
    // --no-verify-checksums copies it as it is
    const unchecked = (await copy(remote, dst, {
      ...options,
      bmap,
      noVerifyChecksums: true,
    })) as RemoteCopyResult;
    assert.equal(unchecked.bmap?.rangesVerified, 0);
    assert.equal((await readFile(dst)).subarray(11, 14).toString(), 'BAD');
  });
});
