/**
 * HELLO: the agent opens its end — SRC to read (and, with --direct, the copy to DST's host),
 * or DST to write, created or grown to the image's size, with the index it keeps — answers
 * READY, and starts the TOP_HASHES stream blksync asked for.
 */

import type { FileHandle } from 'node:fs/promises';
import { BlksyncError } from '../../errors.js';
import { dropTrace, startTrace, trace } from '../../trace.js';
import { WrittenRanges } from '../../engine/written-log.js';
import { sniffFile } from '../../containers/sniff-file.js';
import { FileSink } from '../../io/file-sink.js';
import { syncedIdentityOf } from '../../io/identity.js';
import { openSource, openTarget } from '../../io/open.js';
import { prepareDestination } from '../../io/prepare-destination.js';
import { AgentIndex } from '../agent-index.js';
import { Compressor, DEFLATE_RAW } from '../compress.js';
import { FrameType, jsonFrame, PROTOCOL_VERSION, type Hello, type Ready } from '../protocol.js';
import { lockAgentTarget } from './dest-lock.js';
import { DirectCopy } from './direct-copy.js';
import { KeptSourceIndex } from './kept-source-index.js';
import { parseHello } from './hello-check.js';
import type { AgentSession } from './session.js';
import { digestHashes, hasherOf, reqHasherOf, topHashes } from './top-hashes.js';

/** Handles HELLO: opens the end, sends READY, starts what runs beside the request queue. */
export async function hello(s: AgentSession, payload: Buffer): Promise<void> {
  const h = parseHello(payload);
  if (h.trace === true && s.traceOut !== undefined) startTrace(s.traceOut);
  else dropTrace();
  trace(`HELLO received (${h.role})`);
  s.startKeepalive(h.keepalive);
  if (h.reqHash !== undefined) s.unitHash = reqHasherOf(h);
  const encoding = h.encodings.includes(DEFLATE_RAW) ? DEFLATE_RAW : '';
  const { ready, digests } =
    h.role === 'source' ? await openSourceEnd(s, h, encoding) : await openTargetEnd(s, h, encoding);
  const opened = s.opened!;
  await s.send(jsonFrame(FrameType.READY, ready));
  trace('READY sent');
  if (s.direct !== undefined) {
    s.directRun = s.direct.run((p) => void s.send(jsonFrame(FrameType.PROGRESS, p)));
    s.directRun.catch((err: unknown) => s.fail(err));
  }
  if (digests) {
    const known = s.index ?? s.sourceIndex!;
    s.topStream = digestHashes(s, opened, opened.fh!, h.topUnit, known).catch((err: unknown) =>
      s.fail(err),
    );
  }
  // a used index stands in for its file: no scan
  const indexUsed = s.index?.used === true || s.sourceIndex?.used === true;
  if (h.topUnit > 0 && !ready.zero && opened.fh !== undefined && !indexUsed) {
    s.topStream = topHashes(s, opened, opened.fh, h.topUnit, hasherOf(h)).catch((err: unknown) =>
      s.fail(err),
    );
  }
}

interface OpenedEnd {
  ready: Ready;
  /** TOP_HASHES come from the used index's digests instead of a scan. */
  digests: boolean;
}

async function openSourceEnd(s: AgentSession, h: Hello, encoding: string): Promise<OpenedEnd> {
  const src = await openSource(h.path);
  await refuseCompressed(h.path, src.fh, src.size, h.raw === true);
  s.opened = {
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
    s.direct = await DirectCopy.open(
      h.direct,
      h,
      { path: h.path, fh: src.fh, size: src.size, kind: src.kind },
      hasherOf(h),
      s.payload,
    );
  }
  // --src-index: in the digests' blocks (hello-check.ts: only with TOP_HASH_BLOCKS)
  if (h.sourceIndex !== undefined) {
    s.sourceIndex = await KeptSourceIndex.open(h.sourceIndex, src, h.topBlock!, h.dryRun === true);
  }
  const ready: Ready = {
    version: PROTOCOL_VERSION,
    size: src.size,
    kind: src.kind,
    created: false,
    zero: false,
    encoding,
    node: process.version,
    ...(s.direct !== undefined ? { target: s.direct.ready } : {}),
    ...(s.sourceIndex !== undefined ? { sourceIndex: s.sourceIndex.report() } : {}),
  };
  const digests = s.sourceIndex?.used === true && h.topUnit > 0;
  return { ready, digests };
}

async function openTargetEnd(s: AgentSession, h: Hello, encoding: string): Promise<OpenedEnd> {
  const size = h.size!;
  const dryRun = h.dryRun === true;
  const found = await openTarget(h.path, { readOnly: dryRun });
  const prepared = await prepareDestination(found, size, dryRun).catch(async (err: unknown) => {
    await found.fh?.close();
    throw err;
  });
  const { created, zero } = prepared;
  const fh = prepared.target?.fh;
  const kind = prepared.target?.kind ?? 'file';
  // a block device is claimed by O_EXCL; a file by the lock a local blksync takes too,
  // taken (a perl process: ~20 ms) while the index is read, held before READY (no DATA comes
  // before it, so nothing is written unlocked)
  const locking =
    !dryRun && fh !== undefined && kind === 'file' ? lockAgentTarget(fh.fd, h.path) : undefined;
  locking?.catch(() => {}); // awaited below, before READY or on failure
  const locked = async (): Promise<void> => {
    try {
      await locking;
    } catch (err) {
      await fh?.close();
      throw err;
    }
  };
  // what READY reports as DST's size: past the image only where DST was larger
  const have = size + prepared.extraBytes;
  s.opened = {
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
  if (h.verify === true) s.written = new WrittenRanges();
  let digests = false;
  const opening =
    h.index === undefined
      ? undefined
      : AgentIndex.open(
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
  let index: AgentIndex | undefined;
  try {
    index = await opening;
  } catch (err) {
    // a busy DST is the error to tell, whatever the index had to say
    await locked();
    throw err;
  }
  await locked();
  s.index = index;
  if (index !== undefined) {
    digests =
      index.used &&
      h.index!.topDigest === true &&
      h.topUnit > 0 &&
      h.topUnit % index.blockSize === 0 &&
      fh !== undefined;
  }
  const ready: Ready = {
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
      ? { identity: await syncedIdentityOf(h.path, found.fh, found.stats, found.size) }
      : {}),
  };
  return { ready, digests };
}

/**
 * A compressed SRC would be copied as its compressed bytes: blksync decodes only where it
 * runs, and a decoder here would give neither the size up front nor reads by offset. Refused
 * before anything is opened for writing (--direct's target is opened after this); the
 * router (src/copy.ts, with remote/copy/options.ts) adds what to do instead. `raw` (--raw):
 * a container is sent as it is.
 */
async function refuseCompressed(
  path: string,
  fh: FileHandle,
  size: number,
  raw: boolean,
): Promise<void> {
  const sniffed = await sniffFile(fh, size);
  // a container (zip, qcow2, ...) would be written as its own bytes just the same
  if (sniffed === undefined || (sniffed.container !== undefined && raw)) return;
  await fh.close();
  throw sniffed.compression !== undefined
    ? new BlksyncError('ESRC_COMPRESSED', `${path} is ${sniffed.compression}-compressed`, { path })
    : new BlksyncError('ESRC_CONTAINER', `${path} is a ${sniffed.container.name}`, { path });
}
