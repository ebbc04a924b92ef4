/**
 * `copy https://host/IMG DST` when IMG is published (IMG.blkpub beside it): the pipeline's
 * Plan and Source for a copy that downloads only the chunks DST lacks.
 *
 *   1. probe IMG.blkpub: one request for the header and the top level (a "not found" page,
 *      whatever its status, fails the magic check: not published, the image streams as before)
 *   2. hash DST's chunks here (holes of a sparse DST are not read), and each group of them:
 *      the groups whose hash differs from the top level's are the only ones whose leaf
 *      records are fetched (one request, several ranges)
 *   3. the plan is the chunks whose hash differs; the source fetches their stored bytes
 *      from IMG.blkpub.data (one request, several ranges, coalesced), decompresses each with
 *      a bound, and checks its SHA-256 before the pipeline sees a byte of it
 *   4. the pipeline then reads DST there and writes only the blocks that differ
 *
 * Before anything is written, the root over the hashes DST will hold (its own where they
 * matched, the published ones where chunks are fetched, each checked as it arrives) is
 * checked against the index's: the whole-image check costs no second read of DST.
 */

import { open, type FileHandle } from 'node:fs/promises';
import { brotliDecompressSync, inflateRawSync } from 'node:zlib';
import { BlksyncError, fromSystemError, type BlksyncWarning } from '../errors.js';
import {
  checkTop,
  chunkCount,
  chunkLength,
  CODEC_BROTLI,
  DATA_SUFFIX,
  groupCount,
  groupLeafRange,
  HEADER_BYTES,
  indexBytes,
  INDEX_SUFFIX,
  KIND_COMPRESSED,
  KIND_RAW,
  KIND_ZERO,
  checkGroup,
  leafAt,
  looksPublished,
  parseHeader,
  topBytes,
  type Leaf,
  type PublishedHeader,
} from '../formats/published.js';
import { HASH_BYTES, sha256 } from '../hash.js';
import {
  CONTAINER_HEAD_BYTES,
  CONTAINER_TAIL_BYTES,
  detectContainer,
} from '../containers/detect.js';
import { detectCompression } from '../io/compression-magic.js';
import { bodyStream, httpOpen, type HttpOptions, type HttpResponse } from '../io/http-source.js';
import { readFully } from '../io/read-fully.js';
import type { Range } from '../ranges.js';
import type { Plan, Source } from '../types.js';
import { trace } from '../trace.js';
import { prepareDestination, type DestinationIdentity } from './dest-hashes.js';
import { sectorsWritten } from '../io/write-counter.js';
import { RangeClient } from './range-client.js';

/** The first request asks for this much of the index: the header and a top level of 256 groups. */
export const PROBE_BYTES = HEADER_BYTES + 256 * HASH_BYTES;

/** What a copy from a published image reports (`--json`: `http`). */
export interface DeltaReport {
  index: string;
  data: string;
  /** HTTP requests made, and body bytes received. */
  requests: number;
  bytesFetched: number;
  chunkSize: number;
  /** Chunks whose hash differed from DST's: fetched, or zeros made here. */
  chunksDiffering: number;
  chunksFetched: number;
  /** Differing chunks read from another place of DST, which holds them (moved data), not fetched. */
  chunksSeeded: number;
  /** Stored bytes those chunks take in the data file. */
  storedBytes: number;
  groupsFetched: number;
  /** The root of the chunk hashes, checked against what DST holds after the copy. */
  root: string;
}

/** `url` with `suffix` added to its path (before a query). */
export function besideUrl(url: string, suffix: string): string {
  const u = new URL(url);
  u.pathname += suffix;
  u.hash = '';
  return u.href;
}

/** The names of IMG's published files. */
export function publishedUrls(url: string): { index: string; data: string } {
  return { index: besideUrl(url, INDEX_SUFFIX), data: besideUrl(url, DATA_SUFFIX) };
}

