/**
 * The agent against hostile or broken input, run locally over pipes (the transport ssh would
 * be): malformed, oversized, out-of-order and random frames must end in an ERROR frame and
 * leave the file exactly as the valid frames before them asked. Also the endpoint parser.
 */

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { deflateRawSync } from 'node:zlib';
import { agentPayload } from '../src/remote/agent-payload.js';
import { BOOTSTRAP } from '../src/remote/bootstrap.js';
import {
  blockDigest,
  dataHeader,
  Encoding,
  frame,
  FrameDecoder,
  FrameType,
  helloFrame,
  parseReadBack,
  rangeHeader,
  TOP_HASH_BLOCKS,
  TOP_HASH_GMAC,
  topHasher,
  unitHashes,
  WIRE_HASH_BYTES,
  type Frame,
  type Hello,
  type Summary,
  type WireError,
} from '../src/remote/protocol.js';
import { parseRemote, splitCommand } from '../src/remote/spec.js';
import { sha256 } from '../src/hash.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const MiB = 1024 * 1024;

interface AgentRun {
  frames: Frame[];
  code: number | null;
  error: WireError | undefined;
}

/** Runs the agent as ssh would (node -e BOOTSTRAP, agent code on stdin), feeding `input`. */
async function runAgent(input: Buffer[]): Promise<AgentRun> {
  const child = spawn(process.execPath, ['-e', BOOTSTRAP], { stdio: ['pipe', 'pipe', 'inherit'] });
  const decoder = new FrameDecoder();
  const frames: Frame[] = [];
  child.stdout.on('data', (d: Buffer) => frames.push(...decoder.push(d)));
  child.stdin.on('error', () => {});
  child.stdin.write(await agentPayload());
  for (const b of input) child.stdin.write(b);
  child.stdin.end();
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  const err = frames.find((f) => f.type === FrameType.ERROR);
  return {
    frames,
    code,
    error: err && (JSON.parse(err.payload.toString('utf8')) as WireError),
  };
}

function hello(path: string, size: number, extra: Partial<Hello> = {}): Buffer {
  return helloFrame({
    role: 'target',
    path,
    size,
    topUnit: 0,
    encodings: ['deflate-raw'],
    ...extra,
  });
}

function data(offset: number, raw: Buffer, encoding: Encoding = Encoding.RAW, body = raw): Buffer {
  return frame(FrameType.DATA, dataHeader(offset, raw.length, encoding), body);
}

async function imageFile(dir: string, size = 2 * MiB): Promise<[string, Buffer]> {
  const path = join(dir, 'dst.img');
  const content = seededBytes(size, 7);
  await writeFile(path, content);
  return [path, content];
}

test('a well-formed session writes what DATA asks, and reports a matching SUMMARY', async (t) => {
  const dir = await tempDir(t);
  const [path, content] = await imageFile(dir);
  const piece = Buffer.alloc(8192, 0x41);
  const r = await runAgent([
    hello(path, content.length),
    frame(FrameType.HASH_REQ, rangeHeader(0, 65536, 4096)),
    data(4096, piece),
    data(MiB, piece, Encoding.DEFLATE_RAW, deflateRawSync(piece)),
    frame(FrameType.DONE),
  ]);
  assert.equal(r.code, 0);
  assert.equal(r.error, undefined);
  assert.deepEqual(
    r.frames.map((f) => f.type),
    [FrameType.READY, FrameType.HASHES, FrameType.WRITTEN, FrameType.WRITTEN, FrameType.SUMMARY],
  );
  const hashes = r.frames[1]!.payload.subarray(12);
  assert.deepEqual(hashes, unitHashes(content, 65536, 4096));
  assert.equal(hashes.length, 16 * WIRE_HASH_BYTES);
  const expected = Buffer.from(content);
  piece.copy(expected, 4096);
  piece.copy(expected, MiB);
  assert.deepEqual(await readFile(path), expected);
});

