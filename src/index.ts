/**
 * blksync's library API: `import { copy, compare } from 'blksync'`.
 * The library never prints and never exits; it returns results and throws BlksyncError.
 */

export { copy, copyMany, MAX_LINKS } from './copy.js';
export type {
  CopyOptions,
  CopyResult,
  RemoteCopyResult,
  ChannelStats,
  CopyManyOptions,
  CopyManyResult,
  DestinationOutcome,
} from './copy.js';
export { parseTargets, readTargets } from './fanout/targets.js';
export { DEFAULT_BLOCK_SIZE } from './engine/block-size.js';
export { compare } from './engine/compare.js';
export type { CompareOptions, CompareResult } from './engine/compare.js';
export { diff } from './engine/diff.js';
export type { BaseKnowledge, DiffOptions, DiffResult } from './engine/diff.js';
export { apply } from './engine/apply.js';
export type { ApplyOptions, ApplyResult } from './engine/apply.js';
export { describePatch } from './formats/patch-info.js';
export type { PatchInfo } from './formats/patch-info.js';
export type { Compression } from './formats/patch.js';
export {
  makeIndex,
  indexInfo,
  listCachedIndexes,
  DEFAULT_INDEX_BLOCK_SIZE,
} from './engine/make-index.js';
export type {
  MakeIndexOptions,
  MakeIndexResult,
  IndexInfo,
  CachedIndex,
} from './engine/make-index.js';
export type { IndexReport } from './engine/index-target.js';
export { readIndexFile, parseIndex } from './formats/index-file.js';
export type { IndexFile, IndexState } from './formats/index-file.js';
export type { TargetIdentity } from './io/identity.js';
export { createBmap } from './engine/bmap-create.js';
export type { BmapCreateOptions, BmapCreateResult } from './engine/bmap-create.js';
export type { BmapReport } from './engine/copy-source.js';
export { publish } from './delta/publish.js';
export type { PublishOptions, PublishResult } from './delta/publish.js';
export type { DeltaReport } from './delta/published-source.js';
export { parseBmap } from './formats/bmap.js';
export type { Bmap, BmapRange } from './formats/bmap.js';
export { serializeBmap } from './formats/bmap-write.js';
export type { Progress, ProgressListener } from './types.js';
export { parseRemote, isRemote } from './remote/spec.js';
export type { RemoteSpec } from './remote/spec.js';
export type { RemoteOptions } from './remote/link.js';
export { BlksyncError } from './errors.js';
export type { ErrorCode, BlksyncWarning, WarningCode } from './errors.js';
export { DEFAULT_TIMEOUT_S } from './limits.js';
export type { Range } from './ranges.js';
export { parseSize, formatBytes } from './size.js';
