/**
 * Relay: both ends remote, through this host. SRC's agent and DST's agent each stream their
 * top-level hashes; a Refiner compares them and refines the chunks that differ (asking both
 * agents for finer hashes); the differing bytes are fetched from SRC's agent and sent on to
 * DST's:
 *
 *   FetchedSource (blocks fetched from SRC's agent) ──► RefinedTarget ──► RemoteSink (DST's agent)
 */

import { BlksyncError } from '../../errors.js';
import { bmapSourcing, type BmapReport } from '../../engine/copy-source.js';
import { runPipeline, wholeImagePlan } from '../../engine/pipeline.js';
import type { Plan } from '../../types.js';
import { agentPayload } from '../agent-payload.js';
import { DEFLATE_RAW } from '../compress.js';
import { HashDiffer } from '../hash-differ.js';
import { AgentLink } from '../link.js';
import { MappedSource } from '../mapped-source.js';
import { Refiner, type Found } from '../refiner.js';
import {
  fetchSpans,
  FetchedSource,
  RefinedTarget,
  REMOTE_DEPTH,
  RemoteSink,
  SpanBook,
  topHashing,
} from '../roles.js';
import type { RemoteSpec } from '../spec.js';
import { agentIndexHello, blockTopHashing, indexBlockOf, keptRemotely } from './kept-index.js';
import {
  checkRemoteSize,
  givenBmap,
  remoteSourceIndex,
  sessionOf,
  type RemoteCopyOptions,
} from './options.js';
import {
  channelStats,
  closedEarly,
  connectionLost,
  countsOf,
  interrupted,
  resultOf,
  sourceIndexReport,
  verifyReport,
  type RemoteCopyResult,
} from './outcome.js';

