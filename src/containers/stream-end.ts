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
import { SequentialSource } from '../io/sequential-source.js';
import type { Source } from '../types.js';
import { CheckedSliceSource } from './file-parts.js';
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

/** A Source that checks something at its end: ReadsToEnd makes a plan that stops short read there. */
export function checksAtEnd(source: Source): boolean {
  return source instanceof SequentialSource || source instanceof CheckedSliceSource;
}

/**
 * A container's image Source (`outer`, over `inner`, which `checksAtEnd`) that a plan reads
 * only up to `planEnd` (a bmap's last mapped byte, before the image's end): the read that
 * reaches `planEnd` reads the rest of `inner` too, so the checks made at its end (a stream's,
 * above; a stored zip entry's CRC-32) fail that read, and the copy, rather than never being
 * made.
 */
export class ReadsToEnd implements Source {
  readonly size: number;
  readonly #outer: Source;
  readonly #inner: Source;
  readonly #planEnd: number;
  #drained: Promise<unknown> | undefined;

  constructor(outer: Source, inner: Source, planEnd: number) {
    this.#outer = outer;
    this.#inner = inner;
    this.#planEnd = planEnd;
    this.size = outer.size;
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const n = await this.#outer.read(buf, offset, length);
    if (offset + length >= this.#planEnd) {
      // a read of nothing at the end: the stream is read (and dropped) up to there
      this.#drained ??= this.#inner.read(Buffer.alloc(0), this.#inner.size, 0);
      await this.#drained;
    }
    return n;
  }

  close(): Promise<void> {
    return this.#outer.close();
  }
}
