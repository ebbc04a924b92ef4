/**
 * `index SRC` and `diff BASE NEW` read SRC and NEW as `copy` reads its SRC
 * (src/engine/copy-source.ts): compressed by magic bytes, stdin, http(s). Real decoders, a
 * real HTTP server on 127.0.0.1; a failed stream leaves no index or patch behind.
 */

import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFile, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { apply } from '../src/engine/apply.js';
import { copy } from '../src/copy.js';
import { diff } from '../src/engine/diff.js';
import { makeIndex, type MakeIndexResult } from '../src/engine/make-index.js';
import { BlksyncError } from '../src/errors.js';
import { readIndexFile } from '../src/formats/index-file.js';
import { runCli } from './helpers/cli.js';
import { need } from './helpers/resources.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const KIB = 1024;
const MIB = 1024 * KIB;

const COMPRESSORS: Record<string, { ext: string; cmd: string[]; pkg: string }> = {
  gzip: { ext: 'gz', cmd: ['gzip', '-c'], pkg: 'gzip' },
  xz: { ext: 'xz', cmd: ['xz', '-c', '-0'], pkg: 'xz-utils' },
  zstd: { ext: 'zst', cmd: ['zstd', '-qc'], pkg: 'zstd' },
  bzip2: { ext: 'bz2', cmd: ['bzip2', '-c'], pkg: 'bzip2' },
  lz4: { ext: 'lz4', cmd: ['lz4', '-c'], pkg: 'lz4' },
};

function have(cmd: string): boolean {
  return spawnSync(cmd, ['--help'], { stdio: 'ignore' }).error === undefined;
}

/** Compresses with the real tool, or skips (fails under BLKSYNC_TEST_STRICT=1) without it. */
function packed(t: TestContext, kind: string, data: Buffer): Buffer | undefined {
  const c = COMPRESSORS[kind]!;
  if (!need(t, have(c.cmd[0]!), `${c.cmd[0]} is not installed (apt-get install ${c.pkg})`)) {
    return undefined;
  }
  return execFileSync(c.cmd[0]!, c.cmd.slice(1), { input: data, maxBuffer: 64 * MIB });
}

/** NEW: random extents in zeros, not a whole number of blocks; OLD: shorter, some blocks changed. */
const SIZE = 6 * MIB + 12345;
const NEW = Buffer.alloc(SIZE);
seededBytes(700 * KIB, 1).copy(NEW, 0);
seededBytes(MIB, 2).copy(NEW, 3 * MIB);
seededBytes(12345 + 5000, 3).copy(NEW, 6 * MIB - 5000);
const OLD = Buffer.from(NEW.subarray(0, SIZE - 100_000));
for (const at of [4096, 3 * MIB + 70_000, 5 * MIB]) seededBytes(3000, at).copy(OLD, at);

function isCode(code: string) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof BlksyncError, String(err));
    assert.equal(err.code, code, err.message);
    return true;
  };
}

/** The parts of two indexes that describe the image (not what it was read from). */
async function sameHashes(a: string, b: string): Promise<void> {
  const [x, y] = await Promise.all([readIndexFile(a), readIndexFile(b)]);
  assert.equal(x.imageSize, y.imageSize);
  assert.equal(x.blockSize, y.blockSize);
  assert.equal(x.blockCount, y.blockCount);
  assert.ok(x.hashes.equals(y.hashes), `${a} and ${b} hold different hashes`);
}

/** Applies `patch` to a copy of OLD and checks that it gives NEW. */
async function appliesToOld(dir: string, patch: string): Promise<void> {
  const target = join(dir, `target-${Math.random().toString(36).slice(2)}`);
  await writeFile(target, OLD);
  await apply(patch, target);
  assert.ok((await readFile(target)).equals(NEW), 'the patch turns OLD into NEW');
}

async function files(dir: string): Promise<string[]> {
  return (await readdir(dir)).sort();
}

