/**
 * `copy SRC DST1 DST2 …`: one read of SRC, one pipeline per destination.
 *
 *   openCopySource(SRC) ─► Broadcast (ring of RING_CHUNKS chunks) ─► view 1 ─► copyLocal(DST1)
 *                                                                 ─► view 2 ─► copyLocal(DST2)
 *
 * Each destination runs the ordinary local copy (engine/copy.ts) with its own view of SRC in
 * place of opening SRC again: it is prepared and checked (mounted, too small, read-only, SRC
 * itself) before its first write, compared against its own content and written only where it
 * differs. One that is refused or fails is reported and dropped (its view closed, so it no
 * longer paces the reader); the others go on to the end.
 */

import { rangesBytes } from '../ranges.js';
import { defaultMaxListeners, setMaxListeners } from 'node:events';
import { readlink, realpath, stat } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import type { Stats } from 'node:fs';
import { BlksyncError, isSystemError } from '../errors.js';
import { chunkSizeFor, INDEX_CHUNK_SIZE } from '../engine/block-size.js';
import { copyLocal } from '../engine/copy.js';
import type { CopyResult, ResolvedCopyOptions } from '../engine/copy-options.js';
import { openCopySource } from '../engine/copy-source.js';
import { sameFile } from '../io/open.js';
import { isUrl } from '../io/url.js';
import type { RemoteCopyOptions } from '../remote/copy/options.js';
import { REMOTE_CHUNK_BYTES, REMOTE_DEPTH } from '../remote/roles.js';
import { parseRemote } from '../remote/spec.js';
import type { Progress } from '../types.js';
import { Broadcast, RING_CHUNKS } from './broadcast.js';

/**
 * Push chunks in flight over all host:path destinations: 4 hosts keep REMOTE_DEPTH (8) each,
 * 16 hosts 2 each. At 8 each, 16 pushes peaked at 602 MB RSS; at 2, 269 MB.
 */
const PUSH_BUFFER_CHUNKS = 32;
const MIN_PUSH_DEPTH = 2;

/** How one destination of a fan-out ended. */
export interface DestinationOutcome {
  /** The destination as given. */
  destination: string;
  /** Its copy's result, when it finished. */
  result?: CopyResult;
  /** Why it was dropped, when it was: refused before writing, or failed mid-run. */
  error?: Error;
  /** Bytes of this destination read to compare. */
  bytesRead: number;
  /** Bytes written to this destination (also when it failed part way). */
  bytesWritten: number;
}

export interface CopyManyResult {
  source: string;
  /** SRC's size. */
  bytesTotal: number;
  /** Bytes of SRC read: once, whatever the number of destinations. */
  sourceBytesRead: number;
  /** The memory the shared read of SRC holds at most, in bytes. */
  bufferBytes: number;
  destinations: DestinationOutcome[];
  /** How many destinations failed (the CLI exits non-zero when any did). */
  failed: number;
  dryRun: boolean;
  seconds: number;
}

export interface FanOutHooks {
  /** Each destination's own progress (`index` into the destinations). */
  onDestinationProgress?: ((index: number, progress: Progress) => void) | undefined;
  /** The options of a push, for `host:path` destinations (checked by the router). */
  remote?: RemoteCopyOptions | undefined;
}

/**
 * Copies SRC onto every destination (files, devices, `host:path`), reading SRC once. `options` are resolved
 * (router); their `onProgress` gets the sum over the destinations.
 */
