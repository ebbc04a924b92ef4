/**
 * `--index FILE` for a push: the index of the remote DST lives here, so a copy that can trust
 * it compares SRC's block hashes with the stored ones and the agent does not read DST at all
 * (no TOP_HASHES scan) — except the sample that defends against a stale index, as a local
 * copy's does (engine/index-target.ts), asked for with HASH_REQ:
 *
 *   open ─► READY identity matches? ─► sample of DST's blocks (HASH_REQ) matches? ─► use
 *     │            │ no                        │ no
 *     │            ▼                           ▼
 *     │      EINDEX_MISMATCH              EINDEX_STALE      (--rebuild-index: create instead)
 *     └─ no index / DST new / --full ─► create: compare by hashes as usual, hash every chunk
 *
 * Keeping the index honest without syncing the remote mid-copy: before the first write it is
 * marked in progress from that write (or the first range it did not vouch for) to the end of
 * the image, so a copy killed anywhere leaves an index that vouches only for blocks that were
 * durable. A rerun compares that range by the agent's hashes. After DONE the agent syncs all
 * of DST and reports its identity then, and the clean index is written with it.
 */

import { rm } from 'node:fs/promises';
import { pickSampleBlocks } from '../engine/index-sample.js';
import { BlksyncError } from '../errors.js';
import {
  blockCountFor,
  readIndexIfAny as readIndexFileIfAny,
  type IndexFile,
  type IndexState,
  writeNewIndex,
} from '../formats/index-file.js';
import { HASH_BYTES, sha256 } from '../hash.js';
import type { Range } from '../ranges.js';
import type { TargetIdentity } from '../io/identity.js';
import { OwnWrites } from '../io/write-counter.js';
import { HashPool } from '../engine/hash-pool.js';
import { decideIndex, indexFacts } from '../engine/index-policy.js';
import type { IndexSessionOptions } from '../engine/index-session.js';
import { IndexTarget, startingReport, type IndexReport } from '../engine/index-target.js';
import type { SourceIndex } from '../engine/source-index.js';
import { BlockHashes, DEFAULT_INDEX_BLOCK_SIZE } from '../engine/make-index.js';
import type { ChunkKnowledge, Sink, TargetKnowledge } from '../types.js';
import type { HashDiffer } from './hash-differ.js';
import type { AgentLink } from './link.js';
import { MIN_HASH_UNIT, WIRE_HASH_BYTES, wireHash } from './protocol.js';

/** The index options of a local copy that apply to a push (the cache's "auto" is keyed by a local DST). */
export type RemoteIndexOptions = Pick<
  IndexSessionOptions,
  | 'index'
  | 'imageSize'
  | 'blockSize'
  | 'blockSizeReason'
  | 'chunkSize'
  | 'rebuild'
  | 'trust'
  | 'verifySample'
  | 'full'
  | 'dryRun'
  | 'hashThreads'
> & {
  /**
   * A bmap copy: only these ranges pass through the pipeline; DST is left as it is outside
   * them. The index still describes all of DST, so the blocks outside must be known here
   * without reading them: zeros on a new or empty DST, or vouched for by a used index.
   */
  partial?: { ranges: readonly Range[] };
};

/** Reads the index file before ssh starts; undefined when there is none. */
export async function readIndexIfAny(
  path: string,
): Promise<{ index: IndexFile } | { unreadable: BlksyncError } | undefined> {
  const found = await readIndexFileIfAny(path);
  return found === 'absent' ? undefined : 'unreadable' in found ? found : { index: found };
}

/** The ranges of [0, size) outside the ascending `ranges`. */
function outsideOf(ranges: readonly Range[], size: number): Range[] {
  const outside: Range[] = [];
  let at = 0;
  for (const r of [...ranges, { start: size, end: size }]) {
    if (r.start > at) outside.push({ start: at, end: r.start });
    at = Math.max(at, r.end);
  }
  return outside;
}