test('a target asked to verify reads back what it wrote: READ_BACK digests before SUMMARY', async (t) => {
  const dir = await tempDir(t);
  const [path, content] = await imageFile(dir, 70 * MiB);
  const a = Buffer.alloc(8192, 0x41);
  const b = Buffer.alloc(4096, 0x42);
  const c = Buffer.alloc(100, 0x43);
  const r = await runAgent([
    hello(path, content.length, { verify: true }),
    data(4096, a),
    data(4096 + 8192, b), // touches the write before: one range
    data(66 * MiB, c), // the second 64 MiB segment
    frame(FrameType.DONE),
  ]);
  assert.equal(r.error, undefined);
  assert.deepEqual(
    r.frames.map((f) => f.type),
    [
      FrameType.READY,
      FrameType.WRITTEN,
      FrameType.WRITTEN,
      FrameType.WRITTEN,
      FrameType.READ_BACK,
      FrameType.SUMMARY,
    ],
  );
  assert.deepEqual(parseReadBack(r.frames[4]!.payload), [
    {
      start: 4096,
      end: 4096 + 12288,
      bytes: 12288,
      sha256: sha256(Buffer.concat([a, b])).toString('hex'),
    },
    { start: 66 * MiB, end: 66 * MiB + 100, bytes: 100, sha256: sha256(c).toString('hex') },
  ]);
  const summary = JSON.parse(r.frames[5]!.payload.toString('utf8')) as Summary;
  assert.equal(summary.verify?.bytesRead !== undefined && summary.verify.bytesRead >= 12388, true);
  assert.equal(typeof summary.verify?.direct, 'boolean');
});

