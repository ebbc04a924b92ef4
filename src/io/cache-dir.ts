/**
 * blksync's cache directory ($XDG_CACHE_HOME/blksync, else ~/.cache/blksync), where
 * `--index auto` keeps one index per destination, named by a hash of its identity.
 *
 * An index there is trusted to say what a device holds, and its name is predictable from the
 * device's identity, so whoever can put a file in the directory can make a copy skip blocks
 * it should write. The directory is therefore used only when nobody else can: it is created
 * 0700 and its indexes 0600, and one owned by another user, or writable by group or others,
 * is refused (ECACHE_UNSAFE) before any index in it is read or written — also with the
 * sticky bit, which stops others deleting files but not creating one at an index's name.
 * Each directory above it must be ours or root's and, when others may write it, sticky
 * (as /tmp), or whoever may write it could swap the cache directory for their own.
 */

import { mkdir, realpath, stat } from 'node:fs/promises';
import { homedir } from 'node:os';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { BlksyncError, isSystemError } from '../errors.js';
import { sha256 } from '../hash.js';
import type { TargetIdentity } from './identity.js';

/** File name extension of index files. */
export const INDEX_EXTENSION = '.blkidx';

/** Permission bits of the cache directory and of the indexes in it. */
export const CACHE_DIR_MODE = 0o700;
export const CACHE_FILE_MODE = 0o600;

const GROUP_OTHER_WRITE = 0o022;
const STICKY = 0o1000;

/** The cache directory; XDG says a relative $XDG_CACHE_HOME is to be ignored. */
export function cacheDir(env: NodeJS.ProcessEnv = process.env): string {
  const xdg = env.XDG_CACHE_HOME;
  if (xdg !== undefined && xdg !== '' && isAbsolute(xdg)) return join(xdg, 'blksync');
  return join(
    env.HOME !== undefined && env.HOME !== '' ? env.HOME : homedir(),
    '.cache',
    'blksync',
  );
}

/** What to do about a cache directory that cannot be used, for messages. */
const ELSEWHERE =
  'set XDG_CACHE_HOME to a directory of your own (under sudo, sudo -H keeps root its own), or use --index FILE';

function cacheDirError(dir: string, err: unknown): BlksyncError {
  const code = isSystemError(err) ? err.code : undefined;
  const why =
    code === 'ENOTDIR' || code === 'EEXIST'
      ? 'a part of its path is a file, not a directory'
      : code === 'EACCES' || code === 'EPERM'
        ? 'permission denied'
        : code === 'EROFS'
          ? 'read-only file system'
          : String(isSystemError(err) ? err.message : err);
  return new BlksyncError(
    'ECACHE_DIR',
    `cannot use the cache directory ${dir}: ${why}${code !== undefined ? ` (${code})` : ''}; ${ELSEWHERE}`,
    { cause: err, path: dir, ...(isSystemError(err) ? { syscall: err.syscall } : {}) },
  );
}

/**
 * Refuses a cache directory someone else could plant indexes in (see the header). `uid` is
 * the user the indexes are for (the effective uid).
 */
export async function assertPrivateCacheDir(dir: string, uid: number): Promise<void> {
  let real: string;
  try {
    real = await realpath(dir);
  } catch (err) {
    throw cacheDirError(dir, err);
  }
  const unsafe = (why: string): never => {
    throw new BlksyncError(
      'ECACHE_UNSAFE',
      `the cache directory ${dir} ${why}: indexes planted there could make a copy skip blocks; ${ELSEWHERE}`,
      { path: dir },
    );
  };
  for (let p = real, top = true; ; top = false) {
    let st;
    try {
      st = await stat(p);
    } catch (err) {
      throw cacheDirError(dir, err);
    }
    const where = top ? '' : ` (through ${p})`;
    if (top && !st.isDirectory()) {
      throw new BlksyncError(
        'ECACHE_DIR',
        `the cache directory ${dir} is not a directory; ${ELSEWHERE}`,
        {
          path: dir,
        },
      );
    }
    if (st.uid !== uid && (top || st.uid !== 0)) {
      unsafe(`is owned by uid ${st.uid}, not by you (uid ${uid})${where}`);
    }
    if ((st.mode & GROUP_OTHER_WRITE) !== 0 && (top || (st.mode & STICKY) === 0)) {
      const mode = (st.mode & 0o7777).toString(8).padStart(4, '0');
      unsafe(
        top
          ? `may be written by others (mode ${mode}; chmod 700 ${dir} if it is yours)`
          : `may be swapped by others (mode ${mode}${where})`,
      );
    }
    const up = dirname(p);
    if (up === p) return;
    p = up;
  }
}

/**
 * Creates the cache directory (0700) if needed and refuses one others could write in.
 * `create: false` (a dry run, which writes nothing): a directory that does not exist is left
 * so, and named all the same (no index can be found in it).
 */
export async function ensureCacheDir(
  env: NodeJS.ProcessEnv = process.env,
  create = true,
): Promise<string> {
  const dir = cacheDir(env);
  try {
    if (create) await mkdir(dir, { recursive: true, mode: CACHE_DIR_MODE });
    else await stat(dir);
  } catch (err) {
    if (!create && isSystemError(err) && err.code === 'ENOENT') return dir;
    throw cacheDirError(dir, err);
  }
  const uid = process.geteuid?.();
  if (uid !== undefined) await assertPrivateCacheDir(dir, uid);
  return dir;
}

/** Where `--index auto` keeps the index of the target with this identity. */
export function cachedIndexPath(id: TargetIdentity, dir = cacheDir()): string {
  const name = sha256(Buffer.from(`${id.kind}\n${id.key}\n${id.size}`)).toString('hex');
  return join(dir, `${name.slice(0, 32)}${INDEX_EXTENSION}`);
}

/** The mode a new index file at `path` is created with: 0600 in the cache, else 0666 less the umask. */
export function indexFileMode(path: string, env: NodeJS.ProcessEnv = process.env): number {
  return resolve(dirname(path)) === resolve(cacheDir(env)) ? CACHE_FILE_MODE : 0o666;
}