export async function fanOut(
  src: string,
  dsts: readonly string[],
  options: ResolvedCopyOptions,
  hooks: FanOutHooks = {},
): Promise<CopyManyResult> {
  const started = performance.now();
  await assertDistinct(dsts);
  const shared = await openCopySource(src, options);
  const chunkSize = chunkSizeFor(
    options.blockSize,
    options.chunkSize ?? (options.index !== undefined ? INDEX_CHUNK_SIZE : undefined),
  );
  const specs = dsts.map((d) => parseRemote(d));
  // a push reads SRC in its own chunks (4 MiB): the ring holds two of its reads at least
  const remoteChunk = hooks.remote?.chunkSize ?? REMOTE_CHUNK_BYTES;
  const pieces = specs.some((s) => s !== undefined)
    ? Math.max(RING_CHUNKS, 2 * Math.ceil(remoteChunk / chunkSize) + 1)
    : RING_CHUNKS;
  // each push keeps pushDepth chunks (4 MiB) in flight: PUSH_BUFFER_CHUNKS over all hosts
  const hostCount = specs.filter((s) => s !== undefined).length;
  const pushDepth = Math.max(
    MIN_PUSH_DEPTH,
    Math.min(REMOTE_DEPTH, Math.floor(PUSH_BUFFER_CHUNKS / Math.max(1, hostCount))),
  );
  // every destination's copy listens to the one signal
  if (options.signal !== undefined) {
    setMaxListeners(Math.max(defaultMaxListeners, 8 * dsts.length), options.signal);
  }
  const broadcast = new Broadcast(
    shared.source,
    shared.plan,
    chunkSize,
    pieces,
    dsts.length,
    options.signal,
  );
  // until a destination reports, it counts with the whole plan still to scan
  const planned = rangesBytes(shared.plan.ranges);
  const progress: Progress[] = dsts.map(() => ({
    bytesScanned: 0,
    bytesTotal: planned,
    bytesDiffering: 0,
    bytesWritten: 0,
  }));
  const onProgress = (i: number, p: Progress): void => {
    progress[i] = p;
    hooks.onDestinationProgress?.(i, p);
    if (options.onProgress === undefined) return;
    let scanned = 0;
    let total = 0;
    let differing = 0;
    let written = 0;
    for (const q of progress) {
      scanned += q.bytesScanned;
      total += q.bytesTotal;
      differing += q.bytesDiffering;
      written += q.bytesWritten;
    }
    options.onProgress({
      bytesScanned: scanned,
      bytesTotal: total,
      bytesDiffering: differing,
      bytesWritten: written,
    });
  };
  let outcomes: DestinationOutcome[];
  try {
    outcomes = await Promise.all(
      dsts.map(async (dst, i): Promise<DestinationOutcome> => {
        const view = broadcast.view(i);
        try {
          // holdWrites is for one pipeline reading SRC itself: a broadcast's large ranges are
          // verified before any destination sees them
          const opened = {
            ...shared,
            source: view,
            holdWrites: undefined,
            close: () => view.close(),
          };
          const spec = specs[i];
          let result: CopyResult;
          if (spec !== undefined) {
            // one agent per destination, fed from the same read of SRC
            const { push } = await import('../remote/copy/push.js');
            result = await push(
              src,
              dst,
              spec,
              { ...hooks.remote!, pushDepth, onProgress: (p) => onProgress(i, p) },
              opened,
            );
          } else {
            result = await copyLocal(
              src,
              dst,
              // each destination its own index (auto: its own cache entry); SRC's index would
              // be one file written by every destination at once, so none is kept
              { ...options, srcIndex: false, onProgress: (p) => onProgress(i, p) },
              opened,
            );
          }
          return {
            destination: dst,
            result,
            bytesRead: result.bytesRead,
            bytesWritten: result.bytesWritten,
          };
        } catch (err) {
          await view.close();
          return {
            destination: dst,
            error: err instanceof Error ? err : new Error(String(err)),
            bytesRead: 0,
            bytesWritten: writtenBefore(err),
          };
        }
      }),
    );
  } finally {
    await broadcast.close();
    await shared.close();
  }
  const result: CopyManyResult = {
    source: src,
    bytesTotal: shared.size,
    sourceBytesRead: broadcast.bytesRead,
    bufferBytes: pieces * chunkSize,
    destinations: outcomes,
    failed: outcomes.filter((o) => o.error !== undefined).length,
    dryRun: options.dryRun,
    seconds: (performance.now() - started) / 1000,
  };
  if (options.signal?.aborted === true) {
    throw new BlksyncError(
      'EINTERRUPTED',
      `interrupted; rerun the same command to finish every destination`,
      { partial: result },
    );
  }
  return result;
}

