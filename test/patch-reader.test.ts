/**
 * The patch reader against hostile input: hand-made patches with valid CRCs and checksum but
 * fields out of bounds, and a seeded fuzzer that mutates valid patches. Nothing may be
 * written to TARGET, and nothing but a BlksyncError may come out.
 */

import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { test, type TestContext } from 'node:test';
import { crc32, gzipSync } from 'node:zlib';
import { apply } from '../src/engine/apply.js';
import { diff } from '../src/engine/diff.js';
import { BlksyncError } from '../src/errors.js';
import {
  contentHash,
  encodeHeader,
  encodeRecordHeader,
  encodeTrailer,
  HEADER_BYTES,
  PATCH_VERSION,
  RECORD_HEADER_BYTES,
  RECORD_NEW_COMPRESSED,
  TRAILER_BYTES,
  type PatchHeader,
} from '../src/formats/patch.js';
import { describePatch } from '../src/formats/patch-info.js';
import { sha256 } from '../src/hash.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const BS = 4096;
const SIZE = 64 * 1024;

function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
}

/** Recomputes the header CRC, the CRCs of records at `records`, and the trailer checksum. */
function reseal(buf: Buffer, records: number[]): Buffer {
  const out = Buffer.from(buf);
  if (out.length >= HEADER_BYTES) out.writeUInt32LE(crc32(out.subarray(0, 60)), 60);
  for (const at of records) {
    if (at + RECORD_HEADER_BYTES <= out.length - TRAILER_BYTES) {
      out.writeUInt32LE(crc32(out.subarray(at, at + 132)), at + 132);
    }
  }
  if (out.length >= 32) sha256(out, 0, out.length - 32).copy(out, out.length - 32);
  return out;
}

/** Positions of the record headers in a valid patch. */
function recordPositions(buf: Buffer): number[] {
  const out: number[] = [];
  for (let at = HEADER_BYTES; buf.toString('latin1', at, at + 4) === 'REC1';) {
    out.push(at);
    at += RECORD_HEADER_BYTES + buf.readUInt32LE(at + 20) + buf.readUInt32LE(at + 24);
  }
  return out;
}

/** The hash list of nothing: the gap hash of an empty gap. */
const EMPTY_GAP = contentHash(Buffer.alloc(0), BS);

/** A patch assembled from parts, sealed with a correct checksum. */
function build(header: PatchHeader, records: Buffer[], count: number, lastGap = EMPTY_GAP): Buffer {
  const body = Buffer.concat([encodeHeader(header), ...records, encodeTrailer(count, lastGap)]);
  return Buffer.concat([body, sha256(body)]);
}

const HEADER: PatchHeader = {
  version: PATCH_VERSION,
  blockSize: BS,
  // gap pieces of one block: contentHash gives the gap hashes
  gapUnit: BS,
  baseSize: SIZE,
  resultSize: SIZE,
  reversible: false,
  compression: 'none',
};

async function fixture(t: TestContext): Promise<{
  dir: string;
  target: string;
  base: Buffer;
  patches: Buffer[];
}> {
  const dir = await tempDir(t);
  const base = seededBytes(SIZE, 1);
  const next = Buffer.from(base);
  next.fill(7, 100, 5000);
  next.fill(8, 20_000, 21_000);
  next.fill(9, 40_000, 50_000);
  const target = join(dir, 'target.img');
  await writeFile(join(dir, 'base.img'), base);
  await writeFile(join(dir, 'new.img'), next);
  await writeFile(target, base);
  const patches: Buffer[] = [];
  for (const [i, opts] of [
    {},
    { reversible: true },
    { compress: 'gzip' as const, reversible: true },
  ].entries()) {
    const p = join(dir, `p${i}.bsp`);
    await diff(join(dir, 'base.img'), join(dir, 'new.img'), p, opts);
    patches.push(await readFile(p));
  }
  return { dir, target, base, patches };
}

async function refused(patch: Buffer, target: string, base: Buffer, code?: string): Promise<void> {
  await assert.rejects(apply(Readable.from([patch]), target), (err: unknown) => {
    assert.ok(err instanceof BlksyncError, `not a BlksyncError: ${String(err)}`);
    if (code !== undefined) assert.equal(err.code, code, err.message);
    return true;
  });
  assert.ok((await readFile(target)).equals(base), 'TARGET was written');
}

