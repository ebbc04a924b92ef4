/**
 * The JSON messages of the remote protocol, validated before use: the agent's READY, ERROR,
 * SUMMARY and PROGRESS on blksync's side, HELLO on the agent's. A peer is not trusted
 * (docs/protocol.md, "What each end refuses"): a field of the wrong type, a negative or
 * unsafe number, a string where a number belongs, a `null`, or a value that contradicts what
 * was asked (a READY smaller than the image being pushed, an encoding not offered) is a
 * ProtocolError naming the field, which each end turns into EREMOTE_PROTOCOL.
 *
 * Each message has a small schema made of the checks below; a parse returns the value typed
 * only once every field has passed. Shared by both ends, so it imports node built-ins and
 * protocol.ts only and runs on Node 18 (the agent's floor).
 */

import {
  GMAC_KEY_BYTES,
  MAX_REQUEST_BYTES,
  MIN_HASH_UNIT,
  PROTOCOL_VERSION,
  ProtocolError,
  TOP_HASH_BLOCKS,
  TOP_HASH_GMAC,
  type DirectHello,
  type DirectReport,
  type Hello,
  type IndexHello,
  type SourceIndexHello,
  type Ready,
  type Summary,
  type WireError,
} from './protocol.js';
import type { Progress } from '../types.js';
import { DEFLATE_RAW } from './compress.js';

/** Longest string field taken from a peer (paths, messages, versions). */
const MAX_TEXT = 4096;
/** Most ranges a direct copy's SUMMARY may list (the pipeline keeps the first few). */
const MAX_REPORTED_RANGES = 100_000;
/** Longest ssh command line or error code a message may carry. */
const MAX_WORD = 1024;

/** A check: returns `v` typed, or throws ProtocolError naming `at`. */
type Check<T> = (v: unknown, at: string) => T;

function bad(at: string, v: unknown, what: string): never {
  const shown = typeof v === 'string' ? JSON.stringify(v.slice(0, 40)) : String(v);
  throw new ProtocolError(`${at}: ${shown} is not ${what}`);
}

/** A count or size: a safe integer from 0 (never above 2^53, which no offset reaches). */
const uint: Check<number> = (v, at) =>
  typeof v === 'number' && Number.isSafeInteger(v) && v >= 0 ? v : bad(at, v, 'a size');

/** A duration or CPU time in seconds: finite, not negative. */
const seconds: Check<number> = (v, at) =>
  typeof v === 'number' && Number.isFinite(v) && v >= 0 ? v : bad(at, v, 'a duration');

const bool: Check<boolean> = (v, at) => (typeof v === 'boolean' ? v : bad(at, v, 'a boolean'));

function text(max = MAX_TEXT, nonEmpty = false): Check<string> {
  return (v, at) =>
    typeof v === 'string' && v.length <= max && (!nonEmpty || v !== '')
      ? v
      : bad(at, v, nonEmpty ? 'a non-empty string' : 'a string');
}

function oneOf<T extends string>(...values: T[]): Check<T> {
  return (v, at) =>
    typeof v === 'string' && (values as string[]).includes(v)
      ? (v as T)
      : bad(at, v, `one of ${values.join(', ')}`);
}

function matching(re: RegExp, what: string): Check<string> {
  return (v, at) => (typeof v === 'string' && re.test(v) ? v : bad(at, v, what));
}

/** A block size: a power of two from MIN_HASH_UNIT up to MAX_REQUEST_BYTES. */
const blockSize: Check<number> = (v, at) => {
  const n = uint(v, at);
  return n >= MIN_HASH_UNIT && n <= MAX_REQUEST_BYTES && (n & (n - 1)) === 0
    ? n
    : bad(at, v, 'a power of two from 512');
};

function array<T>(item: Check<T>, max: number): Check<T[]> {
  return (v, at) => {
    if (!Array.isArray(v) || v.length > max) bad(at, '[...]', `a list of at most ${max}`);
    return (v as unknown[]).map((x, i) => item(x, `${at}[${i}]`));
  };
}

type Shape = Record<string, Check<unknown>>;
type Out<S extends Shape> = { [K in keyof S]: ReturnType<S[K]> };

/**
 * An object with `required` fields and `optional` ones (absent, or valid); other fields are
 * ignored (a newer peer's optional additions do not break an older one).
 */
