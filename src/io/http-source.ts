/**
 * http:// and https:// images, bmaps and signatures, with node:http and node:https (undici 8
 * needs Node 22; one GET per file needs nothing more). Web servers are untrusted peers:
 *
 * - redirects are followed to http: and https: only (anything else is ESRC_REDIRECT), never
 *   from https down to http (ESRC_DOWNGRADE: whoever sits on the path could then change the
 *   image), and at most MAX_REDIRECTS times;
 * - silence ends at `timeout` seconds of idle time (ETIMEOUT): waiting for an answer's headers,
 *   and waiting for the next bytes of a body while its reader wants them (a body paused because
 *   DST is slow to write is not the server's silence, so the clock stops then);
 * - a status other than 200 (or 203) is an ESRC_HTTP error naming it — a 204, 205 or 206
 *   answered to a GET of the whole file included —, and a body cut short (a dropped
 *   connection, fewer bytes than Content-Length) is ESRC_SHORT, never a silently short image.
 */

import { get as httpGet, type IncomingMessage } from 'node:http';
import { get as httpsGet } from 'node:https';
import { PassThrough, type Readable } from 'node:stream';
import { BlksyncError } from '../errors.js';
import { timeoutMs } from '../limits.js';

/** Redirects followed before giving up. */
export const MAX_REDIRECTS = 10;

export { isUrl } from './url.js';

export interface HttpOptions {
  signal?: AbortSignal | undefined;
  /** Seconds the server may stay silent while an answer is due (default DEFAULT_TIMEOUT_S). */
  timeout?: number | undefined;
  /** Request headers added to the GET (Range, If-Range for the published-image delta). */
  headers?: Readonly<Record<string, string>> | undefined;
}

export interface HttpResponse {
  /** The URL that answered, after redirects. */
  url: string;
  status: number;
  /** Content-Length, when the server sent one. */
  length: number | undefined;
  body: IncomingMessage;
  /** Idle time allowed while reading the body, in milliseconds. */
  idleMs: number;
}

function seconds(ms: number): string {
  return `${ms / 1000} s`;
}

function request(
  url: string,
  idleMs: number,
  signal: AbortSignal | undefined,
  headers: Readonly<Record<string, string>> | undefined,
) {
  return new Promise<IncomingMessage>((resolve, reject) => {
    const get = url.toLowerCase().startsWith('https:') ? httpsGet : httpGet;
    // `timeout` is the socket's idle timeout: it covers connecting, TLS and the headers
    const req = get(
      url,
      { signal, timeout: idleMs, headers: { ...headers, 'accept-encoding': 'identity' } },
      (res) => {
        // from here bodyStream keeps the clock, stopped while the body is paused
        req.setTimeout(0);
        resolve(res);
      },
    );
    req.on('timeout', () =>
      req.destroy(
        new BlksyncError(
          'ETIMEOUT',
          `${url}: no answer from the server in ${seconds(idleMs)}; try again later, or wait longer with --timeout SECONDS`,
          { path: url },
        ),
      ),
    );
    req.on('error', (err) =>
      reject(
        err instanceof BlksyncError
          ? err
          : new BlksyncError('ESRC_HTTP', `cannot get ${url}: ${err.message}`, {
              path: url,
              cause: err,
            }),
      ),
    );
  });
}

/** Where a redirect from `from` to `location` leads, or why it is not followed. */
function redirectTarget(from: string, location: string): string {
  let next: URL;
  try {
    next = new URL(location, from);
  } catch (err) {
    throw new BlksyncError(
      'ESRC_REDIRECT',
      `${from} redirects to ${JSON.stringify(location)}, which is not a URL; ask the server's owner, or give the image's real URL`,
      { path: from, cause: err },
    );
  }
  if (next.protocol !== 'http:' && next.protocol !== 'https:') {
    throw new BlksyncError(
      'ESRC_REDIRECT',
      `${from} redirects to ${next.href}: blksync follows redirects to http: and https: only, not ${next.protocol}; ` +
        'fetch that location yourself if you trust it',
      { path: from },
    );
  }
  if (new URL(from).protocol === 'https:' && next.protocol === 'http:') {
    throw new BlksyncError(
      'ESRC_DOWNGRADE',
      `${from} redirects to ${next.href}: an https → http downgrade, after which anyone on the network path could ` +
        'change what is read; refused. If you trust the plain-http location, give that http:// URL itself',
      { path: from },
    );
  }
  return next.href;
}