export interface PublishedSourceOptions extends HttpOptions {
  /** DST: its chunks are hashed to find what to fetch. Missing or empty: all zeros. */
  destination: string;
  /** --raw: a compressed image or a container is written as it is, so its published files serve. */
  raw?: boolean | undefined;
  /**
   * Told when the published files are older than the image they stand for (WPUB_STALE), or
   * stand for a container's own bytes (WPUB_CONTAINER).
   */
  onWarning?: ((warning: BlksyncWarning) => void) | undefined;
  /** Told as DST is hashed: bytes of its data hashed so far, of all to hash. */
  onHashed?: ((done: number, total: number) => void) | undefined;
}

/**
 * Why the published files must not stand for the image at `url`, or undefined when nothing
 * says so: a range request for the image's first bytes tells its size (206's Content-Range,
 * or a 200's Content-Length), its Last-Modified, and what it is. An image of another size,
 * or modified after the published index, is stale (WPUB_STALE); a compressed image or a
 * container (zip, tar, qcow2, ...) was published as it is, while a copy writes what it holds
 * (WPUB_CONTAINER; not with --raw). An image the server does not have (404) leaves the
 * published files to stand alone.
 */
async function imageMismatch(
  url: string,
  size: number,
  indexModified: number | undefined,
  options: PublishedSourceOptions,
  asked: { requests: number },
): Promise<BlksyncWarning | undefined> {
  asked.requests++;
  const res = await httpOpen(url, {
    ...options,
    headers: { range: `bytes=0-${CONTAINER_HEAD_BYTES - 1}` },
  });
  if (res.status < 200 || res.status > 299) {
    res.body.destroy();
    return undefined;
  }
  const head = await readHead(res, CONTAINER_HEAD_BYTES);
  const range = /\/(\d+)\s*$/.exec(res.body.headers['content-range'] ?? '');
  const total = res.status === 206 ? (range !== null ? Number(range[1]) : undefined) : res.length;
  const modified = Date.parse(res.body.headers['last-modified'] ?? '');
  const stale =
    total !== undefined && total !== size
      ? `the image is ${total} bytes, the published one ${size}`
      : indexModified !== undefined && Number.isFinite(modified) && modified > indexModified
        ? 'the image was modified after it was published'
        : undefined;
  if (stale !== undefined) {
    // the image was replaced and not published again: what the published files hold is not
    // what the URL serves, so the URL is streamed as it is
    return {
      code: 'WPUB_STALE',
      message: `${url} does not match its published files (${stale}); reading the image itself, not by ranges: run blksync publish again`,
    };
  }
  if (options.raw === true) return undefined;
  const compression = detectCompression(head);
  let what = compression !== undefined ? `a ${compression} stream` : detectContainer(head)?.name;
  // (a server that ignored the range would send the whole image again: not asked)
  if (
    what === undefined &&
    res.status === 206 &&
    total !== undefined &&
    total >= CONTAINER_TAIL_BYTES
  ) {
    // a fixed VHD (or a dmg) shows only by its last 512 bytes, which a copy of the image
    // itself refuses at its end: its published files would write the footer with the disk
    asked.requests++;
    const tail = await readTail(url, total, options);
    if (tail !== undefined) what = detectContainer(head, tail)?.name;
  }
  if (what === undefined) return undefined;
  // by ranges, DST would get the container's own bytes; read as without the published files,
  // it gets the image the container holds (or a refusal naming it)
  return {
    code: 'WPUB_CONTAINER',
    message: `${url} is ${what}, published as it is, where a copy writes the image it holds; reading it itself, not by ranges: publish the image it holds (or copy with --raw to write it as it is)`,
  };
}

/**
 * The last CONTAINER_TAIL_BYTES of the `total`-byte image at `url`, or undefined when the
 * server does not answer that range as asked (then nothing is known of its end).
 */
async function readTail(
  url: string,
  total: number,
  options: PublishedSourceOptions,
): Promise<Buffer | undefined> {
  const start = total - CONTAINER_TAIL_BYTES;
  const res = await httpOpen(url, {
    ...options,
    headers: { range: `bytes=${start}-${total - 1}` },
  });
  const range = /^bytes (\d+)-(\d+)\/(\d+)\s*$/.exec(res.body.headers['content-range'] ?? '');
  if (
    res.status !== 206 ||
    range === null ||
    Number(range[1]) !== start ||
    Number(range[3]) !== total
  ) {
    res.body.destroy();
    return undefined;
  }
  const tail = await readHead(res, CONTAINER_TAIL_BYTES);
  return tail.length === CONTAINER_TAIL_BYTES ? tail : undefined;
}

