/**
 * `copy hostA:SRC hostB:DST --direct`, the part that runs inside the source agent on hostA:
 * it starts a target agent on hostB over ssh itself (sending on its own bundle, with
 * blksync's --ssh, --remote-node and --sudo) and runs the copy there as a push from a plain
 * file would, so the hashes and the changed blocks go hostA → hostB and blksync, on its own
 * machine, sees only PROGRESS and the summary:
 *
 *   blksync ──HELLO{direct}──► agent A ──ssh, bundle, HELLO{target}──► agent B
 *           ◄─READY{target}──          ◄─READY, TOP_HASHES, HASHES, WRITTEN──
 *           ◄─PROGRESS ...─            ──HASH_REQ, DATA ...────────────────►
 *           ──DONE──────────►          ──DONE──────────────────────────────►
 *           ◄─SUMMARY{direct}          ◄─SUMMARY (digest checked here, on A)
 *
 * PushSource (SRC hashed ahead, re-read where it differs) ──► RefinedTarget ──► RemoteSink(B)
 */

import { BlksyncError } from '../../errors.js';
import { NoTarget, ZeroTarget } from '../../engine/knowledge.js';
import { runPipeline, wholeImagePlan } from '../../engine/pipeline.js';
import type { FileHandle } from 'node:fs/promises';
import type { Progress, Source, TargetKnowledge } from '../../types.js';
import { FileSource } from '../../io/file-source.js';
import { DEFLATE_RAW } from '../compress.js';
import { AgentLink } from '../link.js';
import type { DirectHello, DirectReport, Hello, Ready, Summary, TopHasher } from '../protocol.js';
import { hashAheadPush, RefinedTarget, REMOTE_DEPTH, RemoteSink, SpanBook } from '../roles.js';
import { HashScanner } from '../scanner.js';
import { agentDataMap } from './data-map.js';
import type { Refiner } from '../refiner.js';

/** Least time between two PROGRESS frames: they cross the link blksync is on. */
export const PROGRESS_INTERVAL_MS = 250;

/** The source file as the agent opened it. */
export interface DirectSource {
  path: string;
  fh: FileHandle;
  size: number;
  /** A regular file's holes are not read (data-map.ts). */
  kind: 'file' | 'block-device';
}

export class DirectCopy {
  readonly #d: DirectHello;
  readonly #src: DirectSource;
  readonly #link: AgentLink;
  readonly #scanner: HashScanner | undefined;
  readonly #abort = new AbortController();

  private constructor(
    d: DirectHello,
    src: DirectSource,
    link: AgentLink,
    scanner: HashScanner | undefined,
  ) {
    this.#d = d;
    this.#src = src;
    this.#link = link;
    this.#scanner = scanner;
  }

  /**
   * Starts the target agent on the other host (SRC is hashed meanwhile) and completes its
   * handshake. An ssh failure there is EREMOTE_UNREACHABLE: this host cannot reach that one.
   */
  static async open(
    d: DirectHello,
    hello: Hello,
    src: DirectSource,
    hasher: TopHasher,
    payload: Buffer | undefined,
  ): Promise<DirectCopy> {
    if (payload === undefined) {
      throw new BlksyncError(
        'EREMOTE',
        'this agent was started without its bundle; cannot --direct',
      );
    }
    const file = new FileSource(src.fh, src.path, src.size, false);
    const scanner =
      d.full === true
        ? undefined
        : new HashScanner(file, src.path, src.size, d.chunkSize, hasher, () =>
            src.kind === 'file' ? agentDataMap(src.fh.fd, src.size) : undefined,
          ).start();
    let link: AgentLink;
    try {
      link = await AgentLink.open(
        { destination: d.destination, path: d.path },
        {
          ...(d.ssh !== undefined ? { ssh: d.ssh } : {}),
          ...(d.remoteNode !== undefined ? { remoteNode: d.remoteNode } : {}),
          sudo: d.sudo === true,
          ...(d.timeout !== undefined ? { timeout: d.timeout } : {}),
        },
        {
          role: 'target',
          path: d.path,
          size: src.size,
          dryRun: d.dryRun === true,
          topUnit: d.full === true ? 0 : d.chunkSize,
          ...(hello.topHash !== undefined
            ? { topHash: hello.topHash, key: hello.key, topBlock: hello.topBlock }
            : {}),
          encodings: [DEFLATE_RAW],
          ...(d.index !== undefined ? { index: d.index } : {}),
          ...(d.verify === true ? { verify: true } : {}),
        },
        payload,
      );
    } catch (err) {
      await scanner?.stop();
      if (err instanceof BlksyncError && err.code === 'ESSH') {
        const why = err.message.replace(/; check the host and --ssh$/, '');
        throw new BlksyncError(
          'EREMOTE_UNREACHABLE',
          `cannot reach ${d.destination} over ssh from here for --direct (${why}); drop --direct to relay the copy through this machine`,
          { cause: err },
        );
      }
      throw err;
    }
    return new DirectCopy(d, src, link, scanner);
  }

