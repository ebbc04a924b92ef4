/**
 * Holes over ssh (remote/scanner.ts, protocol.ts `skippingZeros`): the local end does not
 * read the units its file system reports as all hole and gives them the hash of zeros, and
 * both ends hash a unit of zeros by a memcmp. Whatever is skipped, DST must end equal to
 * SRC: a hole in SRC against data in DST is zeroed, data in SRC against a hole in DST is
 * written, holes on both sides cost nothing, and a block device (which reports no holes) is
 * read as it is. Push and pull, through a real sshd on 127.0.0.1.
 */

import assert from 'node:assert/strict';
import { open, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test, type TestContext } from 'node:test';
import type { RemoteCopyResult } from '../src/copy.js';
import { agentDataMap, parseDataMap } from '../src/remote/agent/data-map.js';
import { parseHello } from '../src/remote/messages.js';
import { skippingZeros, topHasher, TOP_HASH_GMAC, unitHashes } from '../src/remote/protocol.js';
import { runCli } from './helpers/cli.js';
import { attachLoop, needLoop } from './helpers/loop.js';
import { sharedSshd, type Sshd } from './helpers/sshd.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = 4096;
/** The remote copy's top-level unit (REMOTE_CHUNK_BYTES). */
const UNIT = 4 * MiB;
/** Ten units and a short one. */
const SIZE = 10 * UNIT + 5000;
/** For a loop device: a multiple of 512 bytes, still with a short last unit. */
const DEVICE_SIZE = 10 * UNIT + 4608;

/**
 * What a rerun with nothing to do may receive: READY, eleven top hashes, SUMMARY (~1 KiB).
 * Each both-hole unit hashed otherwise on one end adds a 64 KiB-level reply (~1 KiB).
 */
const RERUN_RECEIVED_BYTES = 2 * KiB;

type Piece = { offset: number; data: Buffer };

/**
 * SRC and DST, unit by unit (a unit is the top-level hash's 4 MiB):
 *
 *   unit 0  SRC data (1 MiB)           DST hole                → written
 *   unit 1  SRC hole                   DST data 1 MiB + 4 KiB in → zeroed (a memcmp of only the
 *                                                                  first MiB would miss it)
 *   unit 2  hole                       hole                    → nothing
 *   unit 3  SRC data in its last block DST hole                → written (the unit is not all hole)
 *   unit 4  SRC data in its first block, DST other data 2 MiB in → both blocks
 *   unit 5  the same data both sides                          → nothing
 *   6 to 9  hole                       hole                    → nothing
 *   tail    SRC data in its last bytes DST hole                → written (a short unit)
 */
function layout(size: number): { src: Piece[]; dst: Piece[] } {
  const same = seededBytes(MiB, 5);
  return {
    src: [
      { offset: 0, data: seededBytes(MiB, 1) },
      { offset: 4 * UNIT - BS, data: seededBytes(BS, 3) },
      { offset: 4 * UNIT, data: seededBytes(BS, 4) },
      { offset: 5 * UNIT, data: same },
      { offset: size - 100, data: seededBytes(100, 6) },
    ],
    dst: [
      { offset: UNIT + MiB + BS, data: seededBytes(BS, 7) },
      { offset: 4 * UNIT + 2 * MiB, data: seededBytes(BS, 8) },
      { offset: 5 * UNIT, data: same },
    ],
  };
}

/** Blocks of BS where `a` and `b` differ. */
function differingBlocks(a: Buffer, b: Buffer): number {
  let n = 0;
  for (let at = 0; at < a.length; at += BS) {
    if (!a.subarray(at, at + BS).equals(b.subarray(at, at + BS))) n++;
  }
  return n;
}

/** DST equals SRC (deepEqual would print a diff of megabytes): else where they first differ. */
function assertSame(actual: Buffer, expected: Buffer): void {
  if (actual.equals(expected)) return;
  let at = 0;
  while (at < Math.min(actual.length, expected.length) && actual[at] === expected[at]) at++;
  assert.fail(`DST differs from SRC at byte ${at} (${actual.length} and ${expected.length} bytes)`);
}

async function reportsHoles(file: string): Promise<boolean> {
  const st = await stat(file);
  return st.blocks * 512 < st.size;
}

async function copyJson(
  s: Sshd,
  from: string,
  to: string,
  extra: string[] = [],
): Promise<RemoteCopyResult> {
  const r = await runCli(['copy', '--json', '--no-bmap', ...extra, '--ssh', s.ssh, from, to]);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as RemoteCopyResult;
}

