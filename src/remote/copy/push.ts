/**
 * Push: a local SRC onto a remote DST (docs/architecture.md, "Remote ends").
 *
 *   PushSource (SRC, re-read where it differs) ──► RefinedTarget ──► RemoteSink (DATA)
 *   or, for a source read once in order (compressed, stdin, URL, bmap plan):
 *   CheckedSource (hashes each chunk as it is read) ──► RefinedTarget ──► RemoteSink
 *
 * SRC comes from openCopySource, as a local copy's does; ssh starts once it is open. A plain
 * file is hashed ahead by a HashScanner started as the HELLO goes out, while ssh logs in; a
 * Refiner compares its top-level hashes with the agent's stream and refines the chunks that
 * differ ahead of the pipeline.
 */

import { BlksyncError } from '../../errors.js';
import { openCopySource, type CopySource } from '../../engine/copy-source.js';
import { NoTarget, ZeroTarget } from '../../engine/knowledge.js';
import { SourceWatch } from '../../io/source-watch.js';
import { isWholePlan, runPipeline } from '../../engine/pipeline.js';
import { dataRangesOf } from '../../engine/sparse-plan.js';
import { SourceIndex } from '../../engine/source-index.js';
import type { Range } from '../../ranges.js';
import { FileSource } from '../../io/file-source.js';
import type { Sink, Source, TargetKnowledge } from '../../types.js';
import { agentPayload } from '../agent-payload.js';
import { DEFLATE_RAW } from '../compress.js';
import { HashDiffer } from '../hash-differ.js';
import { AgentLink, type StartedAgent } from '../link.js';
import { blockDigest, MIN_HASH_UNIT, unitHashes, WIRE_HASH_BYTES, wireHash } from '../protocol.js';
import type { Refiner } from '../refiner.js';
import { readIndexIfAny, RemoteIndex } from '../remote-index.js';
import {
  hashAheadPush,
  RefinedTarget,
  REMOTE_DEPTH,
  RemoteSink,
  SpanBook,
  topHashing,
} from '../roles.js';
import { HashScanner } from '../scanner.js';
import type { RemoteSpec } from '../spec.js';
import { CheckedSource } from './checked-source.js';
import { IndexedPushSource, pushSourceIndex, SourceHashes } from './push-src-index.js';
import { agentIndexHello, keptRemotely } from './kept-index.js';
import { sessionOf, type RemoteCopyOptions } from './options.js';
import {
  channelStats,
  closedEarly,
  connectionLost,
  countsOf,
  interrupted,
  resultOf,
  verifyReport,
  withChannel,
  type RemoteCopyResult,
} from './outcome.js';

/**
 * Pushes SRC to the agent's DST. `preopened`: SRC already opened (a fan-out's view of its one
 * read of SRC, compared chunk by chunk as it comes); closed here.
 */
