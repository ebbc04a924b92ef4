/**
 * `blksync publish IMG [-o DIR]`: writes IMG.blkpub (the published index, formats/published.ts)
 * and IMG.blkpub.data (every chunk compressed on its own) so that `copy https://…/IMG DST`
 * fetches only the chunks DST lacks, by HTTP range requests, from any static web server.
 *
 * Deterministic: the same image gives the same bytes (chunks are compressed independently,
 * with fixed parameters, and written in chunk order whatever order compression finishes in).
 * Holes cost nothing: a chunk inside a hole (SEEK_DATA/SEEK_HOLE) is not read, and a chunk
 * of zeros is not stored.
 */

import { availableParallelism } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { brotliCompress, constants as zc, deflateRaw } from 'node:zlib';
import { BlksyncError, fromSystemError } from '../errors.js';
import {
  CODEC_BROTLI,
  CODEC_DEFLATE,
  chunkCount,
  chunkLength,
  DATA_SUFFIX,
  encodeHeader,
  encodeLeaf,
  groupChunksFor,
  groupCount,
  INDEX_SUFFIX,
  KIND_COMPRESSED,
  KIND_RAW,
  KIND_ZERO,
  LEAF_BYTES,
  MAX_CHUNK_SIZE,
  MAX_CHUNKS,
  MIN_CHUNK_SIZE,
  type Codec,
  type PublishedHeader,
} from '../formats/published.js';
import { HASH_BYTES, isZero, sha256, sha256Stream, zeroes, zeroHash } from '../hash.js';
import { openSource } from '../io/open.js';
import { SourceWatch } from '../io/source-watch.js';
import { OutputFile, writeOutputFile } from '../io/output-file.js';
import { readFully } from '../io/read-fully.js';
import type { Range } from '../ranges.js';

/**
 * 64 KiB chunks: on the realistic 1 GiB ext4 pair a one-file change costs two chunks; smaller
 * chunks compress worse (each starts with an empty dictionary) and cost more index.
 */
export const DEFAULT_PUBLISH_CHUNK_SIZE = 64 * 1024;
export const DEFAULT_CODEC: Codec = CODEC_BROTLI;
/** Brotli quality: see docs/formats/published.md for the measurements behind it. */
const BROTLI_QUALITY = 5;
const DEFLATE_LEVEL = 9;
/** Chunks compressed at once (zlib runs them on libuv's thread pool). */
const IN_FLIGHT = Math.max(2, availableParallelism() * 2);

export interface PublishOptions {
  /** Directory to write into (default: beside IMG). */
  outputDir?: string | undefined;
  chunkSize?: number | undefined;
  codec?: Codec | undefined;
  signal?: AbortSignal | undefined;
  onProgress?: ((p: { bytesScanned: number; bytesTotal: number }) => void) | undefined;
}

export interface PublishResult {
  image: string;
  index: string;
  data: string;
  imageSize: number;
  chunkSize: number;
  chunks: number;
  zeroChunks: number;
  dataBytes: number;
  indexBytes: number;
  codec: 'brotli' | 'deflate';
  /** The root of the chunk hashes: what `copy` checks DST against. */
  root: string;
  sha256: string;
  seconds: number;
}

const deflateAsync = promisify(deflateRaw);
const brotliAsync = promisify(brotliCompress);

/** Compresses one chunk with the publisher's fixed parameters. */
export function compressChunk(codec: Codec, data: Buffer): Promise<Buffer> {
  if (codec === CODEC_DEFLATE) return deflateAsync(data, { level: DEFLATE_LEVEL });
  return brotliAsync(data, {
    params: {
      [zc.BROTLI_PARAM_QUALITY]: BROTLI_QUALITY,
      [zc.BROTLI_PARAM_SIZE_HINT]: data.length,
    },
  });
}

/** The data ranges of the image (holes left out); all of it when it has no holes to find. */
async function dataRanges(
  fh: import('node:fs/promises').FileHandle,
  size: number,
  kind: string,
  path: string,
): Promise<Range[]> {
  if (kind !== 'file') return [{ start: 0, end: size }];
  const { mappedRanges } = await import('../io/sparse-map.js');
  return mappedRanges(fh, size, MIN_CHUNK_SIZE, path);
}

/**
 * A compressed image or a container (zip, qcow2, a fixed VHD, ...) would be published as its
 * own bytes, where `copy` of it decodes it: refused, saying to publish the image it holds.
 */
async function refuseEncoded(
  image: string,
  fh: import('node:fs/promises').FileHandle,
  size: number,
  kind: string,
  outputDir: string | undefined,
): Promise<void> {
  const { sniffFile } = await import('../containers/sniff-file.js');
  const sniffed = await sniffFile(fh, size);
  if (sniffed === undefined) return;
  const what =
    sniffed.compression !== undefined
      ? `${sniffed.compression}-compressed`
      : `a ${sniffed.container.name}`;
  // beside a device (in /dev) a file of the image's size would take RAM: in -o DIR, or here
  const plain = join(outputDir ?? (kind === 'file' ? dirname(image) : '.'), 'plain.img');
  throw new BlksyncError(
    sniffed.compression !== undefined ? 'ESRC_COMPRESSED' : 'ESRC_CONTAINER',
    `${image} is ${what}, and a copy of its URL writes the image it holds: publish that image (blksync copy ${image} ${plain}; blksync publish ${plain}); the web server needs only its published files`,
    { path: image },
  );
}

