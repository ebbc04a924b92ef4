/**
 * Byte ranges of one file on a web server, fetched with few requests: the wanted pieces are
 * coalesced (neighbours closer than a part's overhead become one range), several ranges go in
 * one request (`Range: bytes=a-b,c-d`, answered as multipart/byteranges), and the answer is
 * parsed as it streams, handing each piece over in order without buffering the body.
 *
 *   206 multipart/byteranges   each part's Content-Range must be the next range asked for
 *   206 with a Content-Range   one part (a server may answer several ranges as one)
 *   200                        the server ignores Range: the whole file streams past and the
 *                              pieces are taken from it (every piece still wanted, not just
 *                              this request's: no second full download)
 *   416                        ESRC_RANGE: the ranges lie past the file's end
 *
 * The first answer's validator (a strong ETag, else Last-Modified) is sent back as If-Range:
 * when the file changed between requests, the server sends the new file whole (200) instead
 * of mixing its ranges with the old one's, and a validator or size that differs from the
 * first answer's is EPUB_CHANGED.
 */

import type { Readable } from 'node:stream';
import { BlksyncError } from '../errors.js';
import { bodyStream, httpOpen, type HttpOptions, type HttpResponse } from '../io/http-source.js';
import type { Range } from '../ranges.js';
import { ByteReader } from './byte-reader.js';

/** Ranges in one request: its Range header stays well inside servers' 8 KiB header limits. */
export const MAX_RANGES_PER_REQUEST = 200;
/** Pieces closer than this are fetched as one range: a multipart part costs ~100 bytes. */
export const MIN_GAP_BYTES = 256;
/** Largest gap coalescing grows to when there are too many ranges for one request. */
const MAX_GAP_BYTES = 1024 * 1024;
/** Requests a fetch aims for: coalescing grows until the ranges fit in these. */
const TARGET_REQUESTS = 2;
/** Preamble and epilogue bytes tolerated around the parts of a multipart answer. */
const MAX_SLACK_BYTES = 4096;

/** Groups ascending, non-overlapping `pieces` into request ranges, and the ranges into requests. */
export function planRequests(pieces: readonly Range[]): Range[][] {
  const coalesce = (gap: number): Range[] => {
    const out: Range[] = [];
    for (const p of pieces) {
      const last = out[out.length - 1];
      if (last !== undefined && p.start - last.end <= gap) last.end = Math.max(last.end, p.end);
      else out.push({ start: p.start, end: p.end });
    }
    return out;
  };
  let gap = MIN_GAP_BYTES;
  let ranges = coalesce(gap);
  while (ranges.length > MAX_RANGES_PER_REQUEST * TARGET_REQUESTS && gap < MAX_GAP_BYTES) {
    gap *= 4;
    ranges = coalesce(gap);
  }
  const requests: Range[][] = [];
  for (let i = 0; i < ranges.length; i += MAX_RANGES_PER_REQUEST) {
    requests.push(ranges.slice(i, i + MAX_RANGES_PER_REQUEST));
  }
  return requests;
}

function validatorOf(res: HttpResponse): string | undefined {
  const etag = res.body.headers.etag;
  if (etag !== undefined && !etag.startsWith('W/')) return etag;
  return res.body.headers['last-modified'];
}

/** Parses `bytes a-b/n`: [a, b+1) and n (undefined for `*`). */
function parseContentRange(
  text: string | undefined,
  url: string,
): { start: number; end: number; total: number | undefined } {
  const m = /^bytes (\d{1,16})-(\d{1,16})\/(\d{1,16}|\*)$/.exec(text?.trim() ?? '');
  const start = Number(m?.[1]);
  const end = Number(m?.[2]) + 1;
  if (m === null || end <= start) {
    throw new BlksyncError(
      'ESRC_RANGE',
      `${url}: the server answered a range request with Content-Range ${JSON.stringify(text ?? null)}, which is not a byte range; it does not serve ranges properly`,
      { path: url },
    );
  }
  return { start, end, total: m[3] === '*' ? undefined : Number(m[3]) };
}

