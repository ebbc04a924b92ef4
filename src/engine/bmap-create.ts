/**
 * `bmap create IMAGE`: the block map of a sparse image, as bmaptool writes it.
 *
 * The plan is the image's sparse map (SEEK_DATA/SEEK_HOLE), the source the image, there is
 * no target knowledge, and the sink is the bmap writer: each mapped range is read once and
 * hashed. With detectZeros, all-zero blocks inside the mapped ranges are left out too (for
 * images that were written without holes), which splits ranges; the same single read
 * decides the split and feeds the hashes.
 */

import { rangesBytes } from '../ranges.js';
import { createHash, type Hash } from 'node:crypto';
import { BlksyncError, fromSystemError } from '../errors.js';
import type { BmapRange } from '../formats/bmap.js';
import { serializeBmap } from '../formats/bmap-write.js';
import { assertSeparateOutput, inputOf, openSource } from '../io/open.js';
import { checkOutput, writeOutputFile } from '../io/output-file.js';
import { fsBlockSize, mappedRanges } from '../io/sparse-map.js';
import type { ProgressListener } from '../types.js';

/** Bytes read at once while hashing. */
export const BMAP_READ_CHUNK = 4 * 1024 * 1024;

export interface BmapCreateOptions {
  /** Also leave out allocated blocks that hold only zeros. */
  detectZeros?: boolean;
  /** Range and self-checksum algorithm (default sha256, as bmaptool). */
  checksumType?: string;
  /** Write the bmap here; otherwise it is only returned. */
  output?: string;
  signal?: AbortSignal;
  onProgress?: ProgressListener;
}

export interface BmapCreateResult {
  image: string;
  output: string | undefined;
  imageSize: number;
  blockSize: number;
  blocksCount: number;
  mappedBlocks: number;
  ranges: number;
  /** The bmap file's text. */
  text: string;
  seconds: number;
}

/** Builds the bmap of IMAGE (a regular file, ideally sparse). */
export async function createBmap(
  image: string,
  options: BmapCreateOptions = {},
): Promise<BmapCreateResult> {
  const started = performance.now();
  const checksumType = options.checksumType ?? 'sha256';
  const detectZeros = options.detectZeros === true;
  checkAborted(options.signal, image);
  const src = await openSource(image);
  try {
    if (options.output !== undefined) {
      await assertSeparateOutput(options.output, [inputOf(src, 'the image')]);
      await checkOutput(options.output, { what: 'bmap', code: 'EWRITE' });
    }
    if (src.size === 0) {
      throw new BlksyncError(
        'ESRC_KIND',
        `${image} is empty; a bmap needs an image of at least one byte`,
        {
          path: image,
        },
      );
    }
    // as bmaptool: make delayed allocations visible to the sparse map
    await src.fh.datasync().catch(() => {});
    const blockSize = await fsBlockSize(src.fh);
    const mapped = mappedRanges(src.fh, src.size, blockSize, image);
    const bytesTotal = rangesBytes(mapped);
    const out: BmapRange[] = [];
    const chunk = Math.max(blockSize, Math.floor(BMAP_READ_CHUNK / blockSize) * blockSize);
    // two buffers: the next piece is read while the current one is hashed
    const bufs = [Buffer.allocUnsafe(chunk), Buffer.allocUnsafe(chunk)] as const;
    const zero = Buffer.alloc(blockSize);
    let scanned = 0;

    // the run of blocks being hashed: [runFirst, next block) in blocks
    let run: { first: number; hash: Hash } | undefined;
    const close = (endBlock: number): void => {
      if (run === undefined) return;
      out.push({ first: run.first, last: endBlock - 1, checksum: run.hash.digest('hex') });
      run = undefined;
    };

    const readPiece = async (buf: Buffer, off: number, len: number): Promise<void> => {
      let got = 0;
      try {
        while (got < len) {
          const { bytesRead } = await src.fh.read(buf, got, len - got, off + got);
          if (bytesRead === 0) break;
          got += bytesRead;
        }
      } catch (err) {
        throw fromSystemError('EREAD', 'cannot read', image, err);
      }
      if (got < len) {
        throw new BlksyncError('ESRC_SHORT', `${image} shrank while its bmap was being made`, {
          path: image,
        });
      }
    };

    const hashPiece = (buf: Buffer, off: number, len: number): void => {
      const firstBlock = off / blockSize;
      if (!detectZeros) {
        run ??= { first: firstBlock, hash: createHash(checksumType) };
        run.hash.update(buf.subarray(0, len));
        return;
      }
      let spanStart = -1; // start (in buf) of non-zero blocks not yet hashed
      for (let s = 0; s < len; s += blockSize) {
        const e = Math.min(s + blockSize, len);
        if (buf.compare(zero, 0, e - s, s, e) === 0) {
          if (spanStart >= 0) run?.hash.update(buf.subarray(spanStart, s));
          spanStart = -1;
          close(firstBlock + s / blockSize);
        } else {
          run ??= { first: firstBlock + s / blockSize, hash: createHash(checksumType) };
          if (spanStart < 0) spanStart = s;
        }
      }
      if (spanStart >= 0) run?.hash.update(buf.subarray(spanStart, len));
    };

    const pieces = piecesOf(mapped, chunk);
    let cur = pieces.next();
    let curRead = cur.done === true ? undefined : readPiece(bufs[0], cur.value.off, cur.value.len);
    for (let i = 0; cur.done !== true; i++) {
      checkAborted(options.signal, image);
      const piece = cur.value;
      const next = pieces.next();
      const nextRead =
        next.done === true
          ? undefined
          : readPiece(bufs[(i + 1) % 2]!, next.value.off, next.value.len);
      nextRead?.catch(() => {}); // awaited on its turn
      await curRead;
      hashPiece(bufs[i % 2]!, piece.off, piece.len);
      if (piece.rangeEnd !== undefined) close(Math.ceil(piece.rangeEnd / blockSize));
      scanned += piece.len;
      options.onProgress?.({
        bytesScanned: scanned,
        bytesTotal,
        bytesDiffering: 0,
        bytesWritten: 0,
      });
      cur = next;
      curRead = nextRead;
    }

    const text = serializeBmap({ imageSize: src.size, blockSize, checksumType, ranges: out });
    if (options.output !== undefined) {
      // as every output (io/output-file.ts): a temporary renamed into place, a device in place
      await writeOutputFile(options.output, text, { what: 'bmap', code: 'EWRITE' });
    }
    return {
      image,
      output: options.output,
      imageSize: src.size,
      blockSize,
      blocksCount: Math.ceil(src.size / blockSize),
      mappedBlocks: out.reduce((n, r) => n + r.last - r.first + 1, 0),
      ranges: out.length,
      text,
      seconds: (performance.now() - started) / 1000,
    };
  } finally {
    await src.fh.close();
  }
}

/** The reads of the mapped ranges, at most `chunk` bytes each; the last of a range says so. */
function* piecesOf(
  ranges: readonly { start: number; end: number }[],
  chunk: number,
): Generator<{ off: number; len: number; rangeEnd: number | undefined }> {
  for (const r of ranges) {
    for (let off = r.start; off < r.end; off += chunk) {
      const len = Math.min(chunk, r.end - off);
      yield { off, len, rangeEnd: off + len === r.end ? r.end : undefined };
    }
  }
}

function checkAborted(signal: AbortSignal | undefined, image: string): void {
  if (signal?.aborted === true) {
    throw new BlksyncError(
      'EINTERRUPTED',
      `interrupted while making the bmap of ${image}; nothing was written: rerun the command`,
      { path: image },
    );
  }
}
