/**
 * Writes bmap 2.0 files byte for byte as bmaptool 3.x writes them, so that `bmaptool copy`
 * accepts them and a diff against bmaptool's own bmap of the same image is empty.
 *
 * bmaptool writes the header with blank padding where the mapped-block figures go, writes
 * the ranges, then seeks back and overwrites the padding (a longer figure runs over the
 * padding into the text after it), and finally hashes the file with the self-checksum as
 * "0" characters and overwrites those. The same steps are replayed here on a string. Its
 * numbers come from Python's "%.1f", which rounds exact ties to even; JavaScript's toFixed
 * rounds them up, hence pyFixed1().
 */

import { bmapDigest, type BmapRange } from './bmap.js';

/** The version written. */
export const BMAP_WRITE_VERSION = '2.0';

const HEADER_COMMENT = `<?xml version="1.0" ?>
<!-- This file contains the block map for an image file, which is basically
     a list of useful (mapped) block numbers in the image file. In other words,
     it lists only those blocks which contain data (boot sector, partition
     table, file-system metadata, files, directories, extents, etc). These
     blocks have to be copied to the target device. The other blocks do not
     contain any useful data and do not have to be copied to the target
     device.

     The block map an optimization which allows to copy or flash the image to
     the image quicker than copying of flashing the entire image. This is
     because with bmap less data is copied: <MappedBlocksCount> blocks instead
     of <BlocksCount> blocks.

     Besides the machine-readable data, this file contains useful commentaries
     which contain human-readable information like image size, percentage of
     mapped data, etc.

     The 'version' attribute is the block map file format version in the
     'major.minor' format. The version major number is increased whenever an
     incompatible block map format change is made. The minor number changes
     in case of minor backward-compatible changes. -->

`;

/**
 * Python's "%.1f" % x: x's exact binary value rounded to one decimal, ties to even.
 * toFixed(60) is exact for the magnitudes here (sizes and percentages), so the tie test
 * looks at the exact digits.
 */
export function pyFixed1(x: number): string {
  const exact = x.toFixed(60);
  const dot = exact.indexOf('.');
  const intPart = exact.slice(0, dot);
  const d1 = Number(exact[dot + 1]);
  const rest = exact.slice(dot + 2);
  const firstRest = Number(rest[0] ?? '0');
  let roundUp: boolean;
  if (firstRest > 5) roundUp = true;
  else if (firstRest < 5) roundUp = false;
  else if (/[1-9]/.test(rest.slice(1))) roundUp = true;
  else roundUp = d1 % 2 === 1; // an exact tie: to even
  if (!roundUp) return `${intPart}.${d1}`;
  // x is non-negative here; carry through the integer part when d1 is 9
  const scaled = BigInt(intPart) * 10n + BigInt(d1) + 1n;
  const s = scaled.toString().padStart(2, '0');
  return `${s.slice(0, -1)}.${s.slice(-1)}`;
}

/** bmaptool's human_size(): "1 byte", "100 bytes", "802.5 KiB", ... */
export function humanSize(size: number): string {
  if (size === 1) return '1 byte';
  if (size < 512) return `${size} bytes`;
  let v = size;
  for (const unit of ['KiB', 'MiB', 'GiB', 'TiB']) {
    v /= 1024;
    if (v < 1024) return `${pyFixed1(v)} ${unit}`;
  }
  return `${pyFixed1(v)} EiB`;
}

function overwrite(text: string, at: number, value: string): string {
  return text.slice(0, at) + value + text.slice(at + value.length);
}

function rangeLine(r: BmapRange): string {
  const sum = r.checksum === undefined ? '' : ` chksum="${r.checksum}"`;
  const span = r.first === r.last ? `${r.first}` : `${r.first}-${r.last}`;
  return `        <Range${sum}> ${span} </Range>\n`;
}

export interface BmapWriteInput {
  imageSize: number;
  blockSize: number;
  /** Algorithm of the range checksums and of the self-checksum (bmaptool's default: sha256). */
  checksumType: string;
  /** Ranges in ascending order; a range without a checksum gets no attribute. */
  ranges: readonly BmapRange[];
}

/** The bmap 2.0 text for these ranges, exactly as `bmaptool create` writes it. */
export function serializeBmap(input: BmapWriteInput): string {
  const { imageSize, blockSize, checksumType, ranges } = input;
  const blocksCount = Math.ceil(imageSize / blockSize);
  const imageHuman = humanSize(imageSize);
  const zeros = '0'.repeat(bmapDigest(checksumType, '').length);

  let text =
    HEADER_COMMENT +
    `<bmap version="${BMAP_WRITE_VERSION}">\n` +
    `    <!-- Image size in bytes: ${imageHuman} -->\n` +
    `    <ImageSize> ${imageSize} </ImageSize>\n\n` +
    `    <!-- Size of a block in bytes -->\n` +
    `    <BlockSize> ${blockSize} </BlockSize>\n\n` +
    `    <!-- Count of blocks in the image file -->\n` +
    `    <BlocksCount> ${blocksCount} </BlocksCount>\n\n` +
    `    <!-- Count of mapped blocks: `;
  const mappedPos1 = text.length;
  text += `${' '.repeat(imageHuman.length)} or ${' '.repeat('100.0%'.length)}   -->\n`;
  text += '    <MappedBlocksCount> ';
  const mappedPos2 = text.length;
  text += `${' '.repeat(String(blocksCount).length)} </MappedBlocksCount>\n\n`;
  text += '    <!-- Type of checksum used in this file -->\n';
  text += `    <ChecksumType> ${checksumType} </ChecksumType>\n\n`;
  text += '    <!-- The checksum of this bmap file. When it is calculated, the value of\n';
  text += '         the checksum has be zero (all ASCII "0" symbols).  -->\n';
  text += '    <BmapFileChecksum> ';
  const checksumPos = text.length;
  text += `${zeros} </BmapFileChecksum>\n\n`;
  text += '    <!-- The block map which consists of elements which may either be a\n';
  text += "         range of blocks or a single block. The 'chksum' attribute\n";
  text += '         (if present) is the checksum of this blocks range. -->\n';
  text += '    <BlockMap>\n';

  const parts: string[] = [text];
  let mapped = 0;
  for (const r of ranges) {
    mapped += r.last - r.first + 1;
    parts.push(rangeLine(r));
  }
  parts.push('    </BlockMap>\n</bmap>\n');
  text = parts.join('');

  const percent = (mapped * 100) / blocksCount;
  text = overwrite(text, mappedPos1, `${humanSize(mapped * blockSize)} or ${pyFixed1(percent)}%`);
  text = overwrite(text, mappedPos2, String(mapped));
  return overwrite(text, checksumPos, bmapDigest(checksumType, text));
}