export interface RangeClientOptions extends HttpOptions {
  /** The file's size when known in advance (from the index): a later answer of another is EPUB_CHANGED. */
  size?: number | undefined;
  /**
   * The file that gave `size` (the index): a first answer of another size is EPUB_FORMAT
   * naming it, not EPUB_CHANGED: nothing says the file changed during this copy, and a data
   * file cut short or left from another publish is found so by every rerun.
   */
  sizeFrom?: string | undefined;
}

export class RangeClient {
  readonly url: string;
  readonly #options: RangeClientOptions;
  #validator: string | undefined;
  #first = true;
  /** The answer being read, destroyed by close(). */
  #body: Readable | undefined;
  /** The file's size, once an answer told it. */
  size: number | undefined;
  /** Where `size` came from until an answer confirms it (RangeClientOptions.sizeFrom). */
  #sizeFrom: string | undefined;
  /** The file's Last-Modified (ms since the epoch), when the first answer gave one. */
  lastModified: number | undefined;
  /** Requests made. */
  requests = 0;
  /** Body bytes of the answers read to their end (or dropped). */
  #received = 0;
  /** The answer being read: its bytes count as they arrive. */
  #reader: ByteReader | undefined;

  constructor(url: string, options: RangeClientOptions = {}) {
    this.url = url;
    this.#options = options;
    this.size = options.size;
    this.#sizeFrom = options.size !== undefined ? options.sizeFrom : undefined;
  }

  /**
   * Body bytes received so far, the answer being read included: a fetch's generator is left
   * suspended after its last piece (not read to its end) while the copy goes on.
   */
  get bytesReceived(): number {
    return this.#received + (this.#reader?.received ?? 0);
  }

