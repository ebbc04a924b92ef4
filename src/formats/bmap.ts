/**
 * bmap files (bmaptool's block maps): parse versions 1.0 to 2.x, validate, verify the
 * self-checksum, and write version 2.0 byte for byte as bmaptool 3.x does.
 *
 *   <bmap version="2.0">
 *     <ImageSize> bytes </ImageSize>             image size in bytes
 *     <BlockSize> bytes </BlockSize>             the block the ranges count in
 *     <BlocksCount> n </BlocksCount>             ceil(ImageSize / BlockSize)
 *     <MappedBlocksCount> n </MappedBlocksCount> sum of the ranges (from 1.3; optional before)
 *     <ChecksumType> sha256 </ChecksumType>      1.4 and 2.x; 1.3 is always sha1
 *     <BmapFileChecksum> hex </BmapFileChecksum> 1.4 and 2.x (<BmapFileSHA1> in 1.3): the hash
 *                                                of the whole file with this value written as
 *                                                "0" characters
 *     <BlockMap>
 *       <Range chksum="hex"> first-last </Range> inclusive block numbers, or one block "n";
 *     </BlockMap>                                the attribute is sha1= before 1.4
 *   </bmap>
 *
 * Version 1.4 is 2.0 under a wrong number (bmap-tools 3.0 wrote it); versions up to 1.2 have
 * no self-checksum, and 1.2's optional sha1= range attributes, which bmaptool ignores, are
 * verified here. The XML is parsed with saxes, which neither expands entities nor fetches
 * external ones; a DOCTYPE is refused outright, so billion-laughs and XXE files fail early.
 * Every size is bounded before anything is allocated for it.
 */

import { getHashes, hash } from 'node:crypto';
import { SaxesParser } from 'saxes';
import { BlksyncError } from '../errors.js';
import type { Range } from '../ranges.js';

/** Largest bmap file read (a 200k-range bmap is about 20 MB). */
export const MAX_BMAP_BYTES = 256 * 1024 * 1024;
/** Most ranges accepted in one bmap. */
export const MAX_BMAP_RANGES = 4_000_000;
/** Longest text inside one element (numbers, hex digests, a range). */
export const MAX_ELEMENT_TEXT_CHARS = 1024;
/** Deepest element nesting (a bmap needs 3). */
export const MAX_DEPTH = 8;
/** Block sizes accepted: powers of two in this span. */
export const MIN_BMAP_BLOCK_SIZE = 512;
export const MAX_BMAP_BLOCK_SIZE = 64 * 1024 * 1024;
/** Largest bmap major version understood. */
export const SUPPORTED_MAJOR = 2;

/** Checksum algorithms accepted in ChecksumType, with their hex digest lengths. */
const CHECKSUM_HEX_CHARS: Record<string, number> = {
  md5: 32,
  sha1: 40,
  sha224: 56,
  sha256: 64,
  sha384: 96,
  sha512: 128,
};

/** One range of mapped blocks, inclusive, with its checksum when the bmap has one. */
export interface BmapRange {
  first: number;
  last: number;
  /** Lower-case hex digest of the range's bytes (the last block may be short). */
  checksum?: string;
}

export interface Bmap {
  /** "2.0", "1.3", ... as written in the file. */
  version: string;
  imageSize: number;
  blockSize: number;
  blocksCount: number;
  mappedBlocksCount: number;
  /** Algorithm of the range checksums and of the self-checksum; undefined before 1.2. */
  checksumType: string | undefined;
  /** The self-checksum as stored (undefined before 1.3). */
  fileChecksum: string | undefined;
  ranges: BmapRange[];
}

export interface ParseBmapOptions {
  /** Named in error messages. */
  path?: string;
}

function formatError(where: string, message: string): BlksyncError {
  return new BlksyncError('EBMAP_FORMAT', `${where}: ${message}; is this a bmap file?`, {
    path: where,
  });
}

