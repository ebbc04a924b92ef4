/**
 * Is this a bmap at all? Web servers often answer 200 with an HTML page for a file they do not
 * have, so a bmap probed beside a URL is taken only when its content starts as a bmap does:
 * clearsigned (the signed text is checked later), or XML whose root element is <bmap>, after an
 * optional byte order mark, XML declaration, comments and white space. Only a sniff: the
 * parser validates the rest.
 */

import { CLEARSIGN_MARKER } from '../io/signature.js';

/** Bytes looked at: a bmap's root element comes after at most a declaration and a comment. */
const SNIFF_BYTES = 64 * 1024;

export function looksLikeBmap(bytes: Buffer): boolean {
  let text = bytes
    .subarray(0, SNIFF_BYTES)
    .toString('utf8')
    .replace(/^\uFEFF/, '');
  text = text.trimStart();
  if (text.startsWith(CLEARSIGN_MARKER)) return true;
  for (;;) {
    const m = /^(?:<\?xml[^>]*\?>|<!--[\s\S]*?-->)\s*/.exec(text);
    if (m === null) break;
    text = text.slice(m[0].length);
  }
  return /^<bmap[\s>/]/.test(text);
}
