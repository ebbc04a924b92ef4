/**
 * The frame stream fuzzed (issue #13, "Done when"): sessions of random, valid-looking frames
 * in random order — requests in and out of range, DATA with bodies that do or do not decode,
 * frames only the agent sends, a second HELLO, DONE early, lengths that lie — against a real
 * agent started as ssh would start it (node -e BOOTSTRAP, the bundle on stdin), on a small
 * heap. Every session must end with the agent exiting 0 or 1 on its own (no hang: a deadline
 * per session), having written well-formed frames, and, if it refused something, an ERROR
 * with a code of ours, never an internal error or a crash on stderr. Seeded: a failure names
 * its seed and reproduces.
 */

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { deflateRawSync } from 'node:zlib';
import { agentPayload } from '../src/remote/agent-payload.js';
import { BOOTSTRAP } from '../src/remote/bootstrap.js';
import {
  dataHeader,
  frame,
  FrameDecoder,
  FrameType,
  helloFrame,
  rangeHeader,
  type Frame,
  type Hello,
} from '../src/remote/protocol.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SESSIONS = 30;
const FRAMES_PER_SESSION = 60;
/** A session that has not ended by then is a hang. */
const SESSION_DEADLINE_MS = 20_000;
/** The agent's heap: what it buffers must stay bounded whatever it is sent. */
const HEAP_MB = 64;

/** xorshift32: the same frames for the same seed. */
function rng(seed: number): { int: (n: number) => number; pick: <T>(xs: readonly T[]) => T } {
  let x = seed >>> 0 || 1;
  const next = (): number => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
  return {
    int: (n) => next() % n,
    pick: (xs) => xs[next() % xs.length]!,
  };
}

interface Session {
  frames: Frame[];
  code: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
}

async function runSession(input: Buffer[]): Promise<Session> {
  const child = spawn(process.execPath, [`--max-old-space-size=${HEAP_MB}`, '-e', BOOTSTRAP], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const decoder = new FrameDecoder();
  const frames: Frame[] = [];
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => frames.push(...decoder.push(d)));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  child.stdin.on('error', () => {});
  child.stdin.write(await agentPayload());
  for (const b of input) child.stdin.write(b);
  child.stdin.end();
  const deadline = setTimeout(() => child.kill('SIGKILL'), SESSION_DEADLINE_MS);
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) =>
    child.on('close', (c, s) => resolve([c, s])),
  );
  clearTimeout(deadline);
  return { frames, code, signal, stderr };
}

