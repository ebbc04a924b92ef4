/**
 * OpenPGP signatures of bmap files, checked with the system's GnuPG (`gpg` or `gpgv`), as
 * bmaptool checks them. Two forms:
 *
 *   detached     IMAGE.bmap + IMAGE.bmap.asc (then IMAGE.bmap.sig), found beside the bmap
 *                (for a URL: the same names at the server), or named with --bmap-sig
 *   clearsigned  the bmap itself is
 *                  -----BEGIN PGP SIGNED MESSAGE-----
 *                  Hash: SHA256
 *                  <blank line>
 *                  the bmap's XML, lines starting with "-" escaped as "- -"
 *                  -----BEGIN PGP SIGNATURE-----
 *                  ...
 *                  -----END PGP SIGNATURE-----
 *                and the XML inside is what gets parsed (even with --no-sig-verify, when the
 *                text is taken out here without GnuPG)
 *
 * GnuPG's machine-readable status lines (`--status-fd`) decide, never its exit status alone:
 * every signature must be GOODSIG with a VALIDSIG, and none BADSIG, ERRSIG, EXPSIG, EXPKEYSIG
 * or REVKEYSIG. Keys come from the user's keyring (`gpg`, like bmaptool's gpgme; `gpgv` and
 * its trustedkeys.kbx only when gpg is missing), or, with --keyring FILE, from that file alone
 * (imported into a temporary GNUPGHOME, so the user's keyring is neither used nor changed).
 * Trust levels are not consulted: a key in the keyring used is trusted, as with gpgv.
 * --fingerprint FPR also requires a signature by that key: its primary key's fingerprint or
 * the fingerprint of the (sub)key that made the signature, either one.
 *
 * Many web servers answer 200 with an HTML page for a file they do not have: a probed
 * IMAGE.bmap.asc / .sig URL whose answer is not an OpenPGP signature (neither the armor line
 * "-----BEGIN PGP SIGNATURE-----" nor a binary signature packet) counts as no signature, with a
 * warning, unless --fingerprint or --keyring demand one (ESIG_MISSING). Anything that looks
 * like a signature is checked, and a bad one is ESIG_INVALID.
 */

import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { BlksyncError, fromSystemError, isSystemError, type BlksyncWarning } from '../errors.js';
import { isUrl } from './url.js';

/** A clearsigned file starts with exactly this line. */
export const CLEARSIGN_MARKER = '-----BEGIN PGP SIGNED MESSAGE-----';
const SIGNATURE_BEGIN = '-----BEGIN PGP SIGNATURE-----';
const SIGNATURE_END = '-----END PGP SIGNATURE-----';
/** Largest detached signature read (a few signatures are under 10 KiB). */
export const MAX_SIGNATURE_BYTES = 1024 * 1024;
/** Time GnuPG gets to check a signature (it needs no network and no agent for this). */
export const GPG_TIMEOUT_MS = 60_000;

export interface SignatureOptions {
  /** A detached signature file or URL instead of looking for one. */
  bmapSig?: string | undefined;
  /** Do not verify signatures (a clearsigned bmap's text is still taken out). */
  noSigVerify?: boolean | undefined;
  /** Require a signature by this key (full fingerprint, spaces allowed). */
  fingerprint?: string | undefined;
  /** Take the keys from this file only (binary or armored export) instead of the user's keyring. */
  keyring?: string | undefined;
  signal?: AbortSignal | undefined;
  /** Seconds a web server may stay silent (signatures and bmaps at URLs; default DEFAULT_TIMEOUT_S). */
  timeout?: number | undefined;
  /** Told of what was worked around (a probed signature URL that answered something else). */
  onWarning?: ((warning: BlksyncWarning) => void) | undefined;
}