function unmappedUnknown(index: string, dst: string): BlksyncError {
  return new BlksyncError(
    'EUSAGE',
    `index ${index} is kept here and cannot learn the blocks of ${dst} outside the bmap's ranges (a bmap copy does not read them); ` +
      `keep the index beside DST with --index ${dst.slice(0, dst.indexOf(':'))}:FILE or --index auto, or make this one with --no-bmap`,
    { path: index },
  );
}

/** The remote DST's knowledge from an index; the ranges it does not vouch for by hashes. */
class RemoteIndexTarget implements TargetKnowledge {
  readonly #target: IndexTarget;
  readonly #link: AgentLink;
  readonly #differ: HashDiffer;
  /** Bytes of DST compared by the agent's hashes (the index did not vouch for them). */
  bytesCompared = 0;

  constructor(target: IndexTarget, link: AgentLink, differ: HashDiffer) {
    this.#target = target;
    this.#link = link;
    this.#differ = differ;
  }

  get bytesRead(): number {
    return 0;
  }

  load(offset: number, length: number): Promise<ChunkKnowledge> {
    const trusted = this.#target.untrusted.every(
      (r) => offset + length <= r.start || offset >= r.end,
    );
    if (trusted) return this.#target.load(offset, length);
    return Promise.resolve({
      diff: async (data, len, bs, out) => {
        const chunk = data.subarray(0, len);
        const theirs = await this.#link.hashes(offset, len, Math.max(len, MIN_HASH_UNIT));
        this.bytesCompared += len;
        if (!wireHash(chunk).equals(theirs)) {
          await this.#differ.refine(offset, data, len, false, out);
        }
        // the new content's hashes, for the index written at the end
        const table = this.#target.table;
        for (let s = 0; s < len; s += bs) {
          sha256(chunk, s, Math.min(s + bs, len)).copy(table, ((offset + s) / bs) * HASH_BYTES);
        }
      },
      release: () => {},
    });
  }

  close(): Promise<void> {
    return this.#target.close();
  }
}

export class RemoteIndex {
  readonly path: string;
  readonly blockSize: number;
  /** Set when the index is used: the pipeline's knowledge of DST. */
  readonly knowledge: RemoteIndexTarget | undefined;
  /** Set when the index is created: hashes every chunk of the new content. */
  readonly onChunk: ((offset: number, data: Buffer, length: number) => Promise<void>) | undefined;
  readonly #o: RemoteIndexOptions;
  readonly #pool: HashPool;
  readonly #target: IndexTarget | undefined;
  readonly #collected: BlockHashes | undefined;
  readonly #identity: TargetIdentity | undefined;
  readonly #report: IndexReport;
  #removeBeforeWrite: boolean;
  /** The sectors this copy's writes add to DST's write counter. */
  readonly #own = new OwnWrites();

  private constructor(
    o: RemoteIndexOptions,
    pool: HashPool,
    identity: TargetIdentity | undefined,
    use:
      | { target: IndexTarget; knowledge: RemoteIndexTarget; sampled: number; onWord: boolean }
      | undefined,
    create: { reason: string | undefined; oldExists: boolean } | undefined,
  ) {
    this.#o = o;
    this.path = o.index;
    this.#pool = pool;
    this.#identity = identity;
    this.#removeBeforeWrite = create?.oldExists === true;
    if (use !== undefined) {
      this.blockSize = use.target.blockSize;
      this.#target = use.target;
      this.knowledge = use.knowledge;
      this.#collected = undefined;
      this.onChunk = undefined;
    } else {
      this.blockSize = o.blockSize ?? DEFAULT_INDEX_BLOCK_SIZE;
      this.#target = undefined;
      this.knowledge = undefined;
      const collected = o.dryRun ? undefined : new BlockHashes(o.imageSize, this.blockSize, pool);
      this.#collected = collected;
      this.onChunk =
        collected === undefined ? undefined : (off, data, len) => collected.add(off, data, len);
    }
    this.#report = startingReport(o.index, this.blockSize, use, create);
  }