/** Up to `n` bytes from the start of an answer's body; the rest is dropped. */
async function readHead(res: HttpResponse, n: number): Promise<Buffer> {
  const body = bodyStream(res);
  const parts: Buffer[] = [];
  let got = 0;
  try {
    for await (const c of body) {
      parts.push(c as Buffer);
      got += (c as Buffer).length;
      if (got >= n) break;
    }
  } finally {
    body.destroy();
  }
  return Buffer.concat(parts).subarray(0, n);
}

export interface PublishedSource {
  size: number;
  plan: Plan;
  source: Source;
  report(): DeltaReport;
  /**
   * Called with DST's stats once the copy has opened it (undefined: missing): what was hashed
   * must be what is written, or chunks taken as equal would be left as another file holds
   * them. EDEST_CHANGED when DST was replaced (or made, or removed) since it was hashed.
   */
  checkTarget(
    stats: { dev: number; ino: number; ctimeMs: number; rdev: number } | undefined,
  ): Promise<void>;
}

/** Reads and checks the header and top level; undefined when IMG is not published. */
async function probe(
  client: RangeClient,
): Promise<{ header: PublishedHeader; top: Buffer; whole: Buffer | undefined } | undefined> {
  const head = await client.head(PROBE_BYTES, looksPublished, (b) =>
    b.length >= HEADER_BYTES ? indexBytes(parseHeader(b, client.url)) : undefined,
  );
  if (head === undefined || !looksPublished(head.bytes)) return undefined;
  const header = parseHeader(head.bytes, client.url);
  const topEnd = HEADER_BYTES + topBytes(header);
  let bytes = head.bytes;
  // the index's size as the server tells it (a range's total): one cut short would otherwise
  // be found only where a differing group's records are missing, and blamed on the server
  const size = head.whole ? bytes.length : client.size;
  if (size !== undefined && size !== indexBytes(header)) {
    throw new BlksyncError(
      'EPUB_FORMAT',
      `${client.url} is ${size} bytes; its header describes ${indexBytes(header)}: publish again`,
      { path: client.url },
    );
  }
  if (!head.whole && bytes.length < topEnd) {
    const rest: Buffer[] = [bytes];
    for await (const piece of client.fetch([{ start: bytes.length, end: topEnd }])) {
      rest.push(Buffer.from(piece));
    }
    bytes = Buffer.concat(rest);
  }
  const top = Buffer.from(bytes.subarray(HEADER_BYTES, topEnd));
  checkTop(header, top, client.url);
  return { header, top, whole: head.whole ? bytes : undefined };
}

/**
 * The leaf records of the groups fetched, kept as the index holds them (48 bytes a chunk): an
 * object per chunk cost ~700 bytes, ~3 GB for the 4 Mi chunks an index may describe.
 */
class LeafTable {
  readonly #groups = new Map<number, Buffer>();
  readonly #groupChunks: number;

  constructor(groupChunks: number) {
    this.#groupChunks = groupChunks;
  }

  /** Group `g`'s records, checked (checkGroup). */
  set(g: number, records: Buffer): void {
    this.#groups.set(g, records);
  }