const refused: [string, (path: string, size: number) => Buffer[], string][] = [
  [
    'verify asked of a source',
    (p) => [hello(p, 0, { role: 'source', verify: true })],
    'EREMOTE_PROTOCOL',
  ],
  ['DATA before HELLO', () => [data(0, Buffer.alloc(4096, 1))], 'EREMOTE_PROTOCOL'],
  [
    'an oversized frame length',
    () => [Buffer.from([0xff, 0xff, 0xff, 0xff, 0x20])],
    'EREMOTE_PROTOCOL',
  ],
  ['a zero frame length', (p, n) => [hello(p, n), Buffer.alloc(5)], 'EREMOTE_PROTOCOL'],
  [
    'a protocol version from the future',
    (p, n) => {
      const h = hello(p, n);
      h.writeUInt16BE(99, 5);
      return [h];
    },
    'EREMOTE_PROTOCOL',
  ],
  [
    'HELLO that is not JSON',
    () => [frame(FrameType.HELLO, Buffer.from([0, 1, 0x7b]))],
    'EREMOTE_PROTOCOL',
  ],
  [
    'a second HELLO',
    (p, n) => [hello(p, n), hello(p, n), data(0, Buffer.alloc(4096, 1))],
    'EREMOTE_PROTOCOL',
  ],
  [
    'a GMAC top hash without a proper key',
    (p, n) => [hello(p, n, { topUnit: MiB, topHash: 'gmac-aes128', key: 'abc' })],
    'EREMOTE_PROTOCOL',
  ],
  [
    'an unknown top hash',
    (p, n) => [hello(p, n, { topUnit: MiB, topHash: 'crc32', key: '00'.repeat(16) })],
    'EREMOTE_PROTOCOL',
  ],
  [
    'DATA past the image end',
    (p, n) => [hello(p, n), data(n - 100, Buffer.alloc(4096, 1))],
    'EREMOTE_PROTOCOL',
  ],
  [
    'DATA past the declared image though inside the file',
    (p, n) => [hello(p, n / 2), data(n / 2, Buffer.alloc(4096, 1))],
    'EREMOTE_PROTOCOL',
  ],
  [
    'DATA in a dry run',
    (p, n) => [hello(p, n, { dryRun: true }), data(0, Buffer.alloc(4096, 1))],
    'EREMOTE_PROTOCOL',
  ],
  [
    'DATA whose body is shorter than its length',
    (p, n) => [
      hello(p, n),
      frame(FrameType.DATA, dataHeader(0, 4096, Encoding.RAW), Buffer.alloc(100, 1)),
    ],
    'EREMOTE_PROTOCOL',
  ],
  [
    'DATA that inflates to another length',
    (p, n) => [
      hello(p, n),
      data(0, Buffer.alloc(4096, 1), Encoding.DEFLATE_RAW, deflateRawSync(Buffer.alloc(8192, 1))),
    ],
    'EREMOTE_PROTOCOL',
  ],
  [
    'DATA compressed when no encoding was negotiated',
    (p, n) => [
      hello(p, n, { encodings: [] }),
      data(0, Buffer.alloc(4096, 1), Encoding.DEFLATE_RAW, deflateRawSync(Buffer.alloc(4096, 1))),
    ],
    'EREMOTE_PROTOCOL',
  ],
  [
    'DATA with an unknown encoding',
    (p, n) => [hello(p, n), data(0, Buffer.alloc(4096, 1), 7 as Encoding)],
    'EREMOTE_PROTOCOL',
  ],
  [
    'a HASH_REQ past the end',
    (p, n) => [
      hello(p, n),
      frame(FrameType.HASH_REQ, rangeHeader(n, 4096, 4096)),
      data(0, Buffer.alloc(4096, 1)),
    ],
    'EREMOTE_PROTOCOL',
  ],
  [
    'a HASH_REQ with a tiny unit',
    (p, n) => [
      hello(p, n),
      frame(FrameType.HASH_REQ, rangeHeader(0, 65536, 1)),
      data(0, Buffer.alloc(4096, 1)),
    ],
    'EREMOTE_PROTOCOL',
  ],
  [
    'an offset above 2^53',
    (p, n) => {
      const f = data(0, Buffer.alloc(4096, 1));
      f.writeUInt32BE(0xffffffff, 5);
      return [hello(p, n), f];
    },
    'EREMOTE_PROTOCOL',
  ],
  [
    'DATA_REQ to a writing agent',
    (p, n) => [hello(p, n), frame(FrameType.DATA_REQ, rangeHeader(0, 4096))],
    'EREMOTE_PROTOCOL',
  ],
  [
    'a frame after DONE',
    (p, n) => [hello(p, n), frame(FrameType.DONE), data(0, Buffer.alloc(4096, 1))],
    'EREMOTE_PROTOCOL',
  ],
  [
    'an unknown frame type',
    (p, n) => [
      hello(p, n),
      frame(0x7f as FrameType, Buffer.alloc(3)),
      data(0, Buffer.alloc(4096, 1)),
    ],
    'EREMOTE_PROTOCOL',
  ],
  [
    'a direct copy asked of a writing agent',
    (p, n) => [
      hello(p, n, { direct: { destination: 'h', path: '/x', blockSize: 4096, chunkSize: 65536 } }),
      data(0, Buffer.alloc(4096, 1)),
    ],
    'EREMOTE_PROTOCOL',
  ],
  [
    'a direct copy to a host that looks like an option',
    (p, n) => [
      hello(p, n, {
        role: 'source',
        direct: { destination: '-oProxyCommand=x', path: '/x', blockSize: 4096, chunkSize: 65536 },
      }),
    ],
    'EREMOTE_PROTOCOL',
  ],
  [
    'an index with a block size that is no power of two',
    (p, n) => [
      hello(p, n, {
        index: {
          path: `${p}.idx`,
          blockSize: 5000,
          blockSizeGiven: true,
          chunkSize: 4 * 1024 * 1024,
          rebuild: false,
          verifySample: 16,
          full: false,
        },
      }),
      data(0, Buffer.alloc(4096, 1)),
    ],
    'EREMOTE_PROTOCOL',
  ],
  [
    'block digests whose block does not divide the unit',
    (p, n) => [
      hello(p, n, { topUnit: 65536, topHash: 'sha256-blocks', topBlock: 3 * 4096 }),
      data(0, Buffer.alloc(4096, 1)),
    ],
    'EREMOTE_PROTOCOL',
  ],
  [
    'an index of SRC asked of a writing agent',
    (p, n) => [
      hello(p, n, {
        topUnit: 65536,
        topHash: 'sha256-blocks',
        topBlock: 4096,
        sourceIndex: { path: `${p}.idx`, rebuild: false, verifySample: 16 },
      }),
      data(0, Buffer.alloc(4096, 1)),
    ],
    'EREMOTE_PROTOCOL',
  ],
  [
    'an index of SRC without block digests (its blocks would be unknown)',
    (p, n) => [
      hello(p, n, {
        role: 'source',
        sourceIndex: { path: `${p}.idx`, rebuild: false, verifySample: 16 },
      }),
    ],
    'EREMOTE_PROTOCOL',
  ],
  [
    'a reply type sent to the agent',
    (p, n) => [hello(p, n), frame(FrameType.SUMMARY, Buffer.from('{}'))],
    'EREMOTE_PROTOCOL',
  ],
];

