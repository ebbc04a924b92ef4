/**
 * The one pipeline every command runs: walk the plan in chunks, read the source and learn
 * what the target holds for each chunk in parallel (several chunks in flight), find the
 * blocks that differ, and hand them to the sinks, neighbours coalesced into one write.
 *
 *   chunk i:   [read source i] ─┐
 *              [load target i] ─┴─► diff ─► write spans ─► progress
 *   chunk i+1..i+depth-1 are being read meanwhile
 */

import { BlksyncError } from '../errors.js';
import { RangeList, rangesBytes } from '../ranges.js';
import { trace } from '../trace.js';
import { BufferPool } from '../io/buffer-pool.js';
import type {
  ChunkKnowledge,
  Plan,
  ProgressListener,
  Sink,
  Source,
  TargetKnowledge,
} from '../types.js';

export interface PipelineOptions {
  blockSize: number;
  /** Bytes per chunk; a multiple of blockSize. */
  chunkSize: number;
  /** Chunks in flight at once. */
  depth: number;
  signal?: AbortSignal | undefined;
  onProgress?: ProgressListener | undefined;
  /** Called with each differing span before it is written (compare uses it to find exact bytes). */
  onDiffer?:
    | ((
        chunkOffset: number,
        data: Buffer,
        start: number,
        end: number,
        knowledge: ChunkKnowledge,
      ) => void)
    | undefined;
  /**
   * Called with every chunk's source data, differing or not, once it is read; runs alongside
   * the diff and the writes, and the chunk's buffer is reused only after it settles. The index
   * writer hashes the new content with it.
   */
  onChunk?: ((offset: number, data: Buffer, length: number) => void | Promise<void>) | undefined;
  /** Where chunk buffers come from (default: plain buffers); hashing workers need shared ones. */
  buffers?: { get(): Buffer; put(buf: Buffer): void } | undefined;
}

export interface PipelineResult {
  bytesScanned: number;
  blocksDiffering: number;
  bytesDiffering: number;
  bytesWritten: number;
  /** The differing (and, with sinks, written) ranges, merged across chunks. */
  ranges: RangeList;
  /** True when the signal stopped the run before the plan was done. */
  interrupted: boolean;
}

export interface Chunk {
  offset: number;
  length: number;
}

/** The plan of a whole image of `size` bytes: one range, or none for an empty image. */
export function wholeImagePlan(size: number): Plan {
  return { imageSize: size, ranges: size > 0 ? [{ start: 0, end: size }] : [] };
}

/** Whether `plan` covers all of its image (as wholeImagePlan makes it). */
export function isWholePlan(plan: Plan): boolean {
  const r = plan.ranges;
  return r.length === 0 || (r.length === 1 && r[0]!.start === 0 && r[0]!.end === plan.imageSize);
}

/** The chunks the pipeline walks `plan` in (fan-out reads SRC in the same ones). */
export function* chunksOf(plan: Plan, chunkSize: number): Generator<Chunk> {
  for (const r of plan.ranges) {
    for (let o = r.start; o < r.end;) {
      // chunk boundaries fall on multiples of chunkSize so blocks stay aligned to the image
      const next = Math.min(r.end, (Math.floor(o / chunkSize) + 1) * chunkSize);
      yield { offset: o, length: next - o };
      o = next;
    }
  }
}

const ABORTED = Symbol('aborted');

/** Bounded wait for reads still in flight after an interruption (a stalled stream never settles). */
const ABORT_SETTLE_MS = 500;

/** `p`'s outcome, or ABORTED as soon as the signal fires: a stalled stream must not delay Ctrl-C. */
function untilAborted<T>(
  p: Promise<T>,
  signal: AbortSignal | undefined,
): Promise<T | typeof ABORTED> {
  if (signal === undefined) return p;
  if (signal.aborted) return Promise.resolve(ABORTED);
  return new Promise((resolve, reject) => {
    const onAbort = (): void => resolve(ABORTED);
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (err: Error) => {
        signal.removeEventListener('abort', onAbort);
        reject(err);
      },
    );
  });
}

interface InFlight {
  chunk: Chunk;
  buf: Buffer;
  done: Promise<[number, ChunkKnowledge]>;
}

