/**
 * A targets file (`copy SRC --targets FILE`): one destination per line, as it would be given
 * on the command line (a file, a device, or [user@]host:path). Blank lines and lines whose
 * first non-blank character is `#` are skipped; surrounding blanks are trimmed.
 */

import { readFile, stat } from 'node:fs/promises';
import { BlksyncError, fromSystemError } from '../errors.js';

/** More than any fleet's list of destinations; a larger file is a mistake (a disk image). */
export const MAX_TARGETS_FILE_BYTES = 1024 * 1024;

export function parseTargets(text: string): string[] {
  const out: string[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    out.push(line);
  }
  return out;
}

export async function readTargets(path: string): Promise<string[]> {
  let text: string;
  try {
    const st = await stat(path);
    if (st.size > MAX_TARGETS_FILE_BYTES) {
      throw new BlksyncError(
        'EUSAGE',
        `--targets ${path} is ${st.size} bytes, not a list of destinations (one per line)`,
        { path },
      );
    }
    text = await readFile(path, 'utf8');
  } catch (err) {
    if (err instanceof BlksyncError) throw err;
    throw fromSystemError('EUSAGE', 'cannot read --targets', path, err);
  }
  const targets = parseTargets(text);
  if (targets.length === 0) {
    throw new BlksyncError('EUSAGE', `--targets ${path} names no destination (one per line)`, {
      path,
    });
  }
  return targets;
}