for (const [what, frames, code] of refused) {
  test(`the agent refuses ${what} and writes nothing`, async (t) => {
    const dir = await tempDir(t);
    const [path, content] = await imageFile(dir);
    const r = await runAgent(frames(path, content.length));
    assert.equal(r.error?.code, code, JSON.stringify(r.error));
    assert.equal(r.code, 1);
    assert.equal(r.frames.filter((f) => f.type === FrameType.WRITTEN).length, 0);
    assert.deepEqual(await readFile(path), content);
  });
}

test('offsets past 4 GiB travel as u64 (sparse 5 GiB image)', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'big.img');
  const size = 5 * 1024 * MiB;
  const fh = await open(path, 'w');
  await fh.truncate(size);
  await fh.close();
  const at = 4 * 1024 * MiB + 12345 * 4096;
  const piece = Buffer.alloc(4096, 0x77);
  const r = await runAgent([
    hello(path, size),
    data(at, piece),
    frame(FrameType.HASH_REQ, rangeHeader(at, 8192, 4096)),
    frame(FrameType.DONE),
  ]);
  assert.equal(r.error, undefined);
  const hashes = r.frames.find((f) => f.type === FrameType.HASHES)!.payload;
  assert.equal(hashes.readUInt32BE(0), 1, 'high word of the offset');
  assert.deepEqual(
    hashes.subarray(12),
    unitHashes(Buffer.concat([piece, Buffer.alloc(4096)]), 8192, 4096),
  );
  const check = await open(path, 'r');
  const back = Buffer.alloc(4096);
  await check.read(back, 0, 4096, at);
  await check.close();
  assert.deepEqual(back, piece);
});

test('valid DATA before a bad frame is written; nothing after it is', async (t) => {
  const dir = await tempDir(t);
  const [path, content] = await imageFile(dir);
  const good = Buffer.alloc(4096, 0x55);
  const r = await runAgent([
    hello(path, content.length),
    data(8192, good),
    frame(0x42 as FrameType),
    data(16384, good),
  ]);
  assert.equal(r.error?.code, 'EREMOTE_PROTOCOL');
  const expected = Buffer.from(content);
  good.copy(expected, 8192);
  assert.deepEqual(await readFile(path), expected);
});

test('random frames (seeded) never make the agent write', async (t) => {
  const dir = await tempDir(t);
  const [path, content] = await imageFile(dir);
  const rnd = seededBytes(64 * 1024, 99);
  let pos = 0;
  const next = (n: number): Buffer => {
    const b = rnd.subarray(pos % (rnd.length - n), (pos % (rnd.length - n)) + n);
    pos += n + 7;
    return b;
  };
  for (let round = 0; round < 12; round++) {
    const input: Buffer[] = [hello(path, content.length)];
    for (let k = 0; k < 20; k++) {
      const pick = next(2);
      // any type but a well-formed DATA (which would be a write the client asked for)
      let type = pick[0]!;
      if (type === FrameType.DATA) type = FrameType.DATA_REQ;
      const body = next(pick[1]! % 40);
      if (round % 3 === 0)
        input.push(body); // raw garbage, no framing at all
      else input.push(frame(type as FrameType, body));
    }
    const r = await runAgent(input);
    // unframed garbage may also just look like a frame cut short by the link dropping
    if (round % 3 !== 0) assert.equal(r.code, 1, `round ${round}: the agent accepted garbage`);
    assert.equal(r.frames.filter((f) => f.type === FrameType.WRITTEN).length, 0);
  }
  assert.deepEqual(await readFile(path), content);
});

