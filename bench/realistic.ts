/**
 * The realistic image pair: two ext4 images built from real files, the second with one byte
 * appended to one file, as an OS image update looks (mostly holes, a few scattered metadata
 * and data blocks changed). Cached under bench/.data/realistic-<size>/:
 *
 *   tree/      the files (copied from the trees in SOURCE_TREES, all timestamps fixed)
 *   old.img    mkfs.ext4 -d tree           (sparse: only the written blocks are allocated)
 *   new.img    the same after one file grew by one byte
 *   meta.json  how they were made, the changed file, the differing bytes and 4 KiB blocks
 *
 * Reproducible on one machine: mkfs gets a fixed time (E2FSPROGS_FAKE_TIME), UUID and
 * directory hash seed, the tree's files a fixed mtime, and the files are taken in sorted
 * order up to a byte budget. The trees are ones every machine of this project has (its own
 * node_modules, pinned by package-lock.json, then Debian's Python and Perl libraries).
 */

import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import {
  appendFile,
  cp,
  mkdir,
  open,
  readdir,
  readFile,
  rm,
  stat,
  utimes,
  writeFile,
} from 'node:fs/promises';
import path from 'node:path';
import { DATA_DIR, type ImagePair } from './data.js';
import { run } from './measure.js';
import { ROOT } from './setup.js';

/** Bumped whenever the recipe changes, so a cached pair made by an older one is remade. */
const RECIPE_VERSION = 1;
export const REALISTIC_IMAGE_SIZE = 1024 ** 3;
/** Bytes of real files put into the image (about a quarter of it, as in a small OS image). */
const TREE_BUDGET_BYTES = 200 * 1024 * 1024;
const SOURCE_TREES = [
  path.join(ROOT, 'node_modules'),
  '/usr/lib/python3.11',
  '/usr/share/perl',
  '/usr/share/doc',
];
const FIXED_TIME_S = 1_700_000_000;
const FS_UUID = '6b1e0f4a-8d2c-4e5b-9a7f-3c1d2e4f5a6b';
const HASH_SEED = '0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a';
const BLOCK = 4096;

interface RealisticMeta {
  version: number;
  size: number;
  treeBytes: number;
  files: number;
  changedFile: string;
  differingBytes: number;
  differingBlocks: number;
  /** Bytes of new.img that are data (not holes), from its allocated blocks. */
  allocatedBytes: number;
}

export interface RealisticPair extends ImagePair {
  treeBytes: number;
  files: number;
  changedFile: string;
  allocatedBytes: number;
}

/** Regular files under `dir` in sorted order (symlinks and special files left out). */
async function walk(dir: string, out: string[]): Promise<void> {
  const entries = await readdir(dir, { withFileTypes: true });
  entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  for (const e of entries) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) await walk(p, out);
    else if (e.isFile()) out.push(p);
  }
}

async function buildTree(tree: string): Promise<{ bytes: number; files: string[] }> {
  const files: string[] = [];
  let bytes = 0;
  for (const [i, source] of SOURCE_TREES.entries()) {
    if (!existsSync(source)) continue;
    const found: string[] = [];
    await walk(source, found);
    for (const file of found) {
      const size = (await stat(file)).size;
      if (bytes + size > TREE_BUDGET_BYTES) break;
      const rel = path.join(String(i), path.relative(source, file));
      const to = path.join(tree, rel);
      await mkdir(path.dirname(to), { recursive: true });
      await cp(file, to);
      bytes += size;
      files.push(rel);
    }
    if (bytes >= TREE_BUDGET_BYTES * 0.99) break;
  }
  return { bytes, files };
}

/** Gives every file and directory of the tree the same times, so mkfs -d copies no drift. */
async function fixTimes(dir: string): Promise<void> {
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) await fixTimes(p);
    await utimes(p, FIXED_TIME_S, FIXED_TIME_S);
  }
  await utimes(dir, FIXED_TIME_S, FIXED_TIME_S);
}

async function mkfs(image: string, tree: string, size: number): Promise<void> {
  await rm(image, { force: true });
  const fd = await open(image, 'w');
  await fd.truncate(size);
  await fd.close();
  await fixTimes(tree);
  await run('env', [
    `E2FSPROGS_FAKE_TIME=${FIXED_TIME_S}`,
    'mkfs.ext4',
    '-F',
    '-q',
    '-b',
    String(BLOCK),
    '-U',
    FS_UUID,
    '-E',
    `hash_seed=${HASH_SEED},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard`,
    '-d',
    tree,
    image,
  ]);
  // mkfs -d copies each file's ctime, which the kernel set when the tree was copied (no
  // utimes can change it): put the fixed time there too, through debugfs
  const paths: string[] = ['/'];
  await listPaths(tree, '', paths);
  const script = path.join(path.dirname(image), 'ctime.debugfs');
  await writeFile(
    script,
    paths.map((p) => `set_inode_field "${p}" ctime @${FIXED_TIME_S}\n`).join(''),
  );
  await run('env', [`E2FSPROGS_FAKE_TIME=${FIXED_TIME_S}`, 'debugfs', '-w', '-f', script, image]);
  await rm(script);
}