function object<R extends Shape, O extends Shape>(
  required: R,
  optional: O = {} as O,
): Check<Out<R> & Partial<Out<O>>> {
  return (v, at) => {
    if (v === null || typeof v !== 'object' || Array.isArray(v)) bad(at, v, 'an object');
    const o = v as Record<string, unknown>;
    const out: Record<string, unknown> = {};
    for (const [k, check] of Object.entries(required)) out[k] = check(o[k], `${at}.${k}`);
    for (const [k, check] of Object.entries(optional)) {
      if (o[k] !== undefined) out[k] = check(o[k], `${at}.${k}`);
    }
    return out as Out<R> & Partial<Out<O>>;
  };
}

function json(payload: Buffer, name: string): unknown {
  try {
    return JSON.parse(payload.toString('utf8')) as unknown;
  } catch {
    throw new ProtocolError(`${name} is not JSON`);
  }
}

const knownIdentity = object(
  {
    kind: oneOf('file', 'block-device'),
    size: uint,
    key: text(MAX_WORD, true),
    weak: bool,
  },
  {
    mtimeNs: matching(/^\d{1,30}$/, 'nanoseconds'),
    ctimeNs: matching(/^\d{1,30}$/, 'nanoseconds'),
    bootId: text(MAX_WORD, true),
    sectorsWritten: matching(/^\d{1,30}$/, 'a sector count'),
    model: text(),
    path: text(),
  },
);

/** Most fields an identity may carry; each is compared between runs, so none is dropped. */
const MAX_IDENTITY_FIELDS = 32;

/**
 * DST's identity, the stamp an index keeps and compares: the known fields checked, and every
 * other field kept as long as it is a bounded string, a safe integer or a boolean — a field
 * dropped here would make a later comparison vouch with less than was recorded.
 */
const identity: Check<ReturnType<typeof knownIdentity> & Record<string, unknown>> = (v, at) => {
  const known = knownIdentity(v, at);
  const o = v as Record<string, unknown>;
  const keys = Object.keys(o);
  if (keys.length > MAX_IDENTITY_FIELDS) bad(at, '{...}', `at most ${MAX_IDENTITY_FIELDS} fields`);
  const out: Record<string, unknown> = { ...known };
  for (const k of keys) {
    if (k in out || k === '__proto__') continue;
    const x = o[k];
    if (x === undefined) continue;
    out[k] =
      typeof x === 'boolean'
        ? x
        : typeof x === 'number'
          ? uint(x, `${at}.${k}`)
          : text(MAX_WORD)(x, `${at}.${k}`);
  }
  return out as ReturnType<typeof knownIdentity> & Record<string, unknown>;
};

const indexReport = object(
  {
    path: text(),
    mode: oneOf('used', 'created', 'rebuilt'),
    blockSize,
    bytesHashed: uint,
    sampleBlocks: uint,
    bytesReread: uint,
    checkpoints: uint,
  },
  {
    reason: text(),
    trustedOnWord: bool,
    // DST written by another program while the agent wrote it (WDST_WRITTEN_MEANWHILE)
    sectorsWrittenMeanwhile: uint,
    changedMeanwhile: bool,
  },
);

const verifySummary = object({ direct: bool, bytesRead: uint, seconds });

const summaryFields = {
  bytes: uint,
  frames: uint,
  // empty only in the stand-in summary of an interrupted direct copy's target
  digest: matching(/^([0-9a-f]{64})?$/, 'a hex SHA-256'),
  bytesRead: uint,
};
const summaryOptional = {
  cpuSeconds: seconds,
  identity,
  index: indexReport,
  verify: verifySummary,
  sourceIndexNotWritten: text(),
};
const targetSummary = object(summaryFields, summaryOptional);

const directReport: Check<DirectReport> = object(
  {
    interrupted: bool,
    bytesScanned: uint,
    blocksDiffering: uint,
    bytesDiffering: uint,
    rangesWritten: uint,
    ranges: array(object({ start: uint, end: uint }), MAX_REPORTED_RANGES),
    bytesReadSource: uint,
    target: targetSummary,
    bytesSent: uint,
    bytesReceived: uint,
  },
  {
    verify: object({ bytesVerified: uint, ranges: uint, direct: bool, seconds }),
  },
);

