/**
 * The `--index auto` cache directory (io/cache-dir.ts) against another user who can write
 * in it: an index planted there under the name `copy --index auto` looks for, claiming DST
 * already holds SRC, must not make a copy skip the blocks it has to write.
 */

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { chmod, chown, mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import { copy } from '../src/copy.js';
import { makeIndex } from '../src/engine/make-index.js';
import { readIndexFile, writeNewIndex } from '../src/formats/index-file.js';
import { cachedIndexPath } from '../src/io/cache-dir.js';
import { identityOf } from '../src/io/identity.js';
import { runCli } from './helpers/cli.js';
import { IS_ROOT, need } from './helpers/resources.js';
import { sharedSshd } from './helpers/sshd.js';
import { tempDir, writeSparseFile } from './helpers/tmp.js';

const KIB = 1024;
const MIB = 1024 * KIB;
/** Large enough in 4 KiB blocks that the 16-block sample all but never hits the one change. */
const SIZE = 32 * MIB;
const BLOCK = 4 * KIB;
const CHANGED_AT = 13 * MIB + 8 * BLOCK;

/** Sets $XDG_CACHE_HOME for the test (the library reads process.env). */
function useCache(t: TestContext, root: string): void {
  const saved = process.env.XDG_CACHE_HOME;
  process.env.XDG_CACHE_HOME = root;
  t.after(() => {
    if (saved === undefined) delete process.env.XDG_CACHE_HOME;
    else process.env.XDG_CACHE_HOME = saved;
  });
}

interface Planted {
  dir: string;
  src: string;
  dst: string;
  /** $XDG_CACHE_HOME; the cache is its blksync/. */
  cacheRoot: string;
  cache: string;
  dstBefore: Buffer;
}

/**
 * SRC and DST differ in one block; an index claiming DST holds SRC's blocks (DST's identity,
 * SRC's hashes) is planted where `copy --index auto` onto DST looks for DST's index.
 */
async function plant(t: TestContext): Promise<Planted> {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  await writeSparseFile(src, SIZE, [{ offset: CHANGED_AT, data: Buffer.alloc(BLOCK, 0xee) }]);
  await writeSparseFile(dst, SIZE, []);
  const cacheRoot = join(dir, 'xdg');
  const cache = join(cacheRoot, 'blksync');
  await mkdir(cache, { recursive: true, mode: 0o700 });
  const ofSrc = await readIndexFile(
    (await makeIndex(src, join(dir, 'src.blkidx'), { blockSize: BLOCK, hashThreads: 0 })).output,
  );
  const identity = await identityOf(dst, await stat(dst), SIZE);
  await writeNewIndex(cachedIndexPath(identity, cache), {
    blockSize: BLOCK,
    imageSize: SIZE,
    state: { kind: 'clean' },
    identity,
    hashes: ofSrc.hashes,
  });
  useCache(t, cacheRoot);
  return { dir, src, dst, cacheRoot, cache, dstBefore: await readFile(dst) };
}

/** The copy is refused as unsafe, and DST is untouched: nothing was skipped silently. */
async function assertRefused(p: Planted, why: RegExp): Promise<void> {
  await assert.rejects(copy(p.src, p.dst, { index: 'auto' }), (err: NodeJS.ErrnoException) => {
    assert.equal(err.code, 'ECACHE_UNSAFE', err.message);
    assert.match(err.message, why);
    assert.match(err.message, /XDG_CACHE_HOME/, 'the message says what to do');
    return true;
  });
  assert.ok((await readFile(p.dst)).equals(p.dstBefore), 'nothing was written to DST');
}

test('a cache directory others may write (0777) is refused; its planted index does not make copy skip', async (t) => {
  const p = await plant(t);
  await chmod(p.cache, 0o777);
  await assertRefused(p, /written by others \(mode 0777/);
});

test('a cache directory with the sticky bit but writable by others (1777) is refused too', async (t) => {
  // sticky stops others removing our indexes, not creating one at the name copy looks for
  const p = await plant(t);
  await chmod(p.cache, 0o1777);
  await assertRefused(p, /written by others \(mode 1777/);
});

test('a cache directory owned by another user (uid 12345) is refused', async (t) => {
  if (!need(t, IS_ROOT, 'chown to another uid needs root')) return;
  const p = await plant(t);
  await chown(p.cache, 12345, 12345);
  await assertRefused(p, /owned by uid 12345/);
});

test('a cache directory inside one others may write without the sticky bit is refused', async (t) => {
  // whoever may write $XDG_CACHE_HOME can swap blksync/ for a directory of their own
  const p = await plant(t);
  await chmod(p.cacheRoot, 0o777);
  await assertRefused(p, /may be swapped by others/);
});

const server = sharedSshd();

test('a remote agent refuses its own unsafe cache the same way (push --index auto)', async (t) => {
  const s = server(t);
  if (!s) return;
  const p = await plant(t);
  await chmod(p.cache, 0o777);
  // this side's cache (SRC's index) is a private one: the refusal must come from the agent
  const here = join(p.dir, 'here');
  await mkdir(here, { mode: 0o700 });
  useCache(t, here);
  const ssh = `${s.ssh} -o SetEnv=XDG_CACHE_HOME=${p.cacheRoot}`;
  await assert.rejects(
    copy(p.src, `${s.host}:${p.dst}`, { remote: { ssh }, index: 'auto' }),
    (err: NodeJS.ErrnoException) => {
      assert.equal(err.code, 'ECACHE_UNSAFE', err.message);
      return true;
    },
  );
  assert.ok((await readFile(p.dst)).equals(p.dstBefore), 'nothing was written to DST');
});

test('control: in a private cache the same index is trusted, so the attacks above would have worked', async (t) => {
  // the cache is the user's own: an index there is believed (after its 16-block sample),
  // which is why a cache someone else can write to must be refused, not read
  const p = await plant(t);
  await chmod(p.cache, 0o700);
  const fooled = await copy(p.src, p.dst, { index: 'auto' });
  assert.equal(fooled.index?.mode, 'used');
  assert.equal(fooled.bytesWritten, 0, 'the planted index hid the differing block');
  const plain = await copy(p.src, p.dst);
  assert.equal(plain.bytesWritten, BLOCK);
  assert.ok((await readFile(p.dst)).equals(await readFile(p.src)));
});

test('the cache directory is created 0700 and the indexes in it 0600', async (t) => {
  const dir = await tempDir(t);
  const img = join(dir, 'img');
  await writeSparseFile(img, 1 * MIB, [{ offset: 0, data: Buffer.alloc(KIB, 1) }]);
  const cacheRoot = join(dir, 'xdg');
  useCache(t, cacheRoot);
  const made = await makeIndex(img, 'auto', { hashThreads: 0 });
  assert.equal((await stat(join(cacheRoot, 'blksync'))).mode & 0o777, 0o700);
  assert.equal((await stat(made.output)).mode & 0o777, 0o600);
  // an index written elsewhere keeps the usual mode (0666 less the umask)
  const elsewhere = join(dir, 'img.blkidx');
  await makeIndex(img, elsewhere, { hashThreads: 0 });
  assert.equal((await stat(elsewhere)).mode & 0o777, 0o666 & ~process.umask());
});

test('XDG_CACHE_HOME naming a file is a coded error (ECACHE_DIR), not an internal error', async (t) => {
  const dir = await tempDir(t);
  const img = join(dir, 'img');
  const dst = join(dir, 'dst');
  await writeSparseFile(img, 1 * MIB, [{ offset: 0, data: Buffer.alloc(KIB, 1) }]);
  await writeSparseFile(dst, 1 * MIB, []);
  const file = join(dir, 'not-a-dir');
  await writeFile(file, 'x');
  for (const args of [
    ['index', img, '-o', 'auto'],
    ['copy', '--index', 'auto', img, dst],
  ]) {
    const r = await runCli(args, { env: { XDG_CACHE_HOME: file } });
    assert.notEqual(r.code, 0);
    assert.doesNotMatch(r.stderr, /internal error/);
    assert.match(r.stderr, /cache directory .*not-a-dir.*\[ECACHE_DIR\]/);
  }
});

test('a cache directory the user may not create (EACCES) is a coded error (ECACHE_DIR)', async (t) => {
  if (!need(t, IS_ROOT, 'running blksync as another user (uid 12345) needs root')) return;
  const dir = await tempDir(t);
  await chmod(dir, 0o755);
  const img = join(dir, 'img');
  await writeSparseFile(img, 1 * MIB, [{ offset: 0, data: Buffer.alloc(KIB, 1) }]);
  await chmod(img, 0o644);
  const rootOwned = join(dir, 'root-owned');
  await mkdir(rootOwned, { mode: 0o755 });
  const entry = fileURLToPath(new URL('./helpers/cli-entry.ts', import.meta.url));
  const r = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
    const child = execFile(
      'setpriv',
      [
        '--reuid=12345',
        '--regid=12345',
        '--clear-groups',
        process.execPath,
        '--import',
        'tsx',
        entry,
        'index',
        img,
        '-o',
        'auto',
      ],
      { env: { ...process.env, XDG_CACHE_HOME: rootOwned, HOME: rootOwned } },
      (_err, _stdout, stderr) => resolve({ code: child.exitCode, stderr }),
    );
  });
  assert.notEqual(r.code, 0);
  assert.doesNotMatch(r.stderr, /internal error/);
  assert.match(
    r.stderr,
    /cache directory .*root-owned.*permission denied \(EACCES\).*\[ECACHE_DIR\]/,
  );
});
