/**
 * Web servers as attackers (src/io/http-source.ts): redirects that downgrade https to http or
 * leave http(s), redirect loops, servers that stall after the headers or never answer, and a
 * slow but live server that must not be taken for a stalled one. Real node http and https
 * servers on port 0; the https one has a self-signed certificate made by openssl at test time,
 * trusted by the CLI child through NODE_EXTRA_CA_CERTS.
 */

import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo, Socket } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { promisify } from 'node:util';
import { copy } from '../src/index.js';
import { bodyStream, httpOpenOk } from '../src/io/http-source.js';
import { runCli } from './helpers/cli.js';
import { need } from './helpers/resources.js';
import { seededBytes, tempDir } from './helpers/tmp.js';
import { absent, isBlksyncError } from './helpers/assert-error.js';

const run = promisify(execFile);
const HAVE_OPENSSL = spawnSync('openssl', ['version']).status === 0;
const IMAGE = seededBytes(256 * 1024, 11);

type Handler = (req: IncomingMessage, res: ServerResponse) => void;

/** Every socket a server accepted, so that stalled ones can be closed after the test. */
function tracked(server: Server): Set<Socket> {
  const sockets = new Set<Socket>();
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  return sockets;
}

/** Starts `server` on a free port; returns the port and how to stop it (stalled sockets too). */
async function listen(server: Server): Promise<{ port: number; stop: () => Promise<void> }> {
  const sockets = tracked(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const stop = async (): Promise<void> => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  };
  return { port: (server.address() as AddressInfo).port, stop };
}