test('hostile patches with valid checksums are refused without writing', async (t) => {
  const { target, base } = await fixture(t);
  const data = base.subarray(0, BS);
  const h = contentHash(data, BS);
  const rec = (over: Partial<Parameters<typeof encodeRecordHeader>[0]>, payload = data): Buffer =>
    Buffer.concat([
      encodeRecordHeader({
        offset: 0,
        length: BS,
        flags: 0,
        newStored: payload.length,
        oldStored: 0,
        head: 0,
        tail: 0,
        oldHash: h,
        newHash: contentHash(payload, BS),
        gapHash: EMPTY_GAP,
        ...over,
      }),
      payload,
    ]);
  const cases: [string, Buffer, string][] = [
    ['offset past the end', build(HEADER, [rec({ offset: SIZE })], 1), 'EPATCH_FORMAT'],
    ['offset near 2^53', build(HEADER, [rec({ offset: 2 ** 52 })], 1), 'EPATCH_FORMAT'],
    ['huge length', build(HEADER, [rec({ length: 0xffff_f000 })], 1), 'EPATCH_FORMAT'],
    ['zero length', build(HEADER, [rec({ length: 0 })], 1), 'EPATCH_FORMAT'],
    ['unaligned offset', build(HEADER, [rec({ offset: 100 })], 1), 'EPATCH_FORMAT'],
    ['stored longer than content', build(HEADER, [rec({ newStored: BS + 1 })], 1), 'EPATCH_FORMAT'],
    ['too few records counted', build(HEADER, [rec({})], 0), 'EPATCH_CHECKSUM'],
    ['too many records counted', build(HEADER, [rec({})], 5), 'EPATCH_CHECKSUM'],
    [
      'overlapping records',
      build(HEADER, [rec({ offset: BS }), rec({ offset: 0 })], 2),
      'EPATCH_FORMAT',
    ],
    [
      'payload not matching its hash',
      build(HEADER, [rec({ newHash: Buffer.alloc(32) })], 1),
      'EPATCH_CHECKSUM',
    ],
    [
      'compressed flag without compression',
      build(HEADER, [rec({ flags: RECORD_NEW_COMPRESSED })], 1),
      'EPATCH_FORMAT',
    ],
    [
      'old payload in a forward-only patch',
      build(HEADER, [rec({ oldStored: 10 })], 1),
      'EPATCH_FORMAT',
    ],
    [
      'huge sizes',
      build({ ...HEADER, baseSize: 2 ** 53, resultSize: 2 ** 53 }, [], 0),
      'EPATCH_FORMAT',
    ],
    ['bad block size', build({ ...HEADER, blockSize: 1000 }, [], 0), 'EPATCH_FORMAT'],
    ['gap unit 0', build({ ...HEADER, gapUnit: 0 }, [], 0), 'EPATCH_FORMAT'],
    ['gap unit not a power of two', build({ ...HEADER, gapUnit: 3 * BS }, [], 0), 'EPATCH_FORMAT'],
    [
      'gap unit below the block size',
      build({ ...HEADER, gapUnit: BS / 2 }, [], 0),
      'EPATCH_FORMAT',
    ],
    ['gap unit too large', build({ ...HEADER, gapUnit: 2 ** 31 }, [], 0), 'EPATCH_FORMAT'],
    ['trailer missing', encodeHeader(HEADER), 'EPATCH_TRUNCATED'],
    [
      'not a patch',
      Buffer.from('hello world, this is not a patch at all '.repeat(4)),
      'EPATCH_FORMAT',
    ],
    ['empty', Buffer.alloc(0), 'EPATCH_TRUNCATED'],
  ];
  const gz = { ...HEADER, compression: 'gzip' as const };
  // a "gzip bomb": a small payload that inflates to far more than the record declares
  const bomb = gzipSync(Buffer.alloc(3 * 1024 * 1024), { level: 9 });
  assert.ok(bomb.length <= BS);
  cases.push([
    'gzip bomb',
    build(gz, [rec({ flags: RECORD_NEW_COMPRESSED, newStored: bomb.length, newHash: h }, bomb)], 1),
    'EPATCH_CHECKSUM',
  ]);
  const version = build(HEADER, [], 0);
  version.writeUInt16LE(PATCH_VERSION + 1, 8);
  cases.push(['unknown version', reseal(version, []), 'EPATCH_FORMAT']);
  // the gap hashes: wrong ones are a TARGET that is not the base; a gap past the smaller
  // image's end is no gap (unchanged bytes both images have)
  const rest = contentHash(base.subarray(BS), BS);
  cases.push(
    ['a gap hash TARGET does not match', build(HEADER, [rec({ offset: BS })], 1), 'EBASE_MISMATCH'],
    ['a last gap hash TARGET does not match', build(HEADER, [rec({})], 1), 'EBASE_MISMATCH'],
    [
      'a gap past the base',
      build(
        { ...HEADER, resultSize: SIZE + 4 * BS },
        [rec({ offset: SIZE + BS, gapHash: contentHash(base, BS) })],
        1,
      ),
      'EPATCH_FORMAT',
    ],
    [
      'a gap past the result',
      build(
        { ...HEADER, baseSize: SIZE + 4 * BS },
        [rec({ offset: SIZE + BS, gapHash: contentHash(base, BS) })],
        1,
      ),
      'EPATCH_FORMAT',
    ],
  );
  // sealed with the right gap hashes, the same records apply
  await t.test('hand-made patch with the right gap hashes applies', async () => {
    await apply(Readable.from([build(HEADER, [rec({})], 1, rest)]), target);
    assert.ok((await readFile(target)).equals(base));
  });
  for (const [name, patch, code] of cases) {
    await t.test(name, () => refused(patch, target, base, code));
  }
});

