/**
 * An opt-in timeline of a run (`BLKSYNC_TRACE=1`): one line per phase, so where the time of a
 * remote copy goes (ssh login, the agent's start, hashing each end, the compare, the writes)
 * can be read off instead of guessed. Off unless the CLI (or the agent, asked by HELLO's
 * `trace`) installs a writer; then each `trace(event)` is one line
 *
 *   blksync-trace <epoch ms> <ms since this process started> <who> <event>
 *
 * The epoch time lets the local end put an agent's lines (which come back on ssh's stderr)
 * on its own timeline: exact when both run on one machine, off by the clocks' difference
 * otherwise. A trace point costs one branch when tracing is off.
 */

/** The first word of every trace line. */
export const TRACE_PREFIX = 'blksync-trace';

let writer: ((line: string) => void) | undefined;
let who = 'local';
/** Lines traced before a writer is known (the agent learns it from HELLO). */
let held: string[] | undefined;
/** Events already traced once (for `traceOnce`). */
const seen = new Set<string>();

function line(event: string): string {
  const now = performance.now();
  return `${TRACE_PREFIX} ${(performance.timeOrigin + now).toFixed(1)} ${now.toFixed(1)} ${who} ${event}\n`;
}

/** Starts tracing: each line goes to `write`, lines held so far first. */
export function startTrace(write: (line: string) => void, name?: string): void {
  writer = write;
  if (name !== undefined) who = name;
  for (const l of held ?? []) write(l);
  held = undefined;
}

/** Keeps trace lines until startTrace or dropTrace decides (the agent before HELLO). */
export function holdTrace(name: string): void {
  who = name;
  held = [];
}

/** Forgets held lines: no trace was asked for. */
export function dropTrace(): void {
  held = undefined;
}

/** Whether a timeline is being written (a remote end is then asked for its own). */
export function tracing(): boolean {
  return writer !== undefined;
}

/** Records that `event` happened now. */
export function trace(event: string): void {
  if (writer !== undefined) writer(line(event));
  else held?.push(line(event));
}

/** Records `event` the first time it happens only (the first frame of a stream). */
export function traceOnce(event: string): void {
  if ((writer === undefined && held === undefined) || seen.has(event)) return;
  seen.add(event);
  trace(event);
}

/** Passes on a trace line another process wrote (an agent's, read from ssh's stderr). */
export function relayTrace(l: string): void {
  writer?.(l.endsWith('\n') ? l : `${l}\n`);
}
