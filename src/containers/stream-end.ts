/**
 * Checks that only a stream's end can make (a zip entry's CRC-32, the rest of a tar after
 * the image's entry, a fixed VHD's footer), made before the stream's last bytes are handed
 * on: the pipeline's read of the image's last bytes waits for the check, so a copy never
 * finishes with exit 0 on bytes the check refuses. What was written before is reported as a
 * partial write; an image that fits in the first read is refused before any write.
 *
 *   pieces  p1 p2 p3 ... pn-1 | pn (at least `keep` bytes held)
 *           handed on as read   handed on once the input has ended and atEnd(tail) passed
 */

import { BlksyncError } from '../errors.js';
import { isVhdFooter } from './detect.js';

/** A fixed VHD's footer: the last bytes of the file. */
const VHD_FOOTER_BYTES = 512;

/**
 * Passes `input` through, holding back its last piece (and at least its last `keep` bytes)
 * until it has ended and `atEnd` has returned; `atEnd` gets the held bytes (the whole stream
 * when it is shorter than `keep`). An error of `input` or `atEnd` reaches the consumer
 * instead of the held bytes.
 */
export async function* holdBack(
  input: AsyncIterable<Buffer>,
  atEnd: (tail: Buffer) => void | Promise<void>,
  keep = 1,
): AsyncGenerator<Buffer> {
  const held: Buffer[] = [];
  let heldBytes = 0;
  for await (const piece of input) {
    if (piece.length === 0) continue;
    held.push(piece);
    heldBytes += piece.length;
    while (held.length > 1 && heldBytes - held[0]!.length >= keep) {
      const first = held.shift()!;
      heldBytes -= first.length;
      yield first;
    }
  }
  await atEnd(held.length === 1 ? held[0]! : Buffer.concat(held, heldBytes));
  yield* held;
}

/**
 * A raw image's stream (stdin, a URL, a decompressor's output) whose last 512 bytes are a
 * fixed VHD's footer is refused at its end: a stream's first bytes cannot tell a fixed VHD
 * (its data is the raw disk), and written as it is, DST would end with the footer. The
 * footer is held back, so it is never written; a file SRC is recognised before (detect.ts).
 */
export function refuseVhdFooterAtEnd(
  input: AsyncIterable<Buffer>,
  name: string,
): AsyncIterable<Buffer> {
  return holdBack(
    input,
    (tail) => {
      if (tail.length < VHD_FOOTER_BYTES) return;
      if (!isVhdFooter(tail.subarray(tail.length - VHD_FOOTER_BYTES))) return;
      throw new BlksyncError(
        'ESRC_CONTAINER',
        `${name} ends with a fixed VHD's 512-byte footer: it is a VHD (fixed), which a stream shows only at its end, and its footer was not written; save it (decompressed) to a file and copy from that (blksync decodes a fixed VHD from a file), or give --raw to write it as it is`,
        { path: name },
      );
    },
    VHD_FOOTER_BYTES,
  );
}