/** What a READY must agree with: what the HELLO asked. */
export interface ReadyContext {
  role: Hello['role'];
  /** target: the image size pushed; READY's size (the file's) cannot be smaller. */
  size?: number | undefined;
  encodings: string[];
  identity?: boolean | undefined;
  /** source with --direct: the HELLO sent on to the other host's target. */
  direct?: DirectHello | undefined;
  index?: IndexHello | undefined;
  sourceIndex?: SourceIndexHello | undefined;
}

const readyIndex = object(
  { mode: oneOf('used', 'created', 'rebuilt'), path: text(), blockSize },
  { digests: bool },
);

// 'kept' never comes from an agent: it is asked only where the index of DST is used
const readySourceIndex = object(
  { mode: oneOf('used', 'created', 'rebuilt'), path: text(), sampleBlocks: uint },
  { reason: text() },
);

function checkReady(v: unknown, at: string, c: ReadyContext): Ready {
  const r = object(
    {
      version: uint,
      size: uint,
      kind: oneOf('file', 'block-device'),
      created: bool,
      zero: bool,
      encoding: text(64),
      node: text(64),
    },
    { identity, index: readyIndex, sourceIndex: readySourceIndex, target: (x: unknown) => x },
  )(v, at);
  if (r.version !== PROTOCOL_VERSION) bad(`${at}.version`, r.version, `${PROTOCOL_VERSION}`);
  if (r.encoding !== '' && !c.encodings.includes(r.encoding)) {
    bad(`${at}.encoding`, r.encoding, 'an encoding offered');
  }
  if (c.role === 'target' && c.size !== undefined && r.size < c.size) {
    bad(`${at}.size`, r.size, `at least the image's ${c.size} bytes`);
  }
  if (r.identity !== undefined && c.identity !== true) bad(`${at}.identity`, '{...}', 'asked for');
  if (r.index !== undefined && c.index === undefined) bad(`${at}.index`, '{...}', 'asked for');
  if (r.sourceIndex !== undefined && c.sourceIndex === undefined) {
    bad(`${at}.sourceIndex`, '{...}', 'asked for');
  }
  const { target, ...rest } = r;
  if (target === undefined) {
    if (c.direct !== undefined) bad(`${at}.target`, undefined, "the other host's READY");
    return rest;
  }
  if (c.direct === undefined) bad(`${at}.target`, '{...}', 'asked for');
  return {
    ...rest,
    target: checkReady(target, `${at}.target`, {
      role: 'target',
      size: r.size,
      // offered by the source agent to the other host, not by blksync
      encodings: [DEFLATE_RAW],
      identity: false,
      index: c.direct.index,
    }),
  };
}

/** A READY payload, checked against the HELLO that asked for it. */
export function parseReady(payload: Buffer, c: ReadyContext): Ready {
  return checkReady(json(payload, 'READY'), 'READY', c);
}

/** A SUMMARY payload. */
export function parseSummary(payload: Buffer): Summary {
  return object(summaryFields, { ...summaryOptional, direct: directReport })(
    json(payload, 'SUMMARY'),
    'SUMMARY',
  );
}

/** An ERROR payload; its code must look like one of ours (E + capitals). */
export function parseWireError(payload: Buffer): WireError {
  return object(
    { code: matching(/^E[A-Z0-9_]{1,40}$/, 'an error code'), message: text() },
    { path: text() },
  )(json(payload, 'ERROR'), 'ERROR');
}

/** A PROGRESS payload (from an agent running a --direct copy). */
export function parseProgress(payload: Buffer): Progress {
  return object(
    { bytesScanned: uint, bytesTotal: uint, bytesDiffering: uint, bytesWritten: uint },
    { channelBytesSent: uint, channelBytesReceived: uint },
  )(json(payload, 'PROGRESS'), 'PROGRESS');
}

const indexHello: Check<IndexHello> = (v, at) => {
  const i = object(
    {
      path: text(MAX_TEXT, true),
      blockSize,
      blockSizeGiven: bool,
      chunkSize: uint,
      rebuild: bool,
      verifySample: uint,
      full: bool,
    },
    { topDigest: bool, trust: bool },
  )(v, at);
  if (i.chunkSize < i.blockSize || i.chunkSize > MAX_REQUEST_BYTES) {
    bad(`${at}.chunkSize`, i.chunkSize, 'a chunk from the block size up to 64 MiB');
  }
  return i;
};

