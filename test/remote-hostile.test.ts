/**
 * Hostile and broken peers (issue #13, "Remote peers"): blksync run as a user would, its
 * `--ssh` pointing at test/helpers/fake-agent.ts, which speaks real frames as an attacker or
 * a stuck agent would. Each must end in a coded error (EREMOTE_PROTOCOL, ETIMEOUT, EUSAGE),
 * never a crash, a hang or a file left behind; a slow but live agent must pass.
 */

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { access, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test, type TestContext } from 'node:test';
import { agentPayload } from '../src/remote/agent-payload.js';
import { BOOTSTRAP } from '../src/remote/bootstrap.js';
import { TopStream } from '../src/remote/top-stream.js';
import { parseProgress, parseReady, parseSummary, parseWireError } from '../src/remote/messages.js';
import {
  frame,
  FrameDecoder,
  FrameType,
  helloFrame,
  PROTOCOL_VERSION,
  rangeHeader,
  type Frame,
  type WireError,
} from '../src/remote/protocol.js';
import type { CliResult } from './helpers/cli.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const ENTRY = fileURLToPath(new URL('./helpers/cli-entry.ts', import.meta.url));
const FAKE = fileURLToPath(new URL('./helpers/fake-agent.ts', import.meta.url));
const MiB = 1024 * 1024;
/**
 * A --timeout long enough for the fake agent to start on a loaded machine (node and tsx), for
 * the cases that need its handshake through; the proxies hold SUMMARY back for longer.
 */
const PATIENT = '3';
/** Ample for every case here; a hang fails the test instead of the suite. */
const TEST_TIMEOUT_MS = 60_000;

