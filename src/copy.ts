/**
 * The copy router: which ends are local or remote decides which copy runs.
 *
 *   local SRC → local DST        engine/copy.ts      copyLocal
 *   local SRC → host:DST         remote/copy/push.ts
 *   host:SRC  → local DST        remote/copy/pull.ts
 *   host:SRC  → host:DST         remote/copy/relay.ts (through this machine)
 *                                remote/copy/direct.ts (--direct: SRC's host sends to DST's)
 *   local SRC → DST1 DST2 …      fanout/copy-many.ts (copyMany: SRC read once for all)
 *
 * It sits above engine/ and remote/ so that neither imports the other upward: the engine
 * knows nothing of ssh, and remote/ uses the engine as a library. The options are checked and
 * given their defaults once here (engine/copy-options.ts) for every path.
 */

import { BlksyncError } from './errors.js';
import { copyLocal } from './engine/copy.js';
import { checkOutput } from './io/output-file.js';
import {
  resolveCopyOptions,
  type CopyResult,
  type LocalCopyOptions,
  type ResolvedCopyOptions,
} from './engine/copy-options.js';
import type { CopyManyResult, DestinationOutcome } from './fanout/copy-many.js';
import type { RemoteOptions } from './remote/link.js';
import type { Progress } from './types.js';
import { parseRemote } from './remote/spec.js';

export type { CopyResult } from './engine/copy-options.js';
export type { CopyManyResult, DestinationOutcome } from './fanout/copy-many.js';
export type { ChannelStats, RemoteCopyResult } from './remote/copy/outcome.js';

export interface CopyOptions extends LocalCopyOptions {
  /** How to reach a `host:path` end: ssh command, remote node, sudo. */
  remote?: RemoteOptions;
  /** Both ends remote: SRC's host sends to DST's host itself, not through this machine. */
  direct?: boolean;
}

/** Writes SRC onto DST, writing only the blocks that differ; either end may be `host:path`. */
export async function copy(
  src: string,
  dst: string,
  options: CopyOptions = {},
): Promise<CopyResult> {
  const result = await copyAny(src, dst, options);
  warnWrittenMeanwhile(result, options.onWarning);
  return result;
}

/**
 * DST was written by another program while the copy ran (its own writes were synced before
 * DST's counter was first read, so what was pending before is not counted here): a warning,
 * as the index written vouches for nothing.
 */
function warnWrittenMeanwhile(r: CopyResult, onWarning: CopyOptions['onWarning']): void {
  const sectors = r.index?.sectorsWrittenMeanwhile;
  if (sectors === undefined && r.index?.changedMeanwhile !== true) return;
  const what =
    sectors !== undefined
      ? `${sectors} sectors were written to ${r.destination} while the copy ran that its own writes do not account for (another program, or the kernel writing a page of the copy twice)`
      : `${r.destination} was changed by another program while the copy ran (its ctime moved between the copy's own writes, or a loop device's backing file moved while the copy wrote nothing)`;
  onWarning?.({
    code: 'WDST_WRITTEN_MEANWHILE',
    message: `${what}: the index vouches for none of it, and the next copy compares all of it`,
    path: r.destination,
  });
}

async function copyAny(src: string, dst: string, options: CopyOptions): Promise<CopyResult> {
  const resolved = resolveCopyOptions(options);
  const from = parseRemote(src);
  const to = parseRemote(dst);
  if (options.direct === true && (from === undefined || to === undefined)) {
    throw new BlksyncError(
      'EUSAGE',
      '--direct copies between two hosts: give both SRC and DST as [user@]host:path',
    );
  }
  if (from === undefined && to === undefined) {
    await assertIndexesWritable(resolved);
    // DST may steer how SRC is read (engine/copy-source.ts): a published http(s) SRC is
    // fetched by ranges, only what DST lacks; a qcow2 overlay of DST copies only its own
    // clusters. Not with --full, nor with an index, which must describe all of DST
    const delta = !resolved.full && resolved.index === undefined;
    return copyLocal(src, dst, delta ? { ...resolved, destination: dst } : resolved);
  }

  // loaded only for a remote end: a local copy does not pay for ssh's modules. A push reads
  // its local SRC as a local copy does, signature checks included; a remote SRC's bmap is
  // --bmap FILE, checked so too
  const remote = { ...resolved, ...options.remote, direct: options.direct === true };
  const { checkRemoteCopy, compressedRemote } = await import('./remote/copy/options.js');
  checkRemoteCopy(from, to, remote);
  if (to === undefined) await assertIndexesWritable(resolved);
  // a push's --src-index FILE is written here too (its --index FILE is checked by push.ts)
  else if (from === undefined) await assertIndexesWritable({ ...resolved, index: undefined });
  if (from === undefined) {
    const { push } = await import('./remote/copy/push.js');
    return push(src, dst, to!, remote);
  }
  try {
    if (to === undefined) {
      const { pull } = await import('./remote/copy/pull.js');
      return await pull(src, dst, from, remote);
    }
    if (options.direct === true) {
      const { direct } = await import('./remote/copy/direct.js');
      return await direct(src, dst, from, to, remote);
    }
    const { relay } = await import('./remote/copy/relay.js');
    return await relay(src, dst, from, to, remote);
  } catch (err) {
    // a remote container or compressed SRC: streamed through here and decoded here
    const { copyStreamedRemote, decodedHereOnly } =
      await import('./remote/copy/streamed-source.js');
    if (decodedHereOnly(err) && options.direct !== true && options.raw !== true) {
      return await copyStreamedRemote(src, dst, from, to, remote, err);
    }
    throw compressedRemote(err, dst, from, remote);
  }
}

