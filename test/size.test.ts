import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BlksyncError } from '../src/errors.js';
import { formatBytes, parseSize } from '../src/size.js';

test('parseSize follows dd: K = 1024, KB = 1000', () => {
  assert.equal(parseSize('4096'), 4096);
  assert.equal(parseSize('4K'), 4096);
  assert.equal(parseSize('64KiB'), 65536);
  assert.equal(parseSize('1M'), 1048576);
  assert.equal(parseSize('1MB'), 1_000_000);
  assert.equal(parseSize('2g'), 2 * 1024 ** 3);
});

test('parseSize rejects junk with EUSAGE', () => {
  for (const bad of ['', 'K', '4X', '-1', '1.5M', '99999999999999999999']) {
    assert.throws(
      () => parseSize(bad),
      (e: unknown) => e instanceof BlksyncError && e.code === 'EUSAGE',
      bad,
    );
  }
});

test('formatBytes', () => {
  assert.equal(formatBytes(0), '0 B');
  assert.equal(formatBytes(1536), '1.50 KiB');
  assert.equal(formatBytes(1024 ** 3), '1.00 GiB');
});