/**
 * Runs the pipeline. Sinks are not finished here: the caller finishes them (fsync) after
 * success and after interruption alike.
 */
export async function runPipeline(
  plan: Plan,
  source: Source,
  target: TargetKnowledge,
  sinks: readonly Sink[],
  options: PipelineOptions,
): Promise<PipelineResult> {
  const { blockSize, chunkSize, depth, signal } = options;
  const pool = options.buffers ?? new BufferPool(chunkSize);
  const chunks = chunksOf(plan, chunkSize);
  const queue: InFlight[] = [];
  const spans: number[] = [];
  const result: PipelineResult = {
    bytesScanned: 0,
    blocksDiffering: 0,
    bytesDiffering: 0,
    bytesWritten: 0,
    ranges: new RangeList(),
    interrupted: false,
  };
  const bytesTotal = rangesBytes(plan.ranges);

  const start = (): void => {
    const next = chunks.next();
    if (next.done === true) return;
    const chunk = next.value;
    const buf = pool.get();
    const done = Promise.all([
      source.read(buf, chunk.offset, chunk.length),
      target.load(chunk.offset, chunk.length),
    ]);
    // a failure is reported when the chunk's turn comes; until then it must not be "unhandled"
    done.catch(() => {});
    queue.push({ chunk, buf, done });
  };

  for (let i = 0; i < depth; i++) start();
  try {
    while (queue.length > 0) {
      if (signal?.aborted === true) {
        result.interrupted = true;
        break;
      }
      const item = queue.shift()!;
      const { chunk, buf } = item;
      const settled = await untilAborted(item.done, signal);
      if (settled === ABORTED) {
        queue.unshift(item);
        result.interrupted = true;
        break;
      }
      const [got, knowledge] = settled;
      let chunkHooks: Promise<void> | undefined;
      try {
        if (got < chunk.length) {
          throw new BlksyncError(
            'ESRC_SHORT',
            `source ended at ${chunk.offset + got} bytes, expected ${plan.imageSize}; was it truncated while being read?`,
          );
        }
        const hooked = options.onChunk?.(chunk.offset, buf, chunk.length);
        if (hooked instanceof Promise) {
          chunkHooks = hooked;
          hooked.catch(() => {}); // awaited below; until then it must not be "unhandled"
        }
        spans.length = 0;
        const pending = knowledge.diff(buf, chunk.length, blockSize, spans);
        if (pending !== undefined) await pending;
        for (let i = 0; i < spans.length; i += 2) {
          const s = spans[i]!;
          const e = spans[i + 1]!;
          result.blocksDiffering += Math.ceil((e - s) / blockSize);
          result.bytesDiffering += e - s;
          options.onDiffer?.(chunk.offset, buf, s, e, knowledge);
          const data = buf.subarray(s, e);
          for (const sink of sinks) await sink.write(data, chunk.offset + s);
          result.ranges.add(chunk.offset + s, chunk.offset + e);
          result.bytesWritten += sinks.length > 0 ? e - s : 0;
        }
        if (chunkHooks !== undefined) await chunkHooks;
      } finally {
        knowledge.release();
        // the hook may still be reading buf after a failure; let it settle first
        if (chunkHooks !== undefined) await chunkHooks.catch(() => {});
      }
      pool.put(buf);
      result.bytesScanned += chunk.length;
      options.onProgress?.({
        bytesScanned: result.bytesScanned,
        bytesTotal,
        bytesDiffering: result.bytesDiffering,
        bytesWritten: result.bytesWritten,
      });
      start();
    }
  } finally {
    // let reads still in flight settle before their buffers and handles go away; after an
    // interruption not for long, since a stalled stream settles only when it is destroyed
    const settling = Promise.allSettled(queue.map((q) => q.done.then(([, k]) => k.release())));
    if (result.interrupted) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        settling,
        new Promise((resolve) => (timer = setTimeout(resolve, ABORT_SETTLE_MS).unref())),
      ]);
      clearTimeout(timer);
    } else {
      await settling;
    }
  }
  trace(`pipeline done: ${result.bytesScanned} bytes compared, ${result.bytesWritten} written`);
  return result;
}