  /** Chunk `i`'s leaf (its hash a view into the records), if its group was fetched. */
  get(i: number): Leaf | undefined {
    const records = this.#groups.get(Math.floor(i / this.#groupChunks));
    return records === undefined ? undefined : leafAt(records, i % this.#groupChunks);
  }
}

function groupHash(h: PublishedHeader, hashes: Buffer, g: number): Buffer {
  const first = g * h.groupChunks;
  const last = Math.min(chunkCount(h), first + h.groupChunks);
  return sha256(hashes, first * HASH_BYTES, last * HASH_BYTES);
}

/**
 * Opens IMG's published files for a copy onto `destination`; undefined when IMG is not
 * published (the caller streams the image as before).
 */
export async function openPublished(
  url: string,
  options: PublishedSourceOptions,
): Promise<PublishedSource | undefined> {
  const names = publishedUrls(url);
  const index = new RangeClient(names.index, options);
  // DST is opened, mapped and its hashing thread started while the index is fetched, and
  // hashed while the image's freshness is asked: round trips hidden in local work
  const preparing = prepareDestination(options.destination);
  // a failure is seen where it is awaited; keep it from being unhandled meanwhile
  preparing.catch(() => {});
  const drop = async (): Promise<void> => {
    await preparing.then((d) => d.close()).catch(() => {});
  };
  let found: Awaited<ReturnType<typeof probe>>;
  try {
    found = await probe(index);
  } catch (err) {
    await drop();
    throw err;
  }
  if (found === undefined) {
    await drop();
    return undefined;
  }
  trace('published index: header and top level fetched');
  const { header: h, top } = found;
  const hashStop = new AbortController();
  const hashSignal =
    options.signal !== undefined
      ? AbortSignal.any([options.signal, hashStop.signal])
      : hashStop.signal;
  const hashing = preparing.then((d) => d.hash(h, hashSignal, options.onHashed));
  hashing.catch(() => {});
  let mismatch: BlksyncWarning | undefined;
  const imageProbes = { requests: 0 };
  try {
    mismatch = await imageMismatch(url, h.imageSize, index.lastModified, options, imageProbes);
  } catch (err) {
    hashStop.abort();
    await hashing.catch(() => {});
    await drop();
    throw err;
  }
  if (mismatch !== undefined) {
    hashStop.abort();
    await hashing.catch(() => {});
    await drop();
    options.onWarning?.(mismatch);
    index.close();
    return undefined;
  }
  trace('image is fresh (its published files match it)');
  let have: Buffer;
  let hashed: DestinationIdentity | undefined;
  try {
    have = await hashing;
    hashed = (await preparing).identity;
  } finally {
    // the hashing thread is stopped and DST's read handle closed off the critical path
    void drop();
  }
  trace('DST hashed');

  // the groups whose hashes differ, and their leaf records
  const groups = groupCount(h);
  const differing: number[] = [];
  for (let g = 0; g < groups; g++) {
    if (!groupHash(h, have, g).equals(top.subarray(g * HASH_BYTES, (g + 1) * HASH_BYTES))) {
      differing.push(g);
    }
  }
  const leafRanges = differing.map((g) => groupLeafRange(h, g));
  const leaves = new LeafTable(h.groupChunks);
  const take = (g: number, bytes: Buffer): void => {
    leaves.set(g, checkGroup(h, top, g, bytes, names.index));
  };
  if (found.whole !== undefined) {
    differing.forEach((g, n) =>
      take(g, found.whole!.subarray(leafRanges[n]!.start, leafRanges[n]!.end)),
    );
  } else if (differing.length > 0) {
    let n = 0;
    for await (const bytes of index.fetch(leafRanges)) take(differing[n++]!, bytes);
  }

  // the chunks to fetch: where DST's hash differs from the published one
  const needed: number[] = [];
  const final = Buffer.from(have);
  for (const g of differing) {
    const first = g * h.groupChunks;
    const last = Math.min(chunkCount(h), first + h.groupChunks);
    for (let i = first; i < last; i++) {
      const leaf = leaves.get(i)!;
      if (!leaf.hash.equals(have.subarray(i * HASH_BYTES, (i + 1) * HASH_BYTES))) {
        needed.push(i);
        leaf.hash.copy(final, i * HASH_BYTES);
      }
    }
  }
  // the whole-image check, before anything is written: the root over the hashes DST will hold
  // (a group whose hash matched the top level is unchanged: only differing ones are redone)
  const finalTop = Buffer.from(top.subarray(0, groups * HASH_BYTES));
  for (const g of differing) groupHash(h, final, g).copy(finalTop, g * HASH_BYTES);
  if (!sha256(finalTop).equals(h.root)) {
    throw new BlksyncError(
      'EPUB_CHECKSUM',
      `${names.index}: the chunk hashes do not add up to the index's root; nothing was written: rerun, or publish again`,
      { path: names.index },
    );
  }

  const ranges: Range[] = [];
  for (const i of needed) {
    const start = i * h.chunkSize;
    const end = start + chunkLength(h, i);
    const last = ranges[ranges.length - 1];
    if (last !== undefined && last.end === start) last.end = end;
    else ranges.push({ start, end });
  }
  // a publisher stores chunks in chunk order: stored pieces that do not ascend are a damaged
  // or hostile index (asked for as they are, the server would be blamed for the answer)
  let storedEnd = 0;
  for (const i of needed) {
    const leaf = leaves.get(i)!;
    if (leaf.kind === KIND_ZERO) continue;
    if (leaf.offset < storedEnd) {
      throw new BlksyncError(
        'EPUB_FORMAT',
        `${names.index}: chunk ${i}'s stored bytes overlap or precede the previous chunk's; publish again`,
        { path: names.index },
      );
    }
    storedEnd = leaf.offset + leaf.length;
  }
  const seeds = seedsInDestination(h, have, needed, leaves);
  const storedBytes = needed.reduce((n, i) => n + leaves.get(i)!.length, 0);
  const data = new RangeClient(names.data, {
    ...options,
    size: h.dataSize,
    sizeFrom: names.index,
  });
  const source = new ChunkSource(h, needed, leaves, data, seeds, options.destination);
  const destination = options.destination;
  return {
    size: h.imageSize,
    plan: { imageSize: h.imageSize, ranges },
    source,
    checkTarget: async (stats) => {
      const same =
        stats === undefined || hashed === undefined
          ? stats === hashed
          : stats.dev === hashed.dev && stats.ino === hashed.ino;
      // the same file written meanwhile (its ctime moved): what was hashed is not what it holds
      if (same && stats !== undefined && hashed?.ctimeMs !== undefined) {
        if (stats.ctimeMs !== hashed.ctimeMs) {
          throw new BlksyncError(
            'EDEST_CHANGED',
            `${destination} was written by another program after it was hashed against the published index (its ctime moved); nothing was written: stop what writes it and rerun`,
            { path: destination },
          );
        }
      }
      // a device written meanwhile: the kernel's count of sectors written to it moved
      if (same && stats !== undefined && hashed?.sectorsWritten !== undefined) {
        if ((await sectorsWritten(stats.rdev)) !== hashed.sectorsWritten) {
          throw new BlksyncError(
            'EDEST_CHANGED',
            `${destination} was written by another program after it was hashed against the published index (the kernel's count of sectors written to it moved); nothing was written: stop what writes it and rerun`,
            { path: destination },
          );
        }
      }
      if (!same) {
        throw new BlksyncError(
          'EDEST_CHANGED',
          `${destination} was ${stats === undefined ? 'removed' : hashed === undefined ? 'made' : 'replaced by another file'} after it was hashed against the published index; nothing was written: rerun`,
          { path: destination },
        );
      }
    },
    report: () => ({
      index: names.index,
      data: names.data,
      // and those that checked the image is the one published (imageMismatch: head, tail)
      requests: index.requests + data.requests + imageProbes.requests,
      bytesFetched: index.bytesReceived + data.bytesReceived,
      chunkSize: h.chunkSize,
      chunksDiffering: needed.length,
      chunksFetched: source.fetched,
      chunksSeeded: source.seeded,
      storedBytes,
      groupsFetched: differing.length,
      root: h.root.toString('hex'),
    }),
  };
}

/**
 * Moved data: for a differing stored chunk i whose new content DST already holds as chunk j,
 * i -> j, read from DST instead of fetched (as casync's and RAUC's seeds). j is a chunk this
 * copy does not write (not differing), so it still holds what was hashed unless another
 * program writes DST meanwhile, which the chunk's hash check then finds. Zeros are made here
 * anyway, so DST's chunks of zeros seed nothing.
 */
function seedsInDestination(
  h: PublishedHeader,
  have: Buffer,
  needed: number[],
  leaves: LeafTable,
): Map<number, number> {
  const seeds = new Map<number, number>();
  const chunks = chunkCount(h);
  const written = new Uint8Array(chunks);
  for (const i of needed) written[i] = 1;
  const zeroKey = sha256(Buffer.alloc(h.chunkSize)).toString('latin1');
  const heldKey = (j: number): string | undefined => {
    if (written[j] === 1) return undefined;
    const key = have.toString('latin1', j * HASH_BYTES, (j + 1) * HASH_BYTES);
    return key === zeroKey ? undefined : key;
  };
  const seed = (i: number, j: number): void => {
    if (chunkLength(h, i) === chunkLength(h, j)) seeds.set(i, j);
  };
  // a map over the smaller side: the chunks wanted, or those DST holds and keeps (an update
  // onto a DST of other content wants nearly all chunks: a map of them cost ~100 bytes each)
  if (needed.length <= chunks - needed.length) {
    const wanted = new Map<string, number[]>();
    for (const i of needed) {
      const leaf = leaves.get(i)!;
      if (leaf.kind === KIND_ZERO) continue;
      const key = leaf.hash.toString('latin1');
      // appended in place: copying the list per chunk was quadratic in chunks of one content
      // (an image padded with 0xff: minutes of planning before the first request)
      const list = wanted.get(key);
      if (list === undefined) wanted.set(key, [i]);
      else list.push(i);
    }
    for (let j = 0; j < chunks && wanted.size > 0; j++) {
      const key = heldKey(j);
      const list = key === undefined ? undefined : wanted.get(key);
      if (list === undefined) continue;
      for (const i of list) seed(i, j);
      wanted.delete(key!);
    }
  } else {
    // the first place DST holds each content
    const held = new Map<string, number>();
    for (let j = 0; j < chunks; j++) {
      const key = heldKey(j);
      if (key !== undefined && !held.has(key)) held.set(key, j);
    }
    if (held.size === 0) return seeds;
    for (const i of needed) {
      const leaf = leaves.get(i)!;
      if (leaf.kind === KIND_ZERO) continue;
      const j = held.get(leaf.hash.toString('latin1'));
      if (j !== undefined) seed(i, j);
    }
  }
  return seeds;
}

/**
 * The new bytes of the differing chunks, in order: stored ones fetched from the data file
 * (one streamed answer for all) or read where DST holds them (seeds), zero ones made here;
 * each checked against its hash.
 */
class ChunkSource implements Source {
  readonly size: number;
  readonly #h: PublishedHeader;
  readonly #needed: number[];
  readonly #leaves: LeafTable;
  readonly #stored: AsyncGenerator<Buffer>;
  readonly #data: RangeClient;
  #next = 0;
  #current: { index: number; data: Buffer } | undefined;
  #queue: Promise<unknown> = Promise.resolve();
  readonly #seeds: Map<number, number>;
  readonly #destination: string;
  #dst: FileHandle | undefined;
  fetched = 0;
  seeded = 0;

