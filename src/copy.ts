/**
 * The copy router: which ends are local or remote decides which copy runs.
 *
 *   local SRC → local DST        engine/copy.ts      copyLocal
 *   local SRC → host:DST         remote/copy/push.ts
 *   host:SRC  → local DST        remote/copy/pull.ts
 *   host:SRC  → host:DST         remote/copy/relay.ts (through this machine)
 *                                remote/copy/direct.ts (--direct: SRC's host sends to DST's)
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
import type { RemoteOptions } from './remote/link.js';
import { parseRemote } from './remote/spec.js';

export type { CopyResult } from './engine/copy-options.js';
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
      : `${r.destination} was changed by another program while the copy ran (its ctime moved between the copy's own writes)`;
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
    throw compressedRemote(err, dst, from, remote);
  }
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
