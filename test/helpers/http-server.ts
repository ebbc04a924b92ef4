/**
 * A static web server on 127.0.0.1, port 0, serving one directory as nginx does: Range with one
 * range (206 + Content-Range) or several (206 multipart/byteranges), If-Range against a strong
 * ETag, 416 for ranges past the end, 404 for missing files. Options make it misbehave for the
 * fault tests (ignore Range, answer "not found" pages with 200, or anything a hook does).
 * Counts requests and bytes sent (headers and boundaries included), as the server sees them.
 */

import { readFile, stat } from 'node:fs/promises';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { join, normalize } from 'node:path';
import type { TestContext } from 'node:test';

export interface ServedFile {
  path: string;
  data: Buffer;
  etag: string;
  /** The file's mtime, sent as Last-Modified (as nginx does). */
  lastModified: string;
}

export interface ServerOptions {
  /** Answer every GET with 200 and the whole file (a server without Range support). */
  ignoreRange?: boolean;
  /** Answer a missing file with 200 text/html (a "not found" page). */
  notFoundPage?: boolean;
  /** Called for each request before the file is looked at (tests change files here). */
  onRequest?: (req: IncomingMessage, n: number) => void;
  /**
   * Called for each request before the normal handling; returns true when it answered. `n`
   * counts requests from 1.
   */
  hook?: (
    req: IncomingMessage,
    res: ServerResponse,
    file: ServedFile | undefined,
    n: number,
  ) => boolean;
}

export interface Served {
  url: string;
  requests: { url: string; range: string | undefined; status: number }[];
  /** Bytes the server wrote to its sockets so far. */
  bytesSent(): number;
  close(): Promise<void>;
}

export const BOUNDARY = '00000000000000000042';

/** Parses `bytes=a-b,c-,-n` against `size`: [start, end) ranges, or 'unsatisfiable'. */
export function parseRange(
  header: string,
  size: number,
): { start: number; end: number }[] | 'unsatisfiable' | undefined {
  const m = /^bytes=(.+)$/.exec(header);
  if (m === null) return undefined;
  const out: { start: number; end: number }[] = [];
  for (const spec of m[1]!.split(',')) {
    const r = /^\s*(\d*)-(\d*)\s*$/.exec(spec);
    if (r === null) return undefined;
    let start: number;
    let end: number;
    if (r[1] === '') {
      start = Math.max(0, size - Number(r[2]));
      end = size;
    } else {
      start = Number(r[1]);
      end = r[2] === '' ? size : Math.min(size, Number(r[2]) + 1);
    }
    if (start >= size) continue;
    out.push({ start, end });
  }
  return out.length === 0 ? 'unsatisfiable' : out;
}

/** One part of a multipart/byteranges body. */
export function partHead(start: number, end: number, size: number): string {
  return `\r\n--${BOUNDARY}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes ${start}-${end - 1}/${size}\r\n\r\n`;
}

/** Serves `dir`; stops when the test ends. */
export async function serveDirectory(
  t: TestContext,
  dir: string,
  options: ServerOptions = {},
): Promise<Served> {
  const requests: Served['requests'] = [];
  const sockets = new Set<Socket>();
  let closedBytes = 0;
  let n = 0;
  const server = createServer((req, res) => {
    void (async () => {
      n++;
      const name = normalize(decodeURIComponent(new URL(req.url ?? '/', 'http://x').pathname));
      const path = join(dir, name);
      options.onRequest?.(req, n);
      let file: ServedFile | undefined;
      try {
        const st = await stat(path);
        if (st.isFile()) {
          file = {
            path,
            data: await readFile(path),
            etag: `"${st.size.toString(16)}-${st.mtimeMs.toString(16)}"`,
            lastModified: st.mtime.toUTCString(),
          };
        }
      } catch {
        file = undefined;
      }
      const range = req.headers.range;
      const record = (status: number): void => {
        requests.push({ url: name, range, status });
      };
      if (options.hook?.(req, res, file, n) === true) {
        record(res.statusCode);
        return;
      }
      if (file === undefined) {
        record(options.notFoundPage === true ? 200 : 404);
        if (options.notFoundPage === true) {
          res.writeHead(200, { 'content-type': 'text/html' }).end('<html>not found</html>');
        } else res.writeHead(404).end();
        return;
      }
      const size = file.data.length;
      const base = {
        etag: file.etag,
        'last-modified': file.lastModified,
        'accept-ranges': 'bytes',
      };
      const ifRange = req.headers['if-range'];
      const ranges =
        range === undefined ||
        options.ignoreRange === true ||
        (ifRange !== undefined && ifRange !== file.etag)
          ? undefined
          : parseRange(range, size);
      if (ranges === 'unsatisfiable') {
        record(416);
        res.writeHead(416, { ...base, 'content-range': `bytes */${size}` }).end();
        return;
      }
      if (ranges === undefined) {
        record(200);
        res.writeHead(200, { ...base, 'content-length': size }).end(file.data);
        return;
      }
      record(206);
      if (ranges.length === 1) {
        const r = ranges[0]!;
        res
          .writeHead(206, {
            ...base,
            'content-range': `bytes ${r.start}-${r.end - 1}/${size}`,
            'content-length': r.end - r.start,
          })
          .end(file.data.subarray(r.start, r.end));
        return;
      }
      const parts: Buffer[] = [];
      for (const r of ranges) {
        parts.push(Buffer.from(partHead(r.start, r.end, size)), file.data.subarray(r.start, r.end));
      }
      parts.push(Buffer.from(`\r\n--${BOUNDARY}--\r\n`));
      const body = Buffer.concat(parts);
      res
        .writeHead(206, {
          ...base,
          'content-type': `multipart/byteranges; boundary=${BOUNDARY}`,
          'content-length': body.length,
        })
        .end(body);
    })();
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => {
      closedBytes += s.bytesWritten;
      sockets.delete(s);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  const close = async (): Promise<void> => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  };
  t.after(close);
  return {
    url: `http://127.0.0.1:${port}`,
    requests,
    bytesSent: () => closedBytes + [...sockets].reduce((a, s) => a + s.bytesWritten, 0),
    close,
  };
}