describe('index of a compressed file', () => {
  for (const kind of Object.keys(COMPRESSORS)) {
    it(`${kind}: same hashes as the raw image; an identity no destination has`, async (t) => {
      const data = packed(t, kind, NEW);
      if (data === undefined) return;
      const dir = await tempDir(t);
      await writeFile(join(dir, 'new.img'), NEW);
      // a name that does not tell the format: detection is by content
      const src = join(dir, 'new.bin');
      await writeFile(src, data);
      const raw = await makeIndex(join(dir, 'new.img'), join(dir, 'raw.idx'));
      const r = await makeIndex(src, join(dir, 'packed.idx'), { blockSize: 64 * KIB });
      await sameHashes(join(dir, 'raw.idx'), join(dir, 'packed.idx'));
      assert.equal(r.compression, kind);
      assert.equal(r.bytesHashed, SIZE);
      const st = await stat(src);
      assert.equal(r.identity, `${kind}:file:${st.dev}:${st.ino}`);
      assert.notEqual(r.identity, raw.identity);
      const id = (await readIndexFile(join(dir, 'packed.idx'))).identity;
      assert.equal(id.size, data.length, 'the identity describes the compressed file');
      // --size saves the counting pass; it must be right
      await makeIndex(src, join(dir, 'sized.idx'), { size: SIZE });
      await sameHashes(join(dir, 'raw.idx'), join(dir, 'sized.idx'));
      await assert.rejects(
        makeIndex(src, join(dir, 'small.idx'), { size: SIZE - 1 }),
        isCode('EUSAGE'),
      );
      await assert.rejects(
        makeIndex(src, join(dir, 'large.idx'), { size: SIZE + 1 }),
        isCode('ESRC_SHORT'),
      );
      assert.deepEqual(await files(dir), [
        'new.bin',
        'new.img',
        'packed.idx',
        'raw.idx',
        'sized.idx',
      ]);
    });
  }

  it('a truncated or damaged .xz is an error and leaves no index', async (t) => {
    const data = packed(t, 'xz', NEW);
    if (data === undefined) return;
    const dir = await tempDir(t);
    const cut = join(dir, 'cut.img.xz');
    await writeFile(cut, data.subarray(0, Math.floor(data.length * 0.6)));
    await assert.rejects(makeIndex(cut, join(dir, 'a.idx')), isCode('ESRC_SHORT'));
    // with --size there is no counting pass: the pipeline meets the end of the stream
    await assert.rejects(makeIndex(cut, join(dir, 'b.idx'), { size: SIZE }), isCode('ESRC_SHORT'));
    const bad = Buffer.from(data);
    for (let i = 64; i < 4096; i++) bad[i] = 0x55;
    await writeFile(join(dir, 'bad.img.xz'), bad);
    await assert.rejects(
      makeIndex(join(dir, 'bad.img.xz'), join(dir, 'c.idx'), { size: SIZE }),
      (err) => {
        assert.ok(err instanceof BlksyncError);
        assert.ok(['ESRC_CORRUPT', 'ESRC_SHORT'].includes(err.code), err.message);
        return true;
      },
    );
    const cli = await runCli(['index', cut, '-o', join(dir, 'd.idx')]);
    assert.equal(cli.code, 1);
    assert.match(cli.stderr, /\[ESRC_SHORT\]/);
    assert.deepEqual(await files(dir), ['bad.img.xz', 'cut.img.xz']);
  });

  it('is refused by copy --index as an index of the destination, and -o auto is refused', async (t) => {
    const data = packed(t, 'xz', OLD);
    if (data === undefined) return;
    const dir = await tempDir(t);
    const oldXz = join(dir, 'old.img.xz');
    await writeFile(oldXz, data);
    await writeFile(join(dir, 'new.img'), NEW);
    await writeFile(join(dir, 'old.img'), OLD);
    const idx = join(dir, 'old.idx');
    await makeIndex(oldXz, idx);
    // not even onto the compressed file it was made from: its hashes are of the decoded image
    for (const dst of [oldXz, join(dir, 'old.img')]) {
      const before = await readFile(dst);
      // a SRC of DST's size, so that nothing but the index can be refused
      const src = join(dir, 'src.img');
      await writeFile(src, seededBytes(before.length, 9));
      await assert.rejects(
        copy(src, dst, { index: idx }),
        (err) => isCode('EINDEX_MISMATCH')(err) && /made for xz:file:/.test((err as Error).message),
      );
      assert.ok((await readFile(dst)).equals(before), `${dst} is untouched`);
    }
    const auto = await runCli(['index', oldXz, '-o', 'auto']);
    assert.equal(auto.code, 2);
    assert.match(auto.stderr, /-o auto .*give -o FILE \[EUSAGE\]/);
  });
});

