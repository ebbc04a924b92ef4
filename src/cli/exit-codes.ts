/** Exit statuses, documented in the README. */

import type { ErrorCode } from '../errors.js';

export const EXIT_OK = 0;
/** A runtime error (anything not below). */
export const EXIT_ERROR = 1;
/** Bad arguments or options. */
export const EXIT_USAGE = 2;
/** Interrupted by SIGINT (128 + 2) or SIGTERM (128 + 15). */
export const EXIT_SIGINT = 130;
export const EXIT_SIGTERM = 143;

export function exitCodeFor(code: ErrorCode): number {
  return code === 'EUSAGE' ? EXIT_USAGE : EXIT_ERROR;
}
