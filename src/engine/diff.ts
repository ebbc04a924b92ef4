/**
 * `diff(base, next, output)`: a patch holding the blocks of NEW that differ from BASE.
 *
 *   plan: all of NEW × source: NEW × knowledge: BASE (its bytes, or its index) → PatchWriter
 *
 * For every differing span the writer also gets what BASE held there (through the
 * pipeline's onDiffer, from the knowledge's `held` bytes or `heldHashes`), so each record
 * carries the hash of the content it replaces and apply can refuse the wrong base.
 *
 * Sizes may differ. Past BASE's end every block of NEW is a record. When BASE is longer,
 * the blocks from the result's last block to BASE's end are written as "tail" records with
 * the old bytes (reversible patches) so that apply --reverse can restore them; apply
 * truncates a TARGET file to the result size.
 *
 * NEW is opened as `copy` opens SRC (engine/copy-source.ts, without a bmap: a patch
 * describes the whole image), so it may be compressed, stdin or a URL, read once as a
 * stream; with BASE an index, a new release's .img.xz is diffed against the last one's
 * without unpacking either. BASE is a file or device read by offset, or an index.
 */

import type { Writable } from 'node:stream';
import { SimgWriter } from '../containers/simg-write.js';
import { BlksyncError } from '../errors.js';
import { clipped, GAP_UNIT_BYTES, PATCH_VERSION, type Compression } from '../formats/patch.js';
import { compressionAvailable } from '../formats/patch-compression.js';
import {
  PatchWriter,
  type OldContent,
  type PatchStats,
  type Unchanged,
} from '../formats/patch-writer.js';
import { pieceHashes } from '../formats/hash-list.js';
import { INDEX_MAGIC, readIndexSummary } from '../formats/index-file.js';
import { hasMagic } from '../io/file-head.js';
import { assertSeparateOutput, inputOf, openSource, type Opened } from '../io/open.js';
import { OutputFile } from '../io/output-file.js';
import { formatBytes } from '../size.js';
import { checkBlockSize, chunkSizeFor, DEFAULT_BLOCK_SIZE, DEFAULT_DEPTH } from './block-size.js';
import { openCopySource, type CopySource } from './copy-source.js';
import { SharedBufferPool } from '../io/buffer-pool.js';
import { HashPool } from './hash-pool.js';
import { INLINE_HASH_MAX_BYTES } from './index-session.js';
import { ReadTarget } from './knowledge.js';
import { runPipeline } from './pipeline.js';
import type { ChunkKnowledge, ProgressListener, TargetKnowledge } from '../types.js';

/**
 * BASE known without its bytes: the hook for `blksync diff INDEX NEW` (an index made by
 * `blksync index`). Its chunk knowledges must provide `heldHashes` (SHA-256 per block of
 * `blockSize`) when they do not provide `held`. Such a base cannot make reversible patches.
 */
export interface BaseKnowledge {
  /** What to call BASE in messages and results. */
  name: string;
  size: number;
  /** The block size the hashes are of; the patch is made with it. */
  blockSize: number;
  knowledge: TargetKnowledge;
}

export interface DiffOptions {
  /** Block size of the comparison and the records (default 4096; an index base fixes it). */
  blockSize?: number;
  /** Also store the old bytes so `apply --reverse` can undo the patch. */
  reversible?: boolean;
  /** Payload compression (default none). zstd needs the optional zstd-napi package. */
  compress?: Compression;
  /**
   * What is written: a blksync patch (default), or an Android sparse image of NEW's size with
   * NEW's differing blocks and don't-care chunks elsewhere (for fastboot/simg2img; written to
   * a regular file only, NEW's size a multiple of the block size).
   */
  format?: DiffFormat;
  /**
   * NEW's size when a stream's cannot be known before reading it all (compressed stdin or
   * URL); the stream must then end exactly there.
   */
  size?: number | undefined;
  /** Seconds a web server may stay silent while an answer is due (default DEFAULT_TIMEOUT_S). */
  timeout?: number | undefined;
  signal?: AbortSignal;
  onProgress?: ProgressListener;
  chunkSize?: number;
  depth?: number;
}

