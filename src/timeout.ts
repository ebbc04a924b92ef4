/**
 * `--timeout SECONDS`: how long a peer (an ssh agent, a web server) may stay silent while
 * blksync waits for it. Idle time, not total time: a slow but live peer keeps the clock at
 * zero by sending something (the agent's KEEPALIVE). Shared by every command with a peer.
 */

import { BlksyncError } from './errors.js';

/** --timeout's default, in seconds. */
export const DEFAULT_TIMEOUT_SECONDS = 60;

/** Parses --timeout: seconds, 0 or more (0: wait for ever). */
export function parseTimeout(text: string): number {
  const n = Number(text);
  if (text.trim() === '' || !Number.isFinite(n) || n < 0) {
    throw new BlksyncError('EUSAGE', `--timeout ${text}: give a number of seconds, 0 or more`);
  }
  return n;
}
