/**
 * blksync's library API: `import { copy, compare } from 'blksync'`.
 * The library never prints and never exits; it returns results and throws BlksyncError.
 */

export { copy, DEFAULT_BLOCK_SIZE } from './engine/copy.js';
export type { CopyOptions, CopyResult } from './engine/copy.js';
export { compare } from './engine/compare.js';
export type { CompareOptions, CompareResult } from './engine/compare.js';
export type { Progress, ProgressListener } from './engine/types.js';
export { BlksyncError } from './errors.js';
export type { ErrorCode } from './errors.js';
export type { Range } from './ranges.js';
export { parseSize, formatBytes } from './size.js';