  constructor(
    h: PublishedHeader,
    needed: number[],
    leaves: LeafTable,
    data: RangeClient,
    seeds: Map<number, number>,
    destination: string,
  ) {
    this.size = h.imageSize;
    this.#h = h;
    this.#needed = needed;
    this.#leaves = leaves;
    this.#data = data;
    this.#seeds = seeds;
    this.#destination = destination;
    const pieces = needed
      .filter((i) => !seeds.has(i))
      .map((i) => leaves.get(i)!)
      .filter((l) => l.kind !== KIND_ZERO)
      .map((l) => ({ start: l.offset, end: l.offset + l.length }));
    // stored chunks lie in chunk order in the data file, so their pieces ascend
    this.#stored = data.fetch(pieces);
  }

  read(buf: Buffer, offset: number, length: number): Promise<number> {
    const p = this.#queue.then(() => this.#read(buf, offset, length));
    this.#queue = p.catch(() => {});
    return p;
  }

  async #read(buf: Buffer, offset: number, length: number): Promise<number> {
    const h = this.#h;
    let done = 0;
    while (done < length) {
      const at = offset + done;
      const i = Math.floor(at / h.chunkSize);
      const chunk = await this.#chunk(i);
      const from = at - i * h.chunkSize;
      const n = Math.min(length - done, chunk.length - from);
      chunk.copy(buf, done, from, from + n);
      done += n;
    }
    return done;
  }

