/**
 * Compressed images recognised by their magic bytes (not their names). Apart from the
 * decoders (decompress.ts) so the remote agent can recognise a compressed SRC, which it
 * does not decode, without carrying them.
 */

export type Compression = 'gzip' | 'xz' | 'zstd' | 'bzip2' | 'lz4';

/** Bytes needed to recognise every format. */
export const MAGIC_BYTES = 6;

const MAGICS: readonly [Compression, readonly number[]][] = [
  ['gzip', [0x1f, 0x8b]],
  ['xz', [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]],
  ['zstd', [0x28, 0xb5, 0x2f, 0xfd]],
  ['bzip2', [0x42, 0x5a, 0x68]], // "BZh", then the block size digit
  ['lz4', [0x04, 0x22, 0x4d, 0x18]],
  ['lz4', [0x02, 0x21, 0x4c, 0x18]], // legacy frame
];

/** The compression of data starting with `head`, or undefined for a raw image. */
export function detectCompression(head: Buffer): Compression | undefined {
  for (const [kind, magic] of MAGICS) {
    if (head.length >= magic.length && magic.every((b, i) => head[i] === b)) {
      if (kind === 'bzip2' && !(head[3] !== undefined && head[3] >= 0x31 && head[3] <= 0x39)) {
        continue;
      }
      return kind;
    }
  }
  return undefined;
}