/** What was checked, for the copy's report. */
export interface SignatureReport {
  /** "clearsigned", or the detached signature's path or URL. */
  kind: 'clearsigned' | 'detached';
  path: string;
  /** Fingerprints of the primary keys of the keys that made the signatures. */
  fingerprints: string[];
  /** Fingerprints of the keys that made the signatures (a signing subkey's, or the primary's). */
  signingKeys: string[];
  /** The signers' user ids as GnuPG printed them. */
  signers: string[];
  /** Which program checked. */
  verifiedWith: 'gpg' | 'gpgv';
}

/** Fingerprint as GnuPG prints it in status lines: upper-case hex, no spaces. */
export function normalizeFingerprint(fpr: string): string {
  const f = fpr.replace(/\s+/g, '').replace(/^0x/i, '').toUpperCase();
  if (!/^(?:[0-9A-F]{40}|[0-9A-F]{64})$/.test(f)) {
    throw new BlksyncError(
      'EUSAGE',
      `--fingerprint "${fpr}" is not a full key fingerprint (40 hex digits, as \`gpg --fingerprint\` prints it); ` +
        'short and long key ids are not accepted because they can be forged',
    );
  }
  return f;
}

/** Names tried for a bmap's detached signature, in bmaptool's order. */
export function signatureCandidates(bmapPath: string): string[] {
  if (!isUrl(bmapPath)) return [`${bmapPath}.asc`, `${bmapPath}.sig`];
  // the extension goes on the URL's path, before its query string
  return ['.asc', '.sig'].map((ext) => {
    const u = new URL(bmapPath);
    u.pathname += ext;
    return u.href;
  });
}

async function readLocalSmall(path: string, what: string): Promise<Buffer | undefined> {
  try {
    const st = await stat(path);
    if (!st.isFile()) return undefined;
    if (st.size > MAX_SIGNATURE_BYTES) {
      throw new BlksyncError(
        'ESIG_INVALID',
        `${path} is ${st.size} bytes, too large for a ${what}`,
        { path },
      );
    }
    return await readFile(path);
  } catch (err) {
    if (isSystemError(err) && (err.code === 'ENOENT' || err.code === 'ENOTDIR')) return undefined;
    throw fromSystemError('EBMAP_OPEN', `cannot read ${what}`, path, err);
  }
}

/** A signature file's bytes, and for a URL the Content-Type its server gave. */
interface LoadedSignature {
  bytes: Buffer;
  contentType?: string | undefined;
}

async function loadSignature(
  path: string,
  options: SignatureOptions,
): Promise<LoadedSignature | undefined> {
  if (!isUrl(path)) {
    const bytes = await readLocalSmall(path, 'signature');
    return bytes === undefined ? undefined : { bytes };
  }
  // node:http and node:https load only for a URL (a local bmap starts ~10 ms sooner)
  const { httpFetchSmall } = await import('./http-source.js');
  return httpFetchSmall(path, MAX_SIGNATURE_BYTES, options);
}

/** OpenPGP packet tag of a signature packet (RFC 4880 section 4.3). */
const SIGNATURE_PACKET_TAG = 2;

/**
 * True when `bytes` can be an OpenPGP detached signature: ASCII armor whose first line is
 * "-----BEGIN PGP SIGNATURE-----", or a binary packet whose tag (old or new format header,
 * RFC 4880 section 4.2) is a signature packet's. Only a sniff: GnuPG does the checking.
 */
export function looksLikeSignature(bytes: Buffer): boolean {
  const text = bytes.subarray(0, 1024).toString('latin1');
  if (
    text
      .replace(/^\xEF\xBB\xBF/, '')
      .trimStart()
      .startsWith(SIGNATURE_BEGIN)
  )
    return true;
  const first = bytes[0];
  if (first === undefined || (first & 0x80) === 0) return false;
  const tag = (first & 0x40) !== 0 ? first & 0x3f : (first >> 2) & 0x0f;
  return tag === SIGNATURE_PACKET_TAG;
}