describe('index and diff from stdin', () => {
  it('index - needs --size for a pipe, and then equals the index of the file', async (t) => {
    const data = packed(t, 'zstd', NEW);
    if (data === undefined) return;
    const dir = await tempDir(t);
    await writeFile(join(dir, 'new.img'), NEW);
    await makeIndex(join(dir, 'new.img'), join(dir, 'raw.idx'));
    const unsized = await runCli(['index', '-', '-o', join(dir, 'x.idx')], { input: data });
    assert.equal(unsized.code, 2);
    assert.match(unsized.stderr, /not known before reading it all; give its size \(--size BYTES\)/);
    for (const [name, input] of [
      ['zstd', data],
      ['raw', NEW],
    ] as const) {
      const out = join(dir, `${name}.idx`);
      const r = await runCli(['index', '--size', String(SIZE), '-', '-o', out, '--json'], {
        input,
      });
      assert.equal(r.code, 0, r.stderr);
      const result = JSON.parse(r.stdout) as MakeIndexResult;
      assert.equal(result.sourceKind, 'stdin');
      assert.equal(result.identity, 'stdin');
      await sameHashes(join(dir, 'raw.idx'), out);
      assert.equal((await readIndexFile(out)).identity.weak, true);
    }
    const long = await runCli(
      ['index', '--size', String(SIZE + 4096), '-', '-o', join(dir, 'long.idx')],
      {
        input: data,
      },
    );
    assert.equal(long.code, 1);
    assert.match(long.stderr, /\[ESRC_SHORT\]/);
    assert.ok(!(await files(dir)).includes('long.idx'));
  });

  it('diff BASE - reads NEW from stdin', async (t) => {
    const data = packed(t, 'gzip', NEW);
    if (data === undefined) return;
    const dir = await tempDir(t);
    await writeFile(join(dir, 'old.img'), OLD);
    const patch = join(dir, 'p.patch');
    const r = await runCli(
      ['diff', '--size', String(SIZE), join(dir, 'old.img'), '-', '-o', patch],
      {
        input: data,
      },
    );
    assert.equal(r.code, 0, r.stderr);
    await appliesToOld(dir, patch);
  });
});

