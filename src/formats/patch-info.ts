/** `describePatch(path)`: a patch's header and statistics, for `blksync info` and the API. */

import { stat } from 'node:fs/promises';
import { fromSystemError } from '../errors.js';
import { formatBytes } from '../size.js';
import { SequentialReader } from '../io/stream-source.js';
import type { Compression } from './patch.js';
import { PatchReader } from './patch-reader.js';

export interface PatchInfo {
  format: 'blksync-patch';
  path: string;
  version: number;
  blockSize: number;
  /** The pieces gap hashes are made of (the block size in version 1, which has none). */
  gapUnit: number;
  baseSize: number;
  resultSize: number;
  reversible: boolean;
  compression: Compression;
  records: number;
  /** Unpacked bytes of new content (what apply writes at most) and of stored old content. */
  newBytes: number;
  oldBytes: number;
  /** Bytes of payload as stored, and of the whole file. */
  payloadBytes: number;
  patchBytes: number;
  /** The largest record, in bytes of the image. */
  largestRecord: number;
  /** True once the trailer's count and SHA-256 (and, with `verify`, every payload) checked out. */
  verified: true;
}

/**
 * Reads the whole patch and checks it (CRCs, bounds, count, SHA-256; with `verify`, also
 * the hash of every payload that is a record's whole content, i.e. has no shared edges);
 * throws the same EPATCH_* errors apply would.
 */
export async function describePatch(
  path: string,
  options: { verify?: boolean } = {},
): Promise<PatchInfo> {
  let patchBytes: number;
  try {
    patchBytes = (await stat(path)).size;
  } catch (err) {
    throw fromSystemError('ESRC_OPEN', 'cannot open the patch', path, err);
  }
  const input = SequentialReader.fromFile(path);
  try {
    const reader = new PatchReader(input);
    const h = await reader.header();
    const info: PatchInfo = {
      format: 'blksync-patch',
      path,
      ...h,
      records: 0,
      newBytes: 0,
      oldBytes: 0,
      payloadBytes: 0,
      patchBytes,
      largestRecord: 0,
      verified: true,
    };
    for (;;) {
      const r = await reader.next(options.verify === true ? 'verify' : 'skip');
      if (r === undefined) break;
      info.records++;
      info.newBytes += r.newBytes;
      info.oldBytes += h.reversible ? r.oldBytes : 0;
      info.payloadBytes += r.newStored + r.oldStored;
      info.largestRecord = Math.max(info.largestRecord, r.length);
    }
    return info;
  } finally {
    input.close();
  }
}

function sizeText(n: number): string {
  return `${n} bytes (${formatBytes(n)})`;
}

/** The text `blksync info` prints for a patch. */
export function patchInfoText(i: PatchInfo): string {
  return [
    `${i.path}: blksync patch, version ${i.version}, checksum verified`,
    `  base        ${sizeText(i.baseSize)}`,
    `  result      ${sizeText(i.resultSize)}`,
    `  blocks      ${formatBytes(i.blockSize)}${i.version > 1 ? ` (gap hashes by ${formatBytes(i.gapUnit)} pieces)` : ''}`,
    `  records     ${i.records} (largest ${formatBytes(i.largestRecord)})`,
    `  new bytes   ${sizeText(i.newBytes)}`,
    `  reversible  ${i.reversible ? `yes (${sizeText(i.oldBytes)} of old content)` : 'no'}`,
    `  compression ${i.compression}; payload ${sizeText(i.payloadBytes)}, file ${sizeText(i.patchBytes)}`,
  ].join('\n');
}