export type DiffFormat = 'patch' | 'simg';

export interface DiffResult extends PatchStats {
  format: DiffFormat;
  base: string;
  next: string;
  /** The patch's path, or "-" for a stream. */
  output: string;
  baseSize: number;
  resultSize: number;
  blockSize: number;
  reversible: boolean;
  compression: Compression;
  bytesScanned: number;
  /** Bytes of BASE read to compare (0 with an index). */
  bytesRead: number;
  bytesDiffering: number;
  seconds: number;
}

/** What BASE held in [start, end) of a chunk at chunkOffset, clipped to BASE's size. */
function oldContent(
  k: ChunkKnowledge,
  chunkOffset: number,
  start: number,
  end: number,
  baseSize: number,
): OldContent {
  const n = clipped(chunkOffset + start, end - start, baseSize);
  if (k.held !== undefined) return { bytes: k.held.subarray(start, start + n) };
  if (k.heldHashes !== undefined) return { blockHashes: k.heldHashes(start, start + n) };
  throw new Error('diff: the base knowledge provides neither held bytes nor heldHashes');
}

/**
 * An index base for a NEW longer than BASE. The index's hashes end with BASE (its last block
 * may be partial), so the knowledge is asked only about BASE's bytes; from the block that
 * crosses BASE's end on, every block of NEW differs (as with a base read as bytes). Without
 * this the index knowledge would compare hashes past the end of its table.
 */
function endingAt(inner: TargetKnowledge, baseSize: number): TargetKnowledge {
  return {
    load: async (offset, length) => {
      if (offset + length <= baseSize) return inner.load(offset, length);
      const within = Math.max(0, baseSize - offset);
      const k = within > 0 ? await inner.load(offset, within) : undefined;
      return {
        diff: async (data, len, bs, out) => {
          const mark = out.length;
          if (k !== undefined) await k.diff(data, within, bs, out);
          // spans reaching the block across BASE's end merge with the differing rest
          let start = Math.floor(within / bs) * bs;
          while (out.length > mark && out[out.length - 1]! >= start) {
            start = Math.min(start, out[out.length - 2]!);
            out.length -= 2;
          }
          out.push(start, len);
        },
        // old content is asked for only up to BASE's end (oldContent clips it)
        heldHashes: (start, end) =>
          end <= start || k?.heldHashes === undefined
            ? Buffer.alloc(0)
            : k.heldHashes(start, Math.min(end, within)),
        release: () => k?.release(),
      };
    },
    get bytesRead() {
      return inner.bytesRead;
    },
    close: () => inner.close(),
  };
}

/**
 * Hands the writer, for each chunk, the hashes of the blocks it leaves unchanged, before the
 * chunk's differing spans: the patch's gap hashes, with which apply checks TARGET outside the
 * records. An index base has them (its hashes equal NEW's there); bytes are hashed on the
 * pool, and runs of zeros (holes, mostly) not at all.
 */
function reportingUnchanged(
  inner: TargetKnowledge,
  writer: PatchWriter,
  pool: HashPool,
): TargetKnowledge {
  const unit = writer.header.gapUnit;
  return {
    load: async (offset, length) => {
      const k = await inner.load(offset, length);
      // an index's block hashes are the pieces' (its gap unit is its block size)
      const hashed = async (data: Buffer, s: number, e: number): Promise<Unchanged> => ({
        offset: offset + s,
        bytes: e - s,
        hashes:
          k.held === undefined && k.heldHashes !== undefined
            ? k.heldHashes(s, e)
            : await pieceHashes(pool, data, s, e, offset + s, unit),
      });
      return {
        diff: async (data, len, bs, out) => {
          const mark = out.length;
          const pending = k.diff(data, len, bs, out);
          if (pending !== undefined) await pending;
          const parts: Promise<Unchanged>[] = [];
          for (let i = mark, at = 0; at < len; i += 2) {
            const end = i < out.length ? out[i]! : len;
            if (end > at) parts.push(hashed(data, at, end));
            at = i < out.length ? out[i + 1]! : len;
          }
          writer.unchanged(await Promise.all(parts));
        },
        get held() {
          return k.held;
        },
        ...(k.heldHashes !== undefined && { heldHashes: k.heldHashes.bind(k) }),
        release: () => k.release(),
      };
    },
    get bytesRead() {
      return inner.bytesRead;
    },
    close: () => inner.close(),
  };
}

