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
 */

import { once } from 'node:events';
import type { FileHandle } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { BlksyncError } from '../errors.js';
import { FileSink } from '../io/file-sink.js';
import { identityOf } from '../io/identity.js';
import { createTarget, openSource, openTarget } from '../io/open.js';
import { detectCompression, MAGIC_BYTES } from '../io/compression-magic.js';
import { readBackWritten, WrittenRanges } from '../engine/written-log.js';
import { Compressor, decode, DEFLATE_RAW } from './compress.js';
import { AgentIndex } from './agent-index.js';
import { DirectCopy } from './direct.js';
import { parseHello } from './messages.js';
import {
  dataHeader,
  frame,
  FrameDecoder,
  readBackFrames,
  FrameType,
  jsonFrame,
  MAX_DATA_BYTES,
  MAX_HASHES_PER_REPLY,
  MAX_REQUEST_BYTES,
  MIN_HASH_UNIT,
  PROTOCOL_VERSION,
  ProtocolError,
  rangeHeader,
  readU64,
  unitHashes,
  topHasher,
  TOP_HASH_GMAC,
  TOP_HASH_BLOCKS,
  blockDigestHasher,
  type TopHasher,
  type Frame,
  type DirectReport,
  type Hello,
  type Ready,
  type Summary,
  type WireError,
} from './protocol.js';

/** Frames queued before stdin is paused. */
const QUEUE_HIGH_WATER = 32;
/** TOP_HASHES batched per frame. */
const TOP_BATCH = 4;
/** Top-level units read ahead while hashing. */
const TOP_READ_AHEAD = 4;

export interface AgentStreams {
  input: NodeJS.ReadableStream;
  output: NodeJS.WritableStream;
  /** The agent bundle as the bootstrap received it (length prefix included). */
  payload?: Buffer | undefined;
}

interface Opened {
  path: string;
  /** Undefined only in a dry run onto a missing file, which reads as zeros. */
  fh: FileHandle | undefined;
  /** Bytes the protocol may touch: the image size (target) or the file size (source). */
  limit: number;
  role: 'target' | 'source';
  sink: FileSink | undefined;
  compressor: Compressor;
  encoding: string;
  /** Report the identity after DONE (blksync keeps an index of this target). */
  identity: boolean;
  kind: 'file' | 'block-device';
  /** The file's or device's size when opened. */
  fileSize: number;
}

function parseHelloFrame(payload: Buffer): Hello {
  if (payload.length < 2) throw new ProtocolError('HELLO too short');
  const version = payload.readUInt16BE(0);
  if (version !== PROTOCOL_VERSION) {
    throw new BlksyncError(
      'EREMOTE_PROTOCOL',
      `blksync speaks protocol ${version} but the agent speaks ${PROTOCOL_VERSION}; use the same blksync version`,
    );
  }
  let h: unknown;
  try {
    h = JSON.parse(payload.subarray(2).toString('utf8'));
  } catch {
    throw new ProtocolError('HELLO is not JSON');
  }
  return parseHello(h);
}

function hasherOf(h: Hello): TopHasher {
  if (h.topHash === TOP_HASH_BLOCKS) return blockDigestHasher(h.topBlock!);
  return topHasher(h.topHash === TOP_HASH_GMAC ? Buffer.from(h.key!, 'hex') : undefined);
}