/** ssh links (one agent per host:path destination) a fan-out opens at once unless told. */
export const MAX_LINKS = 16;

export interface CopyManyOptions extends CopyOptions {
  /**
   * ssh links open at once (default: one per host:path destination, at most MAX_LINKS). With
   * fewer, hosts are done in waves, each reading SRC again (so not from stdin or a URL).
   */
  jobs?: number;
  /** Each destination's own progress (`index` into `dsts`); `onProgress` gets the sum. */
  onDestinationProgress?: (index: number, progress: Progress) => void;
}

/**
 * Writes SRC onto every destination, reading SRC once, each destination compared against its
 * own content and written only where it differs. A destination that is refused or fails is
 * reported in its entry of `destinations` (`error`) and the others go on; the result's
 * `failed` counts them. Throws only when nothing could start (bad options, SRC unreadable)
 * or when interrupted. One destination is `copy`'s path, its result in the one entry.
 */
export async function copyMany(
  src: string,
  dsts: readonly string[],
  options: CopyManyOptions = {},
): Promise<CopyManyResult> {
  if (dsts.length === 0) throw new BlksyncError('EUSAGE', 'copy needs at least one destination');
  if (dsts.length === 1) return single(src, dsts[0]!, options);
  const resolved = resolveCopyOptions(options);
  if (parseRemote(src) !== undefined) {
    throw new BlksyncError(
      'EUSAGE',
      `${src}: with several destinations SRC is local (a file, device, stdin or URL); copy from a host to one destination per run`,
    );
  }
  if (options.direct === true) {
    throw new BlksyncError('EUSAGE', '--direct copies between two hosts: give one destination');
  }
  const remote = { ...resolved, ...options.remote, direct: false };
  const hosts = dsts.map((d) => parseRemote(d)).filter((s) => s !== undefined);
  const jobs = options.jobs ?? Math.max(1, Math.min(hosts.length, MAX_LINKS));
  if (!Number.isInteger(jobs) || jobs < 1) {
    throw new BlksyncError('EUSAGE', `--jobs ${jobs}: give a whole number of links, 1 or more`);
  }
  if (hosts.length > 0) {
    const { checkRemoteCopy } = await import('./remote/copy/options.js');
    for (const to of hosts) checkRemoteCopy(undefined, to, remote);
  }
  if (resolved.index !== undefined && resolved.index !== 'auto') {
    throw new BlksyncError(
      'EUSAGE',
      `--index ${resolved.index} describes one destination; with several give --index auto (each its own cached index)`,
    );
  }
  if (typeof resolved.srcIndex === 'string') {
    throw new BlksyncError(
      'EUSAGE',
      '--src-index works with one destination; with several SRC is read once anyway',
    );
  }
  const { fanOutInWaves } = await import('./fanout/copy-many.js');
  const hooks = { onDestinationProgress: options.onDestinationProgress, remote };
  return fanOutInWaves(src, dsts, resolved, hooks, jobs);
}

/** A fan-out of one: `copy` itself, its outcome in copyMany's shape. */
async function single(src: string, dst: string, options: CopyManyOptions): Promise<CopyManyResult> {
  const started = performance.now();
  const { onDestinationProgress, onProgress } = options;
  const both = (p: Progress): void => {
    onDestinationProgress?.(0, p);
    onProgress?.(p);
  };
  const entry = await copy(src, dst, {
    ...options,
    ...(onDestinationProgress !== undefined || onProgress !== undefined
      ? { onProgress: both }
      : {}),
  }).then(
    (result): DestinationOutcome => ({
      destination: dst,
      result,
      bytesRead: result.bytesRead,
      bytesWritten: result.bytesWritten,
    }),
    (err: unknown): DestinationOutcome => {
      if (err instanceof BlksyncError && err.code === 'EINTERRUPTED') throw err;
      const partial = err instanceof BlksyncError ? err.partial : undefined;
      const written = (partial as { bytesWritten?: unknown } | undefined)?.bytesWritten;
      return {
        destination: dst,
        error: err instanceof Error ? err : new Error(String(err)),
        bytesRead: 0,
        bytesWritten: typeof written === 'number' ? written : 0,
      };
    },
  );
  return {
    source: src,
    bytesTotal: entry.result?.bytesTotal ?? 0,
    sourceBytesRead: entry.result?.bytesScanned ?? 0,
    bufferBytes: 0,
    destinations: [entry],
    failed: entry.error !== undefined ? 1 : 0,
    dryRun: options.dryRun === true,
    seconds: (performance.now() - started) / 1000,
  };
}

/**
 * An index kept here (local DST: a local copy or a pull) that cannot be written would fail
 * only after DST is written: it is checked (its kind, its directory) before anything is read.
 * The cache (`auto`) is checked where it is opened.
 */
async function assertIndexesWritable(options: ResolvedCopyOptions): Promise<void> {
  if (options.dryRun) return;
  for (const out of [options.index, options.srcIndex]) {
    if (typeof out === 'string' && out !== 'auto' && parseRemote(out) === undefined) {
      await checkOutput(out, { what: 'index', code: 'EINDEX_WRITE' });
    }
  }
}