/**
 * An Android sparse image covers whole blocks (its size is a block count): NEW's size must
 * be a multiple of the block size. Refused rather than padded: padding would make the image
 * longer than NEW, and flashing it would write past NEW's end.
 */
function checkSimgSizes(newSize: number, baseSize: number, blockSize: number, next: string): void {
  if (newSize % blockSize !== 0) {
    throw new BlksyncError(
      'EUSAGE',
      `--format simg: NEW (${next}) is ${newSize} bytes, not a multiple of the block size ${blockSize} ` +
        `(an Android sparse image is whole blocks); choose a --block-size that divides ${newSize} and is a multiple of 4, or write a patch`,
      { path: next },
    );
  }
  if (newSize / blockSize > 0xffffffff) {
    throw new BlksyncError(
      'EUSAGE',
      `--format simg: NEW is ${newSize / blockSize} blocks of ${blockSize}, more than an Android sparse image can count; use a larger --block-size`,
    );
  }
  void baseSize;
}

/**
 * Writes a patch that turns BASE into NEW. `output` is a path (written as every output is,
 * io/output-file.ts: through a temporary renamed into place when complete, so a patch file is
 * never left half-made; a device or FIFO in place) or a stream (left open; an interrupted run
 * leaves it without a trailer, which apply refuses).
 */
