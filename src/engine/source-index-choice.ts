/**
 * Which index of SRC a copy uses (--src-index FILE|auto, or implied by --index auto): one
 * decision for a local copy (engine/copy.ts) and a push (remote/copy/push-src-index.ts).
 */

import { BlksyncError } from '../errors.js';
import type { ResolvedCopyOptions } from './copy-options.js';
import type { CopySource } from './copy-source.js';
import type { SourceIndexOptions } from './source-index.js';

/**
 * The index of SRC to use with --index: --src-index's, or the cache's with --index auto when
 * SRC is a plain file. Asking for one where it cannot work is an error; the implied one is
 * just left out.
 */
export function sourceIndexFor(
  options: ResolvedCopyOptions,
  source: CopySource,
): SourceIndexOptions | undefined {
  const asked = options.srcIndex === false ? undefined : options.srcIndex;
  if (asked !== undefined && options.index === undefined) {
    throw new BlksyncError(
      'EUSAGE',
      '--src-index works with --index: it saves reading SRC only where DST is known from an index',
    );
  }
  const wanted =
    asked ?? (options.srcIndex !== false && options.index === 'auto' ? 'auto' : undefined);
  if (wanted === undefined) return undefined;
  const file = source.file;
  if (file === undefined || file.kind !== 'file' || source.bmap !== undefined) {
    if (asked === undefined) return undefined;
    throw new BlksyncError(
      'EUSAGE',
      source.bmap !== undefined
        ? `--src-index describes all of SRC; a bmap copy reads only its mapped ranges (add --no-bmap)`
        : `--src-index needs SRC to be a regular file read as it is; ${source.path} is ${source.compression !== undefined ? `${source.compression}-compressed` : `a ${source.kind}`}`,
    );
  }
  return {
    index: wanted,
    opened: file,
    rebuild: options.rebuildIndex,
    dryRun: options.dryRun,
  };
}