async function readFully(
  o: Opened,
  fh: FileHandle,
  buf: Buffer,
  length: number,
  offset: number,
): Promise<void> {
  let got = 0;
  while (got < length) {
    const { bytesRead } = await fh.read(buf, got, length - got, offset + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  if (got < length) {
    throw new BlksyncError(
      o.role === 'source' ? 'ESRC_SHORT' : 'EDEST_SHORT',
      `${o.path} ended at ${offset + got} bytes while being read; did it shrink? Rerun the command.`,
      { path: o.path },
    );
  }
}

/**
 * A compressed SRC would be copied as its compressed bytes: blksync decodes only where it
 * runs, and a decoder here would give neither the size up front nor reads by offset. Refused
 * before anything is opened for writing (--direct's target is opened after this);
 * remote-copy.ts adds what to do instead.
 */
async function refuseCompressed(path: string, fh: FileHandle): Promise<void> {
  const head = Buffer.alloc(MAGIC_BYTES);
  const { bytesRead } = await fh.read(head, 0, MAGIC_BYTES, 0);
  const kind = detectCompression(head.subarray(0, bytesRead));
  if (kind === undefined) return;
  await fh.close();
  throw new BlksyncError('ESRC_COMPRESSED', `${path} is ${kind}-compressed`, { path });
}

/** Runs the agent until stdin ends or an error; resolves with the exit status. */
export async function runAgent(streams: AgentStreams, initial?: Buffer): Promise<number> {
  const { input, output } = streams;
  const decoder = new FrameDecoder();
  const queue: Frame[] = [];
  let wake: (() => void) | undefined;
  let ended = false;
  let failed = false;
  let opened: Opened | undefined;
  let done = false;
  let bytesRead = 0;
  let bytes = 0;
  let frames = 0;
  const digest = createHash('sha256');
  let direct: DirectCopy | undefined;
  let index: AgentIndex | undefined;
  /** --verify: where this session wrote, read back at DONE. */
  let written: WrittenRanges | undefined;
  let directRun: Promise<DirectReport> | undefined;
  let sendChain: Promise<void> = Promise.resolve();

  /** HELLO's keepalive timer; frames queued to send (a keepalive waits behind none). */
  let keepalive: NodeJS.Timeout | undefined;
  let sending = 0;
  const send = (buf: Buffer): Promise<void> => {
    sending++;
    sendChain = sendChain.then(async () => {
      try {
        if (failed && buf[4] !== FrameType.ERROR) return;
        if (!output.write(buf)) await once(output, 'drain');
      } finally {
        sending--;
      }
    });
    return sendChain;
  };

  const fail = async (err: unknown): Promise<void> => {
    if (failed) return;
    failed = true;
    queue.length = 0;
    const e: WireError =
      err instanceof BlksyncError
        ? { code: err.code, message: err.message, ...(err.path ? { path: err.path } : {}) }
        : err instanceof ProtocolError
          ? { code: 'EREMOTE_PROTOCOL', message: `protocol error: ${err.message}` }
          : { code: 'EREMOTE', message: `agent error: ${String(err)}` };
    await send(jsonFrame(FrameType.ERROR, e)).catch(() => {});
  };

  const onData = (chunk: Buffer): void => {
    if (failed) return;
    try {
      for (const f of decoder.push(chunk)) queue.push(f);
    } catch (err) {
      void fail(err);
    }
    if (queue.length >= QUEUE_HIGH_WATER) input.pause();
    wake?.();
  };

  const checkRange = (offset: number | undefined, length: number): number => {
    if (offset === undefined || length < 1 || length > MAX_REQUEST_BYTES) {
      throw new ProtocolError('range out of bounds');
    }
    if (offset + length > opened!.limit) {
      throw new ProtocolError(`range ${offset}+${length} passes the end (${opened!.limit})`);
    }
    return offset;
  };

  const topHashes = async (
    o: Opened,
    fh: FileHandle,
    unit: number,
    hasher: TopHasher,
  ): Promise<void> => {
    // a few buffers reused round robin: fresh 4 MiB buffers cost a page fault per 4 KiB
    const free: Buffer[] = [];
    const reads: Promise<[Buffer, number]>[] = [];
    let next = 0;
    const start = (): void => {
      if (next >= o.limit || failed) return;
      const off = next;
      const len = Math.min(unit, o.limit - off);
      next += len;
      const buf = free.pop() ?? Buffer.allocUnsafe(unit);
      const p = readFully(o, fh, buf, len, off).then((): [Buffer, number] => {
        bytesRead += len;
        return [buf, len];
      });
      p.catch(() => {});
      reads.push(p);
    };
    for (let i = 0; i < TOP_READ_AHEAD; i++) start();
    let batch: Buffer[] = [];
    let batchOffset = 0;
    for (let off = 0; off < o.limit && !failed; off += unit) {
      const [buf, len] = await reads.shift()!;
      start();
      // before this unit's hash goes out: no DATA for it can have come yet
      index?.learned(off, buf, len);
      if (batch.length === 0) batchOffset = off;
      batch.push(hasher(buf.subarray(0, len)));
      free.push(buf);
      if (batch.length === TOP_BATCH || off + unit >= o.limit) {
        await send(frame(FrameType.TOP_HASHES, rangeHeader(batchOffset, unit), ...batch));
        batch = [];
      }
    }
  };

  /**
   * A used index's TOP_HASHES: each unit's block digest from the table, DST read only where
   * the index does not vouch (then its hashes are learned first). Like the scan, a unit's
   * entry goes out before any DATA for it can come.
   */
  const digestHashes = async (
    o: Opened,
    fh: FileHandle,
    unit: number,
    idx: AgentIndex,
  ): Promise<void> => {
    let batch: Buffer[] = [];
    let batchOffset = 0;
    for (let off = 0; off < o.limit && !failed; off += unit) {
      const len = Math.min(unit, o.limit - off);
      if (!idx.knows(off, len)) {
        const buf = Buffer.allocUnsafe(len);
        await readFully(o, fh, buf, len, off);
        bytesRead += len;
        idx.learned(off, buf, len);
      }
      if (batch.length === 0) batchOffset = off;
      batch.push(idx.digest(off, len));
      if (batch.length === TOP_BATCH || off + unit >= o.limit) {
        await send(frame(FrameType.TOP_HASHES, rangeHeader(batchOffset, unit), ...batch));
        batch = [];
      }
    }
  };

  const hello = async (payload: Buffer): Promise<void> => {
    const h = parseHelloFrame(payload);
    if (h.keepalive !== undefined && h.keepalive > 0) {
      // blksync times out a silent link: say "alive" whenever nothing else went out for a while
      keepalive = setInterval(
        () => {
          if (sending === 0 && !failed) void send(frame(FrameType.KEEPALIVE));
        },
        Math.max(10, h.keepalive * 1000),
      );
    }
    const encoding = h.encodings.includes(DEFLATE_RAW) ? DEFLATE_RAW : '';
    let ready: Ready;
    let digests = false;
    if (h.role === 'source') {
      const src = await openSource(h.path);
      await refuseCompressed(h.path, src.fh);
      opened = {
        path: h.path,
        fh: src.fh,
        limit: src.size,
        role: 'source',
        sink: undefined,
        compressor: new Compressor(encoding !== ''),
        encoding,
        identity: false,
        kind: src.kind,
        fileSize: src.size,
      };
      if (h.direct !== undefined) {
        direct = await DirectCopy.open(
          h.direct,
          h,
          { path: h.path, fh: src.fh, size: src.size },
          hasherOf(h),
          streams.payload,
        );
      }
      ready = {
        version: PROTOCOL_VERSION,
        size: src.size,
        kind: src.kind,
        created: false,
        zero: false,
        encoding,
        node: process.version,
        ...(direct !== undefined ? { target: direct.ready } : {}),
      };
    } else {
      const size = h.size!;
      const dryRun = h.dryRun === true;
      const found = await openTarget(h.path, { readOnly: dryRun });
      let created = false;
      let zero = false;
      let fh: FileHandle | undefined;
      let kind: 'file' | 'block-device' = 'file';
      let have = size;
      if (found.fh === undefined) {
        created = true;
        zero = true;
        if (!dryRun) fh = (await createTarget(h.path, size)).fh;
      } else {
        fh = found.fh;
        kind = found.kind;
        have = found.size;
        if (found.size === 0 && kind === 'file') {
          zero = true;
          if (!dryRun) await fh.truncate(size);
          have = size;
        } else if (found.size < size) {
          await fh.close();
          throw new BlksyncError(
            'EDEST_TOO_SMALL',
            `${h.path} is ${found.size} bytes but the source is ${size} bytes; use a larger destination`,
            { path: h.path },
          );
        }
      }
      opened = {
        path: h.path,
        // a dry run onto a missing file reads nothing: the image is all zeros
        fh,
        limit: size,
        role: 'target',
        sink: !dryRun && fh !== undefined ? new FileSink(fh, h.path) : undefined,
        compressor: new Compressor(false),
        encoding,
        identity: h.identity === true,
        kind,
        fileSize: have,
      };
      if (h.verify === true) written = new WrittenRanges();
      if (h.index !== undefined) {
        index = await AgentIndex.open(
          h.index,
          {
            path: h.path,
            fh,
            stats: found.fh !== undefined ? found.stats : await fh?.stat(),
            kind,
            size: have,
          },
          size,
          zero,
          dryRun,
        );
        digests =
          index.used &&
          h.index.topDigest === true &&
          h.topUnit > 0 &&
          h.topUnit % index.blockSize === 0 &&
          fh !== undefined;
      }
      ready = {
        version: PROTOCOL_VERSION,
        size: have,
        kind,
        created,
        zero,
        encoding,
        node: process.version,
        ...(index !== undefined
          ? {
              index: {
                mode: index.report().mode,
                path: index.path,
                blockSize: index.blockSize,
                ...(digests ? { digests } : {}),
              },
            }
          : {}),
        ...(h.identity === true && found.fh !== undefined
          ? { identity: await identityOf(h.path, found.stats, found.size) }
          : {}),
      };
    }
    await send(jsonFrame(FrameType.READY, ready));
    if (direct !== undefined) {
      directRun = direct.run((p) => void send(jsonFrame(FrameType.PROGRESS, p)));
      directRun.catch((err: unknown) => fail(err));
    }
    if (digests) {
      digestHashes(opened, opened.fh!, h.topUnit, index!).catch((err: unknown) => fail(err));
    }
    // a used index stands in for DST: no scan
    if (h.topUnit > 0 && !ready.zero && opened.fh !== undefined && index?.used !== true) {
      topHashes(opened, opened.fh, h.topUnit, hasherOf(h)).catch((err: unknown) => fail(err));
    }
  };

  const handle = async (f: Frame): Promise<void> => {
    const p = f.payload;
    if (opened === undefined) {
      if (f.type !== FrameType.HELLO) throw new ProtocolError(`frame type ${f.type} before HELLO`);
      await hello(p);
      return;
    }
    if (done) throw new ProtocolError(`frame type ${f.type} after DONE`);
    // a --direct source runs the copy itself: blksync only says when to finish
    if (direct !== undefined && f.type !== FrameType.DONE) {
      throw new ProtocolError(`frame type ${f.type} to an agent running a direct copy`);
    }
    const o = opened;
    switch (f.type) {
      case FrameType.HASH_REQ: {
        if (p.length !== 16 || o.fh === undefined) throw new ProtocolError('bad HASH_REQ');
        const length = p.readUInt32BE(8);
        const unit = p.readUInt32BE(12);
        const offset = checkRange(readU64(p, 0), length);
        if (unit < MIN_HASH_UNIT || Math.ceil(length / unit) > MAX_HASHES_PER_REPLY) {
          throw new ProtocolError(`bad hash unit ${unit}`);
        }
        const known = index?.hashesFor(offset, length, unit);
        if (known !== undefined) {
          await send(frame(FrameType.HASHES, rangeHeader(offset, unit), known));
          return;
        }
        const buf = Buffer.allocUnsafe(length);
        await readFully(o, o.fh, buf, length, offset);
        bytesRead += length;
        index?.learned(offset, buf, length);
        await send(
          frame(FrameType.HASHES, rangeHeader(offset, unit), unitHashes(buf, length, unit)),
        );
        return;
      }
      case FrameType.DATA: {
        if (o.role !== 'target' || o.sink === undefined) {
          throw new ProtocolError('DATA sent to an agent that does not write');
        }
        if (p.length < 13) throw new ProtocolError('DATA too short');
        const rawLength = p.readUInt32BE(8);
        if (rawLength > MAX_DATA_BYTES) throw new ProtocolError('DATA too long');
        const offset = checkRange(readU64(p, 0), rawLength);
        const enc = p[12]!;
        if (enc !== 0 && o.encoding === '') throw new ProtocolError('DATA encoding not negotiated');
        const raw = decode(enc, p.subarray(13), rawLength);
        if (raw === undefined) throw new ProtocolError('DATA does not decode to its length');
        digest.update(p.subarray(0, 12)).update(raw);
        await index?.beforeWrite(offset);
        await o.sink.write(raw, offset);
        index?.wrote(offset, raw);
        written?.add(offset, rawLength);
        bytes += rawLength;
        frames++;
        const ack = Buffer.allocUnsafe(8);
        ack.writeUInt32BE(Math.floor(bytes / 2 ** 32), 0);
        ack.writeUInt32BE(bytes >>> 0, 4);
        await send(frame(FrameType.WRITTEN, ack));
        return;
      }
      case FrameType.DATA_REQ: {
        if (o.role !== 'source' || p.length !== 12) throw new ProtocolError('bad DATA_REQ');
        const length = p.readUInt32BE(8);
        const offset = checkRange(readU64(p, 0), length);
        const buf = Buffer.allocUnsafe(length);
        await readFully(o, o.fh!, buf, length, offset);
        bytesRead += length;
        for (let s = 0; s < length; s += MAX_DATA_BYTES) {
          const raw = buf.subarray(s, Math.min(s + MAX_DATA_BYTES, length));
          const [enc, body] = await o.compressor.encode(raw);
          const head = dataHeader(offset + s, raw.length, enc);
          digest.update(head.subarray(0, 12)).update(raw);
          bytes += raw.length;
          frames++;
          await send(frame(FrameType.DATA, head, body));
        }
        return;
      }
      case FrameType.DONE: {
        if (p.length !== 0) throw new ProtocolError('bad DONE');
        const directReport = await directRun;
        await o.sink?.finish();
        let identity: Summary['identity'];
        if (o.identity && o.fh !== undefined && o.sink !== undefined) {
          // an index is about to vouch for all of the file, also what an earlier, killed run
          // wrote and this one found equal: make all of it durable, then say what it is now
          await o.fh.sync();
          const st = await o.fh.stat();
          identity = await identityOf(o.path, st, o.kind === 'file' ? st.size : o.fileSize);
        }
        if (index !== undefined && o.fh !== undefined && o.sink !== undefined) {
          // the clean index vouches for all of DST, also what a killed run wrote
          await o.fh.sync();
          await index.commit();
          bytesRead += index.bytesRead;
        } else if (index !== undefined) bytesRead += index.bytesRead;
        let verified: Summary['verify'];
        if (written !== undefined) {
          // after the fsync above: the read-back sees what the medium holds
          const t0 = performance.now();
          const r =
            o.fh !== undefined && !written.empty
              ? await readBackWritten(o.path, written, { fd: o.fh.fd })
              : { digests: [], direct: false, bytesRead: 0 };
          for (const f of readBackFrames(r.digests)) await send(f);
          verified = {
            direct: r.direct,
            bytesRead: r.bytesRead,
            seconds: (performance.now() - t0) / 1000,
          };
        }
        done = true;
        const cpu = process.cpuUsage();
        const s: Summary = {
          bytes,
          frames,
          digest: digest.digest('hex'),
          bytesRead,
          cpuSeconds: (cpu.user + cpu.system) / 1e6,
          ...(identity !== undefined ? { identity } : {}),
          ...(directReport !== undefined ? { direct: directReport } : {}),
          ...(index !== undefined ? { index: index.report() } : {}),
          ...(verified !== undefined ? { verify: verified } : {}),
        };
        await send(jsonFrame(FrameType.SUMMARY, s));
        return;
      }
      default:
        throw new ProtocolError(`unexpected frame type ${f.type}`);
    }
  };

  input.on('data', onData);
  input.on('end', () => {
    ended = true;
    // even while DONE waits for it: blksync is gone, nobody will read the summary
    direct?.abort();
    wake?.();
  });
  input.on('error', () => {
    ended = true;
    wake?.();
  });
  if (initial !== undefined && initial.length > 0) onData(initial);
  input.resume();

  while (!failed) {
    const f = queue.shift();
    if (f === undefined) {
      if (ended) break;
      await new Promise<void>((resolve) => (wake = resolve));
      wake = undefined;
      continue;
    }
    if (queue.length < QUEUE_HIGH_WATER / 2) input.resume();
    try {
      await handle(f);
    } catch (err) {
      await fail(err);
    }
  }
  input.removeListener('data', onData);
  clearInterval(keepalive);
  // blksync went away (or a frame was refused) during a direct copy: stop it; the other
  // host's agent syncs what it wrote
  direct?.abort();
  await directRun?.catch(() => {});
  await direct?.close().catch(() => {});
  // make what was written durable, whether the link dropped or a frame was refused
  await opened?.sink?.finish().catch(() => {});
  await opened?.fh?.close().catch(() => {});
  await sendChain.catch(() => {});
  return failed ? 1 : 0;
}

/**
 * The bundle's entry: called by the bootstrap with the bytes it read past the agent code, and
 * the agent code as it was sent (for --direct, where this agent starts another).
 */
export function main(rest: Buffer, payload?: Buffer): void {
  void runAgent({ input: process.stdin, output: process.stdout, payload }, rest).then((code) => {
    process.stdout.end(() => process.exit(code));
  });
}