  /** The target agent's READY. */
  get ready(): Ready {
    return this.#link.ready;
  }

  /** Stops the copy (blksync went away): the target agent syncs what it wrote. */
  abort(): void {
    this.#abort.abort();
  }

  /** Runs the copy; `onProgress` is called at most every PROGRESS_INTERVAL_MS, and at the end. */
  async run(onProgress: (p: Progress) => void): Promise<DirectReport> {
    const d = this.#d;
    const { path, size } = this.#src;
    const link = this.#link;
    const scanner = this.#scanner;
    const file = new FileSource(this.#src.fh, path, size, false);
    let refiner: Refiner | undefined;
    try {
      const book = new SpanBook();
      let input: Source = file;
      let knowledge: TargetKnowledge;
      if (d.full === true) knowledge = new NoTarget();
      else if (link.ready.zero) {
        knowledge = new ZeroTarget();
        await scanner?.stop();
      } else {
        const ahead = hashAheadPush(
          file,
          path,
          size,
          d.chunkSize,
          d.blockSize,
          scanner!,
          link,
          book,
        );
        refiner = ahead.refiner;
        input = ahead.input;
        knowledge = new RefinedTarget(book, () => 0);
      }
      let last = 0;
      const run = await runPipeline(
        wholeImagePlan(size),
        input,
        knowledge,
        d.dryRun === true ? [] : [new RemoteSink(link)],
        {
          blockSize: d.blockSize,
          chunkSize: d.chunkSize,
          depth: REMOTE_DEPTH,
          signal: this.#abort.signal,
          onProgress: (p) => {
            const now = performance.now();
            if (now - last < PROGRESS_INTERVAL_MS && p.bytesScanned < p.bytesTotal) return;
            last = now;
            onProgress({
              ...p,
              channelBytesSent: link.bytesSent,
              channelBytesReceived: link.bytesReceived,
            });
          },
        },
      );
      await refiner?.stop();
      await scanner?.stop();
      // an interrupted copy leaves B's index marked in progress, as an interrupted push does
      const target: Summary =
        run.interrupted && link.ready.index !== undefined
          ? { bytes: link.bytesConfirmed, frames: 0, digest: '', bytesRead: 0 }
          : await link.finish();
      await link.close();
      return {
        interrupted: run.interrupted,
        bytesScanned: run.bytesScanned,
        blocksDiffering: run.blocksDiffering,
        bytesDiffering: run.bytesDiffering,
        rangesWritten: run.ranges.count,
        ranges: [...run.ranges.ranges],
        bytesReadSource: (scanner?.bytesRead ?? 0) + (input === file ? run.bytesScanned : 0),
        target,
        bytesSent: link.bytesSent,
        bytesReceived: link.bytesReceived,
        ...(link.verified !== undefined ? { verify: link.verified } : {}),
      };
    } finally {
      await refiner?.stop();
      await scanner?.stop();
      await link.close();
    }
  }

  /** Closes the link to the other host (after a failure before run()). */
  async close(): Promise<void> {
    await this.#scanner?.stop();
    await this.#link.close();
  }
}
