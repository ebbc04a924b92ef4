/**
 * The FileSink of a destination on this machine: on a block device it also drops the device's
 * clean cached pages after each background sync (see dropCachedPages). The remote agent makes
 * its FileSink directly: it carries no koffi.
 */

import type { FileHandle } from 'node:fs/promises';
import { FileSink } from './file-sink.js';
import { dropCachedPages } from './sparse-map.js';

export function destinationSink(
  fh: FileHandle,
  path: string,
  kind: 'file' | 'block-device',
): FileSink {
  return new FileSink(
    fh,
    path,
    kind === 'block-device' ? { afterSync: () => dropCachedPages(fh.fd) } : {},
  );
}