describe('hostile web servers', () => {
  let http = '';
  let https = '';
  let certFile = '';
  const routes = new Map<string, Handler>();
  const handle: Handler = (req, res) => {
    const route = routes.get(new URL(req.url ?? '/', 'http://x').pathname);
    if (route !== undefined) route(req, res);
    else res.writeHead(404).end();
  };

  const cleanups: (() => Promise<void>)[] = [];
  after(async () => {
    for (const c of cleanups.reverse()) await c();
  });

  before(async () => {
    const plain = await listen(createServer(handle));
    cleanups.push(plain.stop);
    http = `http://127.0.0.1:${plain.port}`;
    if (!HAVE_OPENSSL) return;
    const { mkdtemp, rm } = await import('node:fs/promises');
    const { tmpdir } = await import('node:os');
    const dir = await mkdtemp(join(tmpdir(), 'blksync-tls-'));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    certFile = join(dir, 'cert.pem');
    const keyFile = join(dir, 'key.pem');
    await run('openssl', [
      'req',
      '-x509',
      '-newkey',
      'ec',
      '-pkeyopt',
      'ec_paramgen_curve:prime256v1',
      '-nodes',
      '-keyout',
      keyFile,
      '-out',
      certFile,
      '-days',
      '1',
      '-subj',
      '/CN=127.0.0.1',
      '-addext',
      'subjectAltName=IP:127.0.0.1',
    ]);
    const tls = createHttpsServer(
      { key: await readFile(keyFile), cert: await readFile(certFile) },
      handle,
    );
    const secure = await listen(tls);
    cleanups.push(secure.stop);
    https = `https://127.0.0.1:${secure.port}`;
  });

  routes.set('/disk.img', (_req, res) => {
    res.writeHead(200, { 'content-length': IMAGE.length }).end(IMAGE);
  });
  const redirect =
    (to: () => string): Handler =>
    (_req, res) =>
      res.writeHead(302, { location: to() }).end();

  function needTls(t: TestContext): boolean {
    return need(t, HAVE_OPENSSL, 'openssl is not installed (it makes the test certificate)');
  }

  it('refuses an https URL redirected to http (ESRC_DOWNGRADE), nothing written', async (t) => {
    if (!needTls(t)) return;
    const dir = await tempDir(t);
    routes.set(
      '/down.img',
      redirect(() => `${http}/disk.img`),
    );
    const env = { NODE_EXTRA_CA_CERTS: certFile };
    // the certificate is trusted: the same image over https copies
    const ok = await runCli(['copy', '-q', '--no-bmap', `${https}/disk.img`, join(dir, 'ok')], {
      env,
    });
    assert.equal(ok.code, 0, ok.stderr);
    assert.ok((await readFile(join(dir, 'ok'))).equals(IMAGE));

    const out = join(dir, 'out');
    const r = await runCli(['copy', '-q', '--no-bmap', `${https}/down.img`, out], { env });
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /^blksync: .*https → http downgrade.*\[ESRC_DOWNGRADE\]$/m);
    assert.match(r.stderr, new RegExp(`${http}/disk.img`.replace(/\./g, '\\.')));
    await absent(out);
  });

  it('refuses a redirect to file:, ftp: or a malformed location (ESRC_REDIRECT)', async (t) => {
    const dir = await tempDir(t);
    routes.set(
      '/to-file.img',
      redirect(() => 'file:///etc/passwd'),
    );
    routes.set(
      '/to-ftp.img',
      redirect(() => 'ftp://127.0.0.1/disk.img'),
    );
    routes.set(
      '/to-nowhere.img',
      redirect(() => 'http://[::1'),
    );
    for (const name of ['to-file', 'to-ftp', 'to-nowhere']) {
      const out = join(dir, name);
      await assert.rejects(
        copy(`${http}/${name}.img`, out, { noBmap: true }),
        isBlksyncError('ESRC_REDIRECT', /redirects to/),
      );
      await absent(out);
    }
    const r = await runCli(['copy', '-q', '--no-bmap', `${http}/to-ftp.img`, join(dir, 'cli')]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /^blksync: .*ftp:.*\[ESRC_REDIRECT\]$/m);
    assert.doesNotMatch(r.stderr, /internal error/);
  });

  it('gives up on a redirect loop', async (t) => {
    const dir = await tempDir(t);
    let hops = 0;
    routes.set('/loop.img', (_req, res) => {
      hops++;
      res.writeHead(302, { location: '/loop.img' }).end();
    });
    await assert.rejects(
      copy(`${http}/loop.img`, join(dir, 'out'), { noBmap: true }),
      isBlksyncError('ESRC_HTTP', /more than 10 redirects/),
    );
    assert.equal(hops, 11);
    await absent(join(dir, 'out'));
  });

  it('ends a transfer that stalls after the headers with ETIMEOUT naming --timeout', async (t) => {
    const dir = await tempDir(t);
    routes.set('/stall.img', (_req, res) => {
      // promise the whole image, send a quarter, then keep the connection open and silent
      res.writeHead(200, { 'content-length': IMAGE.length });
      res.write(IMAGE.subarray(0, IMAGE.length / 4));
    });
    const out = join(dir, 'out');
    const r = await runCli(['copy', '--no-bmap', '--timeout', '1', `${http}/stall.img`, out]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /sent nothing for 1 s after 65536 bytes of 262144/);
    assert.match(r.stderr, /--timeout SECONDS/);
    assert.match(r.stderr, /stall\.img.*\[ETIMEOUT\]$/m);
    assert.doesNotMatch(r.stderr, /connection ended/);
  });

  it('ends a wait for headers that never come, and a stalled bmap probe, with ETIMEOUT', async (t) => {
    const dir = await tempDir(t);
    routes.set('/silent.img', () => {});
    const r = await runCli([
      'copy',
      '--no-bmap',
      '--timeout',
      '1',
      `${http}/silent.img`,
      join(dir, 'a'),
    ]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(
      r.stderr,
      /silent\.img: no answer from the server in 1 s.*--timeout.*\[ETIMEOUT\]$/m,
    );
    await absent(join(dir, 'a'));

    // the image answers, its bmap stalls half-way
    routes.set('/probe.img', routes.get('/disk.img')!);
    routes.set('/probe.img.bmap', (_req, res) => {
      res.writeHead(200, { 'content-length': 1000, 'content-type': 'application/xml' });
      res.write('<?xml version="1.0"?>\n<bmap version="2.0">\n');
    });
    await assert.rejects(
      copy(`${http}/probe.img`, join(dir, 'b'), { timeout: 1 }),
      isBlksyncError('ETIMEOUT', /probe\.img\.bmap: the server sent nothing for 1 s/),
    );
    await absent(join(dir, 'b'));
  });

  it('lets a slow but live server finish: the timeout is idle time, not total time', async (t) => {
    const dir = await tempDir(t);
    const pieces = 8;
    const step = IMAGE.length / pieces;
    routes.set('/slow.img', (_req, res) => {
      res.writeHead(200, { 'content-length': IMAGE.length });
      let i = 0;
      const next = (): void => {
        res.write(IMAGE.subarray(i * step, (i + 1) * step));
        if (++i === pieces) res.end();
        else setTimeout(next, 250);
      };
      next();
    });
    // 8 pieces 250 ms apart: about 2 s in all, longer than the 1 s timeout
    const out = join(dir, 'out');
    const r = await runCli(['copy', '-q', '--no-bmap', '--timeout', '1', `${http}/slow.img`, out]);
    assert.equal(r.code, 0, r.stderr);
    assert.ok((await readFile(out)).equals(IMAGE));
  });

  it('does not count a reader that stops reading as the server stalling', async () => {
    const big = Buffer.alloc(16 * 1024 * 1024, 7);
    routes.set('/big.img', (_req, res) => {
      res.writeHead(200, { 'content-length': big.length }).end(big);
    });
    const res = await httpOpenOk(`${http}/big.img`, { timeout: 1 });
    const body = bodyStream(res);
    // the reader (a DST slow to write) takes nothing for twice the timeout, the body's
    // buffers fill, the server waits: it owes nothing meanwhile
    await new Promise((resolve) => setTimeout(resolve, 2000));
    let got = 0;
    for await (const chunk of body) got += (chunk as Buffer).length;
    assert.equal(got, big.length);
  });

  it('refuses a --timeout that is not a positive number of seconds', async (t) => {
    const dir = await tempDir(t);
    const src = join(dir, 'src');
    await writeFile(src, IMAGE);
    for (const bad of ['0', '-1', 'soon']) {
      const r = await runCli(['copy', '--timeout', bad, src, join(dir, 'out')]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, /timeout/);
    }
    await absent(join(dir, 'out'));
  });

  it('refuses a 200 whose Content-Range names a part of the file; one naming all of it is the file', async (t) => {
    const dir = await tempDir(t);
    routes.set('/part200.img', (_req, res) => {
      // a 206 in disguise: taken as the image, a 4 KiB copy with exit 0
      res
        .writeHead(200, {
          'content-length': 4096,
          'content-range': `bytes 0-4095/${IMAGE.length}`,
        })
        .end(IMAGE.subarray(0, 4096));
    });
    await assert.rejects(
      copy(`${http}/part200.img`, join(dir, 'part'), { noBmap: true }),
      isBlksyncError(
        'ESRC_HTTP',
        /HTTP 200 .*Content-Range: bytes 0-4095\/.*whole file was asked for/,
      ),
    );
    await absent(join(dir, 'part'));
    routes.set('/all200.img', (_req, res) => {
      res
        .writeHead(200, {
          'content-length': IMAGE.length,
          'content-range': `bytes 0-${IMAGE.length - 1}/${IMAGE.length}`,
        })
        .end(IMAGE);
    });
    await copy(`${http}/all200.img`, join(dir, 'all'), { noBmap: true });
    assert.deepEqual(await readFile(join(dir, 'all')), IMAGE);
  });

  it('refuses a success that is not the whole file (204, 205, 206) for the image, its bmap or signature', async (t) => {
    const dir = await tempDir(t);
    routes.set('/partial.img', (_req, res) => {
      // a part of the image nobody asked for: taken as the image, a short copy with exit 0
      res
        .writeHead(206, {
          'content-length': 4096,
          'content-range': `bytes 0-4095/${IMAGE.length}`,
        })
        .end(IMAGE.subarray(0, 4096));
    });
    routes.set('/empty.img', (_req, res) => res.writeHead(204).end());
    routes.set('/reset.img', (_req, res) => res.writeHead(205).end());
    for (const [name, status] of [
      ['partial', 206],
      ['empty', 204],
      ['reset', 205],
    ] as const) {
      const out = join(dir, name);
      await assert.rejects(
        copy(`${http}/${name}.img`, out, { noBmap: true }),
        isBlksyncError('ESRC_HTTP', new RegExp(`HTTP ${status} .*whole file was asked for`)),
      );
      await absent(out);
    }
    // a bmap answered with a part of one is no bmap to trust: refused, nothing written
    routes.set('/with-bmap.img', (_req, res) => {
      res.writeHead(200, { 'content-length': IMAGE.length }).end(IMAGE);
    });
    routes.set('/with-bmap.img.bmap', (_req, res) => {
      res
        .writeHead(206, { 'content-length': 10, 'content-range': 'bytes 0-9/1000' })
        .end('<?xml vers');
    });
    const r = await runCli(['copy', '-q', `${http}/with-bmap.img`, join(dir, 'bmapped')]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /^blksync: .*with-bmap\.img\.bmap: HTTP 206 .*\[ESRC_HTTP\]$/m);
    await absent(join(dir, 'bmapped'));
  });
});