  #changed(what: string): BlksyncError {
    return new BlksyncError(
      'EPUB_CHANGED',
      `${this.url} changed on the server while it was being read (${what}); nothing of the new version was mixed in: rerun to update to it`,
      { path: this.url },
    );
  }

  #checkSize(total: number | undefined): void {
    if (total === undefined) return;
    if (this.size !== undefined && total !== this.size) {
      if (this.#sizeFrom !== undefined) {
        throw new BlksyncError(
          'EPUB_FORMAT',
          `${this.url} is ${total} bytes but ${this.#sizeFrom} describes ${this.size}: the published files do not belong together (one cut short, or replaced without the other): if they are being uploaded, rerun once both are; else publish again and put both on the server`,
          { path: this.url },
        );
      }
      throw this.#changed(`its size was ${this.size} bytes, now ${total}`);
    }
    this.size = total;
    this.#sizeFrom = undefined;
  }

  /** GETs the ranges; checks the answer's validator against the first answer's. */
  async #get(ranges: readonly Range[]): Promise<HttpResponse> {
    const headers: Record<string, string> = {
      range: 'bytes=' + ranges.map((r) => `${r.start}-${r.end - 1}`).join(','),
    };
    if (this.#validator !== undefined) headers['if-range'] = this.#validator;
    this.requests++;
    const res = await httpOpen(this.url, { ...this.#options, headers });
    const v = validatorOf(res);
    if (this.#first) {
      this.#first = false;
      this.#validator = v;
      const modified = res.body.headers['last-modified'];
      if (modified !== undefined) this.lastModified = Date.parse(modified);
    } else if (res.status >= 200 && res.status < 300 && v !== this.#validator) {
      res.body.destroy();
      throw this.#changed(`ETag/Last-Modified ${v ?? 'none'}, first ${this.#validator ?? 'none'}`);
    }
    return res;
  }

  /**
   * The file's first `n` bytes (fewer when it is shorter), or all of it when the server
   * ignores Range (`whole`); undefined when it does not exist (404, 410). A body that fails
   * `looksRight` (a "not found" page sent with 200) is returned as soon as that shows, and
   * a whole file may be no longer than `wholeSize` says once it has seen enough of it.
   */
  async head(
    n: number,
    looksRight: (head: Buffer) => boolean,
    wholeSize: (head: Buffer) => number | undefined,
  ): Promise<{ bytes: Buffer; whole: boolean } | undefined> {
    const res = await this.#get([{ start: 0, end: n }]);
    if (res.status === 404 || res.status === 410) {
      res.body.resume();
      return undefined;
    }
    if (res.status !== 200 && res.status !== 206) {
      res.body.resume();
      throw new BlksyncError(
        'ESRC_HTTP',
        `${this.url}: HTTP ${res.status} ${res.body.statusMessage ?? ''}`.trimEnd(),
        { path: this.url },
      );
    }
    const whole = res.status === 200;
    const body = bodyStream(res);
    // the pieces, joined once at the end: a whole index of a large image is many pieces
    const parts: Buffer[] = [];
    let got = 0;
    try {
      if (!whole) {
        const cr = parseContentRange(res.body.headers['content-range'], this.url);
        this.#checkSize(cr.total);
        if (cr.start !== 0)
          throw this.#wrongRange(`bytes ${cr.start}-${cr.end - 1} for 0-${n - 1}`);
      }
      let limit = n;
      let sized = !whole;
      let judged = false;
      for await (const c of body) {
        parts.push(c as Buffer);
        got += (c as Buffer).length;
        if (!judged && got >= 8) {
          judged = true;
          const head = Buffer.concat(parts);
          if (!looksRight(head)) return { bytes: head, whole: false };
        }
        if (!sized && got >= n) {
          const size = wholeSize(Buffer.concat(parts));
          if (size !== undefined) {
            sized = true;
            limit = size;
          }
        }
        if (got > limit) throw this.#wrongRange(`more than the ${limit} bytes expected`);
      }
      const bytes = Buffer.concat(parts);
      if (whole) this.#checkSize(bytes.length);
      return { bytes, whole };
    } finally {
      this.#received += got;
      body.destroy();
    }
  }

  /**
   * Yields the bytes of each piece, in order. Pieces are ascending and non-overlapping. The
   * yielded buffer is valid until the next piece is asked for.
   */
  async *fetch(pieces: readonly Range[]): AsyncGenerator<Buffer> {
    let next = 0;
    for (const ranges of planRequests(pieces)) {
      if (next >= pieces.length) return;
      const res = await this.#get(ranges);
      const body = bodyStream(res);
      this.#body = body;
      const reader = new ByteReader(body, this.url);
      this.#reader = reader;
      try {
        const status = res.status;
        if (status === 416) {
          throw new BlksyncError(
            'ESRC_RANGE',
            `${this.url}: the server says the ranges asked for lie past the file's end (HTTP 416): the published files are damaged or changed; rerun, or publish again`,
            { path: this.url },
          );
        }
        if (status === 200) {
          // the whole file: every piece still wanted is in it
          this.#checkSize(res.length);
          const end = res.length ?? Number.MAX_SAFE_INTEGER;
          const n = yield* this.#part(reader, { start: 0, end }, pieces, next, true);
          if (n < pieces.length) {
            const p = pieces[n]!;
            throw this.#wrongRange(`the whole file sent ends before bytes ${p.start}-${p.end - 1}`);
          }
          return;
        }
        if (status !== 206) {
          throw new BlksyncError(
            'ESRC_HTTP',
            `${this.url}: HTTP ${status} ${res.body.statusMessage ?? ''} to a range request`.trimEnd(),
            { path: this.url },
          );
        }
        const type = res.body.headers['content-type'] ?? '';
        const boundary = /^multipart\/byteranges\s*;.*boundary=("?)([^";]{1,70})\1/i.exec(
          type,
        )?.[2];
        const batchEnd = ranges[ranges.length - 1]!.end;
        const until = (from: number): number => {
          let n = from;
          while (n < pieces.length && pieces[n]!.end <= batchEnd) n++;
          return n;
        };
        const stop = until(next);
        if (boundary === undefined) {
          const cr = parseContentRange(res.body.headers['content-range'], this.url);
          this.#checkSize(cr.total);
          if (res.length !== undefined && res.length !== cr.end - cr.start) {
            throw this.#wrongRange(`Content-Length ${res.length} for ${cr.end - cr.start} bytes`);
          }
          next = yield* this.#part(reader, cr, pieces.slice(0, stop), next, false);
        } else {
          for (;;) {
            const line = await this.#boundaryLine(reader, boundary);
            if (line === 'end') break;
            let contentRange: string | undefined;
            for (let h = 0; ; h++) {
              const header = await reader.line('a part header');
              if (header === '') break;
              if (h > 32) throw this.#wrongRange('more than 32 header lines in a part');
              const colon = header.indexOf(':');
              if (header.slice(0, colon).trim().toLowerCase() === 'content-range') {
                contentRange = header.slice(colon + 1);
              }
            }
            const cr = parseContentRange(contentRange, this.url);
            this.#checkSize(cr.total);
            next = yield* this.#part(reader, cr, pieces.slice(0, stop), next, false);
            const crlf = await reader.line('the end of a part');
            if (crlf !== '') throw this.#wrongRange('a part runs past its Content-Range');
          }
          if (!(await reader.drain(MAX_SLACK_BYTES))) {
            throw this.#wrongRange('bytes after the closing boundary');
          }
        }
        if (next < stop) {
          const p = pieces[next]!;
          throw this.#wrongRange(`bytes ${p.start}-${p.end - 1} were asked for but not sent`);
        }
      } finally {
        this.#received += reader.received;
        this.#reader = undefined;
        body.destroy();
      }
    }
  }

  /** Drops the answer being read (an interrupted copy must not wait for a stalled server). */
  close(): void {
    this.#body?.destroy();
  }

  #wrongRange(what: string): BlksyncError {
    return new BlksyncError(
      'ESRC_RANGE',
      `${this.url}: the server's answer to a range request is not what was asked (${what}); rerun, or report the server`,
      { path: this.url },
    );
  }

  /** Reads up to and including the next boundary line: 'part' before a part, 'end' after the last. */
  async #boundaryLine(reader: ByteReader, boundary: string): Promise<'part' | 'end'> {
    const dash = `--${boundary}`;
    for (let n = 0; n < 4; n++) {
      const line = (await reader.line('a boundary')).trimEnd();
      if (line === dash) return 'part';
      if (line === `${dash}--`) return 'end';
      if (line !== '') break;
    }
    throw this.#wrongRange('a multipart boundary is missing');
  }

  /**
   * Hands over the pieces [from, …) that lie in `part`, reading the part to its end; returns
   * the index of the first piece not handed over. A piece that starts before the part and
   * was not handed over yet was skipped by the server: an error (unless `whole`).
   */
  async *#part(
    reader: ByteReader,
    part: { start: number; end: number },
    pieces: readonly Range[],
    from: number,
    whole: boolean,
  ): AsyncGenerator<Buffer, number> {
    let at = part.start;
    let n = from;
    for (; n < pieces.length; n++) {
      const p = pieces[n]!;
      if (p.start >= part.end) break;
      if (p.start < at || p.end > part.end) {
        throw this.#wrongRange(
          `bytes ${p.start}-${p.end - 1} were asked for, the part holds ${part.start}-${part.end - 1}`,
        );
      }
      await reader.skip(p.start - at, 'a gap between ranges');
      yield await reader.read(p.end - p.start, `bytes ${p.start}-${p.end - 1}`);
      at = p.end;
    }
    if (whole) {
      // the rest of a whole-file answer is not needed: stop reading it
      return n;
    }
    await reader.skip(part.end - at, 'the end of a part');
    return n;
  }
}
