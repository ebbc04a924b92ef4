/**
 * Limits that bound what an untrusted peer (a web server, an ssh agent) can cost us, with
 * their defaults in one place.
 */

import { BlksyncError } from './errors.js';

/**
 * Default `timeout` (`--timeout`), in seconds: the longest a peer may stay silent while
 * something is asked of it (an answer's headers, the next bytes of a body the reader wants).
 * Idle time, not total time: a slow but live peer never trips it.
 */
export const DEFAULT_TIMEOUT_S = 60;

/** Largest `timeout` accepted, in seconds (a day: longer is a hang by another name). */
export const MAX_TIMEOUT_S = 24 * 60 * 60;

/** Validates a `timeout` option (seconds; undefined: the default) and returns milliseconds. */
export function timeoutMs(seconds: number | undefined): number {
  const s = seconds ?? DEFAULT_TIMEOUT_S;
  if (!Number.isFinite(s) || s <= 0 || s > MAX_TIMEOUT_S) {
    throw new BlksyncError(
      'EUSAGE',
      `invalid timeout ${String(seconds)}: give a number of seconds above 0 and at most ${MAX_TIMEOUT_S}`,
    );
  }
  return Math.ceil(s * 1000);
}

/** Parses `--timeout SECONDS` ("60", "0.5"). */
export function parseTimeout(text: string): number {
  const s = /^\s*\d+(?:\.\d+)?\s*$/.test(text) ? Number(text) : NaN;
  if (Number.isNaN(s)) {
    throw new BlksyncError('EUSAGE', `invalid --timeout "${text}": give a number of seconds`);
  }
  timeoutMs(s);
  return s;
}
