/** Two versions of a small sparse image with its bmap, for the bmap + --index tests. */

import { join } from 'node:path';
import { createBmap } from '../../src/engine/bmap-create.js';
import { seededBytes, writeSparseFile } from './tmp.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const BS = 4 * KiB;
export const SIZE = 8 * MiB + 1000;

/** A sparse image of a few extents, version `v` (v2 changes one block in each of two), with its bmap. */
export async function bmapImage(dir: string, v: 1 | 2): Promise<{ path: string; bytes: Buffer }> {
  const path = join(dir, `v${v}.img`);
  const pieces = [
    { offset: 0, data: seededBytes(3 * BS, 1) },
    { offset: MiB + 5 * BS, data: seededBytes(300 * BS, 2) },
    { offset: 6 * MiB, data: seededBytes(BS, 3) },
    { offset: 8 * MiB, data: seededBytes(1000, 4) },
  ];
  if (v === 2) {
    seededBytes(100, 5).copy(pieces[1]!.data, 7 * BS + 10);
    seededBytes(100, 6).copy(pieces[2]!.data, 0);
  }
  await writeSparseFile(path, SIZE, pieces);
  await createBmap(path, { output: `${path}.bmap` });
  const bytes = Buffer.alloc(SIZE);
  for (const p of pieces) p.data.copy(bytes, p.offset);
  return { path, bytes };
}
