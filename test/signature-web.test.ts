/**
 * Signatures and bmaps at real web servers (src/io/signature.ts, the bmap probe in
 * src/engine/copy-source.ts): a server that answers 200 text/html for files it does not have
 * must read as "no signature" / "no bmap" with a warning, not as a bad one; a real but bad
 * signature is still refused. And --fingerprint names either the primary key or the signing
 * subkey (a key made by gpg in a temporary GNUPGHOME).
 */

import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { createBmap } from '../src/engine/bmap-create.js';
import { looksLikeBmap } from '../src/formats/bmap-sniff.js';
import type { BlksyncWarning } from '../src/errors.js';
import { copy } from '../src/index.js';
import { runCli } from './helpers/cli.js';
import { need } from './helpers/resources.js';
import { seededBytes, writeSparseFile } from './helpers/tmp.js';
import { absent, isBlksyncError } from './helpers/assert-error.js';

const run = promisify(execFile);
const HAVE_GPG = spawnSync('gpg', ['--version']).status === 0;
const MiB = 1024 * 1024;
const NOT_FOUND_PAGE = Buffer.from(
  '<!DOCTYPE html>\n<html><head><title>Not found</title></head><body>No such page</body></html>\n',
);

describe('signatures and bmaps at web servers', () => {
  let root = '';
  let home = '';
  let alice = '';
  /** carol: a primary key that only certifies, and a subkey that signs */
  let carol = '';
  let carolSub = '';
  let base = '';
  let server: Server | undefined;
  /** What the server has; anything else is answered 200 with NOT_FOUND_PAGE, as many do. */
  const files = new Map<string, Buffer>();
  const savedHome = process.env.GNUPGHOME;

  const gpg = (...args: string[]) =>
    run('gpg', ['--homedir', home, '--batch', '--yes', '--passphrase', '', ...args]);

  async function fingerprints(uid: string): Promise<string[]> {
    const { stdout } = await gpg('--with-colons', '--with-subkey-fingerprints', '--list-keys', uid);
    return [...stdout.matchAll(/^fpr:+([0-9A-F]{40}):/gm)].map((m) => m[1]!);
  }

  before(async () => {
    server = createServer((req, res) => {
      const body = files.get(new URL(req.url ?? '/', 'http://x').pathname);
      if (body !== undefined) res.writeHead(200, { 'content-length': body.length }).end(body);
      else res.writeHead(200, { 'content-type': 'text/html' }).end(NOT_FOUND_PAGE);
    });
    await new Promise<void>((resolve) => server!.listen(0, '127.0.0.1', resolve));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    root = await mkdtemp(join(tmpdir(), 'blksync-sigweb-'));
    if (!HAVE_GPG) return;
    home = join(root, 'gnupg');
    await mkdir(home, { mode: 0o700 });
    await gpg('--quick-gen-key', 'alice <alice@example.invalid>', 'ed25519', 'sign', 'never');
    alice = (await fingerprints('alice@example.invalid'))[0] ?? '';
    await gpg('--quick-gen-key', 'carol <carol@example.invalid>', 'ed25519', 'cert', 'never');
    const [primary] = await fingerprints('carol@example.invalid');
    await gpg('--quick-add-key', primary!, 'ed25519', 'sign', 'never');
    [carol = '', carolSub = ''] = await fingerprints('carol@example.invalid');
    assert.ok(alice && carol && carolSub && carol !== carolSub);
    process.env.GNUPGHOME = home;
  });

  after(async () => {
    if (savedHome === undefined) delete process.env.GNUPGHOME;
    else process.env.GNUPGHOME = savedHome;
    if (server !== undefined) await new Promise<void>((resolve) => server!.close(() => resolve()));
    if (home !== '')
      await run('gpgconf', ['--homedir', home, '--kill', 'gpg-agent']).catch(() => {});
    if (root !== '') await rm(root, { recursive: true, force: true });
  });

  /** An image with data at 1 MiB, and its bmap, published at /NAME.img and /NAME.img.bmap. */
  async function publish(name: string): Promise<{ dir: string; bmap: string; image: Buffer }> {
    const dir = await mkdtemp(join(root, `${name}-`));
    const img = join(dir, 'disk.img');
    const size = 2 * MiB;
    const data = seededBytes(64 * 1024, 5);
    await writeSparseFile(img, size, [{ offset: MiB, data }]);
    const image = Buffer.alloc(size);
    data.copy(image, MiB);
    const bmap = join(dir, 'disk.img.bmap');
    await createBmap(img, { output: bmap });
    files.set(`/${name}.img`, image);
    files.set(`/${name}.img.bmap`, await readFile(bmap));
    return { dir, bmap, image };
  }

  it('a signature URL answered with an HTML page is no signature, with a warning', async (t) => {
    const { dir, image } = await publish('page');
    const url = `${base}/page.img`;
    const warnings: BlksyncWarning[] = [];
    const r = await copy(url, join(dir, 'out'), { onWarning: (w) => warnings.push(w) });
    assert.equal(r.bmap?.path, `${url}.bmap`);
    assert.equal(r.bmap?.signature, undefined);
    assert.ok((await readFile(join(dir, 'out'))).equals(image));
    assert.equal(warnings.length, 2, JSON.stringify(warnings));
    assert.equal(warnings[0]!.code, 'WPROBE_NOT_FOUND');
    assert.match(
      warnings[0]!.message,
      /page\.img\.bmap\.asc is not an OpenPGP signature.*text\/html/,
    );
    assert.match(warnings[1]!.message, /page\.img\.bmap\.sig is not an OpenPGP signature/);

    const cli = await runCli(['copy', '-q', url, join(dir, 'cli')]);
    assert.equal(cli.code, 0, cli.stderr);
    assert.match(
      cli.stderr,
      /^blksync: warning: .*bmap\.asc is not an OpenPGP signature.*\[WPROBE_NOT_FOUND\]$/m,
    );

    // demanded: a coded refusal that says what the server sent, nothing written
    if (!need(t, HAVE_GPG, 'gpg is not installed (apt-get install gnupg)')) return;
    await assert.rejects(
      copy(url, join(dir, 'demanded'), { fingerprint: alice }),
      isBlksyncError('ESIG_MISSING', /not an OpenPGP signature/),
    );
    await absent(join(dir, 'demanded'));
    const keyring = join(dir, 'alice.gpg');
    await writeFile(
      keyring,
      (await run('gpg', ['--homedir', home, '--export', alice], { encoding: 'buffer' })).stdout,
    );
    await assert.rejects(copy(url, join(dir, 'kr'), { keyring }), isBlksyncError('ESIG_MISSING'));
    await absent(join(dir, 'kr'));
  });

  it('a real but bad signature at the URL is still ESIG_INVALID, nothing written', async (t) => {
    if (!need(t, HAVE_GPG, 'gpg is not installed (apt-get install gnupg)')) return;
    const { dir, bmap } = await publish('bad');
    // a good signature by alice, of the bmap with one byte changed afterwards
    await gpg('--local-user', alice, '--detach-sign', '-o', `${bmap}.sig`, bmap);
    files.set('/bad.img.bmap.sig', await readFile(`${bmap}.sig`));
    const changed = Buffer.from(files.get('/bad.img.bmap')!);
    const at = changed.indexOf('<ImageSize>') + '<ImageSize>'.length;
    changed[at] = changed[at] === 0x31 ? 0x32 : 0x31;
    files.set('/bad.img.bmap', changed);
    await assert.rejects(
      copy(`${base}/bad.img`, join(dir, 'out')),
      isBlksyncError('ESIG_INVALID', /BAD signature/),
    );
    await absent(join(dir, 'out'));
    // --bmap-sig naming a page is refused, not taken as unsigned
    await assert.rejects(
      copy(`${base}/bad.img`, join(dir, 'out'), { bmapSig: `${base}/missing.asc` }),
      isBlksyncError('ESIG_INVALID', /missing\.asc is not an OpenPGP signature/),
    );
    await absent(join(dir, 'out'));
  });

  it('a bmap URL answered with an HTML page is no bmap, with a warning', async () => {
    const { dir, image } = await publish('nobmap');
    files.delete('/nobmap.img.bmap');
    const warnings: BlksyncWarning[] = [];
    const r = await copy(`${base}/nobmap.img`, join(dir, 'out'), {
      onWarning: (w) => warnings.push(w),
    });
    assert.equal(r.bmap, undefined);
    assert.equal(r.bytesScanned, image.length);
    assert.ok((await readFile(join(dir, 'out'))).equals(image));
    assert.equal(warnings.length, 1, JSON.stringify(warnings));
    assert.match(warnings[0]!.message, /no bmap used.*nobmap\.img\.bmap \(text\/html\)/);
    // a named --bmap that is a page is still an error
    await assert.rejects(
      copy(`${base}/nobmap.img`, join(dir, 'named'), { bmap: `${base}/nobmap.img.bmap` }),
      isBlksyncError('EBMAP_FORMAT'),
    );
    await absent(join(dir, 'named'));
  });

  it("tells bmaptool's bmaps (1.2 to 2.0) from pages, for the probe", async () => {
    const fixtures = new URL('./fixtures/bmaptool-compat/', import.meta.url);
    for (const v of ['1.2', '1.3', '1.4', '2.0']) {
      const bytes = await readFile(new URL(`test.image.bmap.v${v}`, fixtures));
      assert.ok(looksLikeBmap(bytes), v);
      assert.ok(looksLikeBmap(Buffer.concat([Buffer.from('\uFEFF\n'), bytes])), v);
    }
    for (const page of [
      NOT_FOUND_PAGE,
      Buffer.from('<bmapx/>'),
      Buffer.from(''),
      Buffer.from('{}'),
    ]) {
      assert.equal(looksLikeBmap(page), false, page.toString());
    }
  });

  it('--fingerprint accepts the signing subkey as well as the primary key', async (t) => {
    if (!need(t, HAVE_GPG, 'gpg is not installed (apt-get install gnupg)')) return;
    const { dir, bmap, image } = await publish('sub');
    // carol's primary key only certifies: gpg signs with her subkey
    await gpg('--local-user', carol, '--armor', '--detach-sign', '-o', `${bmap}.asc`, bmap);
    files.set('/sub.img.bmap.asc', await readFile(`${bmap}.asc`));
    const url = `${base}/sub.img`;
    for (const [i, fpr] of [carolSub, carol].entries()) {
      const r = await copy(url, join(dir, `out${i}`), { fingerprint: fpr });
      assert.deepEqual(r.bmap?.signature?.fingerprints, [carol]);
      assert.deepEqual(r.bmap?.signature?.signingKeys, [carolSub]);
      assert.ok((await readFile(join(dir, `out${i}`))).equals(image));
    }
    const cli = await runCli(['copy', '--fingerprint', carolSub, url, join(dir, 'cli')]);
    assert.equal(cli.code, 0, cli.stderr);
    assert.match(cli.stdout, new RegExp(`key ${carol}, signing subkey ${carolSub}`));
    // another key's fingerprint: refused, naming both of carol's
    await assert.rejects(
      copy(url, join(dir, 'other'), { fingerprint: alice }),
      isBlksyncError('ESIG_INVALID', new RegExp(`${carol} \\(signing subkey ${carolSub}\\)`)),
    );
    await absent(join(dir, 'other'));
  });
});