test('TOP_HASHES under a session key are GMAC tags that blksync can recompute', async (t) => {
  const dir = await tempDir(t);
  const [path, content] = await imageFile(dir, 3 * MiB);
  const key = Buffer.alloc(16, 9);
  const r = await runAgent([
    hello(path, content.length, { topUnit: MiB, topHash: TOP_HASH_GMAC, key: key.toString('hex') }),
    frame(FrameType.DONE),
  ]);
  assert.equal(r.error, undefined);
  const tops = Buffer.concat(
    r.frames.filter((f) => f.type === FrameType.TOP_HASHES).map((f) => f.payload.subarray(12)),
  );
  const hash = topHasher(key);
  const expected = [0, 1, 2].map((i) => hash(content.subarray(i * MiB, (i + 1) * MiB)));
  assert.deepEqual(tops, Buffer.concat(expected));
  assert.notDeepEqual(tops, unitHashes(content, content.length, MiB));
});

test("TOP_HASHES as block digests are the hash of the blocks' hashes, as an index knows them", async (t) => {
  const dir = await tempDir(t);
  const [path, content] = await imageFile(dir, 3 * MiB);
  const block = 64 * 1024;
  const r = await runAgent([
    hello(path, content.length, { topUnit: MiB, topHash: TOP_HASH_BLOCKS, topBlock: block }),
    frame(FrameType.DONE),
  ]);
  assert.equal(r.error, undefined);
  const tops = Buffer.concat(
    r.frames.filter((f) => f.type === FrameType.TOP_HASHES).map((f) => f.payload.subarray(12)),
  );
  // what an index's table gives: each block's SHA-256, of which the wire hash is the prefix
  const expected = [0, 1, 2].map((i) => {
    const blocks = [];
    for (let s = i * MiB; s < (i + 1) * MiB; s += block) {
      blocks.push(sha256(content, s, s + block).subarray(0, WIRE_HASH_BYTES));
    }
    return blockDigest(Buffer.concat(blocks));
  });
  assert.deepEqual(tops, Buffer.concat(expected));
});

test('a pull agent serves TOP_HASHES unasked and DATA in request order', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'src.img');
  const content = randomBytes(3 * MiB + 5);
  await writeFile(path, content);
  const r = await runAgent([
    helloFrame({ role: 'source', path, topUnit: MiB, encodings: [] }),
    frame(FrameType.DATA_REQ, rangeHeader(2 * MiB, MiB + 5)),
    frame(FrameType.DATA_REQ, rangeHeader(100, 50)),
    frame(FrameType.DONE),
  ]);
  assert.equal(r.error, undefined);
  const tops = r.frames.filter((f) => f.type === FrameType.TOP_HASHES);
  const all = Buffer.concat(tops.map((f) => f.payload.subarray(12)));
  assert.deepEqual(all, unitHashes(content, content.length, MiB));
  const datas = r.frames.filter((f) => f.type === FrameType.DATA);
  assert.deepEqual(
    Buffer.concat(datas.map((f) => f.payload.subarray(13))),
    Buffer.concat([content.subarray(2 * MiB), content.subarray(100, 150)]),
  );
});

test('endpoints: a colon before the first slash means remote (rsync rule)', () => {
  assert.deepEqual(parseRemote('host:/dev/sdb'), { destination: 'host', path: '/dev/sdb' });
  assert.deepEqual(parseRemote('me@host:img'), { destination: 'me@host', path: 'img' });
  assert.deepEqual(parseRemote('[::1]:/x'), { destination: '::1', path: '/x' });
  assert.deepEqual(parseRemote('me@[fe80::1]:/x'), { destination: 'me@fe80::1', path: '/x' });
  assert.equal(parseRemote('./a:b'), undefined);
  assert.equal(parseRemote('/mnt/a:b'), undefined);
  assert.equal(parseRemote('plain.img'), undefined);
  assert.equal(parseRemote(':x'), undefined);
  assert.equal(parseRemote('https://example.com/disk.img'), undefined);
  assert.deepEqual(splitCommand(`ssh -p 2222 -i 'my key' -o "A=b c"`), [
    'ssh',
    '-p',
    '2222',
    '-i',
    'my key',
    '-o',
    'A=b c',
  ]);
});