describe('diff with a compressed NEW', () => {
  it('diff old.idx new.img.zst: a patch that apply turns old.img into new.img with', async (t) => {
    const data = packed(t, 'zstd', NEW);
    if (data === undefined) return;
    const dir = await tempDir(t);
    await writeFile(join(dir, 'old.img'), OLD);
    await writeFile(join(dir, 'new.img.zst'), data);
    await makeIndex(join(dir, 'old.img'), join(dir, 'old.idx'));
    const patch = join(dir, 'p.patch');
    const d = await diff(join(dir, 'old.idx'), join(dir, 'new.img.zst'), patch);
    assert.equal(d.resultSize, SIZE);
    assert.equal(d.bytesRead, 0);
    await appliesToOld(dir, patch);
  });

  it('diff old-index-of-.xz new.img.xz: a release diffed against the last without unpacking', async (t) => {
    const oldXz = packed(t, 'xz', OLD);
    const newXz = packed(t, 'xz', NEW);
    if (oldXz === undefined || newXz === undefined) return;
    const dir = await tempDir(t);
    await writeFile(join(dir, 'old.img.xz'), oldXz);
    await writeFile(join(dir, 'new.img.xz'), newXz);
    const idx = join(dir, 'old.img.xz.idx');
    const made = await runCli(['index', join(dir, 'old.img.xz'), '-o', idx, '-q']);
    assert.equal(made.code, 0, made.stderr);
    const patch = join(dir, 'p.patch');
    const r = await runCli(['diff', idx, join(dir, 'new.img.xz'), '-o', patch, '-q']);
    assert.equal(r.code, 0, r.stderr);
    await appliesToOld(dir, patch);
  });

  it('diff BASE NEW.gz, and with BASE longer than NEW (reversible)', async (t) => {
    const newGz = packed(t, 'gzip', NEW);
    const oldGz = packed(t, 'gzip', OLD);
    if (newGz === undefined || oldGz === undefined) return;
    const dir = await tempDir(t);
    await writeFile(join(dir, 'old.img'), OLD);
    await writeFile(join(dir, 'new.img'), NEW);
    await writeFile(join(dir, 'new.img.gz'), newGz);
    await writeFile(join(dir, 'old.img.gz'), oldGz);
    const patch = join(dir, 'p.patch');
    await diff(join(dir, 'old.img'), join(dir, 'new.img.gz'), patch, { reversible: true });
    await appliesToOld(dir, patch);
    // the reverse: NEW (compressed) shorter than BASE, the tail read from the stream
    const back = join(dir, 'back.patch');
    await diff(join(dir, 'new.img'), join(dir, 'old.img.gz'), back, { reversible: true });
    const target = join(dir, 't');
    await copyFile(join(dir, 'new.img'), target);
    await apply(back, target);
    assert.ok((await readFile(target)).equals(OLD));
    await apply(back, target, { reverse: true });
    assert.ok((await readFile(target)).equals(NEW));
  });

  it('a truncated NEW is an error and leaves no patch, partial or not', async (t) => {
    const data = packed(t, 'xz', NEW);
    if (data === undefined) return;
    const dir = await tempDir(t);
    await writeFile(join(dir, 'old.img'), OLD);
    await makeIndex(join(dir, 'old.img'), join(dir, 'old.idx'));
    const cut = join(dir, 'cut.img.xz');
    await writeFile(cut, data.subarray(0, Math.floor(data.length * 0.6)));
    const patch = join(dir, 'p.patch');
    for (const base of ['old.img', 'old.idx']) {
      await assert.rejects(diff(join(dir, base), cut, patch), isCode('ESRC_SHORT'));
      // with --size the patch's partial file exists when the stream fails
      await assert.rejects(diff(join(dir, base), cut, patch, { size: SIZE }), isCode('ESRC_SHORT'));
    }
    const cli = await runCli([
      'diff',
      join(dir, 'old.img'),
      cut,
      '-o',
      patch,
      '--size',
      String(SIZE),
    ]);
    assert.equal(cli.code, 1);
    assert.match(cli.stderr, /\[ESRC_SHORT\]/);
    assert.deepEqual(await files(dir), ['cut.img.xz', 'old.idx', 'old.img']);
  });

  it('refuses a patch written over NEW, compressed or not', async (t) => {
    const data = packed(t, 'gzip', NEW);
    if (data === undefined) return;
    const dir = await tempDir(t);
    await writeFile(join(dir, 'old.img'), OLD);
    await writeFile(join(dir, 'new.img.gz'), data);
    const r = await runCli([
      'diff',
      join(dir, 'old.img'),
      join(dir, 'new.img.gz'),
      '-o',
      join(dir, 'new.img.gz'),
    ]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /is NEW .*writing it would destroy that.*\[ESAME_FILE\]/);
    assert.ok((await readFile(join(dir, 'new.img.gz'))).equals(data));
  });
});

