/**
 * Seeded benchmark data, generated once and cached under bench/.data/<size>/:
 *
 *   old.img    SIZE bytes of AES-256-CTR keystream (incompressible, same bytes for a seed)
 *   new.img    old.img with CHANGE_COUNT scattered, unaligned ~100 KB changes (~1 MiB in all)
 *   meta.json  how both were made, and the differing bytes and 4 KiB blocks between them
 *
 * The files are regenerated only when missing, of the wrong size, or made with other
 * parameters; benchmarks then work on copies (see `freshCopy` in measure.ts).
 */

import { createCipheriv, createHash } from 'node:crypto';
import { mkdir, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

/** The directory every section keeps its data in (gitignored). */
export const DATA_DIR = fileURLToPath(new URL('./.data/', import.meta.url));

export const DEFAULT_IMAGE_SIZE = 1024 ** 3;
export const DEFAULT_SEED = 'blksync-bench-1';
/** Scattered changes between old.img and new.img. */
export const CHANGE_COUNT = 10;
/** Each change is CHANGE_BYTES plus up to CHANGE_JITTER_BYTES more. */
export const CHANGE_BYTES = 100_000;
export const CHANGE_JITTER_BYTES = 9_000;
/** Bytes generated and written per step while making old.img. */
const WRITE_CHUNK_BYTES = 16 * 1024 * 1024;
/** Bumped whenever the generator changes, so cached data made by an older one is remade. */
const GENERATOR_VERSION = 1;
const BLOCK = 4096;

export interface Change {
  offset: number;
  length: number;
}

export interface ImagePair {
  dir: string;
  /** The image DST holds before a run. */
  oldPath: string;
  /** The image a run writes onto DST (SRC). */
  newPath: string;
  size: number;
  changes: Change[];
  /** Bytes at which old.img and new.img differ. */
  differingBytes: number;
  /** 4 KiB blocks (aligned to the image) in which they differ. */
  differingBlocks: number;
}

interface Meta {
  version: number;
  seed: string;
  size: number;
  changes: Change[];
  differingBytes: number;
  differingBlocks: number;
}

/** A deterministic stream of bytes for a seed and a purpose: AES-256-CTR over zeros. */
function keystream(seed: string, purpose: string): (length: number) => Buffer {
  const key = createHash('sha256').update(`${seed}/${purpose}/key`).digest();
  const iv = createHash('sha256').update(`${seed}/${purpose}/iv`).digest().subarray(0, 16);
  const cipher = createCipheriv('aes-256-ctr', key, iv);
  let zeros = Buffer.alloc(0);
  return (length) => {
    if (zeros.length < length) zeros = Buffer.alloc(length);
    return cipher.update(zeros.subarray(0, length));
  };
}

/** Unaligned, non-overlapping changes: one in each of CHANGE_COUNT equal slots of the image. */
function planChanges(seed: string, size: number): Change[] {
  const next = keystream(seed, 'changes');
  const slot = Math.floor(size / CHANGE_COUNT);
  const changes: Change[] = [];
  for (let i = 0; i < CHANGE_COUNT; i++) {
    const r = next(8);
    const length = Math.min(slot, CHANGE_BYTES + (r.readUInt32LE(0) % CHANGE_JITTER_BYTES));
    let offset = i * slot + (r.readUInt32LE(4) % (slot - length + 1));
    // a change that starts on a block boundary would flatter block-granular tools
    if (offset % BLOCK === 0 && offset + length < (i + 1) * slot) offset += 1;
    changes.push({ offset, length });
  }
  return changes;
}

async function readMeta(dir: string): Promise<Meta | undefined> {
  try {
    return JSON.parse(await readFile(path.join(dir, 'meta.json'), 'utf8')) as Meta;
  } catch {
    return undefined;
  }
}

async function sizeOf(file: string): Promise<number | undefined> {
  try {
    return (await stat(file)).size;
  } catch {
    return undefined;
  }
}

/**
 * Returns the seeded image pair of `size` bytes, generating it if the cache is missing,
 * of the wrong size, or was made with other parameters.
 */
export async function ensureImages(
  size = DEFAULT_IMAGE_SIZE,
  seed = DEFAULT_SEED,
  log: (line: string) => void = () => {},
): Promise<ImagePair> {
  if (!Number.isSafeInteger(size) || size < CHANGE_COUNT * 2 * (CHANGE_BYTES + BLOCK)) {
    throw new Error(`image size ${size} is too small for ${CHANGE_COUNT} changes`);
  }
  const dir = path.join(DATA_DIR, String(size));
  const oldPath = path.join(dir, 'old.img');
  const newPath = path.join(dir, 'new.img');
  const meta = await readMeta(dir);
  const fresh =
    meta !== undefined &&
    meta.version === GENERATOR_VERSION &&
    meta.seed === seed &&
    meta.size === size &&
    (await sizeOf(oldPath)) === size &&
    (await sizeOf(newPath)) === size;
  if (fresh) return { dir, oldPath, newPath, ...meta };

  log(`generating ${size} byte seeded images in ${dir} ...`);
  const started = performance.now();
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  const made = await generate(oldPath, newPath, size, seed);
  await writeFile(path.join(dir, 'meta.json'), `${JSON.stringify(made, null, 2)}\n`);
  log(`generated in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  return { dir, oldPath, newPath, ...made };
}

async function generate(
  oldPath: string,
  newPath: string,
  size: number,
  seed: string,
): Promise<Meta> {
  const image = keystream(seed, 'image');
  const changes = planChanges(seed, size);
  const changeBytes = keystream(seed, 'change-bytes');
  const oldFile = await open(oldPath, 'w');
  const newFile = await open(newPath, 'w');
  let differingBytes = 0;
  const blocks = new Set<number>();
  try {
    for (let offset = 0; offset < size; offset += WRITE_CHUNK_BYTES) {
      const chunk = image(Math.min(WRITE_CHUNK_BYTES, size - offset));
      await oldFile.write(chunk, 0, chunk.length, offset);
      // the new image is the old one with the changes that fall in this chunk patched in
      for (const c of changes) {
        const s = Math.max(c.offset, offset);
        const e = Math.min(c.offset + c.length, offset + chunk.length);
        if (s >= e) continue;
        const patch = changeBytes(e - s);
        for (let i = 0; i < patch.length; i++) {
          const at = s - offset + i;
          if (chunk[at] !== patch[i]) {
            differingBytes++;
            blocks.add(Math.floor((s + i) / BLOCK));
          }
        }
        patch.copy(chunk, s - offset);
      }
      await newFile.write(chunk, 0, chunk.length, offset);
    }
    await oldFile.sync();
    await newFile.sync();
  } finally {
    await oldFile.close();
    await newFile.close();
  }
  return {
    version: GENERATOR_VERSION,
    seed,
    size,
    changes,
    differingBytes,
    differingBlocks: blocks.size,
  };
}
