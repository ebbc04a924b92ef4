/**
 * The agent: the far end of a remote copy, started by blksync over ssh as `node -e <bootstrap>`
 * (see bootstrap.ts) and bundled by esbuild into one CommonJS file. It speaks the protocol in
 * protocol.ts on stdin/stdout and opens files through io/open.ts, so a remote refusal
 * (missing, not permitted, mounted, too small) carries the code a local run would give.
 *
 * State machine:
 *
 *   start ──HELLO──► ready ──DONE──► done ──stdin end──► exit
 *     │                │
 *     └── any other ───┴── bad frame, bad range, I/O error ──► ERROR frame, exit
 *
 * Frames are handled one at a time in arrival order, so replies come back in request order
 * and a write is never reordered with a hash of the same range. The TOP_HASHES stream runs
 * beside that queue. After an error nothing further is read or written.
 *
 * This file is the loop; each frame type has its handler: HELLO in open-end.ts, HASH_REQ,
 * DATA and DATA_REQ in requests.ts, DONE in done.ts. The session's state is session.ts.
 */

import { holdTrace, trace } from '../../trace.js';
import { FrameDecoder, FrameType, ProtocolError, type Frame } from '../protocol.js';
import { done } from './done.js';
import { hello } from './open-end.js';
import { dataRequest, dataWrite, hashRequest } from './requests.js';
import { AgentSession } from './session.js';

/** Frames queued before stdin is paused. */
const QUEUE_HIGH_WATER = 32;

export interface AgentStreams {
  input: NodeJS.ReadableStream;
  output: NodeJS.WritableStream;
  /** The agent bundle as the bootstrap received it (length prefix included). */
  payload?: Buffer | undefined;
  /** Where trace lines go when HELLO asks for a trace (the agent's stderr). */
  trace?: ((line: string) => void) | undefined;
}

/** Hands one frame to its handler. */
async function handle(s: AgentSession, f: Frame): Promise<void> {
  const p = f.payload;
  const o = s.opened;
  if (o === undefined) {
    if (f.type !== FrameType.HELLO) throw new ProtocolError(`frame type ${f.type} before HELLO`);
    await hello(s, p);
    return;
  }
  if (s.done) throw new ProtocolError(`frame type ${f.type} after DONE`);
  // a --direct source runs the copy itself: blksync only says when to finish
  if (s.direct !== undefined && f.type !== FrameType.DONE) {
    throw new ProtocolError(`frame type ${f.type} to an agent running a direct copy`);
  }
  switch (f.type) {
    case FrameType.HASH_REQ:
      return hashRequest(s, o, p);
    case FrameType.DATA:
      return dataWrite(s, o, p);
    case FrameType.DATA_REQ:
      return dataRequest(s, o, p);
    case FrameType.DONE:
      return done(s, o, p);
    default:
      throw new ProtocolError(`unexpected frame type ${f.type}`);
  }
}

/** Runs the agent until stdin ends or an error; resolves with the exit status. */
export async function runAgent(streams: AgentStreams, initial?: Buffer): Promise<number> {
  const { input, output } = streams;
  const s = new AgentSession(output, streams.payload, streams.trace);
  const decoder = new FrameDecoder();
  const queue = s.queue;
  let wake: (() => void) | undefined;
  let ended = false;

  const onData = (chunk: Buffer): void => {
    if (s.failed) return;
    try {
      for (const f of decoder.push(chunk)) queue.push(f);
    } catch (err) {
      void s.fail(err);
    }
    if (queue.length >= QUEUE_HIGH_WATER) input.pause();
    wake?.();
  };

  input.on('data', onData);
  input.on('end', () => {
    ended = true;
    // even while DONE waits for it: blksync is gone, nobody will read the summary
    s.direct?.abort();
    wake?.();
  });
  input.on('error', () => {
    ended = true;
    wake?.();
  });
  if (initial !== undefined && initial.length > 0) onData(initial);
  input.resume();

  while (!s.failed) {
    const f = queue.shift();
    if (f === undefined) {
      if (ended) break;
      await new Promise<void>((resolve) => (wake = resolve));
      wake = undefined;
      continue;
    }
    if (queue.length < QUEUE_HIGH_WATER / 2) input.resume();
    try {
      await handle(s, f);
    } catch (err) {
      await s.fail(err);
    }
  }
  input.removeListener('data', onData);
  s.stopKeepalive();
  // blksync went away (or a frame was refused) during a direct copy: stop it; the other
  // host's agent syncs what it wrote
  s.direct?.abort();
  await s.directRun?.catch(() => {});
  await s.direct?.close().catch(() => {});
  // make what was written durable, whether the link dropped or a frame was refused
  await s.opened?.sink?.finish().catch(() => {});
  // an index marked in progress vouches again for what lies outside its marked range
  await s.index?.settle().catch(() => {});
  await s.opened?.fh?.close().catch(() => {});
  await s.flushed();
  trace('agent exits');
  return s.failed ? 1 : 0;
}

/**
 * The bundle's entry: called by the bootstrap with the bytes it read past the agent code, and
 * the agent code as it was sent (for --direct, where this agent starts another).
 */
export function main(rest: Buffer, payload?: Buffer): void {
  // held until HELLO says whether a trace is wanted; performance.now() counts from node's start
  holdTrace('agent');
  trace('agent running (node started, bundle received and loaded)');
  const stderr = (line: string): void => void process.stderr.write(line);
  void runAgent(
    { input: process.stdin, output: process.stdout, payload, trace: stderr },
    rest,
  ).then((code) => {
    process.stdout.end(() => process.exit(code));
  });
}