/**
 * With more `host:path` destinations than `jobs` links at once: waves, each one fan-out of
 * its own. The first takes every local destination and the first `jobs` hosts; each later
 * wave reads SRC again, so SRC must be readable again (not stdin, not a URL).
 */
export async function fanOutInWaves(
  src: string,
  dsts: readonly string[],
  options: ResolvedCopyOptions,
  hooks: FanOutHooks,
  jobs: number,
): Promise<CopyManyResult> {
  const hosts = dsts.flatMap((d, i) => (parseRemote(d) !== undefined ? [i] : []));
  if (hosts.length <= jobs) return fanOut(src, dsts, options, hooks);
  if (src === '-' || isUrl(src)) {
    throw new BlksyncError(
      'EUSAGE',
      `${hosts.length} hosts with --jobs ${jobs} would read SRC once per wave of hosts, and ${src === '-' ? 'stdin' : src} can be read once; give --jobs ${hosts.length} or SRC as a file`,
    );
  }
  const local = dsts.flatMap((d, i) => (parseRemote(d) === undefined ? [i] : []));
  const waves: number[][] = [[...local, ...hosts.slice(0, jobs)]];
  for (let k = jobs; k < hosts.length; k += jobs) waves.push(hosts.slice(k, k + jobs));
  const started = performance.now();
  const outcomes: DestinationOutcome[] = new Array<DestinationOutcome>(dsts.length);
  let last: CopyManyResult | undefined;
  let sourceBytesRead = 0;
  for (const wave of waves) {
    last = await fanOut(
      src,
      wave.map((i) => dsts[i]!),
      options,
      {
        ...hooks,
        onDestinationProgress: (k, p) => hooks.onDestinationProgress?.(wave[k]!, p),
      },
    );
    sourceBytesRead += last.sourceBytesRead;
    last.destinations.forEach((o, k) => (outcomes[wave[k]!] = o));
  }
  return {
    ...last!,
    sourceBytesRead,
    destinations: outcomes,
    failed: outcomes.filter((o) => o.error !== undefined).length,
    seconds: (performance.now() - started) / 1000,
  };
}

/** What a failed copy had written, from its partial-write fields. */
function writtenBefore(err: unknown): number {
  const partial = err instanceof BlksyncError ? err.partial : undefined;
  if (typeof partial !== 'object' || partial === null) return 0;
  const n = (partial as { bytesWritten?: unknown }).bytesWritten;
  return typeof n === 'number' ? n : 0;
}

/**
 * Two destinations naming one file or device would be written by two copies at once: refused
 * before anything is read. A destination that does not exist yet is compared by the path it
 * would be created at (`new.img` and `./new.img`, a dangling link to it).
 */
async function assertDistinct(dsts: readonly string[]): Promise<void> {
  const seen: { dst: string; st: Stats | undefined; at: string }[] = [];
  for (const dst of dsts) {
    let st: Stats | undefined;
    try {
      st = await stat(dst);
    } catch (err) {
      if (!isSystemError(err)) throw err;
      // missing (created by its copy) or not reachable: its copy reports it
    }
    const at = st === undefined ? await createdAt(dst) : dst;
    const twin = seen.find((s) =>
      s.st !== undefined && st !== undefined ? sameFile(s.st, st) : s.at === at,
    );
    if (twin !== undefined) {
      throw new BlksyncError(
        'EUSAGE',
        `${dst} and ${twin.dst} are the same file or device (or one is a partition of the other, or a loop device over the other); give each destination once`,
        { path: dst },
      );
    }
    seen.push({ dst, st, at });
  }
}

/** Links followed to where a missing destination would be created. */
const MAX_LINKS = 40;

/** The absolute path a missing destination would be created at (its links followed). */
async function createdAt(dst: string): Promise<string> {
  let path = resolve(dst);
  for (let i = 0; i < MAX_LINKS; i++) {
    try {
      const target = await readlink(path);
      path = resolve(dirname(path), target);
      continue;
    } catch {
      // not a link (or not there): created here
    }
    break;
  }
  try {
    return join(await realpath(dirname(path)), basename(path));
  } catch {
    return path; // its directory is missing too: its copy reports it
  }
}