function notASignature(path: string, found: LoadedSignature): string {
  return (
    `${path} is not an OpenPGP signature` +
    (found.contentType !== undefined
      ? ` (the server answered ${JSON.stringify(found.contentType)}, likely a "not found" page)`
      : '')
  );
}

/** True when `bytes` is a clearsigned message. */
export function isClearsigned(bytes: Buffer): boolean {
  return bytes.subarray(0, CLEARSIGN_MARKER.length).toString('latin1') === CLEARSIGN_MARKER;
}

/**
 * The signed text of a clearsigned message (RFC 4880 section 7), without checking the
 * signature: the armor headers are skipped, dash-escaping undone, and the line break before
 * the signature block is not part of the text. Anything but blank lines after the signature
 * block is refused, so no unsigned text can ride along.
 */
export function clearsignedText(bytes: Buffer, where: string): Buffer {
  const bad = (why: string): BlksyncError =>
    new BlksyncError('ESIG_INVALID', `${where}: not a well-formed clearsigned bmap: ${why}`, {
      path: where,
    });
  const text = bytes.toString('utf8');
  const lines = text.split('\n');
  if (lines[0]?.replace(/\r$/, '') !== CLEARSIGN_MARKER) throw bad('no BEGIN line');
  let i = 1;
  // armor headers ("Hash: SHA256") up to the first blank line
  while (i < lines.length && lines[i]!.replace(/\r$/, '').trim() !== '') i++;
  if (i >= lines.length) throw bad('no blank line after the armor headers');
  i++;
  const body: string[] = [];
  for (; i < lines.length; i++) {
    const line = lines[i]!;
    if (line.replace(/\r$/, '') === SIGNATURE_BEGIN) break;
    body.push(line.startsWith('- ') ? line.slice(2) : line);
  }
  if (i >= lines.length) throw bad(`no ${SIGNATURE_BEGIN} line`);
  let end = i + 1;
  while (end < lines.length && lines[end]!.replace(/\r$/, '') !== SIGNATURE_END) end++;
  if (end >= lines.length) throw bad(`no ${SIGNATURE_END} line`);
  for (const rest of lines.slice(end + 1)) {
    if (rest.trim() !== '') throw bad('text follows the signature');
  }
  // RFC 4880 makes the line break before the signature block part of the armor, but gpg
  // --verify --output (what bmaptool parses) ends every line with one: do as gpg does, so a
  // clearsigned bmap's self-checksum holds
  return Buffer.from(body.map((l) => `${l}\n`).join(''), 'utf8');
}

/** Result of one GnuPG run over the status lines. */
interface GpgOutcome {
  code: number | null;
  status: string;
  stderr: string;
}

function runGpg(
  program: string,
  args: string[],
  env: NodeJS.ProcessEnv,
  signal: AbortSignal | undefined,
): Promise<GpgOutcome | undefined> {
  return new Promise((resolveRun, reject) => {
    const child = spawn(program, args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env,
      ...(signal !== undefined ? { signal } : {}),
    });
    // not spawn's own `timeout`: its timer outlives a program that could not be started
    const timer = setTimeout(() => child.kill('SIGKILL'), GPG_TIMEOUT_MS);
    child.on('close', () => clearTimeout(timer));
    child.on('error', () => clearTimeout(timer));
    let status = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (status += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', (err) => {
      if (isSystemError(err) && err.code === 'ENOENT') resolveRun(undefined);
      else if (signal?.aborted === true) {
        reject(new BlksyncError('EINTERRUPTED', 'interrupted while checking the bmap signature'));
      } else reject(new BlksyncError('ESIG_UNAVAILABLE', `cannot run ${program}: ${err.message}`));
    });
    child.on('close', (code) => resolveRun({ code, status, stderr }));
  });
}

interface Verdict {
  fingerprints: string[];
  signingKeys: string[];
  signers: string[];
}