export async function diff(
  base: string | BaseKnowledge,
  next: string,
  output: string | Writable,
  options: DiffOptions = {},
): Promise<DiffResult> {
  if (base === '-') {
    throw new BlksyncError(
      'EUSAGE',
      'BASE cannot be stdin (-): it is read by offset, beside NEW; give a file, a device or an index of BASE (NEW may be -)',
    );
  }
  if (typeof base === 'string' && (await hasMagic(base, INDEX_MAGIC))) {
    // an index made by `blksync index` stands for its image: only NEW is read
    const { indexAsBase } = await import('./index-target.js');
    const { blockSize } = await readIndexSummary(base);
    const indexBase = await indexAsBase(base, chunkSizeFor(blockSize, options.chunkSize));
    try {
      return await diff(indexBase, next, output, options);
    } finally {
      await indexBase.knowledge.close().catch(() => {});
    }
  }
  const started = performance.now();
  const indexBase = typeof base === 'string' ? undefined : base;
  if (
    indexBase !== undefined &&
    options.blockSize !== undefined &&
    options.blockSize !== indexBase.blockSize
  ) {
    throw new BlksyncError(
      'EUSAGE',
      `--block-size ${options.blockSize}: BASE ${indexBase.name} is an index of ${indexBase.blockSize}-byte blocks, and a patch from it has its block size; leave -b out, or make the index with -b ${options.blockSize}`,
    );
  }
  const blockSize = checkBlockSize(indexBase?.blockSize ?? options.blockSize ?? DEFAULT_BLOCK_SIZE);
  const chunkSize = chunkSizeFor(blockSize, options.chunkSize);
  const reversible = options.reversible === true;
  const compression = options.compress ?? 'none';
  options.signal?.throwIfAborted();
  if (indexBase !== undefined && reversible) {
    throw new BlksyncError(
      'EUSAGE',
      '--reversible needs the base image itself, not an index: the patch stores its old bytes',
    );
  }
  const format = options.format ?? 'patch';
  if (format === 'simg') {
    if (typeof output !== 'string' || output === '-') {
      throw new BlksyncError(
        'EUSAGE',
        '--format simg needs -o FILE: the sparse image header is completed at the end, which stdout cannot be rewound for',
      );
    }
    if (reversible || compression !== 'none') {
      throw new BlksyncError(
        'EUSAGE',
        `--format simg cannot be combined with ${reversible ? '--reversible' : '--compress'}: an Android sparse image holds only the new blocks, uncompressed`,
      );
    }
  }
  if (!(await compressionAvailable(compression))) {
    throw new BlksyncError(
      'EPATCH_UNSUPPORTED',
      'zstd needs the optional package zstd-napi (npm install zstd-napi), or use --compress gzip',
    );
  }

  let baseFile: Opened | undefined;
  let src: CopySource | undefined;
  let out: Writable | undefined;
  let outFile: OutputFile | undefined;
  let writer: PatchWriter | undefined;
  let simg: SimgWriter | undefined;
  let pool: HashPool | undefined;
  try {
    // BASE first: a compressed NEW may be decoded once just to learn its size
    if (typeof base === 'string') baseFile = await openSource(base);
    src = await openCopySource(next, {
      noBmap: true,
      size: options.size,
      timeout: options.timeout,
      signal: options.signal,
    });
    const newSource = src;
    const baseSize = baseFile?.size ?? indexBase!.size;
    const baseName = typeof base === 'string' ? base : base.name;
    const outName = typeof output === 'string' ? output : '-';
    if (typeof output === 'string') {
      await assertSeparateOutput(output, [
        { path: next, role: 'NEW', isSame: (st) => newSource.sameAs(st) },
        ...(baseFile !== undefined ? [inputOf(baseFile, 'BASE')] : []),
      ]);
      if (format === 'simg') checkSimgSizes(src.size, baseSize, blockSize, next);
      outFile = await OutputFile.open(output, {
        what: format === 'simg' ? 'sparse image' : 'patch',
        code: 'EWRITE',
      });
      if (format === 'simg' && outFile.inPlace) {
        throw new BlksyncError(
          'EUSAGE',
          `--format simg needs a regular file for -o (${output} is a device or FIFO): the sparse image header is completed at the end`,
          { path: output },
        );
      }
      out = outFile.stream();
    } else {
      out = output;
    }

    const header = {
      version: PATCH_VERSION,
      blockSize,
      // from an index, its block hashes are the gap's pieces; from bytes, larger pieces
      gapUnit: indexBase !== undefined ? blockSize : Math.max(blockSize, GAP_UNIT_BYTES),
      baseSize,
      resultSize: src.size,
      reversible,
      compression,
    };
    writer = new PatchWriter(header, out, { end: typeof output === 'string' });
    const w = writer;
    if (format === 'simg') simg = new SimgWriter(outFile!, blockSize, src.size);
    const sw = simg;
    const known =
      indexBase !== undefined
        ? src.size > baseSize
          ? endingAt(indexBase.knowledge, baseSize)
          : indexBase.knowledge
        : new ReadTarget(baseFile!.fh, baseName, chunkSize, {
            size: baseSize,
            shortCode: 'ESRC_SHORT',
          });
    pool = new HashPool();
    if (Math.min(baseSize, src.size) < INLINE_HASH_MAX_BYTES) pool.inline();
    const knowledge = sw === undefined ? reportingUnchanged(known, w, pool) : known;
    const resultSize = src.size;
    // when BASE is longer, the result's last block (partial or not) and BASE's tail are done
    // below: the last block is always a record, so that apply checks TARGET where it is cut
    // (a sparse image, of NEW's whole blocks and with nothing to check, is all planned)
    const planEnd =
      baseSize > resultSize && sw === undefined
        ? Math.max(0, Math.ceil(resultSize / blockSize) - 1) * blockSize
        : resultSize;
    // an index knows BASE by whole blocks: its record of the result's last block covers
    // BASE's whole block there, or its old hash would be of bytes the index has no hash of
    const wholeBlockEnd = Math.min(baseSize, Math.ceil(resultSize / blockSize) * blockSize);
    const tailEnd =
      baseSize > resultSize
        ? reversible
          ? baseSize
          : indexBase !== undefined
            ? wholeBlockEnd
            : resultSize
        : planEnd;
    let old: OldContent | undefined;
    const source = src.source;
    const run = await runPipeline(
      { imageSize: resultSize, ranges: planEnd > 0 ? [{ start: 0, end: planEnd }] : [] },
      source,
      knowledge,
      [
        {
          write: (data, offset) =>
            sw !== undefined ? sw.add(offset, data) : w.add(offset, data.length, data, old!),
          finish: () => Promise.resolve(),
        },
      ],
      {
        blockSize,
        chunkSize,
        depth: options.depth ?? DEFAULT_DEPTH,
        signal: options.signal,
        onProgress: options.onProgress,
        buffers: new SharedBufferPool(chunkSize),
        onDiffer: (chunkOffset, _data, s, e, k) => {
          if (sw === undefined) old = oldContent(k, chunkOffset, s, e, baseSize);
        },
      },
    );
    if (run.interrupted) {
      throw new BlksyncError(
        'EINTERRUPTED',
        `interrupted after ${formatBytes(run.bytesScanned)} of ${formatBytes(resultSize)}; no patch was written; rerun the command`,
      );
    }
    let bytesDiffering = run.bytesDiffering;
    // the tail: always written whole (at most the result's last block, plus BASE's tail when reversible)
    const buf = Buffer.allocUnsafe(chunkSize);
    for (let o = planEnd; o < tailEnd; o += chunkSize) {
      options.signal?.throwIfAborted();
      const len = Math.min(chunkSize, tailEnd - o);
      const newLen = clipped(o, len, resultSize);
      if (newLen > 0 && (await source.read(buf, o, newLen)) < newLen) {
        throw new BlksyncError(
          'ESRC_SHORT',
          `${next} ended early while being read; was it truncated?`,
          { path: next },
        );
      }
      const k = await knowledge.load(o, len);
      try {
        await w.add(o, len, buf.subarray(0, newLen), oldContent(k, o, 0, len, baseSize));
      } finally {
        k.release();
      }
      bytesDiffering += newLen;
    }
    if (simg !== undefined) {
      // tailEnd === planEnd === resultSize here: NEW's size is whole blocks, not reversible
      await simg.finish();
      writer.abort(); // the patch writer was never used (it writes lazily): let go of its stream
    } else {
      await writer.finish();
    }
    await knowledge.close();
    if (outFile !== undefined) {
      const committing = outFile;
      outFile = undefined;
      await committing.commit();
    }
    const stats: PatchStats =
      simg !== undefined
        ? {
            records: simg.stats.chunks,
            newBytes: bytesDiffering,
            oldBytes: 0,
            payloadBytes: bytesDiffering,
            patchBytes: simg.stats.fileBytes,
          }
        : writer.stats;
    return {
      format,
      base: baseName,
      next,
      output: outName,
      baseSize,
      resultSize,
      blockSize,
      reversible,
      compression,
      bytesScanned: run.bytesScanned,
      bytesRead: knowledge.bytesRead,
      bytesDiffering,
      ...stats,
      seconds: (performance.now() - started) / 1000,
    };
  } catch (err) {
    writer?.abort();
    if (writer === undefined && outFile !== undefined) out?.destroy();
    if (err instanceof BlksyncError) throw err;
    if (options.signal?.aborted === true) {
      throw new BlksyncError(
        'EINTERRUPTED',
        'interrupted; no patch was written; rerun the command',
        { cause: err },
      );
    }
    throw err;
  } finally {
    await pool?.close();
    await outFile?.abort();
    await src?.close();
    await baseFile?.fh.close();
  }
}
