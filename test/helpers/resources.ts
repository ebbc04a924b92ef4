/**
 * Test resources that may be missing on a machine (root, loop devices, sshd, bmaptool).
 * A test that cannot get one skips with the reason; under BLKSYNC_TEST_STRICT=1 (CI) the
 * skip becomes a failure, so CI never passes by skipping.
 */

import type { TestContext } from 'node:test';

export const STRICT = process.env.BLKSYNC_TEST_STRICT === '1';

/** Returns true when the resource is there; otherwise skips (or fails under strict) and returns false. */
export function need(t: TestContext, available: boolean, reason: string): boolean {
  if (available) return true;
  if (STRICT) throw new Error(`required test resource missing (BLKSYNC_TEST_STRICT=1): ${reason}`);
  t.skip(reason);
  return false;
}

export const IS_ROOT = process.getuid?.() === 0;
