/** Signed bmaps: src/io/signature.ts through copy (detached, clearsigned, keyrings, fingerprints). */

import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { mkdir, mkdtemp, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { promisify } from 'node:util';
import { createBmap } from '../src/engine/bmap-create.js';
import { clearsignedText, normalizeFingerprint, signatureCandidates } from '../src/io/signature.js';
import { BlksyncError, copy } from '../src/index.js';
import { runCli } from './helpers/cli.js';
import { need } from './helpers/resources.js';
import { sharedSshd } from './helpers/sshd.js';
import { seededBytes, writeSparseFile } from './helpers/tmp.js';

const run = promisify(execFile);
const HAVE_GPG = spawnSync('gpg', ['--version']).status === 0;
const GPGV = spawnSync('sh', ['-c', 'command -v gpgv'], { encoding: 'utf8' }).stdout.trim();
const MiB = 1024 * 1024;

function needGpg(t: TestContext): boolean {
  return need(t, HAVE_GPG, 'gpg is not installed (apt-get install gnupg)');
}

/** Rejects with a BlksyncError of `code`. */
function code(c: string) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof BlksyncError, String(err));
    assert.equal(err.code, c, err.message);
    return true;
  };
}

describe('signed bmaps', () => {
  let root = '';
  let home = '';
  let keyA = '';
  let keyB = '';
  let keyringA = '';
  const savedHome = process.env.GNUPGHOME;

  /** gpg in the test's GNUPGHOME. */
  const gpg = (...args: string[]) =>
    run('gpg', ['--homedir', home, '--batch', '--yes', '--passphrase', '', ...args]);

  async function makeKey(name: string): Promise<string> {
    await gpg('--quick-gen-key', `${name} <${name}@example.invalid>`, 'ed25519', 'sign', 'never');
    const { stdout } = await gpg('--with-colons', '--list-keys', `${name}@example.invalid`);
    const fpr = /^fpr:+([0-9A-F]{40}):/m.exec(stdout)?.[1];
    assert.ok(fpr !== undefined, stdout);
    return fpr;
  }

  before(async () => {
    if (!HAVE_GPG) return;
    root = await mkdtemp(join(tmpdir(), 'blksync-sig-test-'));
    home = join(root, 'gnupg');
    await mkdir(home, { mode: 0o700 });
    keyA = await makeKey('alice');
    keyB = await makeKey('bob');
    keyringA = join(root, 'alice.gpg');
    const { stdout } = await run('gpg', ['--homedir', home, '--export', keyA], {
      encoding: 'buffer',
    });
    await writeFile(keyringA, stdout);
    // the user's keyring, for gpg as blksync runs it (and for the CLI's child processes)
    process.env.GNUPGHOME = home;
  });

  after(async () => {
    if (savedHome === undefined) delete process.env.GNUPGHOME;
    else process.env.GNUPGHOME = savedHome;
    if (root === '') return;
    await run('gpgconf', ['--homedir', home, '--kill', 'gpg-agent']).catch(() => {});
    await rm(root, { recursive: true, force: true });
  });

  /** A fresh directory with a small sparse image and its bmap. */
  async function imageWithBmap(): Promise<{
    dir: string;
    img: string;
    bmap: string;
    image: Buffer;
  }> {
    const dir = await mkdtemp(join(root, 'case-'));
    const img = join(dir, 'disk.img');
    const size = 2 * MiB + 512;
    const data = seededBytes(64 * 1024, 7);
    await writeSparseFile(img, size, [{ offset: MiB, data }]);
    const image = Buffer.alloc(size);
    data.copy(image, MiB);
    const bmap = `${img}.bmap`;
    await createBmap(img, { output: bmap });
    return { dir, img, bmap, image };
  }

  const signAs = (key: string, ...args: string[]) => gpg('--local-user', key, ...args);
  const sshServer = sharedSshd();

  it('copies with a good detached signature found beside the bmap, and with --fingerprint', async (t) => {
    if (!needGpg(t)) return;
    const { dir, img, bmap, image } = await imageWithBmap();
    await signAs(keyA, '--armor', '--detach-sign', '-o', `${bmap}.asc`, bmap);
    const out = join(dir, 'out');
    const r = await copy(img, out);
    assert.equal(r.bmap?.signature?.kind, 'detached');
    assert.equal(r.bmap?.signature?.path, `${bmap}.asc`);
    assert.deepEqual(r.bmap?.signature?.fingerprints, [keyA]);
    assert.equal(r.bmap?.signature?.verifiedWith, 'gpg');
    assert.ok((await readFile(out)).equals(image));
    // spaces and lower case as people paste fingerprints
    const spaced = keyA.toLowerCase().replace(/(.{4})/g, '$1 ');
    const again = await copy(img, out, { fingerprint: spaced });
    assert.deepEqual(again.bmap?.signature?.fingerprints, [keyA]);
  });

  it('copies with a binary .sig found after .asc, and with --bmap-sig', async (t) => {
    if (!needGpg(t)) return;
    const { dir, img, bmap } = await imageWithBmap();
    await signAs(keyB, '--detach-sign', '-o', `${bmap}.sig`, bmap);
    const r = await copy(img, join(dir, 'out'));
    assert.equal(r.bmap?.signature?.path, `${bmap}.sig`);
    assert.deepEqual(r.bmap?.signature?.fingerprints, [keyB]);
    const elsewhere = join(dir, 'elsewhere.sig');
    await signAs(keyA, '--detach-sign', '-o', elsewhere, bmap);
    const named = await copy(img, join(dir, 'out2'), { bmapSig: elsewhere });
    assert.deepEqual(named.bmap?.signature?.fingerprints, [keyA]);
  });

  it('refuses a tampered bmap or signature with ESIG_INVALID before writing anything', async (t) => {
    if (!needGpg(t)) return;
    const { dir, img, bmap } = await imageWithBmap();
    await signAs(keyA, '--armor', '--detach-sign', '-o', `${bmap}.asc`, bmap);
    const good = await readFile(bmap);
    const out = join(dir, 'out');
    await writeFile(bmap, Buffer.concat([good, Buffer.from('<!-- changed -->\n')]));
    await assert.rejects(copy(img, out), code('ESIG_INVALID'));
    await assert.rejects(stat(out), { code: 'ENOENT' });

    await writeFile(bmap, good);
    await writeFile(`${bmap}.asc`, 'not a signature\n');
    await assert.rejects(copy(img, out), code('ESIG_INVALID'));
    await assert.rejects(stat(out), { code: 'ENOENT' });

    // the CLI: one line naming the code, exit status 1
    const r = await runCli(['copy', img, out]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /--no-sig-verify.*\[ESIG_INVALID\]/, r.stderr);
    // gpg's own reason, not its advice about the order of its arguments
    assert.match(r.stderr, /no valid OpenPGP data/, r.stderr);
    assert.doesNotMatch(r.stderr, /first file given/, r.stderr);
    await assert.rejects(stat(out), { code: 'ENOENT' });

    // --no-sig-verify: the (intact) bmap is used without looking at the signature
    const skipped = await copy(img, out, { noSigVerify: true });
    assert.equal(skipped.bmap?.signature, undefined);
    const cli = await runCli(['copy', '--no-sig-verify', img, join(dir, 'out2')]);
    assert.equal(cli.code, 0, cli.stderr);
  });

  it('refuses a good signature by another key than --fingerprint', async (t) => {
    if (!needGpg(t)) return;
    const { dir, img, bmap } = await imageWithBmap();
    await signAs(keyB, '--armor', '--detach-sign', '-o', `${bmap}.asc`, bmap);
    const out = join(dir, 'out');
    await assert.rejects(copy(img, out, { fingerprint: keyA }), (err: unknown) => {
      code('ESIG_INVALID')(err);
      assert.match((err as Error).message, new RegExp(`made by ${keyB}.*not by the key`));
      return true;
    });
    await assert.rejects(stat(out), { code: 'ENOENT' });
    const r = await runCli(['copy', '--fingerprint', keyA, img, out]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /ESIG_INVALID/);
    // a remote SRC without --bmap has no local bmap to check: refused rather than ignored
    await assert.rejects(copy('nohost.invalid:/dev/x', out, { fingerprint: keyA }), code('EUSAGE'));
    // a key id is not a fingerprint
    assert.throws(() => normalizeFingerprint(keyA.slice(-16)), code('EUSAGE'));
    // --fingerprint needs a signature to check
    await rm(`${bmap}.asc`);
    await assert.rejects(copy(img, out, { fingerprint: keyB }), code('ESIG_MISSING'));
  });

  it('verifies a clearsigned bmap and copies with the text it signs', async (t) => {
    if (!needGpg(t)) return;
    const { dir, img, bmap, image } = await imageWithBmap();
    const plain = await readFile(bmap);
    await signAs(keyA, '--clearsign', '-o', `${bmap}.clear`, bmap);
    const clear = await readFile(`${bmap}.clear`);
    assert.ok(clearsignedText(clear, 'x').equals(plain));
    await writeFile(bmap, clear);
    const out = join(dir, 'out');
    const r = await copy(img, out, { fingerprint: keyA });
    assert.equal(r.bmap?.signature?.kind, 'clearsigned');
    assert.ok((await readFile(out)).equals(image));

    // tampered inside the signed text
    const bad = Buffer.from(
      clear.toString('latin1').replace('<BlockSize>', '<BlockSize> '),
      'latin1',
    );
    await writeFile(bmap, bad);
    const out2 = join(dir, 'out2');
    await assert.rejects(copy(img, out2), code('ESIG_INVALID'));
    await assert.rejects(stat(out2), { code: 'ENOENT' });
    // unsigned text after the signature is refused too
    await writeFile(bmap, Buffer.concat([clear, Buffer.from('<extra/>\n')]));
    await assert.rejects(copy(img, out2), code('ESIG_INVALID'));
    // --bmap-sig makes no sense for a clearsigned bmap
    await writeFile(bmap, clear);
    await assert.rejects(copy(img, out2, { bmapSig: `${bmap}.clear` }), code('EUSAGE'));
  });

  it('--keyring uses only the keys in that file; an unknown signer is ESIG_UNKNOWN_KEY', async (t) => {
    if (!needGpg(t)) return;
    const { dir, img, bmap } = await imageWithBmap();
    const empty = join(dir, 'empty-home');
    await mkdir(empty, { mode: 0o700 });
    process.env.GNUPGHOME = empty; // the user's keyring knows nobody
    try {
      await signAs(keyA, '--armor', '--detach-sign', '-o', `${bmap}.asc`, bmap);
      await assert.rejects(copy(img, join(dir, 'out')), code('ESIG_UNKNOWN_KEY'));
      const r = await copy(img, join(dir, 'out'), { keyring: keyringA, fingerprint: keyA });
      assert.deepEqual(r.bmap?.signature?.fingerprints, [keyA]);
      await signAs(keyB, '--armor', '--detach-sign', '-o', `${bmap}.asc`, bmap);
      await assert.rejects(
        copy(img, join(dir, 'out'), { keyring: keyringA }),
        code('ESIG_UNKNOWN_KEY'),
      );
    } finally {
      process.env.GNUPGHOME = home;
    }
  });

  it('with only gpgv installed: checks against --keyring, detached and clearsigned', async (t) => {
    if (!needGpg(t)) return;
    if (!need(t, GPGV !== '', 'gpgv is not installed (apt-get install gpgv)')) return;
    const { dir, img, bmap, image } = await imageWithBmap();
    await signAs(keyA, '--armor', '--detach-sign', '-o', `${bmap}.asc`, bmap);
    await signAs(keyA, '--clearsign', '-o', join(dir, 'clear.bmap'), bmap);
    const bin = join(dir, 'bin');
    await mkdir(bin);
    await symlink(GPGV, join(bin, 'gpgv'));
    const savedPath = process.env.PATH;
    process.env.PATH = bin;
    try {
      const r = await copy(img, join(dir, 'out'), { keyring: keyringA, fingerprint: keyA });
      assert.equal(r.bmap?.signature?.verifiedWith, 'gpgv');
      const c = await copy(img, join(dir, 'out2'), {
        bmap: join(dir, 'clear.bmap'),
        keyring: keyringA,
      });
      assert.equal(c.bmap?.signature?.kind, 'clearsigned');
      assert.equal(c.bmap?.signature?.verifiedWith, 'gpgv');
      assert.ok((await readFile(join(dir, 'out2'))).equals(image));
    } finally {
      process.env.PATH = savedPath;
    }
  });

  it('without gpg: a signed bmap is ESIG_UNAVAILABLE; a clearsigned one copies with --no-sig-verify', async (t) => {
    if (!needGpg(t)) return;
    const { dir, img, bmap, image } = await imageWithBmap();
    await signAs(keyA, '--armor', '--detach-sign', '-o', `${bmap}.asc`, bmap);
    await signAs(keyA, '--clearsign', '-o', join(dir, 'clear.bmap'), bmap);
    const savedPath = process.env.PATH;
    process.env.PATH = join(dir, 'no-such-bin');
    try {
      await assert.rejects(copy(img, join(dir, 'out')), (err: unknown) => {
        code('ESIG_UNAVAILABLE')(err);
        assert.match((err as Error).message, /apt-get install gpgv.*--no-sig-verify/);
        return true;
      });
      const r = await copy(img, join(dir, 'out'), {
        bmap: join(dir, 'clear.bmap'),
        noSigVerify: true,
      });
      assert.equal(r.bmap?.signature, undefined);
      assert.ok((await readFile(join(dir, 'out'))).equals(image));
    } finally {
      process.env.PATH = savedPath;
    }
  });

  it('finds the signature of a bmap at a URL the same way', async (t) => {
    if (!needGpg(t)) return;
    const { dir, img, bmap, image } = await imageWithBmap();
    await signAs(keyA, '--armor', '--detach-sign', '-o', `${bmap}.asc`, bmap);
    const files: Record<string, Buffer> = {
      '/d/disk.img': await readFile(img),
      '/d/disk.img.bmap': await readFile(bmap),
      '/d/disk.img.bmap.asc': await readFile(`${bmap}.asc`),
    };
    const requested: string[] = [];
    const server: Server = createServer((req, res) => {
      const path = new URL(req.url ?? '/', 'http://x').pathname;
      requested.push(path);
      const body = files[path];
      if (body === undefined) res.writeHead(404).end();
      else res.writeHead(200, { 'content-length': body.length }).end(body);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
    const port = (server.address() as AddressInfo).port;
    const url = `http://127.0.0.1:${port}/d/disk.img?token=1`;
    assert.deepEqual(signatureCandidates(`http://h/d/disk.img.bmap?token=1`), [
      'http://h/d/disk.img.bmap.asc?token=1',
      'http://h/d/disk.img.bmap.sig?token=1',
    ]);
    const r = await copy(url, join(dir, 'out'), { fingerprint: keyA });
    assert.equal(r.bmap?.signature?.path, `http://127.0.0.1:${port}/d/disk.img.bmap.asc?token=1`);
    assert.ok((await readFile(join(dir, 'out'))).equals(image));
    assert.ok(requested.includes('/d/disk.img.bmap.asc'));
    // tampered at the server: a real signature, but of other text
    const other = join(dir, 'other');
    await writeFile(other, 'not the bmap\n');
    await signAs(keyA, '--armor', '--detach-sign', '-o', `${other}.asc`, other);
    files['/d/disk.img.bmap.asc'] = await readFile(`${other}.asc`);
    await assert.rejects(copy(url, join(dir, 'out2')), code('ESIG_INVALID'));
    await assert.rejects(stat(join(dir, 'out2')), { code: 'ENOENT' });
  });

  it("a push checks the local bmap's signature as a local copy does", async (t) => {
    if (!needGpg(t)) return;
    const ssh = sshServer(t);
    if (ssh === undefined) return;
    const { dir, img, bmap, image } = await imageWithBmap();
    await signAs(keyB, '--armor', '--detach-sign', '-o', `${bmap}.asc`, bmap);
    const remote = `${ssh.host}:${join(dir, 'pushed')}`;
    const options = { remote: { ssh: ssh.ssh } };
    // signed by bob, alice asked for: refused before anything reaches the host
    await assert.rejects(
      copy(img, remote, { ...options, fingerprint: keyA }),
      code('ESIG_INVALID'),
    );
    await assert.rejects(stat(join(dir, 'pushed')), { code: 'ENOENT' });
    // alice's keyring only: bob is an unknown signer
    await assert.rejects(
      copy(img, remote, { ...options, keyring: keyringA }),
      code('ESIG_UNKNOWN_KEY'),
    );
    const r = await copy(img, remote, { ...options, fingerprint: keyB });
    assert.deepEqual(r.bmap?.signature?.fingerprints, [keyB]);
    assert.ok((await readFile(join(dir, 'pushed'))).equals(image));
  });

  it("a pull checks its --bmap's signature as a local copy does", async (t) => {
    if (!needGpg(t)) return;
    const ssh = sshServer(t);
    if (ssh === undefined) return;
    const { dir, img, bmap, image } = await imageWithBmap();
    await signAs(keyB, '--armor', '--detach-sign', '-o', `${bmap}.asc`, bmap);
    const remote = `${ssh.host}:${img}`;
    const out = join(dir, 'pulled');
    const options = { remote: { ssh: ssh.ssh }, bmap };
    // signed by bob, alice asked for: refused before ssh starts, nothing written
    await assert.rejects(
      copy(remote, out, { ...options, fingerprint: keyA }),
      code('ESIG_INVALID'),
    );
    await assert.rejects(stat(out), { code: 'ENOENT' });
    await assert.rejects(
      copy(remote, out, { ...options, keyring: keyringA }),
      code('ESIG_UNKNOWN_KEY'),
    );
    await assert.rejects(stat(out), { code: 'ENOENT' });
    // a tampered signature; --no-sig-verify skips the check
    await writeFile(`${bmap}.asc`, 'not a signature\n');
    const cli = await runCli(['copy', '--ssh', ssh.ssh, '--bmap', bmap, remote, out]);
    assert.equal(cli.code, 1, cli.stderr);
    assert.match(cli.stderr, /\[ESIG_INVALID\]$/m);
    await assert.rejects(stat(out), { code: 'ENOENT' });
    const skipped = await copy(remote, out, { ...options, noSigVerify: true });
    assert.equal(skipped.bmap?.signature, undefined);
    await signAs(keyB, '--armor', '--detach-sign', '-o', `${bmap}.asc`, bmap);
    await rm(out);
    const r = await copy(remote, out, { ...options, fingerprint: keyB });
    assert.deepEqual(r.bmap?.signature?.fingerprints, [keyB]);
    assert.equal(r.bmap?.rangesVerified, 1);
    assert.ok((await readFile(out)).equals(image));
  });
});
