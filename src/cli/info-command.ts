/**
 * `blksync info FILE`: what a blksync file is and holds. The type is recognised by its
 * magic; each type is one entry of FILE_TYPES (add a patch or other format there).
 */

import type { Command } from '@commander-js/extra-typings';
import type { IndexInfo } from '../engine/make-index.js';
import { BlksyncError } from '../errors.js';
import { INDEX_MAGIC } from '../formats/index-file.js';
import { PATCH_MAGIC } from '../formats/patch.js';
import { readHead, startsWith } from '../io/file-head.js';
import { formatBytes } from '../size.js';
import { printText, reportError, type SetExit } from './common.js';

/** One kind of file `info` knows: its magic at offset 0, and how to describe it. */
export interface FileType {
  name: string;
  magic: Buffer;
  /** Reads and verifies the file; returns a JSON-able description and its text rendering. */
  describe(path: string): Promise<{ json: object; text: string }>;
}

function indexText(i: IndexInfo): string {
  const id = i.identity;
  const lines = [
    `${i.path}: blksync index, version ${i.version}, checksum ${i.checksum}`,
    `  image       ${i.imageSize} bytes (${formatBytes(i.imageSize)})`,
    `  blocks      ${i.blockCount} of ${formatBytes(i.blockSize)}, ${i.algorithm}`,
    `  distinct    ${i.distinctBlocks} blocks; ${i.zeroBlocks} all zeros`,
    // an index may describe a destination, a source image or a stream: "made for", not "target"
    `  made for    ${id.kind} ${id.path ?? ''} (${id.key}${id.weak ? (id.kind === 'block-device' ? ', weak: only the device number' : ', weak') : ''}), ${id.size} bytes` +
      (id.model !== undefined ? `, ${id.model}` : ''),
    `  state       ${i.state}` +
      (i.dirty !== undefined
        ? ` (bytes ${i.dirty.start}-${i.dirty.end} may be dirty; the next copy reads them back)`
        : ''),
    `  written     ${i.writtenAt}`,
  ];
  return lines.join('\n');
}

export const FILE_TYPES: FileType[] = [
  {
    name: 'index',
    magic: INDEX_MAGIC,
    describe: async (path) => {
      const { indexInfo } = await import('../engine/make-index.js');
      const info = await indexInfo(path);
      return { json: info, text: indexText(info) };
    },
  },
  {
    name: 'patch',
    magic: PATCH_MAGIC,
    describe: async (path) => {
      const { describePatch, patchInfoText } = await import('../formats/patch-info.js');
      const info = await describePatch(path);
      return { json: info, text: patchInfoText(info) };
    },
  },
];

const MAGIC_BYTES = Math.max(...FILE_TYPES.map((t) => t.magic.length));

/** Describes a blksync file of any known type. */
export async function describeFile(path: string): Promise<{ json: object; text: string }> {
  const head = await readHead(path, MAGIC_BYTES, 'EINDEX_OPEN');
  const type = FILE_TYPES.find((t) => startsWith(head, t.magic));
  if (type === undefined) {
    throw new BlksyncError(
      'EINFO_UNKNOWN',
      `${path} is not a file blksync knows (${FILE_TYPES.map((t) => t.name).join(', ')})`,
      { path },
    );
  }
  return type.describe(path);
}

export function registerInfo(program: Command, setExit: SetExit): void {
  program
    .command('info')
    .description('describe a blksync file (index, ...): header, statistics, checksum')
    .argument('<file>', 'the file')
    .option('--json', 'print one JSON object on stdout')
    .option('--debug', 'show stack traces on errors')
    .action(async (file, opts) => {
      try {
        const d = await describeFile(file);
        if (opts.json === true) process.stdout.write(`${JSON.stringify(d.json)}\n`);
        else printText(process.stdout, d.text);
      } catch (err) {
        setExit(reportError(err, opts));
      }
    });
}