  /**
   * Decides, once the agent is READY, whether the index read before (`found`) is used, or
   * created or rebuilt; `differ` must compare in the index's blocks when it is used.
   */
  static async open(
    o: RemoteIndexOptions,
    found: Awaited<ReturnType<typeof readIndexIfAny>>,
    link: AgentLink,
    differFor: (blockSize: number) => HashDiffer,
  ): Promise<RemoteIndex> {
    const pool = new HashPool(o.hashThreads);
    try {
      const ready = link.ready;
      const id = ready.identity;
      const fresh = ready.created || ready.zero;
      const create = (reason: string | undefined, oldExists: boolean): RemoteIndex => {
        // a bmap copy does not read DST outside the mapped ranges, and the agent's hashes
        // are truncated: an index kept here cannot learn those blocks of an existing DST
        if (o.partial !== undefined && !fresh) throw unmappedUnknown(o.index, link.name);
        return new RemoteIndex(o, pool, id, undefined, { reason, oldExists });
      };
      const facts = indexFacts(
        found === undefined ? 'absent' : 'unreadable' in found ? found : found.index,
        fresh ? undefined : id,
        {
          path: o.index,
          named: 'file',
          dst: link.name,
          dstFresh: fresh,
          full: o.full,
          rebuild: o.rebuild,
          trust: o.trust === true,
          chunkSize: o.chunkSize,
          askedBlockSize: o.blockSize,
          blockSizeReason: o.blockSizeReason,
        },
      );
      let decision = decideIndex(facts);
      if (decision.action === 'use' && found !== undefined && 'index' in found) {
        const index = found.index;
        const target = new IndexTarget(index, o.imageSize, undefined, o.chunkSize, pool);
        if (o.partial !== undefined) {
          // an interrupted copy's range outside the mapped ranges stays unknown here
          for (const r of outsideOf(o.partial.ranges, o.imageSize)) {
            if (!target.trusts(r.start, r.end)) throw unmappedUnknown(o.index, link.name);
          }
        }
        const sample = await verifySample(target, o.verifySample, link);
        if (sample.bad === undefined) {
          const knowledge = new RemoteIndexTarget(target, link, differFor(index.blockSize));
          const use = { target, knowledge, sampled: sample.blocks, onWord: decision.onWord };
          return new RemoteIndex(o, pool, id, use, undefined);
        }
        decision = decideIndex({ ...facts, sampleMismatchAt: sample.bad });
      }
      if (decision.action === 'refuse') throw decision.error;
      if (decision.action === 'rebuild') return create(decision.reason, true);
      return create(undefined, false);
    } catch (err) {
      await pool.close();
      throw err;
    }
  }

