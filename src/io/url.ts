/** http(s) URLs as sources: recognised here, read by http-source.ts (loaded only for them). */

import { BlksyncError } from '../errors.js';

export function isUrl(s: string): boolean {
  return /^https?:\/\//i.test(s);
}

/** Throws a coded error for an http(s) URL that does not parse (`https://[::1`). */
export function checkUrl(s: string): void {
  if (!URL.canParse(s)) {
    throw new BlksyncError('ESRC_OPEN', `${s} is not a valid URL: check its host and brackets`, {
      path: s,
    });
  }
}

/**
 * True for a Content-Type that says the answer is a web page: a server's "not found" or login
 * page sent with 200. No disk image is served as HTML.
 */
export function isWebPage(contentType: string | undefined): boolean {
  return (
    contentType !== undefined && /^\s*(text\/html|application\/xhtml\+xml)\b/i.test(contentType)
  );
}
