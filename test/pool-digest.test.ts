/**
 * io/pool-digest.ts: OpenSSL's digests from Node's own binary, computed on libuv's thread
 * pool through koffi. They must be exactly createHash's, whatever the pieces they are fed in.
 */

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'node:test';
import { poolDigest, poolDigestsAvailable } from '../src/io/pool-digest.js';
import { seededBytes } from './helpers/tmp.js';

test('the functions are found in this Node', () => {
  // where they are not, the scan hashes on its threads instead; CI's Node has them
  assert.equal(poolDigestsAvailable(), true);
});

for (const algorithm of ['sha256', 'sha1', 'sha512', 'md5']) {
  test(`${algorithm}: the same digest as createHash, fed in pieces of any size`, async () => {
    const data = seededBytes(3 * 1024 * 1024 + 17, 3);
    const d = poolDigest(algorithm);
    assert.ok(d !== undefined);
    const cuts = [0, 1, 64, 65, 4096, 1024 * 1024, 3 * 1024 * 1024, data.length];
    for (let k = 1; k < cuts.length; k++) await d.update(data.subarray(cuts[k - 1], cuts[k]));
    assert.equal(d.digest(), createHash(algorithm).update(data).digest('hex'));
  });
}

test('nothing fed: the digest of no bytes', () => {
  const d = poolDigest('sha256');
  assert.ok(d !== undefined);
  assert.equal(d.digest(), createHash('sha256').digest('hex'));
});

test('an algorithm OpenSSL does not know: none, not an error', () => {
  assert.equal(poolDigest('no-such-hash'), undefined);
});

test('a digest freed is not fed again', async () => {
  const d = poolDigest('sha256');
  assert.ok(d !== undefined);
  d.free();
  await assert.rejects(d.update(Buffer.from('late')), /after it was freed/);
  d.free(); // twice is harmless
});