describe('remote copies skip holes and still end equal', () => {
  const server = sharedSshd();

  /** Writes the layout's SRC and DST; undefined (skipped) where holes are not kept. */
  async function files(
    t: TestContext,
    size: number,
  ): Promise<{ src: string; dst: string } | undefined> {
    const dir = await tempDir(t);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    const { src: s, dst: d } = layout(size);
    await writeSparseFile(src, size, s);
    await writeSparseFile(dst, size, d);
    if (!(await reportsHoles(src)) || !(await reportsHoles(dst))) {
      t.skip('this file system does not keep holes');
      return undefined;
    }
    return { src, dst };
  }

  for (const direction of ['push', 'pull', 'direct'] as const) {
    test(`${direction}: holes against data either way are written, both holes cost nothing`, async (t) => {
      const s = server(t);
      if (!s) return;
      const f = await files(t, SIZE);
      if (!f) return;
      const want = await readFile(f.src);
      const blocks = differingBlocks(want, await readFile(f.dst));
      const [from, to] =
        direction === 'push'
          ? [f.src, `${s.host}:${f.dst}`]
          : direction === 'pull'
            ? [`${s.host}:${f.src}`, f.dst]
            : [`${s.host}:${f.src}`, `${s.host}:${f.dst}`];
      const extra = direction === 'direct' ? ['--direct'] : [];
      const r = await copyJson(s, from, to, extra);
      assertSame(await readFile(f.dst), want);
      assert.equal(r.blocksDiffering, blocks);
      assert.ok(r.bytesWritten <= blocks * BS, `wrote ${r.bytesWritten}`);

      // nothing differs now: only the top hashes cross, none of the holes is refined (a hole
      // hashed differently on one end than on the other would be asked for, unit by unit)
      const again = await copyJson(s, from, to, extra);
      assert.equal(again.blocksDiffering, 0);
      assert.equal(again.bytesWritten, 0);
      // --direct: the two agents' channel
      const got = again.channel.direct?.bytesReceived ?? again.channel.bytesReceived;
      assert.ok(got < RERUN_RECEIVED_BYTES, `received ${got} bytes`);
      assertSame(await readFile(f.dst), want);
    });
  }

  for (const direction of ['push', 'pull'] as const) {
    test(`${direction} onto a block device (which reports no holes) from a sparse file`, async (t) => {
      const s = server(t);
      if (!s || !needLoop(t)) return;
      const f = await files(t, DEVICE_SIZE);
      if (!f) return;
      const dev = await attachLoop(t, f.dst);
      const want = await readFile(f.src);
      const before = await readFile(dev);
      const [from, to] =
        direction === 'push' ? [f.src, `${s.host}:${dev}`] : [`${s.host}:${f.src}`, dev];
      const r = await copyJson(s, from, to);
      assertSame(await readFile(dev), want);
      assert.equal(r.blocksDiffering, differingBlocks(want, before));
    });
  }
});

test('HELLO reqHash: GMAC HASHES need the session key and no index (whose tables hold SHA-256)', () => {
  const base = { role: 'target', path: '/x', size: 4096, topUnit: 0, encodings: [] };
  const key = '00112233445566778899aabbccddeeff';
  assert.equal(parseHello({ ...base, reqHash: TOP_HASH_GMAC, key }).reqHash, TOP_HASH_GMAC);
  assert.throws(() => parseHello({ ...base, reqHash: TOP_HASH_GMAC }), /key/);
  assert.throws(() => parseHello({ ...base, reqHash: 'sha1', key }), /reqHash/);
  const index = {
    path: 'auto',
    blockSize: 65536,
    blockSizeGiven: false,
    chunkSize: 4 * MiB,
    rebuild: false,
    verifySample: 16,
    full: false,
  };
  assert.throws(() => parseHello({ ...base, reqHash: TOP_HASH_GMAC, key, index }), /reqHash/);
});

test('a unit of zeros hashes by memcmp to what the hash gives, also past the first MiB', () => {
  const gmac = topHasher(Buffer.alloc(16, 7));
  const fast = skippingZeros(gmac);
  const zeros = Buffer.alloc(3 * MiB + 5);
  assert.deepEqual(fast(zeros), gmac(zeros));
  // nonzero bytes only past the first MiB compared: not the hash of zeros
  const late = Buffer.alloc(3 * MiB + 5);
  late[late.length - 1] = 1;
  assert.deepEqual(fast(late), gmac(late));
  assert.notDeepEqual(fast(late), fast(zeros));
  assert.deepEqual(
    unitHashes(late, late.length, MiB, fast),
    unitHashes(late, late.length, MiB, gmac),
  );
});

test("the agent's data map is taken only when whole and in order", () => {
  assert.deepEqual(parseDataMap('0 4096\n8192 20000\nend\n', 16384), [
    { start: 0, end: 4096 },
    { start: 8192, end: 16384 },
  ]);
  assert.deepEqual(parseDataMap('end\n', 16384), []);
  // cut short (no `end`: SEEK_DATA failed otherwise than "no more data"): read everything
  assert.equal(parseDataMap('0 4096\n', 16384), undefined);
  assert.equal(parseDataMap('0 4096\n8192 9000\n', 16384), undefined);
  assert.equal(parseDataMap('8192 9000\n0 4096\nend\n', 16384), undefined);
  assert.equal(parseDataMap('0 4096\n4000 9000\nend\n', 16384), undefined);
  assert.equal(parseDataMap('0 -1\nend\n', 16384), undefined);
  assert.equal(parseDataMap('20000 30000\nend\n', 16384), undefined);
  assert.equal(parseDataMap('', 16384), undefined);
});

test("the agent's data map of a sparse file is where the data is", async (t) => {
  const dir = await tempDir(t);
  const file = join(dir, 'sparse.img');
  await writeSparseFile(file, 8 * MiB, [
    { offset: MiB, data: seededBytes(BS, 1) },
    { offset: 6 * MiB, data: seededBytes(2 * BS, 2) },
  ]);
  if (!(await reportsHoles(file))) return t.skip('this file system does not keep holes');
  const fh = await open(file, 'r');
  try {
    const map = await agentDataMap(fh.fd, 8 * MiB);
    if (map === undefined) return t.skip('no perl here: the agent reads every unit');
    const covered = (at: number): boolean => map.some((r) => r.start <= at && at < r.end);
    assert.ok(covered(MiB) && covered(6 * MiB + 2 * BS - 1));
    assert.ok(!covered(0) && !covered(3 * MiB) && !covered(8 * MiB - 1));
  } finally {
    await fh.close();
  }
});
