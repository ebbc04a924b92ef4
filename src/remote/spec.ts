/**
 * Telling remote endpoints from local paths, by rsync's rule: `[user@]host:path` is remote
 * when a colon comes before the first slash, so `./a:b` and `/mnt/a:b` stay local.
 * `[v6addr]:path` brackets an IPv6 address; `scheme://...` is a URL, not a remote.
 * A host, user or path starting with `-` is refused here, when the arguments are parsed and
 * before any ssh starts: ssh would read such a destination as one of its options
 * (`-oProxyCommand=...`), wherever it stood on blksync's command line (also after `--`).
 */

import { BlksyncError } from '../errors.js';

export interface RemoteSpec {
  /** What ssh is given as its destination: `host` or `user@host`. */
  destination: string;
  /** The path on the remote, as typed (relative paths start in the remote home). */
  path: string;
}

/**
 * Parses `[user@]host:path`; undefined when `arg` names a local path. Throws EUSAGE for a
 * host, user or path that starts with `-` (see above).
 */
export function parseRemote(arg: string): RemoteSpec | undefined {
  // scheme://... is a URL (http source, or rsync's own rsync://), never an ssh end
  if (/^[A-Za-z][A-Za-z0-9+.-]*:\/\//.test(arg)) return undefined;
  let hostEnd: number;
  if (arg.startsWith('[') || /^[^/[]*@\[/.test(arg)) {
    const close = arg.indexOf(']');
    if (close < 0 || arg[close + 1] !== ':') return undefined;
    hostEnd = close + 1;
  } else {
    hostEnd = arg.indexOf(':');
    const slash = arg.indexOf('/');
    if (hostEnd < 0 || (slash >= 0 && slash < hostEnd)) return undefined;
  }
  // ":path" has no host: local, as rsync treats it
  if (hostEnd === 0) return undefined;
  let destination = arg.slice(0, hostEnd);
  // ssh takes [v6addr] without brackets
  destination = destination.replace(/\[([^\]]*)\]$/, '$1');
  const path = arg.slice(hostEnd + 1);
  refuseOptionLike(arg, destination, path);
  return { destination, path };
}

/** A destination or path ssh (or a remote command) could take for an option: EUSAGE. */
function refuseOptionLike(arg: string, destination: string, path: string): void {
  const at = destination.lastIndexOf('@');
  const host = destination.slice(at + 1);
  const user = at >= 0 ? destination.slice(0, at) : '';
  if (destination.startsWith('-') || host.startsWith('-') || user.startsWith('-')) {
    throw new BlksyncError(
      'EUSAGE',
      `"${arg}": a host or user starting with "-" would be read by ssh as an option; name the host plainly (an alias in ~/.ssh/config)`,
    );
  }
  if (path.startsWith('-')) {
    throw new BlksyncError(
      'EUSAGE',
      `"${arg}": a remote path starting with "-" is refused; write ${destination}:./${path}`,
    );
  }
}

/** True when `arg` is `[user@]host:path`. */
export function isRemote(arg: string): boolean {
  return parseRemote(arg) !== undefined;
}

/** Splits an ssh command line as a POSIX shell would split words (quotes and backslashes). */
export function splitCommand(text: string): string[] {
  const words: string[] = [];
  let word = '';
  let inWord = false;
  let quote: '"' | "'" | undefined;
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (quote === "'") {
      if (c === "'") quote = undefined;
      else word += c;
    } else if (quote === '"') {
      if (c === '"') quote = undefined;
      else if (c === '\\' && i + 1 < text.length && '"\\$`'.includes(text[i + 1]!))
        word += text[++i];
      else word += c;
    } else if (c === "'" || c === '"') {
      quote = c;
      inWord = true;
    } else if (c === '\\' && i + 1 < text.length) {
      word += text[++i];
      inWord = true;
    } else if (/\s/.test(c)) {
      if (inWord) words.push(word);
      word = '';
      inWord = false;
    } else {
      word += c;
      inWord = true;
    }
  }
  if (inWord) words.push(word);
  return words;
}

/** Quotes one word for a POSIX shell (ssh hands the remote command to the login shell). */
export function shellQuote(word: string): string {
  return /^[A-Za-z0-9_./=:@%+-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}
