/**
 * What every remote copy (push, pull, relay, --direct) starts from: its options, the session
 * taken once from them, the checks made before any ssh starts, and what a remote SRC's size
 * and bmap must agree on.
 */

import { BlksyncError } from '../../errors.js';
import { chunkSizeFor } from '../../engine/block-size.js';
import type { ResolvedCopyOptions } from '../../engine/copy-options.js';
import { findBmap, signatureFlagsGiven, type FoundBmap } from '../../engine/find-bmap.js';
import type { RemoteOptions } from '../link.js';
import { REMOTE_CHUNK_BYTES } from '../roles.js';
import type { SourceIndexHello } from '../protocol.js';
import { isRemote, parseRemote, shellQuote, type RemoteSpec } from '../spec.js';
import { keptRemotely } from './kept-index.js';

/**
 * A remote copy's options: a copy's (resolved once by the router, engine/copy-options.ts) and
 * how to reach the hosts. The CopySourceOptions among them (bmap, size, ...) describe a local
 * SRC and are handed to openCopySource as they are, so a push reads SRC as a local copy does.
 */
export interface RemoteCopyOptions extends ResolvedCopyOptions, RemoteOptions {
  /** Both ends remote: SRC's host copies straight to DST's host (see agent/direct-copy.ts). */
  direct?: boolean;
  /**
   * Chunks a push keeps in flight (default REMOTE_DEPTH): a fan-out to many hosts lowers it,
   * since each chunk in flight holds a buffer per host.
   */
  pushDepth?: number;
}

/** What push, pull, relay and --direct all start from, taken once from the options. */
export interface Session {
  started: number;
  blockSize: number;
  chunkSize: number;
  dryRun: boolean;
  full: boolean;
}

export function sessionOf(options: RemoteCopyOptions): Session {
  return {
    started: performance.now(),
    blockSize: options.blockSize,
    chunkSize: chunkSizeFor(options.blockSize, options.chunkSize ?? REMOTE_CHUNK_BYTES),
    dryRun: options.dryRun,
    full: options.full,
  };
}

/**
 * The refusals of a remote copy's options that need no host (made before ssh starts): an index
 * kept where it cannot be, --direct with options only this machine can honour.
 */
export function checkRemoteCopy(
  srcRemote: RemoteSpec | undefined,
  dstRemote: RemoteSpec | undefined,
  options: RemoteCopyOptions,
): void {
  if (
    options.index !== undefined &&
    srcRemote !== undefined &&
    dstRemote !== undefined &&
    keptRemotely(options.index, dstRemote) === undefined
  ) {
    // the index would have to learn SRC's blocks, whose bytes stay on the hosts
    throw new BlksyncError(
      'EUSAGE',
      `--index ${options.index}: with two remote ends the index is kept beside DST by its agent; use --index ${dstRemote.destination}:FILE or --index auto`,
    );
  }
  if (
    options.index !== undefined &&
    srcRemote !== undefined &&
    dstRemote === undefined &&
    isRemote(options.index)
  ) {
    throw new BlksyncError(
      'EUSAGE',
      `--index ${options.index}: a pull's index describes the local DST and is kept here; name a local FILE or auto`,
    );
  }
  if (typeof options.srcIndex === 'string' && srcRemote !== undefined) {
    remoteSourceIndex(options, srcRemote, dstRemote);
  }
  if (options.direct === true) {
    const given = [
      ...(options.bmap !== undefined ? ['--bmap'] : []),
      ...(options.size !== undefined ? ['--size'] : []),
      ...signatureFlagsGiven(options),
    ];
    if (given.length > 0) {
      // the copy runs on SRC's host, which has neither the bmap nor gpg's verdict
      throw new BlksyncError(
        'EUSAGE',
        `${given.join(', ')} with --direct: drop --direct to relay the copy through this machine`,
      );
    }
  }
  options.signal?.throwIfAborted();
}

