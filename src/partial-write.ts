/**
 * A failure after DST's first write says so: what was written, and that a rerun converges.
 * Every operation that writes DST in place (copy, pull) turns its errors through this, so the
 * user never has to guess whether DST is untouched, finished or in between.
 */

import { BlksyncError } from './errors.js';
import { formatBytes } from './size.js';

/** What a failed run had done to DST when it failed (the JSON error object carries it). */
export interface PartialWrite {
  destination: string;
  bytesWritten: number;
  [field: string]: unknown;
}

/**
 * `err` with the partial-write sentence appended and `partial` attached; the code is kept, so
 * callers still switch on ESRC_SHORT, EWRITE, ... An error that already carries a partial
 * result (EINTERRUPTED), or a run that wrote nothing, is returned as it is.
 */
export function partlyWritten(
  err: unknown,
  partial: PartialWrite,
  options: { allWritten?: boolean } = {},
): unknown {
  if (!(err instanceof BlksyncError) || err.partial !== undefined) return err;
  if (partial.bytesWritten <= 0) return err;
  // allWritten: the failure came after every differing block was written (index, verify)
  const state =
    options.allWritten === true
      ? `was written (${formatBytes(partial.bytesWritten)}) before the failure`
      : `was partly written (${formatBytes(partial.bytesWritten)} written before the failure, the rest as it was)`;
  const message =
    `${err.message}; ${partial.destination} ${state}: ` +
    'rerun the same command once the cause is fixed, it writes only what still differs and converges';
  const wrapped = new BlksyncError(err.code, message, {
    cause: err.cause ?? err,
    ...(err.path !== undefined ? { path: err.path } : {}),
    ...(err.syscall !== undefined ? { syscall: err.syscall } : {}),
    partial,
  });
  // --debug shows where it failed, not where the sentence was added
  if (err.stack !== undefined) wrapped.stack = err.stack;
  return wrapped;
}