/** One session's frames for `seed`: a HELLO (mostly valid), then random valid-looking frames. */
function sessionFrames(seed: number, target: string, source: string, size: number): Buffer[] {
  const r = rng(seed);
  const role = r.pick(['target', 'source'] as const);
  const encodings = r.pick([[], ['deflate-raw']]);
  const hello: Hello = {
    role,
    path: role === 'target' ? target : source,
    ...(role === 'target' ? { size: r.int(8) === 0 ? r.pick([size / 2, size + 4096]) : size } : {}),
    topUnit: r.pick([0, 0, 64 * KiB, 256 * KiB]),
    encodings,
    ...(role === 'target' && r.int(3) === 0 ? { verify: true } : {}),
    ...(role === 'target' && r.int(4) === 0 ? { dryRun: true } : {}),
    ...(r.int(2) === 0 ? { keepalive: 0.05 } : {}),
  };
  const out: Buffer[] = [];
  if (r.int(12) === 0) out.push(frame(FrameType.HELLO, Buffer.from([0, 2]), seededBytes(40, seed)));
  else out.push(helloFrame(hello));
  // in range and of the right kind most of the time, so sessions get deep into the agent
  const inRange = (): [number, number] => {
    const offset = 4 * KiB * r.int(size / (4 * KiB));
    return [offset, Math.min(r.pick([512, 4 * KiB, 64 * KiB, 256 * KiB]), size - offset)];
  };
  const anyOffset = (): number =>
    r.pick([0, 4 * KiB * r.int(size / (4 * KiB)), size - 4 * KiB, size, size + 4 * KiB, 2 ** 53]);
  const anyLength = (): number => r.pick([0, 1, 512, 4 * KiB, 64 * KiB, MiB, MiB + 1, 64 * MiB]);
  const data = (offset: number, raw: Buffer, enc: number, claimed = raw.length): Buffer => {
    const body = enc === 1 ? deflateRawSync(raw) : raw;
    return frame(FrameType.DATA, dataHeader(offset, claimed, enc as 0 | 1), body);
  };
  // percent of frames that are out of range, malformed or unexpected: some sessions are clean
  const hostility = r.pick([0, 1, 2, 5, 10]);
  for (let i = 0; i < FRAMES_PER_SESSION; i++) {
    if (r.int(100) >= hostility) {
      const [offset, length] = inRange();
      const kind = r.int(3);
      if (kind === 0) {
        const unit = r.pick([512, 4 * KiB, 64 * KiB]);
        out.push(frame(FrameType.HASH_REQ, rangeHeader(offset, length, unit)));
      } else if (role === 'target') {
        const enc = encodings.length > 0 ? r.int(2) : 0;
        out.push(data(offset, seededBytes(length, seed * 1000 + i), enc));
      } else out.push(frame(FrameType.DATA_REQ, rangeHeader(offset, length)));
      continue;
    }
    switch (r.int(8)) {
      case 0:
        out.push(frame(FrameType.HASH_REQ, rangeHeader(anyOffset(), anyLength(), r.pick([0, 16]))));
        break;
      case 1: {
        const raw = seededBytes(r.pick([0, 1, 4 * KiB]), seed + i);
        const claimed = r.pick([raw.length + 1, 2 * MiB, 0]);
        out.push(data(anyOffset(), raw, r.pick([0, 1, 7]), claimed));
        break;
      }
      case 2:
        out.push(frame(FrameType.DATA_REQ, rangeHeader(anyOffset(), anyLength())));
        break;
      case 3:
        out.push(frame(FrameType.DONE));
        break;
      case 4:
        // a frame only the agent sends, or one it does not know
        out.push(
          frame(
            r.pick([
              FrameType.READY,
              FrameType.TOP_HASHES,
              FrameType.HASHES,
              FrameType.WRITTEN,
              FrameType.SUMMARY,
              FrameType.READ_BACK,
              FrameType.KEEPALIVE,
              FrameType.HELLO,
              0x7f,
            ] as FrameType[]),
            seededBytes(r.int(64), seed * 31 + i),
          ),
        );
        break;
      case 5: {
        // a payload cut short
        const f = frame(FrameType.HASH_REQ, rangeHeader(anyOffset(), anyLength(), 4 * KiB));
        f.writeUInt32BE(r.pick([1, 9]), 0);
        out.push(f.subarray(0, 4 + f.readUInt32BE(0)));
        break;
      }
      case 6: {
        // a header that lies about the frame's length
        const f = Buffer.alloc(5);
        f.writeUInt32BE(r.pick([0, 2 ** 32 - 1, 2 * MiB]), 0);
        f[4] = FrameType.DATA;
        out.push(f);
        break;
      }
      default:
        out.push(data(anyOffset(), Buffer.alloc(0), 0));
    }
  }
  // most sessions end as a client would
  if (r.int(3) !== 0) out.push(frame(FrameType.DONE));
  return out;
}

test('the agent survives random frame streams: no crash, no hang, small heap', async (t) => {
  const dir = await tempDir(t);
  const size = MiB;
  const target = join(dir, 'target.img');
  const source = join(dir, 'source.img');
  await writeFile(source, seededBytes(size, 1));
  let refused = 0;
  let finished = 0;
  for (let seed = 1; seed <= SESSIONS; seed++) {
    await writeFile(target, seededBytes(size, 2));
    const s = await runSession(sessionFrames(seed, target, source, size));
    const what = `seed ${seed}: exit ${s.code} ${s.signal ?? ''} ${s.stderr}`;
    assert.equal(s.signal, null, what);
    assert.ok(s.code === 0 || s.code === 1, what);
    assert.equal(s.stderr, '', what);
    const errors = s.frames.filter((f) => f.type === FrameType.ERROR);
    assert.ok(errors.length <= 1, what);
    for (const f of errors) {
      const e = JSON.parse(f.payload.toString('utf8')) as { code: string; message: string };
      assert.match(e.code, /^E[A-Z_]+$/, what);
      assert.doesNotMatch(e.message, /agent error|TypeError|RangeError/, `${what}: ${e.message}`);
      refused++;
    }
    assert.equal(errors.length === 1, s.code === 1, what);
    if (s.frames.some((f) => f.type === FrameType.SUMMARY)) finished++;
  }
  // the streams reach both ends of the agent: refusals, and sessions run to their SUMMARY
  assert.ok(refused >= SESSIONS / 4, `refused ${refused} of ${SESSIONS}`);
  assert.ok(finished >= SESSIONS / 8, `${finished} of ${SESSIONS} reached SUMMARY`);
});