const NUMBER_RE = /^\s*(\d{1,16})\s*$/;
const RANGE_RE = /^\s*(\d{1,16})\s*(?:-\s*(\d{1,16})\s*)?$/;
const HEX_RE = /^[0-9a-fA-F]+$/;

function parseNumber(where: string, name: string, text: string | undefined): number {
  if (text === undefined) throw formatError(where, `<${name}> is missing`);
  const m = NUMBER_RE.exec(text);
  const n = m ? Number(m[1]) : NaN;
  if (!Number.isSafeInteger(n))
    throw formatError(where, `<${name}> "${text.trim()}" is not a number`);
  return n;
}

interface RawBmap {
  version: string | undefined;
  fields: Map<string, string>;
  ranges: { text: string; attrs: Record<string, string> }[];
}

/** Parses the XML into raw fields, bounding everything. */
function parseXml(text: string, where: string): RawBmap {
  const parser = new SaxesParser({ xmlns: false, position: true });
  const raw: RawBmap = { version: undefined, fields: new Map(), ranges: [] };
  const stack: string[] = [];
  let textBuf = '';
  let rangeAttrs: Record<string, string> = {};
  let failure: BlksyncError | undefined;
  const fail = (message: string): never => {
    throw formatError(where, `line ${parser.line}: ${message}`);
  };

  parser.on('doctype', () => fail('a DOCTYPE is not allowed in a bmap'));
  parser.on('opentag', (tag) => {
    if (stack.length >= MAX_DEPTH) fail('elements nested too deep');
    const parent = stack.length;
    stack.push(tag.name);
    textBuf = '';
    if (parent === 0) {
      if (tag.name !== 'bmap') fail(`the root element is <${tag.name}>, not <bmap>`);
      const v = tag.attributes.version;
      raw.version = typeof v === 'string' ? v : undefined;
    } else if (tag.name === 'Range' && stack[1] === 'BlockMap' && parent === 2) {
      if (raw.ranges.length >= MAX_BMAP_RANGES) fail(`more than ${MAX_BMAP_RANGES} ranges`);
      rangeAttrs = {};
      for (const [k, v] of Object.entries(tag.attributes)) {
        if (typeof v === 'string') rangeAttrs[k] = v;
      }
    }
  });
  parser.on('text', (t) => {
    if (stack.length < 2) return;
    if (textBuf.length + t.length > MAX_ELEMENT_TEXT_CHARS) {
      // whitespace between elements is text too; only a leaf's text is bounded
      if (t.trim() !== '') fail(`text in <${stack[stack.length - 1]}> is too long`);
      return;
    }
    textBuf += t;
  });
  parser.on('closetag', (tag) => {
    const depth = stack.length;
    stack.pop();
    if (depth === 2) {
      if (raw.fields.has(tag.name)) fail(`<${tag.name}> appears twice`);
      raw.fields.set(tag.name, tag.name === 'BlockMap' ? '' : textBuf);
    } else if (depth === 3 && tag.name === 'Range' && stack[1] === 'BlockMap') {
      raw.ranges.push({ text: textBuf, attrs: rangeAttrs });
    }
    textBuf = '';
  });
  parser.on('error', (err) => {
    failure ??= formatError(where, `not well-formed XML: ${err.message}`);
  });
  try {
    parser.write(text).close();
  } catch (err) {
    if (err instanceof BlksyncError) throw err;
    throw formatError(where, `not well-formed XML: ${(err as Error).message}`);
  }
  if (failure !== undefined) throw failure;
  return raw;
}

/** Lower-case hex digest of `data` with a ChecksumType algorithm. */
export function bmapDigest(algorithm: string, data: Buffer | string): string {
  return hash(algorithm, data, 'hex');
}

function checkChecksumType(where: string, name: string): string {
  const type = name.trim().toLowerCase();
  if (CHECKSUM_HEX_CHARS[type] === undefined || !getHashes().includes(type)) {
    throw formatError(
      where,
      `checksum type "${name.trim()}" is not supported (use one of ${Object.keys(CHECKSUM_HEX_CHARS).join(', ')})`,
    );
  }
  return type;
}

