/**
 * DATA frame compression, used only when it pays. Disk images mix zeros, text and already
 * compressed or encrypted data, so each frame is tried with raw deflate (level 1, on libuv's
 * thread pool) and sent raw when that saves under a tenth; after a failed try the next
 * frames skip the attempt, so a stream of incompressible data costs little CPU.
 */

import { deflateRaw, inflateRawSync } from 'node:zlib';
import { Encoding } from './protocol.js';

/** The one encoding besides raw that both ends speak today. */
export const DEFLATE_RAW = 'deflate-raw';
/** Frames sent raw without trying after a try that did not pay. */
const SKIP_AFTER_MISS = 8;
/** A compressed frame must be at most this fraction of the raw one. */
const WORTH_RATIO = 0.9;

function deflate(data: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    deflateRaw(data, { level: 1 }, (err, out) => (err ? reject(err) : resolve(out)));
  });
}

export class Compressor {
  readonly #enabled: boolean;
  #skip = 0;

  constructor(enabled: boolean) {
    this.#enabled = enabled;
  }

  async encode(raw: Buffer): Promise<[Encoding, Buffer]> {
    if (!this.#enabled || raw.length < 256) return [Encoding.RAW, raw];
    if (this.#skip > 0) {
      this.#skip--;
      return [Encoding.RAW, raw];
    }
    const packed = await deflate(raw);
    if (packed.length <= raw.length * WORTH_RATIO) return [Encoding.DEFLATE_RAW, packed];
    this.#skip = SKIP_AFTER_MISS;
    return [Encoding.RAW, raw];
  }
}

/**
 * Decodes a DATA body to exactly `rawLength` bytes; undefined when it does not decode to
 * that length (inflation stops at rawLength, so a bomb costs nothing).
 */
export function decode(encoding: number, body: Buffer, rawLength: number): Buffer | undefined {
  if (encoding === Encoding.RAW) return body.length === rawLength ? body : undefined;
  if (encoding !== Encoding.DEFLATE_RAW) return undefined;
  let out: Buffer;
  try {
    out = inflateRawSync(body, { maxOutputLength: rawLength });
  } catch {
    return undefined;
  }
  return out.length === rawLength ? out : undefined;
}
