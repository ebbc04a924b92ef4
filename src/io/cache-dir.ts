/**
 * blksync's cache directory ($XDG_CACHE_HOME/blksync, else ~/.cache/blksync), where
 * `--index auto` keeps one index per destination, named by a hash of its identity.
 */

import { mkdir } from 'node:fs/promises';
import { homedir } from 'node:os';
import { isAbsolute, join } from 'node:path';
import { sha256 } from '../hash.js';
import type { TargetIdentity } from './identity.js';

/** File name extension of index files. */
export const INDEX_EXTENSION = '.blkidx';

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

/** Creates the cache directory (private: indexes name the user's disks). */
export async function ensureCacheDir(env: NodeJS.ProcessEnv = process.env): Promise<string> {
  const dir = cacheDir(env);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  return dir;
}

/** Where `--index auto` keeps the index of the target with this identity. */
export function cachedIndexPath(id: TargetIdentity, dir = cacheDir()): string {
  const name = sha256(Buffer.from(`${id.kind}\n${id.key}\n${id.size}`)).toString('hex');
  return join(dir, `${name.slice(0, 32)}${INDEX_EXTENSION}`);
}