export async function push(
  src: string,
  dst: string,
  spec: RemoteSpec,
  options: RemoteCopyOptions,
  preopened?: CopySource,
): Promise<RemoteCopyResult> {
  // the agent code, read (and deflated) while SRC is opened and ssh logs in
  const payload = agentPayload();
  payload.catch(() => {}); // awaited where ssh starts
  const session = sessionOf(options);
  const { blockSize, chunkSize, dryRun, full } = session;
  // SRC as a local copy reads it: a file, compressed, stdin, a URL; a bmap's plan
  const opened = preopened ?? (await openCopySource(src, options));
  const { plan, size } = opened;
  const whole = isWholePlan(plan);
  // --index auto or host:FILE: the index is kept beside DST by the agent (agent-index.ts)
  const kept = keptRemotely(options.index, spec);
  const indexing = options.index !== undefined && kept === undefined;
  // --src-index: SRC's index, kept here (push-src-index.ts); asked for explicitly only
  const srcIndexAsked = pushSourceIndex(options, opened);
  // a plain file read by offset is hashed ahead and re-read only where it differs; any
  // other source is hashed chunk by chunk as the pipeline reads it (CheckedSource), also
  // when an index is made or used: it needs every chunk's bytes. With --src-index it is not
  // hashed ahead either: a used index of SRC makes reading all of it needless
  const plain = whole && opened.source instanceof FileSource ? opened.source : undefined;
  const file = !indexing && srcIndexAsked === undefined ? plain : undefined;
  const top = topHashing();
  let refiner: Refiner | undefined;
  // another program writing SRC meanwhile would leave DST a mix of old and new (io/source-watch.ts)
  const watching =
    opened.watched !== undefined ? SourceWatch.start(opened.watched, src) : undefined;
  watching?.catch(() => {}); // awaited in the try below; until then it must not be "unhandled"
  // SRC's hashes are computed while ssh connects and the agent scans DST; its holes unread.
  // Started once ssh is: its reads would fill libuv's thread pool ahead of the few file
  // operations before ssh starts (~50-100 ms later on 2 loaded cores)
  const holes = opened.file?.kind === 'file' ? opened.file.fh : undefined;
  const scanner =
    full || file === undefined
      ? undefined
      : new HashScanner(
          file,
          src,
          size,
          chunkSize,
          top.hash,
          holes && (() => dataRangesOf(holes, size, src)),
        );
  let link: AgentLink | undefined;
  let index: RemoteIndex | undefined;
  let srcIndex: SourceIndex | undefined;
  let started: StartedAgent | undefined;
  try {
    // ssh logs in while the rest of the HELLO is got ready (SRC's watch, a local index)
    started = AgentLink.start(spec, options);
    const watch = await watching;
    let found: Awaited<ReturnType<typeof readIndexIfAny>>;
    // with a bmap, the index's blocks tile the mapped ranges: the bmap's blocks, or -b's
    // dividing them (as a local copy's)
    const bmapBlock = options.index !== undefined ? opened.bmap?.blockSize : undefined;
    if (
      bmapBlock !== undefined &&
      options.blockSizeGiven !== undefined &&
      bmapBlock % options.blockSizeGiven !== 0
    ) {
      throw new BlksyncError(
        'EUSAGE',
        `-b ${options.blockSizeGiven} does not divide the bmap's ${bmapBlock}-byte blocks; with --index and a bmap omit -b`,
      );
    }
    const indexBlock = options.blockSizeGiven ?? bmapBlock;
    if (options.index !== undefined && indexing) {
      found = await readIndexIfAny(options.index);
    }
    // an index that may be used makes the agent's scan of DST needless
    const mayUseIndex = found !== undefined && 'index' in found && !options.rebuildIndex;
    const topUnit = full || !whole || mayUseIndex ? 0 : chunkSize;
    // without an index (whose tables hold SHA-256) the agent's HASHES are GMAC tags too:
    // a bmap's mapped pieces are compared by HASH_REQ, at a sixth of SHA-256's CPU
    const gmacHashes = kept === undefined && !indexing;
    const reqHash = gmacHashes ? top.hash : wireHash;
    const opening = started.open(
      {
        role: 'target',
        path: spec.path,
        size,
        dryRun,
        // a bmap plan asks for the mapped ranges' hashes instead of a scan of all of DST
        topUnit,
        ...top.hello,
        ...(gmacHashes ? { reqHash: top.hello.topHash } : {}),
        encodings: [DEFLATE_RAW],
        ...(indexing ? { identity: true } : {}),
        ...(options.verify === true ? { verify: true } : {}),
        ...(kept !== undefined
          ? { index: agentIndexHello(kept, options, chunkSize, indexBlock) }
          : {}),
      },
      await payload,
    );
    // the HELLO is out: SRC's reads no longer delay it
    scanner?.start();
    link = await opening;
    const ready = link.ready;
    const book = new SpanBook();
    const l = link;
    // the agent's index is used: it answers hashes in its blocks, and DST is not read
    const ibs = ready.index?.mode === 'used' ? ready.index.blockSize : undefined;
    const digests = ready.index?.digests === true;
    if (options.index !== undefined && indexing) {
      index = await RemoteIndex.open(
        {
          index: options.index,
          imageSize: size,
          blockSize: indexBlock,
          ...(options.blockSizeGiven === undefined && bmapBlock !== undefined
            ? { blockSizeReason: "the bmap's blocks are" }
            : {}),
          ...(whole ? {} : { partial: { ranges: plan.ranges } }),
          chunkSize,
          rebuild: options.rebuildIndex,
          trust: options.trustIndex,
          verifySample: options.verifySample,
          full,
          dryRun,
          hashThreads: options.hashThreads,
        },
        found,
        l,
        (bs) => new HashDiffer(l, chunkSize, bs),
      );
    }
    // SRC's index is in DST's index's blocks, and of use only where DST's index is used
    const srcBlock = index?.blockSize ?? ready.index?.blockSize;
    if (srcIndexAsked !== undefined && srcBlock !== undefined) {
      const usable = index !== undefined ? index.knowledge !== undefined : ibs !== undefined;
      srcIndex = await SourceIndex.open(
        srcIndexAsked,
        srcBlock,
        size,
        usable,
        options.verifySample,
      );
    }
    // absent or stale: every chunk of SRC is read, and hashed for the index written after
    // ('kept': valid, but of no use while DST's index is made; left as it is)
    const srcMode = srcIndex?.report().mode;
    const collected =
      (srcMode === 'created' || srcMode === 'rebuilt') && !dryRun
        ? new SourceHashes(size, srcBlock!)
        : undefined;
    let knowledge: TargetKnowledge;
    let input: Source = opened.source;
    let narrowed: Range[] | undefined;
    let indexed: IndexedPushSource | undefined;
    if (full) knowledge = new NoTarget();
    else if (index?.knowledge !== undefined) {
      knowledge = index.knowledge;
      if (srcIndex !== undefined) narrowed = index.planFrom(srcIndex);
    } else if (ibs !== undefined && srcIndex?.hashes !== undefined && plain !== undefined) {
      indexed = new IndexedPushSource(plain, srcIndex, l, book, ibs, digests);
      input = indexed;
      knowledge = new RefinedTarget(book, () => 0);
    } else if (ibs !== undefined) {
      await scanner?.stop();
      input = new CheckedSource(opened.source, book, async (offset, data, length) => {
        const mine = unitHashes(data, length, ibs);
        // one 16-byte digest per chunk from the index; its blocks only where it differs
        if (digests && blockDigest(mine).equals(await l.topHash(offset))) return [];
        const theirs = await l.hashes(offset, length, ibs);
        const spans: number[] = [];
        for (let s = 0, k = 0; s < length; s += ibs, k++) {
          const h = k * WIRE_HASH_BYTES;
          if (mine.compare(theirs, h, h + WIRE_HASH_BYTES, h, h + WIRE_HASH_BYTES) === 0) continue;
          const e = Math.min(s + ibs, length);
          if (spans.length > 0 && spans[spans.length - 1] === s) spans[spans.length - 1] = e;
          else spans.push(s, e);
        }
        return spans;
      });
      knowledge = new RefinedTarget(book, () => 0);
    } else if (ready.zero) {
      knowledge = new ZeroTarget();
      await scanner?.stop();
    } else if (file !== undefined && scanner !== undefined) {
      const ahead = hashAheadPush(
        file,
        src,
        size,
        chunkSize,
        blockSize,
        scanner,
        link,
        book,
        reqHash,
      );
      refiner = ahead.refiner;
      input = ahead.input;
      knowledge = new RefinedTarget(book, () => 0);
    } else {
      const differ = new HashDiffer(link, chunkSize, blockSize, reqHash);
      input = new CheckedSource(opened.source, book, async (offset, data, length) => {
        const chunk = data.subarray(0, length);
        // the whole image: the agent's TOP_HASHES stream; a bmap's piece: one hash asked for
        const same =
          topUnit > 0
            ? top.hash(chunk).equals(await l.topHash(offset))
            : reqHash(chunk).equals(
                await l.hashes(offset, length, Math.max(length, MIN_HASH_UNIT)),
              );
        const spans: number[] = [];
        if (!same) await differ.refine(offset, data, length, false, spans);
        return spans;
      });
      knowledge = new RefinedTarget(book, () => 0);
    }
    const sink: Sink = index?.wrapSink(new RemoteSink(link)) ?? new RemoteSink(link);
    const pipelineBlockSize = index?.knowledge !== undefined ? index.blockSize : (ibs ?? blockSize);
    const indexHook = index?.onChunk;
    const onChunk =
      collected === undefined
        ? indexHook
        : indexHook === undefined
          ? collected.onChunk
          : (offset: number, data: Buffer, length: number) => {
              collected.onChunk(offset, data, length);
              return indexHook(offset, data, length);
            };
    const run = await runPipeline(
      narrowed !== undefined ? { imageSize: size, ranges: narrowed } : plan,
      input,
      knowledge,
      dryRun ? [] : [sink],
      {
        blockSize: pipelineBlockSize,
        chunkSize,
        depth: options.pushDepth ?? REMOTE_DEPTH,
        signal: options.signal,
        onProgress: options.onProgress && withChannel(options.onProgress, link),
        onChunk,
      },
    );
    await refiner?.stop();
    if (!run.interrupted) {
      await watch?.check(
        dryRun
          ? 'what this dry run reports is neither'
          : `what was copied onto ${dst} may be a mix of its old and new content`,
      );
    }
    // an index kept by the agent is written clean at DONE; an interrupted run ends as a killed
    // one does instead (no DONE: the agent syncs and exits), leaving the index marked in
    // progress rather than having the agent read back what it never compared
    const summary =
      run.interrupted && ready.index !== undefined ? await closedEarly(link) : await link.finish();
    if (!run.interrupted) {
      await index?.commit(summary.identity);
      // SRC read whole and DST now holds it: SRC's index, unless SRC changed meanwhile
      if (collected !== undefined) await srcIndex?.save(collected.table);
    }
    const dstIndex = index?.report() ?? summary.index;
    const source =
      srcIndex !== undefined
        ? { ...srcIndex.report(), bytesRead: indexed?.bytesRead ?? run.bytesScanned }
        : undefined;
    const result: RemoteCopyResult = {
      ...resultOf(session, src, dst, size, countsOf(run), {
        bytesRead: summary.bytesRead,
        blockSize: pipelineBlockSize,
        bytesWritten: summary.bytes,
        created: ready.created,
        dstSize: ready.size,
        channel: channelStats(link, spec, summary),
      }),
      ...(dstIndex !== undefined
        ? { index: { ...dstIndex, ...(source !== undefined ? { source } : {}) } }
        : {}),
      ...(opened.bmap !== undefined ? { bmap: opened.bmap } : {}),
      ...verifyReport(link.verified),
    };
    await link.close();
    result.channel = channelStats(link, spec, summary);
    result.seconds = (performance.now() - session.started) / 1000;
    if (run.interrupted) throw interrupted(result);
    return result;
  } catch (err) {
    throw await connectionLost(
      err,
      dst,
      link?.bytesConfirmed ?? 0,
      options.signal,
      link?.dataBytes ?? 0,
    );
  } finally {
    await refiner?.stop();
    await scanner?.stop();
    // ssh started and no HELLO sent: the failure came first
    if (link === undefined) await started?.abort();
    await link?.close();
    await index?.close();
    await srcIndex?.close();
    await opened.close();
  }
}