/** Publishes IMG: see the file header. */
export async function publish(image: string, options: PublishOptions = {}): Promise<PublishResult> {
  const started = performance.now();
  const chunkSize = options.chunkSize ?? DEFAULT_PUBLISH_CHUNK_SIZE;
  if (
    (chunkSize & (chunkSize - 1)) !== 0 ||
    chunkSize < MIN_CHUNK_SIZE ||
    chunkSize > MAX_CHUNK_SIZE
  ) {
    throw new BlksyncError(
      'EUSAGE',
      `invalid chunk size ${chunkSize}: give a power of two from 4K to 4M`,
    );
  }
  const codec = options.codec ?? DEFAULT_CODEC;
  const dir = options.outputDir ?? dirname(image);
  const indexPath = join(dir, basename(image) + INDEX_SUFFIX);
  const dataPath = join(dir, basename(image) + DATA_SUFFIX);
  const src = await openSource(image);
  let data: OutputFile | undefined;
  try {
    // another program writing IMG meanwhile would leave files that stand for an image no one
    // made (chunks of the old and of the new), which copies of its URL would write
    const watch = await SourceWatch.start(src.fh, image);
    const size = src.size;
    await refuseEncoded(image, src.fh, size, src.kind, options.outputDir);
    const shape = { imageSize: size, chunkSize };
    const chunks = chunkCount(shape);
    if (chunks > MAX_CHUNKS) {
      throw new BlksyncError(
        'EUSAGE',
        `${image} would have ${chunks} chunks, more than ${MAX_CHUNKS}: give a larger --chunk-size`,
        { path: image },
      );
    }
    const ranges = await dataRanges(src.fh, size, src.kind, image);
    data = await OutputFile.open(dataPath, { what: 'published data', code: 'EWRITE' });
    const leaves = Buffer.alloc(chunks * LEAF_BYTES);
    const whole = sha256Stream();
    let dataBytes = 0;
    let zeroChunks = 0;
    let r = 0;
    // chunks being compressed, in chunk order; written out as the oldest completes
    const pending: { i: number; content: Buffer; stored: Promise<Buffer> | undefined }[] = [];
    const flush = async (): Promise<void> => {
      const p = pending.shift()!;
      const len = p.content.length;
      // a chunk of zeros (most of a sparse image) hashes as every other one of its length
      const hash = p.stored === undefined ? zeroHash(len) : sha256(p.content);
      whole.update(p.content);
      let kind = KIND_ZERO;
      let stored: Buffer | undefined;
      if (p.stored !== undefined) {
        const c = await p.stored;
        stored = c.length < len ? c : p.content;
        kind = c.length < len ? KIND_COMPRESSED : KIND_RAW;
      } else zeroChunks++;
      encodeLeaf(
        { hash, offset: stored ? dataBytes : 0, length: stored?.length ?? 0, kind },
        leaves,
        p.i * LEAF_BYTES,
      );
      if (stored !== undefined) {
        await data!.write(stored);
        dataBytes += stored.length;
      }
    };
    for (let i = 0; i < chunks; i++) {
      if (options.signal?.aborted === true) {
        throw new BlksyncError('EINTERRUPTED', 'interrupted; nothing was published');
      }
      const start = i * chunkSize;
      const len = chunkLength(shape, i);
      while (r < ranges.length && ranges[r]!.end <= start) r++;
      const mapped = r < ranges.length && ranges[r]!.start < start + len;
      let content: Buffer;
      if (!mapped) content = zeroes(len);
      else {
        content = Buffer.allocUnsafe(len);
        let got: number;
        try {
          got = await readFully(src.fh, content, 0, len, start);
        } catch (err) {
          throw fromSystemError('EREAD', 'cannot read', image, err);
        }
        if (got < len) {
          throw new BlksyncError(
            'ESRC_SHORT',
            `${image} ended at ${start + got} bytes while being read; did it shrink?`,
            {
              path: image,
            },
          );
        }
      }
      const zero = !mapped || isZero(content);
      if (zero && mapped) content = zeroes(len);
      pending.push({ i, content, stored: zero ? undefined : compressChunk(codec, content) });
      if (pending.length >= IN_FLIGHT) await flush();
      options.onProgress?.({ bytesScanned: start + len, bytesTotal: size });
    }
    while (pending.length > 0) await flush();
    await watch?.check('nothing was published');

    const groups = groupCount({ ...shape, groupChunks: groupChunksFor(chunks) });
    const groupChunks = groupChunksFor(chunks);
    const top = Buffer.alloc(groups * HASH_BYTES);
    const hashes = Buffer.alloc(groupChunks * HASH_BYTES);
    for (let g = 0; g < groups; g++) {
      const first = g * groupChunks;
      const n = Math.min(chunks, first + groupChunks) - first;
      for (let k = 0; k < n; k++) {
        leaves.copy(
          hashes,
          k * HASH_BYTES,
          (first + k) * LEAF_BYTES,
          (first + k) * LEAF_BYTES + HASH_BYTES,
        );
      }
      sha256(hashes, 0, n * HASH_BYTES).copy(top, g * HASH_BYTES);
    }
    const header: PublishedHeader = {
      imageSize: size,
      chunkSize,
      groupChunks,
      codec,
      dataSize: dataBytes,
      root: sha256(top),
      imageSha256: whole.digest(),
    };
    // the data first: an index is never there without the data it points into
    await data.commit();
    data = undefined;
    await writeOutputFile(indexPath, [encodeHeader(header), top, leaves], {
      what: 'published index',
      code: 'EWRITE',
    });
    return {
      image,
      index: indexPath,
      data: dataPath,
      imageSize: size,
      chunkSize,
      chunks,
      zeroChunks,
      dataBytes,
      indexBytes: 128 + top.length + leaves.length,
      codec: codec === CODEC_BROTLI ? 'brotli' : 'deflate',
      root: header.root.toString('hex'),
      sha256: header.imageSha256.toString('hex'),
      seconds: (performance.now() - started) / 1000,
    };
  } finally {
    await data?.abort();
    await src.fh.close();
  }
}