/**
 * HELLO's `sourceIndex` for a remote SRC's agent (pull, relay): --src-index names an index of
 * SRC kept on SRC's host, `host:FILE` or `auto` (that host's cache). The combinations where
 * it could not act are refused before ssh starts.
 */
export function remoteSourceIndex(
  options: RemoteCopyOptions,
  src: RemoteSpec,
  dst?: RemoteSpec,
): SourceIndexHello | undefined {
  const given = options.srcIndex;
  if (typeof given !== 'string') return undefined;
  const refuse = (why: string): never => {
    throw new BlksyncError('EUSAGE', `--src-index ${given}: ${why}`);
  };
  if (options.index === undefined) {
    refuse('it saves reading SRC only where DST is known from an index; add --index');
  }
  if (options.direct === true) {
    refuse("--direct runs the copy on SRC's host as a push without an index of SRC; drop --direct");
  }
  if (options.full) refuse('--full reads and sends all of SRC; drop one of them');
  if (options.bmap !== undefined) {
    refuse('it describes all of SRC; a bmap copy reads only its mapped ranges; drop --bmap');
  }
  let path = given;
  if (given !== 'auto') {
    const at = parseRemote(given);
    if (at === undefined || at.destination !== src.destination) {
      refuse(
        `a remote SRC's index is kept on its host by its agent; use ${src.destination}:FILE or auto`,
      );
    }
    path = at!.path;
    // the index is written by rename on SRC's host (the agent refuses SRC itself there)
    const dstIndex = options.index === undefined ? undefined : parseRemote(options.index);
    for (const other of [dst, dstIndex]) {
      if (other?.destination === src.destination && other.path === path) {
        refuse(
          `it names ${other === dst ? 'DST' : "DST's index"} too; give SRC's index its own file`,
        );
      }
    }
  }
  return { path, rebuild: options.rebuildIndex, verifySample: options.verifySample };
}

/**
 * The bmap of a remote SRC: only --bmap's, a local file or URL (none is looked for beside SRC
 * on its host), its signature checked as a local copy checks it. As for stdin, without
 * --bmap there is none and the signature options are refused.
 */
export function givenBmap(options: RemoteCopyOptions): Promise<FoundBmap | undefined> {
  return findBmap('-', options);
}

/** --size and the bmap must describe the remote SRC's size, as a local SRC's (EUSAGE, EBMAP_MISMATCH). */
export async function checkRemoteSize(
  size: number,
  src: string,
  given: number | undefined,
  bmap: FoundBmap | undefined,
): Promise<void> {
  if (given !== undefined && given !== size) {
    throw new BlksyncError('EUSAGE', `--size ${given} contradicts the size ${size} of ${src}`);
  }
  if (bmap !== undefined) {
    const { checkBmapMatches } = await import('../../formats/bmap.js');
    checkBmapMatches(bmap.bmap, size, bmap.path, src);
  }
}

/**
 * The agent refuses a compressed SRC (it would copy the compressed bytes); this adds what to
 * do, which only this end knows how to spell: stream it through here, where it is decoded.
 */
export function compressedRemote(
  err: unknown,
  dst: string,
  spec: RemoteSpec,
  options: RemoteCopyOptions,
): unknown {
  if (
    !(err instanceof BlksyncError) ||
    (err.code !== 'ESRC_COMPRESSED' && err.code !== 'ESRC_CONTAINER')
  ) {
    return err;
  }
  const cat = `${options.sudo === true ? 'sudo -n ' : ''}cat ${shellQuote(spec.path)}`;
  const stream = `${options.ssh ?? 'ssh'} ${spec.destination} ${shellQuote(cat)} | blksync copy --size BYTES - ${shellQuote(dst)}`;
  return new BlksyncError(
    err.code,
    `${err.message}, and blksync decodes only on this machine: stream it through here with \`${stream}\` (BYTES: its decoded size), or ${err.code === 'ESRC_CONTAINER' ? 'unpack' : 'decompress'} it on ${spec.destination} first`,
    { cause: err, ...(err.path !== undefined ? { path: err.path } : {}) },
  );
}