describe('index and diff of a URL', () => {
  let server: Server;
  let base: string;
  let newZst: Buffer | undefined;

  before(async () => {
    if (have('zstd')) newZst = execFileSync('zstd', ['-qc'], { input: NEW, maxBuffer: 64 * MIB });
    server = createServer((req, res) => {
      const path = new URL(req.url ?? '/', 'http://x').pathname;
      const send = (body: Buffer): void => {
        res.writeHead(200, { 'content-length': body.length });
        res.end(body);
      };
      if (path === '/new.img') send(NEW);
      else if (path === '/new.img.zst' && newZst !== undefined) send(newZst);
      else if (path === '/cut.img') {
        // promise the whole image, send a third, drop the connection
        res.writeHead(200, { 'content-length': NEW.length });
        res.write(NEW.subarray(0, 2 * MIB), () => res.socket?.destroy());
      } else {
        res.writeHead(404);
        res.end();
      }
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(() => new Promise<void>((resolve) => server.close(() => resolve())));

  it('index URL equals the index of the file; its identity names the URL, weakly', async (t) => {
    const dir = await tempDir(t);
    await writeFile(join(dir, 'new.img'), NEW);
    await makeIndex(join(dir, 'new.img'), join(dir, 'raw.idx'));
    const r = await makeIndex(`${base}/new.img?token=secret`, join(dir, 'url.idx'));
    assert.equal(r.sourceKind, 'url');
    await sameHashes(join(dir, 'raw.idx'), join(dir, 'url.idx'));
    const id = (await readIndexFile(join(dir, 'url.idx'))).identity;
    assert.deepEqual(id, {
      kind: 'file',
      size: SIZE,
      key: `url:${base}/new.img`,
      weak: true,
      path: `${base}/new.img`,
    });
    if (!need(t, newZst !== undefined, 'zstd is not installed (apt-get install zstd)')) return;
    await assert.rejects(makeIndex(`${base}/new.img.zst`, join(dir, 'x.idx')), isCode('EUSAGE'));
    await makeIndex(`${base}/new.img.zst`, join(dir, 'zst.idx'), { size: SIZE });
    await sameHashes(join(dir, 'raw.idx'), join(dir, 'zst.idx'));
  });

  it('diff BASE URL makes the same patch as from the file', async (t) => {
    const dir = await tempDir(t);
    await writeFile(join(dir, 'old.img'), OLD);
    await makeIndex(join(dir, 'old.img'), join(dir, 'old.idx'));
    await diff(join(dir, 'old.idx'), `${base}/new.img`, join(dir, 'p.patch'));
    await appliesToOld(dir, join(dir, 'p.patch'));
    if (!need(t, newZst !== undefined, 'zstd is not installed (apt-get install zstd)')) return;
    const r = await runCli([
      'diff',
      '--size',
      String(SIZE),
      join(dir, 'old.img'),
      `${base}/new.img.zst`,
      '-o',
      join(dir, 'q.patch'),
    ]);
    assert.equal(r.code, 0, r.stderr);
    await appliesToOld(dir, join(dir, 'q.patch'));
  });

  it('a 404 is the error copy gives, a cut connection ESRC_SHORT; nothing is left', async (t) => {
    const dir = await tempDir(t);
    await writeFile(join(dir, 'old.img'), OLD);
    const missing = `${base}/missing.img`;
    const fromCopy = await copy(missing, join(dir, 'dst')).then(
      () => assert.fail('copy of a 404 succeeded'),
      (err: unknown) => err as BlksyncError,
    );
    assert.equal(fromCopy.code, 'ESRC_HTTP');
    const same = (err: unknown): boolean => {
      assert.ok(err instanceof BlksyncError, String(err));
      assert.equal(err.code, fromCopy.code);
      assert.equal(err.message, fromCopy.message);
      return true;
    };
    await assert.rejects(makeIndex(missing, join(dir, 'a.idx')), same);
    await assert.rejects(diff(join(dir, 'old.img'), missing, join(dir, 'a.patch')), same);
    const cliCopy = await runCli(['copy', missing, join(dir, 'dst')]);
    const cliIndex = await runCli(['index', missing, '-o', join(dir, 'b.idx')]);
    const cliDiff = await runCli([
      'diff',
      join(dir, 'old.img'),
      missing,
      '-o',
      join(dir, 'b.patch'),
    ]);
    assert.match(cliCopy.stderr, /HTTP 404.*\[ESRC_HTTP\]/);
    for (const r of [cliIndex, cliDiff]) {
      assert.equal(r.code, cliCopy.code);
      assert.equal(r.stderr, cliCopy.stderr);
    }
    await assert.rejects(makeIndex(`${base}/cut.img`, join(dir, 'c.idx')), isCode('ESRC_SHORT'));
    await assert.rejects(
      diff(join(dir, 'old.img'), `${base}/cut.img`, join(dir, 'c.patch')),
      isCode('ESRC_SHORT'),
    );
    assert.deepEqual(await files(dir), ['old.img']);
  });
});
