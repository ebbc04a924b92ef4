/**
 * http:// and https:// images and bmaps, with node:http and node:https (undici 8 needs
 * Node 22; one GET per file needs nothing more). Redirects are followed, a status other than
 * 2xx is an ESRC_HTTP error naming it, and a body cut short (a dropped connection, fewer
 * bytes than Content-Length) is ESRC_SHORT, never a silently short image.
 */

import { get as httpGet, type IncomingMessage } from 'node:http';
import { get as httpsGet } from 'node:https';
import { PassThrough, type Readable } from 'node:stream';
import { BlksyncError } from '../errors.js';

/** Redirects followed before giving up. */
export const MAX_REDIRECTS = 10;
/** Time allowed for a server to answer or to send the next bytes. */
export const HTTP_TIMEOUT_MS = 60_000;

export { isUrl } from './url.js';

export interface HttpResponse {
  /** The URL that answered, after redirects. */
  url: string;
  status: number;
  /** Content-Length, when the server sent one. */
  length: number | undefined;
  body: IncomingMessage;
}

function request(url: string, signal: AbortSignal | undefined): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    const get = url.toLowerCase().startsWith('https:') ? httpsGet : httpGet;
    const req = get(
      url,
      { signal, timeout: HTTP_TIMEOUT_MS, headers: { 'accept-encoding': 'identity' } },
      resolve,
    );
    req.on('timeout', () => req.destroy(new Error(`no answer in ${HTTP_TIMEOUT_MS / 1000} s`)));
    req.on('error', (err) =>
      reject(
        new BlksyncError('ESRC_HTTP', `cannot get ${url}: ${err.message}`, {
          path: url,
          cause: err,
        }),
      ),
    );
  });
}

/** GETs `url`, following redirects; resolves with the final response whatever its status. */
export async function httpOpen(url: string, signal?: AbortSignal): Promise<HttpResponse> {
  let current = url;
  for (let i = 0; ; i++) {
    const res = await request(current, signal);
    const status = res.statusCode ?? 0;
    const location = res.headers.location;
    if ([301, 302, 303, 307, 308].includes(status) && location !== undefined) {
      res.resume();
      if (i >= MAX_REDIRECTS) {
        throw new BlksyncError('ESRC_HTTP', `${url}: more than ${MAX_REDIRECTS} redirects`, {
          path: url,
        });
      }
      current = new URL(location, current).href;
      continue;
    }
    const len = res.headers['content-length'];
    const length = len !== undefined && /^\d+$/.test(len) ? Number(len) : undefined;
    return { url: current, status, length, body: res };
  }
}

function statusError(url: string, res: HttpResponse): BlksyncError {
  return new BlksyncError(
    'ESRC_HTTP',
    `${url}: HTTP ${res.status} ${res.body.statusMessage ?? ''}`.trimEnd() +
      (res.status === 404 ? ' (check the URL)' : ''),
    { path: url },
  );
}

/** GETs `url` and fails unless the answer is 2xx. */
export async function httpOpenOk(url: string, signal?: AbortSignal): Promise<HttpResponse> {
  const res = await httpOpen(url, signal);
  if (res.status < 200 || res.status > 299) {
    res.body.resume();
    throw statusError(url, res);
  }
  return res;
}

/**
 * The body of a small file (a bmap), at most `maxBytes`; undefined when the server says it
 * does not exist (404, 410), so that bmap discovery can try the next name.
 */
export async function httpFetchSmall(
  url: string,
  maxBytes: number,
  signal?: AbortSignal,
): Promise<Buffer | undefined> {
  const res = await httpOpen(url, signal);
  if (res.status === 404 || res.status === 410) {
    res.body.resume();
    return undefined;
  }
  if (res.status < 200 || res.status > 299) {
    res.body.resume();
    throw statusError(url, res);
  }
  if (res.length !== undefined && res.length > maxBytes) {
    res.body.destroy();
    throw new BlksyncError('EBMAP_FORMAT', `${url} is ${res.length} bytes, more than ${maxBytes}`, {
      path: url,
    });
  }
  const parts: Buffer[] = [];
  let n = 0;
  try {
    for await (const chunk of res.body) {
      n += (chunk as Buffer).length;
      if (n > maxBytes) {
        res.body.destroy();
        throw new BlksyncError('EBMAP_FORMAT', `${url} is larger than ${maxBytes} bytes`, {
          path: url,
        });
      }
      parts.push(chunk as Buffer);
    }
  } catch (err) {
    if (err instanceof BlksyncError) throw err;
    throw cutShort(url, n, res.length, err);
  }
  if (res.length !== undefined && n < res.length) throw cutShort(url, n, res.length);
  return Buffer.concat(parts);
}

function cutShort(
  url: string,
  got: number,
  length: number | undefined,
  cause?: unknown,
): BlksyncError {
  return new BlksyncError(
    'ESRC_SHORT',
    `${url}: the connection ended after ${got} bytes` +
      (length !== undefined ? ` of ${length}` : '') +
      '; rerun to try again',
    { path: url, cause },
  );
}

/**
 * The response body as a stream whose errors are BlksyncErrors: a connection cut mid-body
 * becomes ESRC_SHORT with the byte count.
 */
export function bodyStream(res: HttpResponse): Readable {
  const out = new PassThrough({ highWaterMark: 1024 * 1024 });
  out.on('error', () => {}); // kept by the stream for its reader (see decompress.ts)
  let got = 0;
  let failed = false;
  const fail = (err?: unknown): void => {
    if (failed) return;
    failed = true;
    out.destroy(cutShort(res.url, got, res.length, err));
  };
  res.body.on('data', (c: Buffer) => (got += c.length));
  res.body.on('aborted', () => fail());
  res.body.on('error', (err) => fail(err));
  res.body.on('end', () => {
    if (res.length !== undefined && got < res.length) fail();
  });
  res.body.pipe(out);
  // a copy that needs no more (a bmap's last range is in) closes the stream: drop the
  // connection rather than leave it open, which would keep the process alive
  out.on('close', () => res.body.destroy());
  return out;
}
