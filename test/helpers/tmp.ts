/** Temporary directories and files made of real bytes, removed after the test. */

import { randomBytes } from 'node:crypto';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';

/** A fresh directory removed when the test ends (also when it fails). */
export async function tempDir(t: TestContext): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'blksync-test-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Deterministic pseudo-random bytes (xorshift32) so failures reproduce. */
export function seededBytes(length: number, seed: number): Buffer {
  const buf = Buffer.allocUnsafe(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf[i] = x & 0xff;
  }
  return buf;
}

export async function writeRandomFile(
  path: string,
  length: number,
  seed?: number,
): Promise<Buffer> {
  const data = seed === undefined ? randomBytes(length) : seededBytes(length, seed);
  await writeFile(path, data);
  return data;
}

/** A sparse file of `size` bytes with `data` written at each offset. */
export async function writeSparseFile(
  path: string,
  size: number,
  pieces: { offset: number; data: Buffer }[],
): Promise<void> {
  const fh = await open(path, 'w');
  try {
    await fh.truncate(size);
    for (const p of pieces) await fh.write(p.data, 0, p.data.length, p.offset);
  } finally {
    await fh.close();
  }
}

/** A fixed VHD's 512-byte footer ("conectix", disk type fixed, its checksum right). */
export function vhdFooter(): Buffer {
  const footer = Buffer.alloc(512);
  footer.write('conectix', 0, 'latin1');
  footer.writeUInt32BE(2, 60); // disk type: fixed
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += footer[i]!;
  footer.writeUInt32BE(~sum >>> 0, 64);
  return footer;
}
