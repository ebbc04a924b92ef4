/** Unit tests of src/ranges.ts: the list that merges differing ranges as the pipeline finds them. */

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { RangeList } from '../src/ranges.js';

function listOf(pairs: [number, number][], options?: { gap?: number; limit?: number }): RangeList {
  const list = new RangeList(options);
  for (const [s, e] of pairs) list.add(s, e);
  return list;
}

test('an empty list has no ranges, no bytes and is not truncated', () => {
  const list = new RangeList();
  assert.deepEqual(list.ranges, []);
  assert.equal(list.count, 0);
  assert.equal(list.bytes, 0);
  assert.equal(list.truncated, false);
});

test('empty and reversed ranges are ignored', () => {
  const list = listOf([
    [5, 5],
    [9, 3],
  ]);
  assert.deepEqual(list.ranges, []);
  assert.equal(list.count, 0);
  assert.equal(list.bytes, 0);
});

test('ranges that touch merge into one; ranges apart stay apart', () => {
  const list = listOf([
    [0, 10],
    [10, 20],
    [21, 30],
  ]);
  assert.deepEqual(list.ranges, [
    { start: 0, end: 20 },
    { start: 21, end: 30 },
  ]);
  assert.equal(list.count, 2);
  assert.equal(list.bytes, 29);
});

test('an overlapping or contained range extends the last one and counts its bytes once', () => {
  const list = listOf([
    [0, 10],
    [5, 8],
    [5, 15],
    [0, 15],
  ]);
  assert.deepEqual(list.ranges, [{ start: 0, end: 15 }]);
  assert.equal(list.count, 1);
  assert.equal(list.bytes, 15);
});

test('with a gap, ranges less than gap bytes apart merge; the bytes count only what was added', () => {
  const list = listOf(
    [
      [0, 10],
      [14, 20], // 4 apart: merged
      [24, 30], // exactly 4 apart: merged
      [35, 40], // 5 apart: a new range
    ],
    { gap: 4 },
  );
  assert.deepEqual(list.ranges, [
    { start: 0, end: 30 },
    { start: 35, end: 40 },
  ]);
  assert.equal(list.count, 2);
  assert.equal(list.bytes, 10 + 6 + 6 + 5);
});

test('past the limit, ranges are counted but not kept, and the list says it is truncated', () => {
  const pairs: [number, number][] = [];
  for (let i = 0; i < 10; i++) pairs.push([i * 100, i * 100 + 10]);
  const list = listOf(pairs, { limit: 3 });
  assert.deepEqual(list.ranges, [
    { start: 0, end: 10 },
    { start: 100, end: 110 },
    { start: 200, end: 210 },
  ]);
  assert.equal(list.count, 10);
  assert.equal(list.bytes, 100);
  assert.equal(list.truncated, true);
});

test('a range past the limit still merges with its neighbour before being counted', () => {
  const list = listOf(
    [
      [0, 10],
      [20, 30],
      [30, 40], // touches the unkept [20, 30): one range, not two
      [50, 60],
    ],
    { limit: 1 },
  );
  assert.deepEqual(list.ranges, [{ start: 0, end: 10 }]);
  assert.equal(list.count, 3);
  assert.equal(list.bytes, 40);
  assert.equal(list.truncated, true);
});

test('at exactly the limit the list is not truncated', () => {
  const list = listOf(
    [
      [0, 1],
      [2, 3],
    ],
    { limit: 2 },
  );
  assert.equal(list.count, 2);
  assert.equal(list.truncated, false);
});

test('offsets past 4 GiB and up to 2^53 stay exact', () => {
  const big = 2 ** 40;
  const list = listOf([
    [big, big + 4096],
    [big + 4096, big + 8192],
    [Number.MAX_SAFE_INTEGER - 10, Number.MAX_SAFE_INTEGER],
  ]);
  assert.deepEqual(list.ranges, [
    { start: big, end: big + 8192 },
    { start: Number.MAX_SAFE_INTEGER - 10, end: Number.MAX_SAFE_INTEGER },
  ]);
  assert.equal(list.bytes, 8192 + 10);
});