/** `--ssh` running the fake agent in `scenario`. */
function fakeSsh(scenario: string): string {
  const quoted = `'${scenario.replace(/'/g, `'\\''`)}'`;
  return `${process.execPath} --import tsx ${FAKE} ${quoted}`;
}

/** Runs `blksync ...args` under node with `nodeFlags` (e.g. a small heap). */
function blksync(args: string[], nodeFlags: string[] = []): Promise<CliResult> {
  const child = spawn(process.execPath, [...nodeFlags, '--import', 'tsx', ENTRY, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  return new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}

function assertCode(r: CliResult, code: string): void {
  assert.equal(r.signal, null, r.stderr);
  assert.notEqual(r.code, 0, r.stderr);
  assert.match(r.stderr, new RegExp(`\\[${code}\\]`), r.stderr);
  assert.doesNotMatch(r.stderr, /internal error|heap out of memory|RangeError/, r.stderr);
}

/** A temporary directory holding SRC, 1 MiB of seeded bytes. */
async function fixture(t: TestContext): Promise<{ dir: string; src: string }> {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  await writeFile(src, seededBytes(MiB, 7));
  return { dir, src };
}

test(
  'unsolicited TOP_HASHES or READ_BACK floods end in EREMOTE_PROTOCOL, on a 256 MB heap',
  { timeout: TEST_TIMEOUT_MS },
  async (t) => {
    const { src } = await fixture(t);
    const small = ['--max-old-space-size=256'];
    const top = await blksync(['copy', '--ssh', fakeSsh('flood-top'), src, 'h:/dst'], small);
    assertCode(top, 'EREMOTE_PROTOCOL');
    assert.match(top.stderr, /TOP_HASHES/);
    const back = await blksync(
      ['copy', '--verify', '--ssh', fakeSsh('flood-readback'), src, 'h:/dst'],
      small,
    );
    assertCode(back, 'EREMOTE_PROTOCOL');
    assert.match(back.stderr, /READ_BACK/);
  },
);

test(
  'a READY that lies about its size or types is EREMOTE_PROTOCOL; a pull leaves no DST',
  { timeout: TEST_TIMEOUT_MS },
  async (t) => {
    const { dir, src } = await fixture(t);
    const ready = (fields: Record<string, unknown>): string =>
      JSON.stringify({
        version: PROTOCOL_VERSION,
        size: MiB,
        kind: 'file',
        created: false,
        zero: false,
        encoding: '',
        node: 'v20.0.0',
        ...fields,
      });
    const lies: [string, RegExp][] = [
      [ready({ size: -1 }), /READY\.size: -1/],
      [ready({ size: 2 ** 60 }), /READY\.size/],
      [ready({ size: String(MiB) }), /READY\.size/],
      [ready({ size: null }), /READY\.size: null/],
      [ready({ kind: 'pipe' }), /READY\.kind/],
      ['null', /READY: null is not an object/],
      ['[1,2]', /READY/],
      ['not json', /READY is not JSON/],
    ];
    for (const [payload, why] of lies) {
      const dst = join(dir, 'pulled.img');
      const r = await blksync(['copy', '--ssh', fakeSsh(`ready:${payload}`), 'h:/src', dst]);
      assertCode(r, 'EREMOTE_PROTOCOL');
      assert.match(r.stderr, why, payload);
      assert.equal(await exists(dst), false, `${payload} left ${dst}`);
    }
    // a size no file here can have (4 PiB): refused by the file system, nothing left behind,
    // and an empty DST that was there stays as it was
    const huge = ready({ size: 2 ** 52 });
    const dst = join(dir, 'huge.img');
    const big = await blksync(['copy', '--ssh', fakeSsh(`ready:${huge}`), 'h:/src', dst]);
    assertCode(big, 'EDEST_OPEN');
    assert.equal(await exists(dst), false);
    await writeFile(dst, '');
    const grown = await blksync(['copy', '--ssh', fakeSsh(`ready:${huge}`), 'h:/src', dst]);
    assertCode(grown, 'EDEST_OPEN');
    assert.equal((await readFile(dst)).length, 0);
    // a push: the agent cannot hold a smaller file than the image it was sent
    const r = await blksync(['copy', '--ssh', fakeSsh(`ready:${ready({ size: 1 })}`), src, 'h:/x']);
    assertCode(r, 'EREMOTE_PROTOCOL');
    assert.match(r.stderr, /READY\.size: 1 is not at least/);
  },
);

test('an ERROR that is not one is EREMOTE_PROTOCOL', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const { src } = await fixture(t);
  for (const payload of ['null', '{"code":null,"message":"x"}', '{"code":"EUSAGE"}']) {
    const r = await blksync(['copy', '--ssh', fakeSsh(`error:${payload}`), src, 'h:/x']);
    assertCode(r, 'EREMOTE_PROTOCOL');
  }
  // a real one keeps its code
  const r = await blksync([
    'copy',
    '--ssh',
    fakeSsh('error:{"code":"EDEST_MOUNTED","message":"/dev/x is mounted"}'),
    src,
    'h:/dev/x',
  ]);
  assertCode(r, 'EDEST_MOUNTED');
});

test(
  'a claimed 8 TiB source that then says nothing: ETIMEOUT, and no local file',
  { timeout: TEST_TIMEOUT_MS },
  async (t) => {
    const { dir } = await fixture(t);
    const dst = join(dir, 'huge.img');
    const payload = JSON.stringify({
      version: PROTOCOL_VERSION,
      size: 8 * 2 ** 40,
      kind: 'file',
      created: false,
      zero: false,
      encoding: '',
      node: 'v20.0.0',
    });
    const r = await blksync([
      'copy',
      '--timeout',
      '1',
      '--ssh',
      fakeSsh(`ready:${payload}`),
      'h:/src',
      dst,
    ]);
    assertCode(r, 'ETIMEOUT');
    assert.equal(await exists(dst), false);
  },
);

test(
  'an agent that stops talking ends with ETIMEOUT, before and after READY',
  { timeout: TEST_TIMEOUT_MS },
  async (t) => {
    const { src } = await fixture(t);
    const after = await blksync([
      'copy',
      '--timeout',
      PATIENT,
      '--ssh',
      fakeSsh('silent'),
      src,
      'h:/x',
    ]);
    assertCode(after, 'ETIMEOUT');
    assert.match(after.stderr, /nothing received for 3 s while waiting for its reply/);
    const before = await blksync(['copy', '--timeout', '1', '--ssh', fakeSsh('mute'), src, 'h:/x']);
    assertCode(before, 'ETIMEOUT');
    assert.match(before.stderr, /while waiting for the agent to start/);
    const usage = await blksync(['copy', '--timeout', 'soon', src, 'h:/x']);
    assertCode(usage, 'EUSAGE');
  },
);

test(
  'empty DATA where data is due is EREMOTE_PROTOCOL, not progress',
  { timeout: TEST_TIMEOUT_MS },
  async (t) => {
    const { dir } = await fixture(t);
    const dst = join(dir, 'empty-data.img');
    const r = await blksync(['copy', '--full', '--ssh', fakeSsh('empty-data'), 'h:/src', dst]);
    assertCode(r, 'EREMOTE_PROTOCOL');
    assert.match(r.stderr, /DATA of 0 bytes/);
  },
);

test(
  'a slow but live agent (KEEPALIVE) passes --timeout; a stalled one does not',
  { timeout: TEST_TIMEOUT_MS },
  async (t) => {
    const { dir, src } = await fixture(t);
    const live = join(dir, 'live.img');
    const ok = await blksync([
      'copy',
      '--timeout',
      PATIENT,
      '--ssh',
      fakeSsh('proxy-keepalive'),
      src,
      `h:${live}`,
    ]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.deepEqual(await readFile(live), await readFile(src));
    const stuck = join(dir, 'stuck.img');
    const r = await blksync([
      'copy',
      '--timeout',
      PATIENT,
      '--ssh',
      fakeSsh('proxy-stall'),
      src,
      `h:${stuck}`,
    ]);
    assertCode(r, 'ETIMEOUT');
  },
);

test(
  'a host or path ssh would take for an option is EUSAGE before any ssh starts',
  { timeout: TEST_TIMEOUT_MS },
  async (t) => {
    const { dir, src } = await fixture(t);
    const marker = join(dir, 'ssh-ran');
    // an "ssh" that leaves a mark when started
    const ssh = `sh -c 'touch ${marker}; exit 255'`;
    const cases: string[][] = [
      [src, '-oProxyCommand=x:/dst'],
      ['-oProxyCommand=x:/src', join(dir, 'out.img')],
      ['ok:/src', '-oProxyCommand=x:/dst'],
      ['--direct', 'ok:/src', '-oProxyCommand=x:/dst'],
      ['--direct', '-oProxyCommand=x:/src', 'ok:/dst'],
      ['--', 'ok:/src', '-oProxyCommand=x:/dst'],
      ['--direct', '--', 'ok:/src', '-oProxyCommand=x:/dst'],
      ['--', src, 'me@-oProxyCommand=x:/dst'],
      ['--', src, '[-x]:/dst'],
      [src, 'ok:-dst'],
      ['ok:/src', 'ok:--dst'],
    ];
    for (const args of cases) {
      const r = await blksync(['copy', '--ssh', ssh, ...args]);
      // before `--` the argument parser itself refuses what looks like an option
      if (args.includes('--') || !args.some((a) => a.startsWith('-o'))) assertCode(r, 'EUSAGE');
      assert.equal(r.code, 2, r.stderr);
      assert.equal(await exists(marker), false, `ssh started for ${args.join(' ')}`);
    }
  },
);

test('messages from the agent are validated field by field', () => {
  const json = (v: unknown): Buffer => Buffer.from(JSON.stringify(v), 'utf8');
  const ready = {
    version: PROTOCOL_VERSION,
    size: MiB,
    kind: 'file',
    created: false,
    zero: false,
    encoding: '',
    node: 'v20',
  };
  const ctx = { role: 'source' as const, encodings: ['deflate-raw'] };
  assert.equal(parseReady(json(ready), ctx).size, MiB);
  assert.throws(() => parseReady(json({ ...ready, encoding: 'zstd' }), ctx), /READY\.encoding/);
  assert.throws(() => parseReady(json({ ...ready, version: 1 }), ctx), /READY\.version/);
  assert.throws(() => parseReady(json({ ...ready, size: 1.5 }), ctx), /READY\.size/);
  assert.throws(() => parseReady(json({ ...ready, identity: {} }), ctx), /READY\.identity/);
  assert.throws(() => parseReady(json({ ...ready, target: ready }), ctx), /READY\.target/);
  // an index of SRC only when asked for, and only as an agent may report it
  const kept = { mode: 'used', path: '/x.idx', sampleBlocks: 16 };
  assert.throws(() => parseReady(json({ ...ready, sourceIndex: kept }), ctx), /READY\.sourceIndex/);
  const asked = { ...ctx, sourceIndex: { path: 'auto', rebuild: false, verifySample: 16 } };
  assert.equal(parseReady(json({ ...ready, sourceIndex: kept }), asked).sourceIndex?.mode, 'used');
  for (const bad of [
    { ...kept, mode: 'kept' },
    { ...kept, sampleBlocks: -1 },
  ]) {
    assert.throws(() => parseReady(json({ ...ready, sourceIndex: bad }), asked), /sourceIndex/);
  }
  const summary = { bytes: 0, frames: 0, digest: 'a'.repeat(64), bytesRead: 5 };
  assert.equal(parseSummary(json(summary)).bytesRead, 5);
  for (const bad of [
    { ...summary, bytes: -1 },
    { ...summary, frames: '1' },
    { ...summary, digest: null },
    { ...summary, cpuSeconds: -2 },
    { ...summary, verify: { direct: 1, bytesRead: 0, seconds: 0 } },
    { ...summary, direct: { interrupted: false } },
  ]) {
    assert.throws(() => parseSummary(json(bad)), /SUMMARY/, JSON.stringify(bad));
  }
  assert.throws(() => parseWireError(json({ code: 'x', message: '' })), /ERROR\.code/);
  assert.throws(
    () => parseProgress(json({ bytesScanned: 1, bytesTotal: 2, bytesDiffering: 0 })),
    /PROGRESS\.bytesWritten/,
  );
});

/**
 * A --direct source agent started directly (as ssh would), its own "ssh" to the other host
 * being `ssh`; sends `after` once READY came and returns the ERROR it ends with, if any.
 */
async function directAgent(
  src: string,
  dst: string,
  ssh: string,
  after: Buffer[],
): Promise<{ frames: Frame[]; error: WireError | undefined }> {
  const child = spawn(process.execPath, ['--max-old-space-size=256', '-e', BOOTSTRAP], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const decoder = new FrameDecoder();
  const frames: Frame[] = [];
  child.stdin.on('error', () => {});
  child.stdout.on('data', (d: Buffer) => {
    for (const f of decoder.push(d)) {
      frames.push(f);
      if (f.type === FrameType.READY) {
        for (const b of after) child.stdin.write(b);
      }
      if (f.type === FrameType.ERROR) child.stdin.end();
    }
  });
  child.stdin.write(await agentPayload());
  child.stdin.write(
    helloFrame({
      role: 'source',
      path: src,
      topUnit: 0,
      encodings: [],
      keepalive: 0.25,
      direct: {
        destination: 'b',
        path: dst,
        ssh,
        blockSize: 4096,
        chunkSize: 65536,
        timeout: Number(PATIENT),
      },
    }),
  );
  await new Promise((resolve) => child.on('close', resolve));
  const err = frames.find((f) => f.type === FrameType.ERROR);
  return { frames, error: err && (JSON.parse(err.payload.toString('utf8')) as WireError) };
}

test(
  '--direct: the source agent takes only DONE from blksync, and its own link is guarded',
  { timeout: TEST_TIMEOUT_MS },
  async (t) => {
    const dir = await tempDir(t);
    const src = join(dir, 'src.img');
    await writeFile(src, seededBytes(MiB, 3));
    // "ssh" to the other host: run the remote command here, as a shell would
    const local = `sh -c 'eval "$2"' sh`;
    const asked = await directAgent(src, join(dir, 'a.img'), local, [
      frame(FrameType.HASH_REQ, rangeHeader(0, 4096, 4096)),
    ]);
    assert.equal(asked.error?.code, 'EREMOTE_PROTOCOL');
    assert.match(asked.error.message, /to an agent running a direct copy/);
    assert.equal(
      asked.frames.some((f) => f.type === FrameType.HASHES),
      false,
    );
    // the other host's agent floods top hashes nobody asked for: the source agent refuses them
    const flooded = await directAgent(src, join(dir, 'b.img'), fakeSsh('flood-top'), []);
    assert.equal(flooded.error?.code, 'EREMOTE_PROTOCOL', JSON.stringify(flooded.error));
    assert.match(flooded.error.message, /TOP_HASHES/);
    // and one that stops talking after its READY ends in ETIMEOUT (direct.timeout)
    const silent = await directAgent(src, join(dir, 'c.img'), fakeSsh('silent'), []);
    assert.equal(silent.error?.code, 'ETIMEOUT', JSON.stringify(silent.error));
  },
);

test('the TOP_HASHES window: in order, of the unit asked, inside the image, bounded ahead', async () => {
  const unit = 4096;
  const hashes = (n: number, fill = 1): Buffer => Buffer.alloc(16 * n, fill);
  const s = new TopStream(unit, 100 * unit, 4);
  assert.match(s.accept(0, 512, hashes(1)) ?? '', /unit 512/);
  assert.match(s.accept(unit, unit, hashes(1)) ?? '', /at 4096, expected 0/);
  assert.match(s.accept(0, unit, hashes(0)) ?? '', /empty/);
  assert.equal(s.accept(0, unit, hashes(4)), undefined);
  // a fifth unit before the copy took any: beyond the window, refused rather than kept
  assert.match(s.accept(4 * unit, unit, hashes(1)) ?? '', /more than 4 units ahead/);
  // taken in any order, each once; taking the oldest opens the window
  assert.equal((await s.get(2 * unit)).length, 16);
  assert.match(s.accept(4 * unit, unit, hashes(1)) ?? '', /more than 4 units ahead/);
  await s.get(0);
  assert.equal(s.accept(4 * unit, unit, hashes(1, 9)), undefined);
  await assert.rejects(s.get(2 * unit), /twice/);
  // a waiter is answered by the frame that brings its unit
  await s.get(unit);
  await s.get(3 * unit);
  const later = s.get(5 * unit);
  assert.equal(s.waiting, true);
  assert.equal(s.accept(5 * unit, unit, hashes(1, 7)), undefined);
  assert.deepEqual(await later, Buffer.alloc(16, 7));
  assert.deepEqual(await s.get(4 * unit), Buffer.alloc(16, 9));
  // never past the image's end
  const end = new TopStream(unit, 2 * unit + 1, 8);
  assert.match(end.accept(0, unit, hashes(4)) ?? '', /past the end/);
  assert.equal(end.accept(0, unit, hashes(3)), undefined);
});

test(
  'the agent sends KEEPALIVE while it has nothing else to say, when HELLO asks',
  { timeout: TEST_TIMEOUT_MS },
  async (t) => {
    const dir = await tempDir(t);
    const src = join(dir, 'src.img');
    await writeFile(src, seededBytes(MiB, 5));
    const child = spawn(process.execPath, ['-e', BOOTSTRAP], {
      stdio: ['pipe', 'pipe', 'inherit'],
    });
    const decoder = new FrameDecoder();
    const seen: number[] = [];
    child.stdin.on('error', () => {});
    const keepalive = new Promise<void>((resolve) => {
      child.stdout.on('data', (d: Buffer) => {
        for (const f of decoder.push(d)) {
          seen.push(f.type);
          // one while it waits for the next request: after READY
          if (f.type === FrameType.KEEPALIVE && seen.includes(FrameType.READY)) resolve();
        }
      });
    });
    child.stdin.write(await agentPayload());
    child.stdin.write(
      helloFrame({ role: 'source', path: src, topUnit: 0, encodings: [], keepalive: 0.05 }),
    );
    await keepalive;
    child.stdin.end();
    await new Promise((resolve) => child.on('close', resolve));
    // KEEPALIVE may come "any time" (link.ts), also before READY on a loaded machine, where
    // opening SRC takes longer than the 50 ms asked for: the first other frame is READY
    assert.equal(
      seen.find((type) => type !== FrameType.KEEPALIVE),
      FrameType.READY,
    );
  },
);
