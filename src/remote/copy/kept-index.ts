/**
 * An index that DST's agent keeps beside DST (`--index auto` or `--index host:FILE`): where it
 * is, the HELLO that asks for it, and the top hashes it can answer without reading DST.
 */

import { DEFAULT_INDEX_BLOCK_SIZE } from '../../engine/make-index.js';
import { BlksyncError } from '../../errors.js';
import { blockDigestHasher, TOP_HASH_BLOCKS, zeroHasher, type IndexHello } from '../protocol.js';
import type { TopHashing } from '../roles.js';
import { parseRemote, type RemoteSpec } from '../spec.js';
import type { ResolvedCopyOptions } from '../../engine/copy-options.js';

/**
 * The index path the agent keeps for `--index`, on DST's host: "auto" (its cache) or the path
 * of `host:FILE`; undefined for an index kept here. FILE must be on DST's host.
 */
export function keptRemotely(index: string | undefined, dst: RemoteSpec): string | undefined {
  if (index === undefined) return undefined;
  if (index === 'auto') return 'auto';
  const at = parseRemote(index);
  if (at === undefined) return undefined;
  if (at.destination !== dst.destination) {
    throw new BlksyncError(
      'EUSAGE',
      `--index ${index} is on ${at.destination}, but an index kept remotely lives beside DST on ${dst.destination}; use ${dst.destination}:FILE, or a local FILE`,
    );
  }
  return at.path;
}

/** The block size of an index the agent makes: -b's, else the default. */
export function indexBlockOf(options: ResolvedCopyOptions): number {
  return options.blockSizeGiven ?? DEFAULT_INDEX_BLOCK_SIZE;
}

/**
 * The HELLO's `index` for an index DST's agent keeps (push, relay, --direct): `blockSize`
 * given (-b, or a bmap's blocks) makes an index of other blocks be refused or rebuilt.
 */
export function agentIndexHello(
  path: string,
  options: ResolvedCopyOptions,
  chunkSize: number,
  blockSize: number | undefined,
): IndexHello {
  return {
    path,
    blockSize: blockSize ?? DEFAULT_INDEX_BLOCK_SIZE,
    blockSizeGiven: blockSize !== undefined,
    chunkSize,
    rebuild: options.rebuildIndex,
    ...(options.trustIndex ? { trust: true } : {}),
    verifySample: options.verifySample,
    full: options.full,
    topDigest: true,
  };
}

/**
 * Top hashes as block digests in `block` blocks (TOP_HASH_BLOCKS): what an index DST's agent
 * keeps knows for DST without reading it, and what SRC's side computes from its bytes.
 */
export function blockTopHashing(block: number): TopHashing {
  const hash = blockDigestHasher(block);
  return { hello: { topHash: TOP_HASH_BLOCKS, topBlock: block }, hash, zero: zeroHasher(hash) };
}
