/**
 * What an image file that can be read by offset is, by its magic bytes: compressed (gzip,
 * xz, ...), a container (zip, qcow2, a fixed VHD by its footer, ...), or neither (raw). Used
 * where such a file would otherwise be taken byte for byte: a remote agent's SRC, `publish`.
 */

import type { FileHandle } from 'node:fs/promises';
import { detectCompression, MAGIC_BYTES, type Compression } from '../io/compression-magic.js';
import {
  CONTAINER_HEAD_BYTES,
  CONTAINER_TAIL_BYTES,
  detectContainer,
  type Detected,
} from './detect.js';

export type Sniffed =
  | { compression: Compression; container?: undefined }
  | { compression?: undefined; container: Detected };

/** Reads the head and tail of the `size`-byte image in `fh`; undefined for a raw image. */
export async function sniffFile(fh: FileHandle, size: number): Promise<Sniffed | undefined> {
  const head = Buffer.alloc(Math.max(MAGIC_BYTES, CONTAINER_HEAD_BYTES));
  const { bytesRead } = await fh.read(head, 0, head.length, 0);
  const compression = detectCompression(head.subarray(0, bytesRead));
  if (compression !== undefined) return { compression };
  const tail = Buffer.alloc(size >= CONTAINER_TAIL_BYTES ? CONTAINER_TAIL_BYTES : 0);
  if (tail.length > 0) await fh.read(tail, 0, tail.length, size - tail.length);
  const container = detectContainer(head.subarray(0, bytesRead), tail);
  return container === undefined ? undefined : { container };
}
