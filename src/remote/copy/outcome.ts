/**
 * How a remote copy ends: its result (the counts, the channel's traffic), and what a failure
 * means for DST — an interruption, a dropped link (with what had been written), a session
 * closed without DONE.
 */

import { BlksyncError } from '../../errors.js';
import type { CopyResult } from '../../engine/copy-options.js';
import type { PipelineResult } from '../../engine/pipeline.js';
import type { VerifyReport } from '../../engine/verify-written.js';
import type { Range } from '../../ranges.js';
import { partlyWritten } from '../../partial-write.js';
import { formatBytes } from '../../size.js';
import type { ProgressListener } from '../../types.js';
import type { AgentLink } from '../link.js';
import type { SourceIndexReport } from '../../engine/source-index.js';
import type { Ready, Summary } from '../protocol.js';
import type { RemoteSpec } from '../spec.js';
import type { Session } from './options.js';

/** What the ssh channel carried, added to the copy result of a remote run. */
export interface ChannelStats {
  host: string;
  /** Bytes blksync wrote into ssh (agent code, requests, data) and read from it. */
  bytesSent: number;
  bytesReceived: number;
  /** CPU seconds the agent used (user + system). */
  remoteCpuSeconds: number;
  /** DATA encoding negotiated ('' for raw only). */
  encoding: string;
  remoteNode: string;
  /**
   * --direct: the ssh channel between the two hosts, which carried the hashes and the data
   * (the fields above count only blksync's own channel, to SRC's host).
   */
  direct?: { host: string; bytesSent: number; bytesReceived: number };
}

export type RemoteCopyResult = CopyResult & { channel: ChannelStats };

/** What the pipeline found: a run here, or the report of an agent that ran it (--direct). */
export interface Counts {
  bytesScanned: number;
  blocksDiffering: number;
  bytesDiffering: number;
  rangesWritten: number;
  ranges: Range[];
}

export function countsOf(run: PipelineResult): Counts {
  return {
    bytesScanned: run.bytesScanned,
    blocksDiffering: run.blocksDiffering,
    bytesDiffering: run.bytesDiffering,
    rangesWritten: run.ranges.count,
    ranges: [...run.ranges.ranges],
  };
}

/**
 * A remote copy's result: the counts, and what each direction knows in its own way (`dstSize`:
 * DST's size as found, which extends past the image unless DST was created).
 */
export function resultOf(
  session: Session,
  src: string,
  dst: string,
  size: number,
  counts: Counts,
  ends: {
    bytesRead: number;
    blockSize: number;
    bytesWritten: number;
    created: boolean;
    dstSize: number;
    channel: ChannelStats;
  },
): RemoteCopyResult {
  return {
    source: src,
    destination: dst,
    bytesTotal: size,
    bytesScanned: counts.bytesScanned,
    bytesRead: ends.bytesRead,
    blockSize: ends.blockSize,
    blocksDiffering: counts.blocksDiffering,
    bytesDiffering: counts.bytesDiffering,
    bytesWritten: ends.bytesWritten,
    rangesWritten: counts.rangesWritten,
    ranges: counts.ranges,
    created: ends.created,
    destinationExtraBytes: ends.created ? 0 : ends.dstSize - size,
    dryRun: session.dryRun,
    full: session.full,
    seconds: (performance.now() - session.started) / 1000,
    channel: ends.channel,
  };
}

/** How long a dropped link waits for a Ctrl-C that may have dropped it to be noticed. */
const SIGNAL_GRACE_MS = 200;

export async function connectionLost(
  err: unknown,
  dst: string,
  written: number,
  signal: AbortSignal | undefined,
  /** Push: bytes sent as DATA; the agent writes what it received before it exits. */
  sent = 0,
): Promise<unknown> {
  if (err instanceof BlksyncError && err.code === 'ECONNECTION_LOST') {
    if (signal !== undefined && !signal.aborted) {
      // ssh may have died of the same SIGINT whose handler has not run yet
      await new Promise((resolve) => setTimeout(resolve, SIGNAL_GRACE_MS));
    }
    if (signal?.aborted === true) {
      // Ctrl-C reaches ssh too (same process group, which it needs for password prompts),
      // so an interrupted run usually sees the link drop first: it is still an interruption
      return new BlksyncError(
        'EINTERRUPTED',
        `interrupted after ${formatBytes(written)} had been written to ${dst}; rerun the same command to finish`,
        { cause: err },
      );
    }
    return new BlksyncError(
      'ECONNECTION_LOST',
      `${err.message}; ${formatBytes(written)} had been written to ${dst}; rerun the same command to finish`,
      { cause: err, partial: { destination: dst, bytesWritten: written } },
    );
  }
  // any other failure after writes began (a local SRC cut short) says so as a local copy does
  return partlyWritten(err, { destination: dst, bytesWritten: Math.max(written, sent) });
}

export function interrupted(result: CopyResult): BlksyncError {
  return new BlksyncError(
    'EINTERRUPTED',
    `interrupted after ${formatBytes(result.bytesScanned)} of ${formatBytes(result.bytesTotal)}; rerun the same command to finish`,
    { partial: result },
  );
}

/** The copy result's `verify` from what a target agent read back and was found equal. */
/**
 * The result's `index.source` for a remote SRC's index kept by its agent (READY said what it
 * does with it): SRC's bytes the agent read, the sample included.
 */
export function sourceIndexReport(ready: Ready, summary: Summary): { source?: SourceIndexReport } {
  if (ready.sourceIndex === undefined) return {};
  const notWritten = summary.sourceIndexNotWritten;
  return {
    source: {
      ...ready.sourceIndex,
      bytesRead: summary.bytesRead,
      ...(notWritten !== undefined ? { notWritten } : {}),
    },
  };
}

export function verifyReport(
  v: { bytesVerified: number; ranges: number; direct: boolean; seconds: number } | undefined,
): { verify?: VerifyReport } {
  if (v === undefined) return {};
  return { verify: { ...v, against: 'written', algorithm: 'sha256' } };
}

/** Ends a session without DONE; what the agent confirmed stands in for its summary. */
export async function closedEarly(link: AgentLink): Promise<Summary> {
  await link.close();
  return { bytes: link.bytesConfirmed, frames: 0, digest: '', bytesRead: 0 };
}

export function channelStats(link: AgentLink, spec: RemoteSpec, summary: Summary): ChannelStats {
  return {
    remoteCpuSeconds: summary.cpuSeconds ?? 0,
    host: spec.destination,
    bytesSent: link.bytesSent,
    bytesReceived: link.bytesReceived,
    encoding: link.ready.encoding,
    remoteNode: link.ready.node,
  };
}

export function withChannel(listener: ProgressListener, link: AgentLink): ProgressListener {
  return (p) =>
    listener({
      ...p,
      channelBytesSent: link.bytesSent,
      channelBytesReceived: link.bytesReceived,
    });
}
