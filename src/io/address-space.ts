/**
 * Whether this process's address space is limited (`ulimit -v`, RLIMIT_AS). V8 reserves
 * address space it never touches: ~10 GiB of guard regions for each WebAssembly.Memory, and
 * for each worker thread's isolate a code range. Under a limit such a reservation can fail,
 * and for a worker's code range that is a fatal error that aborts the process (`Fatal process
 * OOM in Failed to reserve virtual memory for CodeRange`), not an exception. So under any
 * limit blksync makes no Memory (io/buffer-pool.ts) and starts no worker thread: it hashes
 * on the main thread, slower but whole.
 */

import { readFileSync } from 'node:fs';

let limited: boolean | undefined;

/** True when RLIMIT_AS is set (read once, from /proc/self/limits). */
export function addressSpaceLimited(): boolean {
  if (limited !== undefined) return limited;
  try {
    const soft = /^Max address space\s+(\S+)/m.exec(
      readFileSync('/proc/self/limits', 'latin1'),
    )?.[1];
    limited = soft !== undefined && soft !== 'unlimited';
  } catch {
    limited = false; // no /proc: not Linux
  }
  return limited;
}