  /**
   * With a used index of SRC as well (--src-index, engine/source-index.ts): the ranges to copy
   * (the blocks whose hashes differ, and what this index does not vouch for), each read block
   * checked against SRC's index; undefined when either index is not used.
   */
  planFrom(src: SourceIndex): Range[] | undefined {
    const target = this.#target;
    if (target === undefined || this.knowledge === undefined || src.hashes === undefined) {
      return undefined;
    }
    target.expectSourceHashes(src.hashes, (offset) => src.mismatch(offset));
    return src.plan(target.table, target.untrusted, this.#o.imageSize);
  }

  /**
   * Wraps the sink to the agent: before DST's first byte changes, an index being used is
   * marked in progress from there to the end (a replaced one is removed).
   */
  wrapSink(sink: Sink): Sink {
    let first = true;
    return {
      write: async (data, offset) => {
        if (first) {
          first = false;
          await this.#beforeFirstWrite(offset);
        }
        this.#own.add(offset, data.length);
        await sink.write(data, offset);
      },
      finish: () => sink.finish(),
    };
  }

  async #beforeFirstWrite(offset: number): Promise<void> {
    if (this.#removeBeforeWrite) {
      this.#removeBeforeWrite = false;
      await rm(this.path, { force: true });
    }
    const target = this.#target;
    if (target === undefined || this.#identity === undefined) return;
    // blocks before this vouched for what DST durably held; from here on it may change
    let start = offset;
    for (const r of target.untrusted) start = Math.min(start, r.start);
    start = Math.floor(start / this.blockSize) * this.blockSize;
    await this.#write(
      { kind: 'in-progress', dirty: { start, end: this.#o.imageSize } },
      this.#identity,
      target.table,
    );
    this.#report.checkpoints++;
  }

  /** After the agent synced all of DST (DONE): the clean index, with DST's identity then. */
  async commit(identity: TargetIdentity | undefined): Promise<void> {
    if (this.#o.dryRun || identity === undefined) return;
    const hashes = this.#target?.table ?? this.#collected?.table;
    if (hashes === undefined) return;
    if (this.#collected !== undefined && this.#o.partial !== undefined) {
      // made on a new or empty DST (open() refused any other): it reads as zeros outside
      const bs = this.blockSize;
      const size = this.#o.imageSize;
      const zero = Buffer.alloc(bs);
      const zeroBlock = sha256(zero);
      for (const r of outsideOf(this.#o.partial.ranges, size)) {
        for (let b = r.start; b < r.end; b += bs) {
          const h = size - b >= bs ? zeroBlock : sha256(zero, 0, size - b);
          h.copy(hashes, (b / bs) * HASH_BYTES);
        }
      }
    }
    await this.#write({ kind: 'clean' }, identity, hashes);
  }

  async #write(state: IndexState, identity: TargetIdentity, hashes: Buffer): Promise<void> {
    const foreign = this.#own.foreign(this.#identity, identity);
    if (foreign > 0n || this.#own.backingMovedAlone(this.#identity, identity)) {
      // someone else wrote DST during this copy (or the kernel wrote more than this copy's
      // pages): the stamp would vouch for their writes too
      state = { kind: 'in-progress', dirty: { start: 0, end: this.#o.imageSize } };
      if (foreign > 0n) this.#report.sectorsWrittenMeanwhile = Number(foreign);
      else this.#report.changedMeanwhile = true;
    }
    await writeNewIndex(this.path, {
      blockSize: this.blockSize,
      imageSize: this.#o.imageSize,
      state,
      identity,
      hashes,
    });
  }

  report(): IndexReport {
    return {
      ...this.#report,
      bytesHashed: this.#pool.bytesHashed,
      bytesReread: this.knowledge?.bytesCompared ?? 0,
    };
  }

  async close(): Promise<void> {
    await this.#pool.close();
  }
}

/**
 * Asks the agent for the hashes of `count` trusted blocks (the first and last among them,
 * where partition tables live, then random ones), all at once, and compares them with the
 * index's (a wire hash is SHA-256 truncated, so it is a prefix of the stored hash).
 */
async function verifySample(
  target: IndexTarget,
  count: number,
  link: AgentLink,
): Promise<{ bad: number | undefined; blocks: number }> {
  const bs = target.blockSize;
  const blocks = blockCountFor(target.imageSize, bs);
  const order = pickSampleBlocks(blocks, count, (i) =>
    target.trusts(i * bs, Math.min((i + 1) * bs, target.imageSize)),
  ).sort((a, b) => a - b);
  const replies = await Promise.all(
    order.map((i) => {
      const s = i * bs;
      const len = Math.min(bs, target.imageSize - s);
      return link.hashes(s, len, Math.max(len, MIN_HASH_UNIT));
    }),
  );
  for (let k = 0; k < order.length; k++) {
    const i = order[k]!;
    const h = i * HASH_BYTES;
    if (replies[k]!.compare(target.table, h, h + WIRE_HASH_BYTES) !== 0) {
      return { bad: i * bs, blocks: k + 1 };
    }
  }
  return { bad: undefined, blocks: order.length };
}