/** Every file and directory under `dir`, as absolute paths inside the image. */
async function listPaths(dir: string, prefix: string, out: string[]): Promise<void> {
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const inImage = `${prefix}/${e.name}`;
    out.push(inImage);
    if (e.isDirectory()) await listPaths(path.join(dir, e.name), inImage, out);
  }
}

/** Differing bytes and 4 KiB blocks between two files of the same size. */
async function countDifferences(a: string, b: string, size: number): Promise<[number, number]> {
  const fa = await open(a, 'r');
  const fb = await open(b, 'r');
  const step = 16 * 1024 * 1024;
  const ba = Buffer.alloc(step);
  const bb = Buffer.alloc(step);
  let bytes = 0;
  let blocks = 0;
  try {
    for (let offset = 0; offset < size; offset += step) {
      const n = Math.min(step, size - offset);
      await fa.read(ba, 0, n, offset);
      await fb.read(bb, 0, n, offset);
      if (ba.subarray(0, n).equals(bb.subarray(0, n))) continue;
      for (let s = 0; s < n; s += BLOCK) {
        const e = Math.min(n, s + BLOCK);
        if (ba.subarray(s, e).equals(bb.subarray(s, e))) continue;
        blocks++;
        for (let i = s; i < e; i++) if (ba[i] !== bb[i]) bytes++;
      }
    }
  } finally {
    await fa.close();
    await fb.close();
  }
  return [bytes, blocks];
}

/** Offsets of the 4 KiB blocks in which two files of `size` bytes differ. */
export async function differingBlockOffsets(a: string, b: string, size: number): Promise<number[]> {
  const fa = await open(a, 'r');
  const fb = await open(b, 'r');
  const step = 16 * 1024 * 1024;
  const ba = Buffer.alloc(step);
  const bb = Buffer.alloc(step);
  const offsets: number[] = [];
  try {
    for (let offset = 0; offset < size; offset += step) {
      const n = Math.min(step, size - offset);
      await fa.read(ba, 0, n, offset);
      await fb.read(bb, 0, n, offset);
      if (ba.subarray(0, n).equals(bb.subarray(0, n))) continue;
      for (let s = 0; s < n; s += BLOCK) {
        const e = Math.min(n, s + BLOCK);
        if (!ba.subarray(s, e).equals(bb.subarray(s, e))) offsets.push(offset + s);
      }
    }
  } finally {
    await fa.close();
    await fb.close();
  }
  return offsets;
}

/** Returns the realistic pair, building it when missing or made by another recipe. */
export async function ensureRealisticPair(
  log: (line: string) => void = () => {},
  size = REALISTIC_IMAGE_SIZE,
): Promise<RealisticPair> {
  const dir = path.join(DATA_DIR, `realistic-${size}`);
  const oldPath = path.join(dir, 'old.img');
  const newPath = path.join(dir, 'new.img');
  const metaPath = path.join(dir, 'meta.json');
  let meta: RealisticMeta | undefined;
  try {
    meta = JSON.parse(await readFile(metaPath, 'utf8')) as RealisticMeta;
  } catch {
    meta = undefined;
  }
  if (meta?.version === RECIPE_VERSION && meta.size === size && existsSync(newPath)) {
    return { dir, oldPath, newPath, changes: [], ...meta };
  }
  log(`building the realistic ext4 pair in ${dir} (real files, fixed time/UUID/hash seed) ...`);
  const started = performance.now();
  await rm(dir, { recursive: true, force: true });
  const tree = path.join(dir, 'tree');
  await mkdir(tree, { recursive: true });
  const { bytes, files } = await buildTree(tree);
  await mkfs(oldPath, tree, size);
  // one byte appended to one mid-sized file in the middle of the tree: a config file edit
  let changedFile = '';
  for (let i = Math.floor(files.length / 2); i < files.length; i++) {
    const s = (await stat(path.join(tree, files[i]!))).size;
    if (s > 8192 && s < 1024 * 1024) {
      changedFile = files[i]!;
      break;
    }
  }
  if (changedFile === '') throw new Error('realistic pair: no file of 8 KiB–1 MiB to change');
  await appendFile(path.join(tree, changedFile), '\n');
  await mkfs(newPath, tree, size);
  // the tree is only needed to build the images (and would hold thousands of files of other projects)
  await rm(tree, { recursive: true, force: true });
  const [differingBytes, differingBlocks] = await countDifferences(oldPath, newPath, size);
  const allocatedBytes = (await stat(newPath)).blocks * 512;
  const made: RealisticMeta = {
    version: RECIPE_VERSION,
    size,
    treeBytes: bytes,
    files: files.length,
    changedFile,
    differingBytes,
    differingBlocks,
    allocatedBytes,
  };
  await writeFile(metaPath, `${JSON.stringify(made, null, 2)}\n`);
  const digest = createHash('sha256').update(JSON.stringify(made)).digest('hex').slice(0, 12);
  log(
    `built in ${((performance.now() - started) / 1000).toFixed(1)} s: ${files.length} files, ` +
      `${differingBlocks} differing 4 KiB blocks (${differingBytes} bytes), recipe ${digest}`,
  );
  return { dir, oldPath, newPath, changes: [], ...made };
}