/** GETs `url`, following redirects; resolves with the final response whatever its status. */
export async function httpOpen(url: string, options: HttpOptions = {}): Promise<HttpResponse> {
  const idleMs = timeoutMs(options.timeout);
  let current = url;
  for (let i = 0; ; i++) {
    const res = await request(current, idleMs, options.signal, options.headers);
    const status = res.statusCode ?? 0;
    const location = res.headers.location;
    if ([301, 302, 303, 307, 308].includes(status) && location !== undefined) {
      res.resume();
      if (i >= MAX_REDIRECTS) {
        throw new BlksyncError('ESRC_HTTP', `${url}: more than ${MAX_REDIRECTS} redirects`, {
          path: url,
        });
      }
      current = redirectTarget(current, location);
      continue;
    }
    const len = res.headers['content-length'];
    const length = len !== undefined && /^\d+$/.test(len) ? Number(len) : undefined;
    return { url: current, status, length, body: res, idleMs };
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

/**
 * Whether a success answers a GET of the whole file with the whole file: 200, or 203 (the
 * same through a transforming proxy). 204 and 205 carry no body, 206 a part of one (asked
 * for by nobody here), and the rest of 2xx no file at all: taken as the file, each would
 * be a short or empty image copied with exit 0. So would a 200 whose Content-Range names
 * a part of the file: only one naming all of it (bytes 0-(N-1)/N) is taken.
 */
function isWholeFile(res: HttpResponse): boolean {
  if (res.status !== 200 && res.status !== 203) return false;
  // a Content-Range on it names the part sent: the whole file, or it is a 206 in disguise
  const range = res.body.headers['content-range'];
  if (range === undefined) return true;
  const m = /^bytes 0-(\d+)\/(\d+)$/.exec(range.trim());
  return (
    m !== null &&
    Number(m[1]) + 1 === Number(m[2]) &&
    (res.length === undefined || res.length === Number(m[2]))
  );
}

/** The error for an answer that is not the whole file (see isWholeFile). */
function notWholeFile(url: string, res: HttpResponse): BlksyncError {
  if (res.status >= 200 && res.status <= 299) {
    const range = res.body.headers['content-range'];
    return new BlksyncError(
      'ESRC_HTTP',
      `${url}: HTTP ${res.status} ${res.body.statusMessage ?? ''}`.trimEnd() +
        (range !== undefined ? ` (Content-Range: ${range})` : '') +
        ' where the whole file was asked for; nothing was written: check the server (or a proxy on the way)',
      { path: url },
    );
  }
  return statusError(url, res);
}

/** GETs `url` and fails unless the answer is the whole file (200 or 203). */
export async function httpOpenOk(url: string, options: HttpOptions = {}): Promise<HttpResponse> {
  const res = await httpOpen(url, options);
  if (!isWholeFile(res)) {
    res.body.resume();
    throw notWholeFile(url, res);
  }
  return res;
}

/** A small file fetched whole: its bytes and the Content-Type the server gave. */
export interface SmallFile {
  bytes: Buffer;
  contentType: string | undefined;
}

/**
 * The body of a small file (a bmap, a signature), at most `maxBytes`; undefined when the
 * server says it does not exist (404, 410), so that discovery can try the next name.
 */
export async function httpFetchSmall(
  url: string,
  maxBytes: number,
  options: HttpOptions = {},
): Promise<SmallFile | undefined> {
  const res = await httpOpen(url, options);
  if (res.status === 404 || res.status === 410) {
    res.body.resume();
    return undefined;
  }
  if (!isWholeFile(res)) {
    res.body.resume();
    throw notWholeFile(url, res);
  }
  if (res.length !== undefined && res.length > maxBytes) {
    res.body.destroy();
    throw new BlksyncError('EBMAP_FORMAT', `${url} is ${res.length} bytes, more than ${maxBytes}`, {
      path: url,
    });
  }
  const body = bodyStream(res);
  const parts: Buffer[] = [];
  let n = 0;
  for await (const chunk of body) {
    n += (chunk as Buffer).length;
    if (n > maxBytes) {
      body.destroy();
      throw new BlksyncError('EBMAP_FORMAT', `${url} is larger than ${maxBytes} bytes`, {
        path: url,
      });
    }
    parts.push(chunk as Buffer);
  }
  return { bytes: Buffer.concat(parts), contentType: res.body.headers['content-type'] };
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

function stalled(url: string, got: number, length: number | undefined, idleMs: number) {
  return new BlksyncError(
    'ETIMEOUT',
    `${url}: the server sent nothing for ${seconds(idleMs)} after ${got} bytes` +
      (length !== undefined ? ` of ${length}` : '') +
      '; the transfer stalled. Rerun to try again, or allow longer silences with --timeout SECONDS',
    { path: url },
  );
}

/**
 * The response body as a stream whose errors are BlksyncErrors: a connection cut mid-body
 * becomes ESRC_SHORT with the byte count, a server silent for `idleMs` while the stream has
 * room for more becomes ETIMEOUT.
 */
export function bodyStream(res: HttpResponse): Readable {
  const out = new PassThrough({ highWaterMark: 1024 * 1024 });
  out.on('error', () => {}); // kept by the stream for its reader (see decompress.ts)
  let got = 0;
  let done = false;
  // the clock runs only while the body flows: paused (out full, its reader busy), the
  // server owes nothing
  let timer: NodeJS.Timeout | undefined;
  let flowing = false;
  const stopClock = (): void => {
    flowing = false;
    clearTimeout(timer);
    timer = undefined;
  };
  const expired = (): void => {
    timer = undefined;
    // after the event loop was held up (a busy or starved process), expired timers run before
    // the I/O that came meanwhile: judge once that I/O is read (it restarts the clock)
    setImmediate(() => {
      if (!done && flowing && timer === undefined) {
        fail(stalled(res.url, got, res.length, res.idleMs));
      }
    });
  };
  const restartClock = (): void => {
    flowing = true;
    if (timer !== undefined) timer.refresh();
    else timer = setTimeout(expired, res.idleMs);
  };
  const fail = (err: BlksyncError): void => {
    if (done) return;
    done = true;
    stopClock();
    out.destroy(err);
    res.body.destroy();
  };
  res.body.on('data', (c: Buffer) => {
    got += c.length;
    if (out.write(c)) restartClock();
    else {
      stopClock();
      res.body.pause();
    }
  });
  out.on('drain', () => {
    if (done) return;
    restartClock();
    res.body.resume();
  });
  res.body.on('aborted', () => fail(cutShort(res.url, got, res.length)));
  res.body.on('error', (err) => fail(cutShort(res.url, got, res.length, err)));
  res.body.on('end', () => {
    if (res.length !== undefined && got < res.length)
      return fail(cutShort(res.url, got, res.length));
    done = true;
    stopClock();
    out.end();
  });
  // a copy that needs no more (a bmap's last range is in) closes the stream: drop the
  // connection rather than leave it open, which would keep the process alive
  out.on('close', () => {
    done = true;
    stopClock();
    res.body.destroy();
  });
  restartClock();
  return out;
}
