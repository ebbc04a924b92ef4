/** Assertions on blksync's errors, shared by the test files. */

import assert from 'node:assert/strict';
import { stat } from 'node:fs/promises';
import { BlksyncError } from '../../src/errors.js';

/** A predicate for assert.rejects: a BlksyncError with `code` (and a message matching `text`). */
export function isBlksyncError(code: string, text?: RegExp): (err: unknown) => boolean {
  return (err: unknown): boolean => {
    assert.ok(err instanceof BlksyncError, `not a BlksyncError: ${String(err)}`);
    assert.equal(err.code, code, err.message);
    if (text !== undefined) assert.match(err.message, text);
    return true;
  };
}

/** Awaits `p`, which must reject with a BlksyncError of `code` (and a message matching `text`). */
export async function rejectsWith(p: Promise<unknown>, code: string, text?: RegExp): Promise<void> {
  await assert.rejects(p, isBlksyncError(code, text));
}

/** Asserts that nothing exists at `path` (a refused run created nothing). */
export async function absent(path: string): Promise<void> {
  await assert.rejects(stat(path), { code: 'ENOENT' }, `${path} was created`);
}