test('wrong record count in the file path too, and info refuses the same', async (t) => {
  const { dir, target, base } = await fixture(t);
  const p = join(dir, 'bad.bsp');
  await writeFile(p, build(HEADER, [], 3));
  await assert.rejects(apply(p, target), { code: 'EPATCH_CHECKSUM' });
  await assert.rejects(describePatch(p), { code: 'EPATCH_CHECKSUM' });
  assert.ok((await readFile(target)).equals(base));
});

test('fuzz: thousands of mutated patches never write and only throw BlksyncError', async (t) => {
  const { dir, target, base, patches } = await fixture(t);
  const r = rng(20261122);
  const started = Date.now();
  const asFile = join(dir, 'fuzz.bsp');
  let cases = 0;
  let resealedAccepted = 0;
  for (; cases < 2000 && Date.now() - started < 15_000; cases++) {
    const good = patches[cases % patches.length]!;
    const positions = recordPositions(good);
    let m: Buffer = Buffer.from(good);
    const kind = Math.floor(r() * 6);
    const at = Math.floor(r() * m.length);
    if (kind === 0) m[at] = m[at]! ^ (1 << Math.floor(r() * 8));
    else if (kind === 1) m[at] = Math.floor(r() * 256);
    else if (kind === 2) m = m.subarray(0, at);
    else if (kind === 3)
      m = Buffer.concat([m.subarray(0, at), m.subarray(at + 1 + Math.floor(r() * 200))]);
    else if (kind === 4)
      m = Buffer.concat([
        m.subarray(0, at),
        seededBytes(1 + Math.floor(r() * 50), cases),
        m.subarray(at),
      ]);
    else {
      // a field rewritten with an extreme value, then resealed so the deeper checks run
      const fields = [8, 16, 20, 24, 28, 32, 100, 128];
      const rec = positions[Math.floor(r() * positions.length)] ?? HEADER_BYTES;
      const field = rec + fields[Math.floor(r() * fields.length)]!;
      const values = [0, 1, BS - 1, 0x7fff_ffff, 0xffff_ffff, Math.floor(r() * 2 ** 32)];
      m.writeUInt32LE(values[Math.floor(r() * values.length)]!, field);
    }
    const resealed = kind === 5 || (kind <= 1 && r() < 0.5);
    if (resealed) m = reseal(m, positions);
    if (m.equals(good)) continue;
    const viaFile = r() < 0.3;
    if (viaFile) await writeFile(asFile, m);
    try {
      await apply(viaFile ? asFile : Readable.from([m]), target);
      // only a resealed patch can still be valid (e.g. a flipped bit in a reserved-free field)
      assert.ok(resealed, `case ${cases}: an unsealed mutation was accepted`);
      resealedAccepted++;
      await writeFile(target, base);
      continue;
    } catch (err) {
      assert.ok(err instanceof BlksyncError, `case ${cases}: threw ${String(err)}`);
    }
    assert.ok((await readFile(target)).equals(base), `case ${cases}: TARGET was written`);
  }
  assert.ok(cases >= 500, `only ${cases} cases ran`);
  t.diagnostic(`${cases} mutated patches, ${resealedAccepted} resealed ones still valid`);
});