/** Reads GnuPG's status lines: throws unless every signature is good. */
function judge(outcome: GpgOutcome, where: string, program: string): Verdict {
  const lines = outcome.status
    .split('\n')
    .filter((l) => l.startsWith('[GNUPG:] '))
    .map((l) => l.slice('[GNUPG:] '.length).trim().split(' '));
  const of = (kw: string): string[][] => lines.filter((l) => l[0] === kw);
  const invalid = (why: string): BlksyncError =>
    new BlksyncError(
      'ESIG_INVALID',
      `${where}: ${why}; nothing was written. Get the bmap and its signature again, or, if you trust ` +
        'the bmap anyway, pass --no-sig-verify',
      { path: where },
    );
  const bad = of('BADSIG');
  if (bad.length > 0) {
    throw invalid(
      `BAD signature from ${bad[0]!.slice(2).join(' ')} (key ${bad[0]![1]}): the bmap or its signature was changed after signing`,
    );
  }
  for (const kw of ['EXPKEYSIG', 'REVKEYSIG', 'EXPSIG']) {
    const l = of(kw)[0];
    if (l !== undefined) {
      const what =
        kw === 'REVKEYSIG'
          ? 'the key was revoked'
          : kw === 'EXPKEYSIG'
            ? 'the key has expired'
            : 'the signature has expired';
      throw invalid(`signature by ${l.slice(2).join(' ')} (key ${l[1]}) is not valid: ${what}`);
    }
  }
  const errsig = of('ERRSIG')[0];
  if (errsig !== undefined) {
    const key = errsig[7] ?? errsig[1] ?? '?';
    if (errsig[6] === '9' || of('NO_PUBKEY').length > 0) {
      throw new BlksyncError(
        'ESIG_UNKNOWN_KEY',
        `${where}: signed by key ${key}, which is not in the keyring ${program} used; import the ` +
          "signer's public key (gpg --import KEYFILE), or name a keyring holding it with --keyring FILE, " +
          'or pass --no-sig-verify to copy without checking',
        { path: where },
      );
    }
    throw invalid(`the signature by key ${key} cannot be checked (${program} error ${errsig[6]})`);
  }
  const good = of('GOODSIG');
  const valid = of('VALIDSIG');
  const sigs = of('NEWSIG').length;
  if (good.length === 0 || valid.length !== good.length || (sigs > 0 && good.length !== sigs)) {
    // gpg's first line names the fault ("no valid OpenPGP data found."); its last lines are
    // advice about the order of its own arguments, which misleads here
    const why = outcome.stderr
      .trim()
      .split('\n')[0]!
      .replace(/^[a-z]+: /, '');
    throw invalid(`no good signature (${program}: ${why || `exit status ${outcome.code}`})`);
  }
  if (outcome.code !== 0) throw invalid(`${program} exited with status ${outcome.code}`);
  return {
    // VALIDSIG's last field is the primary key's fingerprint (gpg 2.x), its first the signing key's
    fingerprints: valid.map((l) => (l.length >= 11 ? l[10]! : l[1]!).toUpperCase()),
    signingKeys: valid.map((l) => l[1]!.toUpperCase()),
    signers: good.map((l) => l.slice(2).join(' ')),
  };
}

/**
 * Runs GnuPG over `files` in a temporary directory: `gpg` with the user's keyring (or with
 * `keyring` imported into a temporary GNUPGHOME), `gpgv` when gpg is missing.
 */
