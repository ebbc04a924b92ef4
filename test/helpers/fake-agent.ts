/**
 * A hostile or broken agent for tests, run as blksync's `--ssh` command
 * (`--ssh 'node --import tsx fake-agent.ts SCENARIO'`): it ignores the ssh arguments blksync
 * appends, reads the agent bundle and the HELLO from stdin as the bootstrap would, and then
 * speaks real frames on stdout as SCENARIO says:
 *
 *   ready:JSON        sends READY with this payload (as given, valid or not), then is silent
 *   error:JSON        sends ERROR with this payload, then is silent
 *   silent            sends READY, then nothing
 *   mute              sends nothing at all
 *   flood-top         sends READY, then TOP_HASHES nobody asked for, without end
 *   flood-readback    sends READY, then READ_BACK records nobody asked for, without end
 *   empty-data        sends READY (a 1 MiB source), answers DATA_REQ with empty DATA, without end
 *   proxy-keepalive   runs the real agent and passes its frames on, but holds SUMMARY back
 *                     for HOLD_MS, sending KEEPALIVE meanwhile (a slow but live agent)
 *   proxy-stall       the same without the KEEPALIVEs (an agent stuck at the end)
 *
 * It exits when blksync closes its stdin or stops reading its stdout.
 */

import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { BOOTSTRAP } from '../../src/remote/bootstrap.js';
import {
  frame,
  FrameDecoder,
  FrameType,
  jsonFrame,
  PROTOCOL_VERSION,
  rangeHeader,
  READ_BACK_RECORD_BYTES,
  type Frame,
  type Hello,
} from '../../src/remote/protocol.js';

const scenario = process.argv[2] ?? 'silent';
/** How long the proxies hold SUMMARY back. */
const HOLD_MS = 7000;
const KEEPALIVE_MS = 200;

process.stdout.on('error', () => process.exit(0));

function readyFor(h: Hello): Buffer {
  return jsonFrame(FrameType.READY, {
    version: PROTOCOL_VERSION,
    size: h.role === 'target' ? h.size : 1024 * 1024,
    kind: 'file',
    created: false,
    zero: false,
    encoding: '',
    node: process.version,
  });
}

async function write(buf: Buffer): Promise<void> {
  if (!process.stdout.write(buf)) await once(process.stdout, 'drain');
}

/** Writes `next()` frames for ever (until blksync stops reading and stdout fails). */
async function flood(next: (i: number) => Buffer): Promise<never> {
  for (let i = 0; ; i++) await write(next(i));
}

async function proxy(keepalive: boolean, head: Buffer): Promise<void> {
  const agent = spawn(process.execPath, ['-e', BOOTSTRAP], { stdio: ['pipe', 'pipe', 'inherit'] });
  agent.stdin.on('error', () => {});
  agent.stdin.write(head);
  process.stdin.pipe(agent.stdin);
  const decoder = new FrameDecoder();
  for await (const chunk of agent.stdout) {
    for (const f of decoder.push(chunk as Buffer)) {
      const whole = frame(f.type as FrameType, f.payload);
      if (f.type === FrameType.SUMMARY) {
        const timer = keepalive
          ? setInterval(() => process.stdout.write(frame(FrameType.KEEPALIVE)), KEEPALIVE_MS)
          : undefined;
        await new Promise((resolve) => setTimeout(resolve, HOLD_MS));
        clearInterval(timer);
      }
      await write(whole);
    }
  }
}

async function main(): Promise<void> {
  if (scenario.startsWith('proxy-')) {
    // the real agent reads the bundle and the frames itself
    const first = await new Promise<Buffer>((resolve) =>
      process.stdin.once('data', (d: Buffer) => {
        process.stdin.pause();
        resolve(d);
      }),
    );
    return proxy(scenario === 'proxy-keepalive', first);
  }
  const decoder = new FrameDecoder();
  let bundle: number | undefined;
  let buffered = Buffer.alloc(0);
  let hello: Hello | undefined;
  const requests: Frame[] = [];
  let wake: (() => void) | undefined;
  process.stdin.on('data', (d: Buffer) => {
    if (bundle === undefined || buffered.length < 4 + bundle) {
      buffered = Buffer.concat([buffered, d]);
      if (buffered.length < 4) return;
      bundle = buffered.readUInt32BE(0);
      if (buffered.length < 4 + bundle) return;
      d = buffered.subarray(4 + bundle);
    }
    for (const f of decoder.push(d)) {
      if (f.type === FrameType.HELLO) {
        hello = JSON.parse(f.payload.subarray(2).toString('utf8')) as Hello;
      } else requests.push(f);
    }
    wake?.();
  });
  process.stdin.on('end', () => process.exit(0));
  while (hello === undefined) await new Promise<void>((resolve) => (wake = resolve));
  const h = hello;
  if (scenario.startsWith('ready:')) {
    await write(frame(FrameType.READY, Buffer.from(scenario.slice(6), 'utf8')));
    return;
  }
  if (scenario.startsWith('error:')) {
    await write(frame(FrameType.ERROR, Buffer.from(scenario.slice(6), 'utf8')));
    return;
  }
  if (scenario === 'mute') return;
  await write(readyFor(h));
  const unit = h.topUnit > 0 ? h.topUnit : 4 * 1024 * 1024;
  const perFrame = 65532;
  switch (scenario) {
    case 'silent':
      return;
    case 'flood-top':
      // consecutive units from the image's end on: 1 MiB of hashes per frame
      return flood((i) =>
        frame(
          FrameType.TOP_HASHES,
          rangeHeader((h.size ?? 0) + i * perFrame * unit, unit),
          Buffer.alloc(perFrame * 16, i & 0xff),
        ),
      );
    case 'flood-readback': {
      const records = Math.floor((1024 * 1024) / READ_BACK_RECORD_BYTES);
      return flood(() =>
        frame(FrameType.READ_BACK, Buffer.alloc(records * READ_BACK_RECORD_BYTES)),
      );
    }
    case 'empty-data':
      for (;;) {
        const f = requests.shift();
        if (f === undefined) {
          await new Promise<void>((resolve) => (wake = resolve));
          continue;
        }
        if (f.type !== FrameType.DATA_REQ) continue;
        const head = Buffer.alloc(13);
        f.payload.copy(head, 0, 0, 8);
        await flood(() => frame(FrameType.DATA, head));
      }
    default:
      throw new Error(`unknown scenario ${scenario}`);
  }
}

await main();
