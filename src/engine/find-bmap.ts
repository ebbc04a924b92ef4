/**
 * Which bmap a copy uses, and whether it may: `--bmap FILE|URL`, or the one found beside SRC
 * as bmaptool finds it (SRC.bmap, then one extension stripped at a time: x.img.xz →
 * x.img.xz.bmap, x.img.bmap, x.bmap), or none (`--no-bmap`, stdin). A bmap found is checked
 * against its signature before anything is written, then parsed.
 */

import { readFile, stat } from 'node:fs/promises';
import { basename, extname } from 'node:path';
import { BlksyncError, fromSystemError, isSystemError } from '../errors.js';
import type { Bmap } from '../formats/bmap.js';
import type { SignatureOptions, SignatureReport } from '../io/signature.js';
import { isUrl } from '../io/url.js';

/** The options that decide the bmap: which one, its signature's, and the signal. */
export interface BmapOptions extends SignatureOptions {
  /** A bmap file or URL to use instead of looking for one. */
  bmap?: string | undefined;
  /** Copy the whole image even when a bmap is found. */
  noBmap?: boolean | undefined;
  signal?: AbortSignal | undefined;
  /** Called as soon as a bmap's bytes are read, before its signature is checked and it is parsed. */
  onBmapFound?: (() => void) | undefined;
}

/** A found bmap: its path, its parsed content and its checked signature. */
export interface FoundBmap {
  path: string;
  bmap: Bmap;
  signature: SignatureReport | undefined;
}

/** The names bmaptool tries for IMAGE's bmap, in order. */
export function bmapCandidates(image: string): string[] {
  const out: string[] = [];
  // for a URL, only the path's last component loses extensions; the query is dropped
  let base = image;
  let suffix = '';
  if (isUrl(image)) {
    const u = new URL(image);
    suffix = u.search;
    u.search = '';
    u.hash = '';
    base = u.href;
  }
  for (;;) {
    out.push(`${base}.bmap${suffix}`);
    const name = basename(base);
    const ext = extname(name);
    if (ext === '') return out;
    base = base.slice(0, base.length - ext.length);
  }
}

async function readLocalBmap(path: string): Promise<Buffer | undefined> {
  let size: number;
  try {
    const st = await stat(path);
    if (!st.isFile()) return undefined;
    size = st.size;
  } catch (err) {
    if (isSystemError(err) && (err.code === 'ENOENT' || err.code === 'ENOTDIR')) return undefined;
    throw fromSystemError('EBMAP_OPEN', 'cannot open bmap', path, err);
  }
  const { MAX_BMAP_BYTES } = await import('../formats/bmap.js');
  if (size > MAX_BMAP_BYTES) {
    throw new BlksyncError('EBMAP_FORMAT', `${path} is ${size} bytes, more than a bmap can be`, {
      path,
    });
  }
  try {
    return await readFile(path);
  } catch (err) {
    throw fromSystemError('EBMAP_OPEN', 'cannot read bmap', path, err);
  }
}

/**
 * A bmap's bytes (undefined: there is none). A `probe` beside a URL whose answer is not a bmap
 * (a server's "not found" page sent with 200) counts as none, and is pushed on `notBmaps`.
 */
async function loadBmapBytes(
  path: string,
  options: BmapOptions,
  notBmaps?: string[],
): Promise<Buffer | undefined> {
  let bytes: Buffer | undefined;
  if (isUrl(path)) {
    const [{ httpFetchSmall }, { MAX_BMAP_BYTES }, { looksLikeBmap }] = await Promise.all([
      import('../io/http-source.js'),
      import('../formats/bmap.js'),
      import('../formats/bmap-sniff.js'),
    ]);
    const got = await httpFetchSmall(path, MAX_BMAP_BYTES, options);
    if (got !== undefined && notBmaps !== undefined && !looksLikeBmap(got.bytes)) {
      notBmaps.push(`${path} (${got.contentType ?? 'no Content-Type'})`);
      return undefined;
    }
    bytes = got?.bytes;
  } else {
    bytes = await readLocalBmap(path);
  }
  if (bytes !== undefined) options.onBmapFound?.();
  return bytes;
}

/** A found bmap: checks its signature (before anything is written), then parses it. */
async function signedBmap(path: string, bytes: Buffer, options: BmapOptions): Promise<FoundBmap> {
  const [{ verifyBmapSignature }, { parseBmap }] = await Promise.all([
    import('../io/signature.js'),
    import('../formats/bmap.js'),
  ]);
  const { content, signature } = await verifyBmapSignature(bytes, path, options);
  return { path, bmap: parseBmap(content, { path }), signature };
}

/** Finds, checks and parses the bmap for `src` (undefined: none, or --no-bmap). */
export async function findBmap(src: string, options: BmapOptions): Promise<FoundBmap | undefined> {
  if (options.noBmap === true) {
    if (options.bmap !== undefined) {
      throw new BlksyncError('EUSAGE', '--bmap and --no-bmap cannot be used together');
    }
    return noBmapFound(options);
  }
  if (options.bmap !== undefined) {
    const bytes = await loadBmapBytes(options.bmap, options);
    if (bytes === undefined) {
      throw new BlksyncError('EBMAP_OPEN', `bmap ${options.bmap} does not exist`, {
        path: options.bmap,
      });
    }
    return signedBmap(options.bmap, bytes, options);
  }
  if (src === '-') return noBmapFound(options);
  const notBmaps: string[] = [];
  for (const candidate of bmapCandidates(src)) {
    if (candidate === src) continue;
    const bytes = await loadBmapBytes(candidate, options, notBmaps);
    if (bytes !== undefined) return signedBmap(candidate, bytes, options);
  }
  if (notBmaps.length > 0) {
    options.onWarning?.({
      code: 'WPROBE_NOT_FOUND',
      message: `no bmap used: the server answered ${notBmaps.join(', ')} with something that is not a bmap (likely a "not found" page)`,
      path: src,
    });
  }
  return noBmapFound(options);
}

/** The signature options given, as their flags (for refusals that name them). */
export function signatureFlagsGiven(options: SignatureOptions): string[] {
  return [
    options.bmapSig !== undefined ? '--bmap-sig' : undefined,
    options.fingerprint !== undefined ? '--fingerprint' : undefined,
    options.keyring !== undefined ? '--keyring' : undefined,
  ].filter((o) => o !== undefined);
}

/** Signature options need a bmap to apply to. */
function noBmapFound(options: BmapOptions): undefined {
  const given = signatureFlagsGiven(options);
  if (given.length > 0) {
    throw new BlksyncError(
      'EUSAGE',
      `${given.join(' and ')} apply to a bmap's signature, but no bmap is used (give one with --bmap FILE)`,
    );
  }
  return undefined;
}
