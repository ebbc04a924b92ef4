/**
 * apply's reports of what it did when a check between the records (patch format 2) stops it:
 * a stream applied in batches may have written earlier batches, a dry run never writes, and
 * --force is not --records-only; and patches whose records and gaps leave part of the result
 * undescribed.
 */

import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import { apply } from '../src/engine/apply.js';
import { diff } from '../src/engine/diff.js';
import { BlksyncError } from '../src/errors.js';
import {
  contentHash,
  encodeHeader,
  encodeTrailer,
  PATCH_VERSION,
  type PatchHeader,
} from '../src/formats/patch.js';
import { sha256 } from '../src/hash.js';
import { runCli } from './helpers/cli.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const MIB = 1024 * 1024;

/** BASE of 8 MiB, NEW with a byte changed every `stride` bytes; TARGET a copy of BASE. */
async function spread(
  t: Parameters<typeof tempDir>[0],
  stride: number,
): Promise<{
  patch: string;
  target: string;
  base: Buffer;
  next: Buffer;
}> {
  const dir = await tempDir(t);
  const base = seededBytes(8 * MIB, 5150);
  const next = Buffer.from(base);
  for (let o = 0; o < base.length; o += stride) next[o + 100] = next[o + 100]! ^ 0xff;
  const [b, n, target, patch] = ['base.img', 'new.img', 'target.img', 'p.bsp'].map((f) =>
    join(dir, f),
  );
  await writeFile(b!, base);
  await writeFile(n!, next);
  await writeFile(target!, base);
  await diff(b!, n!, patch!);
  return { patch: patch!, target: target!, base, next };
}

test('a stream interrupted while a later batch checks TARGET says what earlier batches wrote', async (t) => {
  // gaps of 2 MiB: more than one chunk each, so the check of one is interrupted inside it
  const p = await spread(t, 2 * MIB);
  const ac = new AbortController();
  let wrote = false;
  const err: unknown = await apply(Readable.from([await readFile(p.patch)]), p.target, {
    batchBytes: 4096,
    signal: ac.signal,
    onProgress: (pr) => {
      if (pr.phase === undefined && pr.bytesWritten > 0) wrote = true;
      if (pr.phase === 'checking TARGET' && wrote) ac.abort();
    },
  }).then(
    () => assert.fail('the apply must be interrupted'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof BlksyncError, String(err));
  assert.equal(err.code, 'EINTERRUPTED', err.message);
  const now = await readFile(p.target);
  assert.ok(!now.equals(p.base), 'earlier batches were written');
  assert.doesNotMatch(err.message, /nothing was written/);
  assert.match(err.message, /records, .* were written/);
  const partial = err.partial as { recordsWritten: number } | undefined;
  assert.ok(partial !== undefined && partial.recordsWritten > 0, 'the partial result is carried');
  // the rerun finishes it
  await apply(Readable.from([await readFile(p.patch)]), p.target, { batchBytes: 4096 });
  assert.deepEqual(await readFile(p.target), p.next);
});

test('a dry run from a stream stopped by a later batch says nothing was written', async (t) => {
  const p = await spread(t, 64 * 1024);
  const target = Buffer.from(p.base);
  target[6 * MIB + 9000] = target[6 * MIB + 9000]! ^ 0x10; // between two records, late
  await writeFile(p.target, target);
  const err: unknown = await apply(Readable.from([await readFile(p.patch)]), p.target, {
    batchBytes: 256 * 1024,
    dryRun: true,
  }).then(
    () => assert.fail('the dry run must find the other bytes'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof BlksyncError, String(err));
  assert.equal(err.code, 'EBASE_MISMATCH', err.message);
  assert.doesNotMatch(err.message, /were written/);
  assert.match(err.message, /nothing was written/);
  assert.deepEqual(await readFile(p.target), target);
  // a record that finds other content in a later batch: the same
  target[6 * MIB + 9000] = p.base[6 * MIB + 9000]!;
  target[6 * MIB + 100] = target[6 * MIB + 100]! ^ 0x10;
  await writeFile(p.target, target);
  const err2: unknown = await apply(Readable.from([await readFile(p.patch)]), p.target, {
    batchBytes: 256 * 1024,
    dryRun: true,
  }).then(
    () => assert.fail('the dry run must find the other content'),
    (e: unknown) => e,
  );
  assert.ok(err2 instanceof BlksyncError, String(err2));
  assert.equal(err2.code, 'EBASE_MISMATCH', err2.message);
  assert.doesNotMatch(err2.message, /were written/);
});

test('apply --force says the bytes between the records were not checked, and does not blame --records-only', async (t) => {
  const p = await spread(t, 2 * MIB);
  const r = await runCli(['apply', '--force', p.patch, p.target]);
  assert.equal(r.code, 0, r.stderr);
  assert.doesNotMatch(r.stdout + r.stderr, /records-only/);
  assert.match(r.stdout + r.stderr, /not checked between the records \(--force\)/);
  assert.deepEqual(await readFile(p.target), p.next);
});

/** A version 2 patch of `records` (already encoded), sealed with a correct SHA-256. */
function sealed(header: PatchHeader, records: Buffer[], count: number, lastGap: Buffer): Buffer {
  const body = Buffer.concat([encodeHeader(header), ...records, encodeTrailer(count, lastGap)]);
  return Buffer.concat([body, sha256(body)]);
}

test('a patch whose records stop before the result ends (or, reversible, the base) is refused', async (t) => {
  const dir = await tempDir(t);
  const bs = 4096;
  const base = seededBytes(16 * bs, 99);
  const target = join(dir, 'target.img');
  const patch = join(dir, 'p.bsp');
  const header: PatchHeader = {
    version: PATCH_VERSION,
    blockSize: bs,
    gapUnit: bs,
    baseSize: base.length,
    resultSize: base.length,
    reversible: false,
    compression: 'none',
  };
  // no records: the base's bytes, then bytes nothing describes (TARGET grown with zeros, or a
  // device's old bytes there called "the result")
  const cases: [string, Buffer, boolean][] = [
    [
      'a larger result without records',
      sealed({ ...header, resultSize: 2 * base.length }, [], 0, contentHash(base, bs)),
      false,
    ],
    [
      'a reversible patch to a smaller result without the rest of the base',
      sealed(
        { ...header, resultSize: base.length / 2, reversible: true },
        [],
        0,
        contentHash(base.subarray(0, base.length / 2), bs),
      ),
      true,
    ],
  ];
  for (const [what, bytes, reversible] of cases) {
    await writeFile(patch, bytes);
    for (const reverse of reversible ? [false, true] : [false]) {
      await writeFile(target, base);
      const err: unknown = await apply(patch, target, { reverse }).then(
        () => assert.fail(`${what} must be refused`),
        (e: unknown) => e,
      );
      assert.ok(err instanceof BlksyncError, String(err));
      assert.equal(err.code, 'EPATCH_FORMAT', `${what}: ${err.message}`);
      assert.deepEqual(await readFile(target), base, `${what}: TARGET written`);
    }
  }
  // records and gaps that do reach the end are taken: one of the same size without records
  await writeFile(patch, sealed(header, [], 0, contentHash(base, bs)));
  await writeFile(target, base);
  assert.equal((await apply(patch, target)).alreadyApplied, true);
});