function checkHex(where: string, what: string, value: string, type: string): string {
  const v = value.trim();
  if (v.length !== CHECKSUM_HEX_CHARS[type] || !HEX_RE.test(v)) {
    throw formatError(where, `${what} "${v.slice(0, 140)}" is not a ${type} checksum`);
  }
  return v.toLowerCase();
}

/**
 * Verifies the self-checksum exactly as bmaptool does: the first occurrence of the stored
 * value in the file's bytes is replaced by as many "0" characters, and the whole file hashed.
 */
function verifyFileChecksum(where: string, bytes: Buffer, stored: string, type: string): void {
  const at = bytes.indexOf(stored, 0, 'latin1');
  if (at < 0) throw formatError(where, 'the self-checksum is not where it should be');
  const copy = Buffer.from(bytes);
  copy.fill(0x30, at, at + stored.length);
  const computed = bmapDigest(type, copy);
  if (computed !== stored.toLowerCase()) {
    throw new BlksyncError(
      'EBMAP_CHECKSUM',
      `${where}: the bmap's own ${type} checksum does not match (computed ${computed}, stored ${stored}); ` +
        'the bmap file is damaged or was edited: get it again',
      { path: where },
    );
  }
}

/**
 * Parses and validates a bmap file's bytes. Throws EBMAP_FORMAT for a malformed or
 * inconsistent bmap and EBMAP_CHECKSUM when its self-checksum fails.
 */