  /** Chunk `i`'s content; chunks are asked for in ascending order, each maybe several times. */
  async #chunk(i: number): Promise<Buffer> {
    if (this.#current?.index === i) return this.#current.data;
    const h = this.#h;
    for (;;) {
      const want = this.#needed[this.#next];
      if (want === undefined || want > i) {
        throw new BlksyncError(
          'EPUB_FORMAT',
          `chunk ${i} was read but is not planned (internal error)`,
        );
      }
      this.#next++;
      const leaf = this.#leaves.get(want)!;
      const len = chunkLength(h, want);
      let data: Buffer;
      const seed = this.#seeds.get(want);
      if (leaf.kind === KIND_ZERO) data = Buffer.alloc(len);
      else if (seed !== undefined) {
        data = await this.#fromDestination(seed, len);
        if (!sha256(data).equals(leaf.hash)) {
          throw new BlksyncError(
            'EDEST_CHANGED',
            `${this.#destination} changed while it was copied onto (its chunk ${seed}, which holds chunk ${want}'s new content, no longer does): stop what writes it and rerun`,
            { path: this.#destination },
          );
        }
        this.seeded++;
      } else {
        const r = await this.#stored.next();
        if (r.done === true) {
          throw new BlksyncError(
            'ESRC_SHORT',
            `the published data ended before chunk ${want}; rerun`,
          );
        }
        data = decode(h, leaf, r.value, len, want);
        this.fetched++;
      }
      if (!sha256(data).equals(leaf.hash)) {
        throw new BlksyncError(
          'EPUB_CHECKSUM',
          `chunk ${want} of the published data does not match its hash; nothing of it was written. The data file is damaged or changed while being read: rerun, or publish again`,
        );
      }
      if (want === i) {
        this.#current = { index: i, data };
        return data;
      }
    }
  }

  /** Chunk `j` of DST, `len` bytes. */
  async #fromDestination(j: number, len: number): Promise<Buffer> {
    const path = this.#destination;
    try {
      this.#dst ??= await open(path, 'r');
      const data = Buffer.alloc(len);
      const got = await readFully(this.#dst, data, 0, len, j * this.#h.chunkSize);
      if (got < len) {
        throw new BlksyncError('EDEST_SHORT', `${path} ended while being read; rerun`, { path });
      }
      return data;
    } catch (err) {
      throw fromSystemError('EREAD', 'cannot read', path, err);
    }
  }

  async close(): Promise<void> {
    await this.#dst?.close().catch(() => {});
    this.#dst = undefined;
    // not awaited: a generator waiting on a stalled answer returns only once that settles,
    // which destroying the answer makes happen
    this.#data.close();
    this.#stored.return(undefined).catch(() => {});
    await Promise.resolve();
  }
}

/** A stored chunk's content: decompressed with its length as the bound (no bomb gets past it). */
function decode(h: PublishedHeader, leaf: Leaf, stored: Buffer, len: number, i: number): Buffer {
  if (leaf.kind === KIND_RAW) return Buffer.from(stored);
  if (leaf.kind !== KIND_COMPRESSED)
    throw new BlksyncError('EPUB_FORMAT', `chunk ${i}: unknown kind`);
  let out: Buffer;
  try {
    out =
      h.codec === CODEC_BROTLI
        ? brotliDecompressSync(stored, { maxOutputLength: len })
        : inflateRawSync(stored, { maxOutputLength: len });
  } catch (err) {
    throw new BlksyncError(
      'EPUB_CHECKSUM',
      `chunk ${i} of the published data does not decompress to its ${len} bytes (${(err as Error).message}); nothing of it was written: rerun, or publish again`,
      { cause: err },
    );
  }
  if (out.length !== len) {
    throw new BlksyncError(
      'EPUB_CHECKSUM',
      `chunk ${i} of the published data decompresses to ${out.length} bytes, not ${len}; nothing of it was written`,
    );
  }
  return out;
}