async function verifyWithGnupg(
  files: { signature?: Buffer; data: Buffer },
  where: string,
  options: SignatureOptions,
): Promise<Verdict & { verifiedWith: 'gpg' | 'gpgv'; output: Buffer | undefined }> {
  const dir = await mkdtemp(join(tmpdir(), 'blksync-sig-'));
  try {
    const data = join(dir, 'bmap');
    const out = join(dir, 'out');
    await writeFile(data, files.data);
    const inputs = [data];
    if (files.signature !== undefined) {
      const sig = join(dir, 'sig');
      await writeFile(sig, files.signature);
      inputs.unshift(sig);
    }
    const env = { ...process.env, LC_ALL: 'C' };
    const common = ['--status-fd', '1', '--output', out];
    const keyring = options.keyring !== undefined ? resolve(options.keyring) : undefined;
    const gpgArgs = [
      '--batch',
      '--no-tty',
      '--no-auto-key-retrieve',
      '--no-auto-check-trustdb',
      '--yes',
    ];
    let outcome: GpgOutcome | undefined;
    let program: 'gpg' | 'gpgv' = 'gpg';
    if (keyring !== undefined) {
      await stat(keyring).catch((err: unknown) => {
        throw fromSystemError('EUSAGE', 'cannot read keyring', keyring, err);
      });
      const home = join(dir, 'gnupg');
      await mkdir(home, { mode: 0o700 });
      const imported = await runGpg(
        'gpg',
        ['--homedir', home, ...gpgArgs, '--import', keyring],
        env,
        options.signal,
      );
      if (imported !== undefined) {
        if (imported.code !== 0) {
          throw new BlksyncError(
            'EUSAGE',
            `--keyring ${keyring}: gpg cannot import keys from it (${imported.stderr.trim().split('\n').pop() ?? ''})`,
          );
        }
        outcome = await runGpg(
          'gpg',
          [
            '--homedir',
            home,
            ...gpgArgs,
            '--trust-model',
            'always',
            ...common,
            '--verify',
            ...inputs,
          ],
          env,
          options.signal,
        );
      } else {
        program = 'gpgv';
        // gpgv reads binary keyrings only (gpg --export, not --export --armor)
        outcome = await runGpg(
          'gpgv',
          ['--keyring', keyring, ...common, ...inputs],
          env,
          options.signal,
        );
      }
    } else {
      outcome = await runGpg(
        'gpg',
        [...gpgArgs, ...common, '--verify', ...inputs],
        env,
        options.signal,
      );
      if (outcome === undefined) {
        program = 'gpgv';
        outcome = await runGpg('gpgv', [...common, ...inputs], env, options.signal);
      }
    }
    if (outcome === undefined) {
      throw new BlksyncError(
        'ESIG_UNAVAILABLE',
        `the bmap is signed (${where}) but neither gpg nor gpgv is installed to check the signature; install ` +
          'one (apt-get install gpgv, or gnupg) or pass --no-sig-verify to copy without checking',
        { path: where },
      );
    }
    const verdict = judge(outcome, where, program);
    const output =
      files.signature === undefined ? await readFile(out).catch(() => undefined) : undefined;
    return { ...verdict, verifiedWith: program, output };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * Checks the signature of the bmap at `bmapPath` whose bytes are `bytes`, before anything is
 * opened for writing. Returns the bmap's XML (the signed text of a clearsigned bmap, else
 * `bytes`) and what was verified (undefined: no signature, or --no-sig-verify).
 */
export async function verifyBmapSignature(
  bytes: Buffer,
  bmapPath: string,
  options: SignatureOptions,
): Promise<{ content: Buffer; signature: SignatureReport | undefined }> {
  const skip = options.noSigVerify === true;
  if (skip && options.bmapSig !== undefined) {
    throw new BlksyncError('EUSAGE', '--bmap-sig and --no-sig-verify cannot be used together');
  }
  if (skip && (options.fingerprint !== undefined || options.keyring !== undefined)) {
    throw new BlksyncError(
      'EUSAGE',
      '--no-sig-verify cannot be used with --fingerprint or --keyring',
    );
  }
  const wanted =
    options.fingerprint !== undefined ? normalizeFingerprint(options.fingerprint) : undefined;

  let signature: Buffer | undefined;
  let sigPath: string;
  const clearsigned = isClearsigned(bytes);
  if (clearsigned) {
    if (options.bmapSig !== undefined) {
      throw new BlksyncError(
        'EUSAGE',
        `${bmapPath} is clearsigned and carries its own signature; drop --bmap-sig`,
      );
    }
    const text = clearsignedText(bytes, bmapPath);
    if (skip) return { content: text, signature: undefined };
    sigPath = bmapPath;
  } else {
    if (skip) return { content: bytes, signature: undefined };
    if (options.bmapSig !== undefined) {
      const found = await loadSignature(options.bmapSig, options);
      if (found === undefined) {
        throw new BlksyncError('EUSAGE', `signature ${options.bmapSig} does not exist`, {
          path: options.bmapSig,
        });
      }
      if (!looksLikeSignature(found.bytes)) {
        throw new BlksyncError(
          'ESIG_INVALID',
          `${notASignature(options.bmapSig, found)}; nothing was written. Check the --bmap-sig you gave`,
          { path: options.bmapSig },
        );
      }
      signature = found.bytes;
      sigPath = options.bmapSig;
    } else {
      sigPath = '';
      // URLs answered with something else (a server's "not found" page): no signature there
      const notSignatures: string[] = [];
      for (const candidate of signatureCandidates(bmapPath)) {
        const found = await loadSignature(candidate, options);
        if (found === undefined) continue;
        if (isUrl(candidate) && !looksLikeSignature(found.bytes)) {
          notSignatures.push(notASignature(candidate, found));
          continue;
        }
        signature = found.bytes;
        sigPath = candidate;
        break;
      }
      if (signature === undefined) {
        if (wanted !== undefined || options.keyring !== undefined) {
          throw new BlksyncError(
            'ESIG_MISSING',
            `--${wanted !== undefined ? 'fingerprint' : 'keyring'} was given but ${bmapPath} is not signed ` +
              `(no ${signatureCandidates(bmapPath).join(' or ')}, and it is not clearsigned` +
              (notSignatures.length > 0 ? `; ${notSignatures.join('; ')}` : '') +
              '); nothing was written. Name the signature with --bmap-sig',
            { path: bmapPath },
          );
        }
        for (const message of notSignatures) {
          options.onWarning?.({
            code: 'WPROBE_NOT_FOUND',
            message: `${message}; taken as no signature, the bmap is used unsigned`,
            path: bmapPath,
          });
        }
        return { content: bytes, signature: undefined };
      }
    }
  }

  const verdict = await verifyWithGnupg(
    { ...(signature !== undefined ? { signature } : {}), data: bytes },
    sigPath,
    options,
  );
  if (
    wanted !== undefined &&
    !verdict.fingerprints.includes(wanted) &&
    !verdict.signingKeys.includes(wanted)
  ) {
    const keys = verdict.fingerprints.map((primary, i) => {
      const signing = verdict.signingKeys[i];
      return signing !== undefined && signing !== primary
        ? `${primary} (signing subkey ${signing})`
        : primary;
    });
    throw new BlksyncError(
      'ESIG_INVALID',
      `${sigPath}: the signature is good but was made by ${keys.join(', ')} ` +
        `(${verdict.signers.join(', ')}), not by the key --fingerprint ${wanted} asks for; nothing was written`,
      { path: sigPath },
    );
  }
  let content = bytes;
  if (clearsigned) {
    // the text gpg vouched for must be the text parsed here: no unsigned text rides along
    content = clearsignedText(bytes, bmapPath);
    if (verdict.output?.equals(content) !== true) {
      throw new BlksyncError(
        'ESIG_INVALID',
        `${bmapPath}: the signed text ${verdict.verifiedWith} checked differs from the bmap's text; refusing it`,
        { path: bmapPath },
      );
    }
  }
  return {
    content,
    signature: {
      kind: clearsigned ? 'clearsigned' : 'detached',
      path: sigPath,
      fingerprints: verdict.fingerprints,
      signingKeys: verdict.signingKeys,
      signers: verdict.signers,
      verifiedWith: verdict.verifiedWith,
    },
  };
}
