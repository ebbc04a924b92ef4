import { BlksyncError } from '../../errors.js';
import { formatBytes } from '../../size.js';
import type { Progress } from '../../types.js';
import { agentPayload } from '../agent-payload.js';
import { AgentLink } from '../link.js';
import { topHashing } from '../roles.js';
import type { RemoteSpec } from '../spec.js';
import { agentIndexHello, blockTopHashing, indexBlockOf, keptRemotely } from './kept-index.js';
import { sessionOf, type RemoteCopyOptions } from './options.js';
import {
  connectionLost,
  interrupted,
  resultOf,
  verifyReport,
  type RemoteCopyResult,
} from './outcome.js';

/**
 * Both ends remote, --direct: the agent on SRC's host starts the one on DST's host and runs
 * the copy itself (agent/direct-copy.ts); this end sends the HELLO and DONE and receives PROGRESS and
 * the SUMMARY, so no hash or data of the image crosses this machine.
 */
export async function direct(
  src: string,
  dst: string,
  fromSpec: RemoteSpec,
  toSpec: RemoteSpec,
  options: RemoteCopyOptions,
): Promise<RemoteCopyResult> {
  const session = sessionOf(options);
  const { chunkSize, dryRun, full } = session;
  const kept = keptRemotely(options.index, toSpec);
  let link: AgentLink | undefined;
  let last: Progress | undefined;
  const signal = options.signal;
  const onAbort = (): void => void link?.close();
  try {
    link = await AgentLink.open(
      fromSpec,
      options,
      {
        role: 'source',
        path: fromSpec.path,
        ...(options.raw === true ? { raw: true } : {}),
        topUnit: 0,
        ...(kept !== undefined ? blockTopHashing(indexBlockOf(options)) : topHashing()).hello,
        encodings: [],
        direct: {
          destination: toSpec.destination,
          path: toSpec.path,
          ...(options.ssh !== undefined ? { ssh: options.ssh } : {}),
          ...(options.remoteNode !== undefined ? { remoteNode: options.remoteNode } : {}),
          sudo: options.sudo === true,
          ...(options.timeout !== undefined ? { timeout: options.timeout } : {}),
          blockSize: options.blockSize,
          chunkSize,
          dryRun,
          full,
          ...(options.verify === true ? { verify: true } : {}),
          ...(kept !== undefined
            ? { index: agentIndexHello(kept, options, chunkSize, options.blockSizeGiven) }
            : {}),
        },
      },
      await agentPayload(),
    );
    const l = link;
    l.onProgress = (p) => {
      last = p;
      options.onProgress?.({
        ...p,
        channelBytesSent: l.bytesSent + (p.channelBytesSent ?? 0),
        channelBytesReceived: l.bytesReceived + (p.channelBytesReceived ?? 0),
      });
    };
    // Ctrl-C: closing the channel makes the agent stop the copy (the far agent syncs)
    signal?.addEventListener('abort', onAbort, { once: true });
    const size = link.ready.size;
    const target = link.ready.target;
    if (target === undefined) {
      throw new BlksyncError('EREMOTE_PROTOCOL', `${link.name}: READY lacks the direct target`);
    }
    const summary = await link.finish();
    const report = summary.direct;
    if (report === undefined) {
      throw new BlksyncError('EREMOTE_PROTOCOL', `${link.name}: SUMMARY lacks the direct report`);
    }
    await link.close();
    const result: RemoteCopyResult = {
      // the copy ran on SRC's host: its report has the pipeline's counts
      ...resultOf(session, src, dst, size, report, {
        bytesRead: report.target.bytesRead,
        blockSize: options.blockSize,
        bytesWritten: report.target.bytes,
        created: target.created,
        dstSize: target.size,
        channel: {
          host: `${fromSpec.destination} (direct to ${toSpec.destination})`,
          bytesSent: link.bytesSent,
          bytesReceived: link.bytesReceived,
          remoteCpuSeconds: (summary.cpuSeconds ?? 0) + (report.target.cpuSeconds ?? 0),
          encoding: target.encoding,
          remoteNode:
            link.ready.node === target.node ? target.node : `${link.ready.node}/${target.node}`,
          direct: {
            host: `${fromSpec.destination} → ${toSpec.destination}`,
            bytesSent: report.bytesSent,
            bytesReceived: report.bytesReceived,
          },
        },
      }),
      ...verifyReport(report.verify),
      ...(report.target.index !== undefined ? { index: report.target.index } : {}),
    };
    if (report.interrupted || signal?.aborted === true) throw interrupted(result);
    return result;
  } catch (err) {
    if (err instanceof BlksyncError && err.code === 'EINTERRUPTED') throw err;
    // what the far agent confirmed is known only to the near one: the last progress says
    const lost = await connectionLost(err, dst, last?.bytesWritten ?? 0, signal);
    if (lost instanceof BlksyncError && lost.code === 'EINTERRUPTED' && last !== undefined) {
      throw new BlksyncError(
        'EINTERRUPTED',
        `interrupted after ${formatBytes(last.bytesScanned)} of ${formatBytes(last.bytesTotal)}; rerun the same command to finish`,
        { cause: err },
      );
    }
    throw lost;
  } finally {
    signal?.removeEventListener('abort', onAbort);
    await link?.close();
  }
}