const sourceIndexHello: Check<SourceIndexHello> = object({
  path: text(MAX_TEXT, true),
  rebuild: bool,
  verifySample: uint,
});

const directHello: Check<DirectHello> = (v, at) => {
  const d = object(
    {
      destination: text(MAX_WORD, true),
      path: text(MAX_TEXT, true),
      blockSize,
      chunkSize: uint,
    },
    {
      ssh: text(MAX_WORD),
      remoteNode: text(MAX_WORD),
      sudo: bool,
      dryRun: bool,
      full: bool,
      verify: bool,
      index: indexHello,
      timeout: seconds,
    },
  )(v, at);
  // ssh would read it as an option (spec.ts refuses it on blksync's side)
  const host = d.destination.slice(d.destination.lastIndexOf('@') + 1);
  if (d.destination.startsWith('-') || host.startsWith('-')) {
    bad(`${at}.destination`, d.destination, 'a host');
  }
  if (d.path.startsWith('-')) bad(`${at}.path`, d.path, 'a path');
  if (
    d.chunkSize < d.blockSize ||
    d.chunkSize > MAX_REQUEST_BYTES ||
    d.chunkSize % d.blockSize !== 0
  ) {
    bad(`${at}.chunkSize`, d.chunkSize, 'a multiple of the block size up to 64 MiB');
  }
  return d;
};

/**
 * A HELLO payload (u16 version, then JSON), as the agent takes it. A version other than ours
 * is EREMOTE_PROTOCOL with what to do, thrown by the caller from `version`.
 */
export function parseHello(json: unknown): Hello {
  const h = object(
    {
      role: oneOf('target', 'source'),
      path: text(MAX_TEXT, true),
      topUnit: uint,
      encodings: array(text(64), 8),
    },
    {
      size: uint,
      dryRun: bool,
      topHash: oneOf(TOP_HASH_GMAC, TOP_HASH_BLOCKS),
      topBlock: blockSize,
      key: matching(new RegExp(`^[0-9a-f]{${2 * GMAC_KEY_BYTES}}$`), 'a hex AES-128 key'),
      reqHash: oneOf(TOP_HASH_GMAC),
      identity: bool,
      raw: bool,
      direct: directHello,
      index: indexHello,
      sourceIndex: sourceIndexHello,
      verify: bool,
      keepalive: seconds,
      trace: bool,
    },
  )(json, 'HELLO');
  if (h.topUnit !== 0 && (h.topUnit < MIN_HASH_UNIT || h.topUnit > MAX_REQUEST_BYTES)) {
    bad('HELLO.topUnit', h.topUnit, '0 or a unit from 512 bytes up to 64 MiB');
  }
  if (h.role === 'target' && h.size === undefined) bad('HELLO.size', undefined, 'a size');
  if (h.role === 'target' && h.direct !== undefined) bad('HELLO.direct', '{...}', 'for a source');
  if (h.role === 'source' && h.index !== undefined) bad('HELLO.index', '{...}', 'for a target');
  if (h.role === 'source' && h.verify !== undefined) bad('HELLO.verify', h.verify, 'for a target');
  if (h.role === 'target' && h.sourceIndex !== undefined) {
    bad('HELLO.sourceIndex', '{...}', 'for a source');
  }
  // its blocks are the digests' (a source agent with --direct runs a push of its own)
  if (h.sourceIndex !== undefined && (h.topHash !== TOP_HASH_BLOCKS || h.direct !== undefined)) {
    bad('HELLO.sourceIndex', '{...}', 'with topHash sha256-blocks, without direct');
  }
  if (h.role === 'target' && h.raw !== undefined) bad('HELLO.raw', h.raw, 'for a source');
  if (h.topHash === TOP_HASH_GMAC && h.key === undefined) bad('HELLO.key', undefined, 'a key');
  if (h.reqHash !== undefined && h.key === undefined) bad('HELLO.key', undefined, 'a key');
  // an index answers HASH_REQ from its table, which holds SHA-256
  if (h.reqHash !== undefined && h.index !== undefined) bad('HELLO.reqHash', h.reqHash, 'no index');
  if (h.topHash === TOP_HASH_BLOCKS && (h.topBlock === undefined || h.topUnit % h.topBlock !== 0)) {
    bad('HELLO.topBlock', h.topBlock, 'a block size dividing topUnit');
  }
  return h;
}