export async function relay(
  src: string,
  dst: string,
  fromSpec: RemoteSpec,
  toSpec: RemoteSpec,
  options: RemoteCopyOptions,
): Promise<RemoteCopyResult> {
  const session = sessionOf(options);
  const { blockSize, chunkSize, dryRun, full } = session;
  const kept = keptRemotely(options.index, toSpec);
  // with DST's agent keeping an index, both sides' top hashes are block digests, which a
  // used index knows without reading DST
  const top = kept !== undefined ? blockTopHashing(indexBlockOf(options)) : topHashing();
  let from: AgentLink | undefined;
  let to: AgentLink | undefined;
  let refiner: Refiner | undefined;
  let mapped: MappedSource | undefined;
  try {
    // a local bmap of SRC's image: only its mapped ranges are compared (one hash per piece
    // from each agent, no TOP_HASHES scan)
    const bmap = await givenBmap(options);
    if (bmap !== undefined && kept !== undefined) {
      throw new BlksyncError(
        'EUSAGE',
        `--index with --bmap is not supported when SRC is remote (${src}); drop one of them`,
      );
    }
    const topUnit = full || bmap !== undefined ? 0 : chunkSize;
    const sourceIndex = remoteSourceIndex(options, fromSpec);
    from = await AgentLink.open(
      fromSpec,
      options,
      {
        role: 'source',
        path: fromSpec.path,
        ...(options.raw === true ? { raw: true } : {}),
        topUnit,
        ...top.hello,
        encodings: [DEFLATE_RAW],
        // --src-index: kept by SRC's agent, in the digests' blocks (remoteSourceIndex
        // refused it where there are none)
        ...(sourceIndex !== undefined && kept !== undefined ? { sourceIndex, dryRun } : {}),
      },
      await agentPayload(),
    );
    const size = from.ready.size;
    // before DST's agent opens (or creates) DST
    await checkRemoteSize(size, src, options.size, bmap);
    to = await AgentLink.open(
      toSpec,
      options,
      {
        role: 'target',
        path: toSpec.path,
        size,
        dryRun,
        topUnit,
        ...top.hello,
        encodings: [DEFLATE_RAW],
        ...(options.verify === true ? { verify: true } : {}),
        ...(kept !== undefined
          ? { index: agentIndexHello(kept, options, chunkSize, options.blockSizeGiven) }
          : {}),
      },
      await agentPayload(),
    );
    const book = new SpanBook();
    const f = from;
    const t = to;
    let plan: Plan = wholeImagePlan(size);
    let bmapReport: BmapReport | undefined;
    if (bmap !== undefined) {
      mapped = new MappedSource(from, book, {
        size,
        chunkSize,
        blockSize,
        local: t.ready.zero ? undefined : t,
        dst,
        full,
        dryRun,
      });
      // the range checksums cannot be checked: DST's unchanged blocks never pass through here
      const b = await bmapSourcing(bmap, mapped, src, {
        noVerifyChecksums: true,
        rereadable: false,
      });
      plan = b.plan;
      bmapReport = b.report;
    } else if (!full) {
      const differ = new HashDiffer(from, chunkSize, blockSize);
      refiner = new Refiner(
        size,
        chunkSize,
        async (offset, length) => {
          const [theirs, mine] = await Promise.all([
            f.topHash(offset),
            t.ready.zero ? top.zero(length) : t.topHash(offset),
          ]);
          return mine.equals(theirs);
        },
        async (offset, length): Promise<Found> => {
          const spans: number[] = [];
          if (t.ready.zero) await differ.refine(offset, Buffer.alloc(0), length, true, spans);
          else await differ.refineBetween(offset, length, t, spans);
          return dryRun ? { spans } : { spans, data: await fetchSpans(f, offset, spans) };
        },
      );
    }
    const source = mapped ?? new FetchedSource(size, from, refiner, book, !dryRun);
    const links = [from, to];
    const run = await runPipeline(
      plan,
      source,
      new RefinedTarget(book, () => 0),
      dryRun ? [] : [new RemoteSink(to)],
      {
        blockSize,
        chunkSize,
        depth: REMOTE_DEPTH,
        signal: options.signal,
        onProgress:
          options.onProgress &&
          ((p) =>
            options.onProgress!({
              ...p,
              channelBytesSent: links.reduce((n, l) => n + l.bytesSent, 0),
              channelBytesReceived: links.reduce((n, l) => n + l.bytesReceived, 0),
            })),
      },
    );
    await refiner?.stop();
    await mapped?.stop();
    const fromSummary = await from.finish();
    // an interrupted run leaves DST's agent index marked in progress (as a push does)
    const toSummary =
      run.interrupted && to.ready.index !== undefined ? await closedEarly(to) : await to.finish();
    await Promise.all([from.close(), to.close()]);
    const a = channelStats(from, fromSpec, fromSummary);
    const b = channelStats(to, toSpec, toSummary);
    const result: RemoteCopyResult = {
      ...resultOf(session, src, dst, size, countsOf(run), {
        bytesRead: toSummary.bytesRead,
        blockSize,
        bytesWritten: toSummary.bytes,
        created: to.ready.created,
        dstSize: to.ready.size,
        channel: {
          host: `${a.host} → ${b.host}`,
          bytesSent: a.bytesSent + b.bytesSent,
          bytesReceived: a.bytesReceived + b.bytesReceived,
          remoteCpuSeconds: a.remoteCpuSeconds + b.remoteCpuSeconds,
          encoding: a.encoding === b.encoding ? a.encoding : `${a.encoding}/${b.encoding}`,
          remoteNode:
            a.remoteNode === b.remoteNode ? a.remoteNode : `${a.remoteNode}/${b.remoteNode}`,
        },
      }),
      ...verifyReport(to.verified),
      ...(toSummary.index !== undefined
        ? { index: { ...toSummary.index, ...sourceIndexReport(from.ready, fromSummary) } }
        : {}),
      ...(bmapReport !== undefined ? { bmap: bmapReport } : {}),
    };
    if (run.interrupted) throw interrupted(result);
    return result;
  } catch (err) {
    throw await connectionLost(err, dst, to?.bytesConfirmed ?? 0, options.signal);
  } finally {
    await refiner?.stop();
    await mapped?.stop();
    await to?.close();
    await from?.close();
  }
}