export function parseBmap(bytes: Buffer, options: ParseBmapOptions = {}): Bmap {
  const where = options.path ?? 'bmap';
  if (bytes.length > MAX_BMAP_BYTES) {
    throw formatError(
      where,
      `${bytes.length} bytes is larger than the ${MAX_BMAP_BYTES}-byte limit`,
    );
  }
  const raw = parseXml(bytes.toString('utf8'), where);
  const version = raw.version?.trim();
  const vm = version === undefined ? null : /^(\d{1,3})\.(\d{1,3})$/.exec(version);
  if (version === undefined || vm === null) {
    throw formatError(where, `<bmap version="${version ?? ''}"> is not a version like "2.0"`);
  }
  const major = Number(vm[1]);
  const minor = Number(vm[2]);
  if (major < 1 || major > SUPPORTED_MAJOR || (major === 1 && minor > 4)) {
    throw formatError(
      where,
      `bmap version ${version} is not supported (1.0 to ${SUPPORTED_MAJOR}.x are); a newer blksync may read it`,
    );
  }

  const f = (name: string): string | undefined => raw.fields.get(name);
  // annotated so that calls narrow like a throw
  const fail: (message: string) => never = (message) => {
    throw formatError(where, message);
  };
  const imageSize = parseNumber(where, 'ImageSize', f('ImageSize'));
  const blockSize = parseNumber(where, 'BlockSize', f('BlockSize'));
  const blocksCount = parseNumber(where, 'BlocksCount', f('BlocksCount'));
  if (
    blockSize < MIN_BMAP_BLOCK_SIZE ||
    blockSize > MAX_BMAP_BLOCK_SIZE ||
    (blockSize & (blockSize - 1)) !== 0
  ) {
    throw formatError(
      where,
      `block size ${blockSize} is not a power of two from ${MIN_BMAP_BLOCK_SIZE} to ${MAX_BMAP_BLOCK_SIZE}`,
    );
  }
  if (blocksCount !== Math.ceil(imageSize / blockSize)) {
    throw formatError(
      where,
      `inconsistent: ${blocksCount} blocks of ${blockSize} bytes cannot hold an image of ${imageSize} bytes`,
    );
  }

  // which names carry the checksums depends on the version (see the file header)
  let checksumType: string | undefined;
  let fileChecksumName: string | undefined;
  let rangeAttr: string;
  if (major > 1 || minor === 4) {
    checksumType = checkChecksumType(where, f('ChecksumType') ?? fail('<ChecksumType> is missing'));
    fileChecksumName = 'BmapFileChecksum';
    rangeAttr = 'chksum';
  } else {
    checksumType = 'sha1';
    fileChecksumName = minor >= 3 ? 'BmapFileSHA1' : undefined;
    rangeAttr = 'sha1';
  }

  let fileChecksum: string | undefined;
  if (fileChecksumName !== undefined) {
    const stored = f(fileChecksumName);
    if (stored === undefined) fail(`<${fileChecksumName}> is missing`);
    fileChecksum = checkHex(where, `<${fileChecksumName}>`, stored, checksumType);
    verifyFileChecksum(where, bytes, stored.trim(), checksumType);
  }

  const ranges: BmapRange[] = [];
  let mapped = 0;
  let prevLast = -1;
  for (const r of raw.ranges) {
    const m = RANGE_RE.exec(r.text);
    if (m === null) fail(`range "${r.text.trim().slice(0, 80)}" is not "first-last" or "block"`);
    const first = Number(m[1]);
    const last = m[2] === undefined ? first : Number(m[2]);
    const label = `${first}-${last}`;
    if (last < first) fail(`range ${label} ends before it starts`);
    if (first <= prevLast) {
      fail(`range ${label} overlaps or comes before the range ending at block ${prevLast}`);
    }
    if (last >= blocksCount) {
      fail(`range ${label} passes the image's end (${blocksCount} blocks)`);
    }
    prevLast = last;
    mapped += last - first + 1;
    const range: BmapRange = { first, last };
    const sum = r.attrs[rangeAttr];
    if (sum !== undefined)
      range.checksum = checkHex(where, `checksum of range ${label}`, sum, checksumType);
    ranges.push(range);
  }
  const mappedText = f('MappedBlocksCount');
  const mappedBlocksCount =
    mappedText === undefined ? mapped : parseNumber(where, 'MappedBlocksCount', mappedText);
  if (mappedBlocksCount !== mapped) {
    fail(`<MappedBlocksCount> says ${mappedBlocksCount} blocks but the ranges hold ${mapped}`);
  }
  if (!raw.fields.has('BlockMap')) fail('<BlockMap> is missing');
  return {
    version,
    imageSize,
    blockSize,
    blocksCount,
    mappedBlocksCount,
    checksumType: major === 1 && minor < 2 ? undefined : checksumType,
    fileChecksum,
    ranges,
  };
}

/** Byte offset just past range `r` (the last block of the image may be short). */
export function rangeEnd(bmap: Bmap, r: BmapRange): number {
  return Math.min((r.last + 1) * bmap.blockSize, bmap.imageSize);
}

/** The bmap's mapped ranges in bytes (the shape of a pipeline Plan). */
export function bmapPlan(bmap: Bmap): { imageSize: number; ranges: Range[] } {
  return {
    imageSize: bmap.imageSize,
    ranges: bmap.ranges.map((r) => ({ start: r.first * bmap.blockSize, end: rangeEnd(bmap, r) })),
  };
}

/** Bytes the bmap maps (what a copy reads and considers). */
export function mappedBytes(bmap: Bmap): number {
  let n = 0;
  for (const r of bmap.ranges) n += rangeEnd(bmap, r) - r.first * bmap.blockSize;
  return n;
}

/** Checks that the bmap describes an image of `size` bytes; EBMAP_MISMATCH otherwise. */
export function checkBmapMatches(bmap: Bmap, size: number, bmapPath: string, image: string): void {
  if (bmap.imageSize !== size) {
    throw new BlksyncError(
      'EBMAP_MISMATCH',
      `${bmapPath} describes an image of ${bmap.imageSize} bytes but ${image} is ${size} bytes; ` +
        'the bmap belongs to another image (pass the right one with --bmap, or --no-bmap)',
      { path: bmapPath },
    );
  }
}
