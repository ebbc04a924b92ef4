/**
 * What only the end of an archive or stream tells (stream-end.ts): a stored zip entry's CRC-32
 * read from a file, a name given twice (tar -r / tar -u, a zip), a streamed tar's headers after
 * the image, a streamed zip's central directory, a fixed VHD's footer at the end of a raw
 * stream. Each is refused with a coded error and a non-zero exit (nothing written when the
 * image fits in the first read), never written with exit 0; from a file, the name given twice
 * is the last entry, as tar x and unzip give.
 */

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { open, readFile, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { copy } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import { runCli } from './helpers/cli.js';
import { needTool } from './helpers/loop.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const run = promisify(execFile);
const KiB = 1024;
const MiB = 1024 * KiB;

/** A zip built by python3's zipfile: `entries` as [name, path], stored or deflated. */
async function zipOf(out: string, entries: [string, string][], deflated: boolean): Promise<void> {
  await run('python3', [
    '-c',
    'import sys, json, zipfile, warnings\n' +
      'warnings.simplefilter("ignore")\n' +
      'm = zipfile.ZIP_DEFLATED if sys.argv[2] == "1" else zipfile.ZIP_STORED\n' +
      'with zipfile.ZipFile(sys.argv[1], "w", m) as z:\n' +
      '    for name, path in json.loads(sys.argv[3]): z.write(path, name)',
    out,
    deflated ? '1' : '0',
    JSON.stringify(entries),
  ]);
}

test('a stored zip entry whose data is damaged is refused from a file (CRC-32), never exit 0', async (t) => {
  if (!(await needTool(t, 'python3', 'python3'))) return;
  const dir = await tempDir(t);
  for (const size of [256 * KiB, 3 * MiB]) {
    const img = join(dir, `os-${size}.img`);
    await writeFile(img, seededBytes(size, 11));
    const zip = join(dir, `os-${size}.zip`);
    await zipOf(zip, [['os.img', img]], false);
    const bytes = await readFile(zip);
    // a byte of the data (after the 30-byte local header and the name); unzip -t: bad CRC
    bytes[30 + 'os.img'.length + Math.floor(size / 3)]! ^= 0xff;
    await writeFile(zip, bytes);
    const dst = join(dir, `dst-${size}.img`);
    const r = await runCli(['copy', zip, dst]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /os\.img's CRC-32 does not match.*\[ESRC_CORRUPT\]$/m);
    if (size < MiB) {
      // the whole image in the first read: refused before the first write
      assert.equal(existsSync(dst), false, 'no DST');
    } else {
      assert.match(r.stderr, /partly written/);
    }
  }
});

test('a name given twice: the last entry from a file (tar -u, zip), warned; refused from a stream', async (t) => {
  if (!(await needTool(t, 'python3', 'python3'))) return;
  const dir = await tempDir(t);
  const old = seededBytes(512 * KiB, 21);
  const fresh = seededBytes(512 * KiB, 22);
  const img = join(dir, 'os.img');
  await writeFile(img, old);
  const tar = join(dir, 'u.tar');
  await run('tar', ['-C', dir, '-cf', tar, 'os.img']);
  await writeFile(img, fresh);
  // tar -r: appended whatever its time (tar -u compares times, too coarse within a second)
  await run('tar', ['-C', dir, '-rf', tar, 'os.img']);
  const oldPath = join(dir, 'old.img');
  await writeFile(oldPath, old);
  const zip = join(dir, 'd.zip');
  await zipOf(
    zip,
    [
      ['os.img', oldPath],
      ['os.img', img],
    ],
    true,
  );
  for (const archive of [tar, zip]) {
    for (const entry of [[], ['--entry', 'os.img']]) {
      const dst = join(dir, `${archive.endsWith('.tar') ? 'tar' : 'zip'}-${entry.length}.img`);
      const r = await runCli(['copy', ...entry, archive, dst]);
      assert.equal(r.code, 0, r.stderr);
      assert.match(
        r.stderr,
        /holds os\.img 2 times: the last one is decoded.*\[WSRC_DUPLICATE_ENTRY\]/,
      );
      assert.ok((await readFile(dst)).equals(fresh), `${archive} ${entry.join(' ')}: the last`);
    }
    const dst = join(dir, 'stdin.img');
    const r = await runCli(['copy', '-', dst], { input: await readFile(archive) });
    assert.equal(r.code, 1, r.stderr);
    assert.match(
      r.stderr,
      /streamed\) holds os\.img 2 times.*save the archive \(decompressed\) to a file.*\[ESRC_ENTRY\]$/m,
    );
    // the image fits in the first read: nothing was written
    assert.equal(existsSync(dst), false, `${archive} from stdin: no DST`);
  }
});

test('an image replaced later in the tar by a link of its name (tar -r) is refused from a file and a stream', async (t) => {
  const dir = await tempDir(t);
  await writeFile(join(dir, 'os.img'), seededBytes(256 * KiB, 51));
  const tar = join(dir, 'linked.tar');
  await run('tar', ['-C', dir, '-cf', tar, 'os.img']);
  const later = join(dir, 'later');
  await run('mkdir', [later]);
  await writeFile(join(later, 'other.img'), seededBytes(256 * KiB, 52));
  await run('ln', ['-s', 'other.img', join(later, 'os.img')]);
  await run('tar', ['-C', later, '-rf', tar, 'os.img']);
  for (const entry of [[], ['--entry', 'os.img']]) {
    const fromFile = await runCli(['copy', ...entry, tar, join(dir, 'file.img')]);
    assert.equal(fromFile.code, 1, fromFile.stderr);
    assert.match(fromFile.stderr, /after it, a link or directory of that name.*\[ESRC_ENTRY\]$/m);
    assert.equal(existsSync(join(dir, 'file.img')), false, 'nothing written from the file');
    const dst = join(dir, 'stdin.img');
    const r = await runCli(['copy', ...entry, '-', dst], { input: await readFile(tar) });
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /after it, a link or directory of that name.*\[ESRC_ENTRY\]$/m);
    assert.equal(existsSync(dst), false, 'nothing written from the stream');
  }
});

test('two images in a streamed archive: refused as from a file (ESRC_ENTRY), never the first with exit 0; --entry picks', async (t) => {
  if (!(await needTool(t, 'python3', 'python3'))) return;
  const dir = await tempDir(t);
  const a = seededBytes(256 * KiB, 41);
  const b = seededBytes(256 * KiB, 42);
  await writeFile(join(dir, 'a.img'), a);
  await writeFile(join(dir, 'b.img'), b);
  const tar = join(dir, 'two.tar');
  await run('tar', ['-C', dir, '-cf', tar, 'a.img', 'b.img']);
  const zip = join(dir, 'two.zip');
  await zipOf(
    zip,
    [
      ['a.img', join(dir, 'a.img')],
      ['b.img', join(dir, 'b.img')],
    ],
    true,
  );
  for (const archive of [tar, zip]) {
    const input = await readFile(archive);
    const fromFile = await runCli(['copy', archive, join(dir, 'file.img')]);
    assert.equal(fromFile.code, 1, fromFile.stderr);
    assert.match(fromFile.stderr, /cannot tell which is the image.*\[ESRC_ENTRY\]$/m);
    const dst = join(dir, 'stdin.img');
    const r = await runCli(['copy', '-', dst], { input });
    assert.equal(r.code, 1, `${archive}: ${r.stderr}`);
    assert.match(
      r.stderr,
      /streamed\) holds 2 files named like an image.*--entry NAME: a\.img.*b\.img.*\[ESRC_ENTRY\]$/m,
    );
    assert.equal(existsSync(dst), false, `${archive} from stdin: nothing written`);
    for (const [entry, want] of [
      ['a.img', a],
      ['b.img', b],
    ] as const) {
      const picked = join(dir, `picked-${entry}`);
      const ok = await runCli(['copy', '--entry', entry, '-', picked], { input });
      assert.equal(ok.code, 0, ok.stderr);
      assert.ok((await readFile(picked)).equals(want), `${archive} --entry ${entry}`);
    }
  }
});

test("a streamed tar is walked to its end: a lying size, a header after the image that doesn't hold, a cut archive", async (t) => {
  const dir = await tempDir(t);
  const data = seededBytes(3 * MiB, 31);
  await writeFile(join(dir, 'os.img'), data);
  await writeFile(join(dir, 'readme.txt'), 'notes\n');
  const tar = join(dir, 'os.tar');
  await run('tar', ['-C', dir, '-cf', tar, 'os.img', 'readme.txt']);
  const good = await readFile(tar);
  // well formed, a file after the image: decoded, exit 0
  const ok = await runCli(['copy', '-', join(dir, 'ok.img')], { input: good });
  assert.equal(ok.code, 0, ok.stderr);
  assert.ok((await readFile(join(dir, 'ok.img'))).equals(data));
  // the image's header says 512 KiB (checksum valid): the next "header" is its data
  const lying = Buffer.from(good);
  lying.write(`${(512 * KiB).toString(8).padStart(11, '0')}\0`, 124, 'latin1');
  lying.fill(0x20, 148, 156);
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += lying[i]!;
  lying.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'latin1');
  const lied = await runCli(['copy', '-', join(dir, 'lying.img')], { input: lying });
  assert.equal(lied.code, 1, lied.stderr);
  assert.match(lied.stderr, /no valid header at byte 524800.*\[ESRC_CORRUPT\]$/m);
  assert.equal(existsSync(join(dir, 'lying.img')), false, 'the image fit in the first read');
  // cut inside readme.txt's header, after the image
  const cut = good.subarray(0, 512 + data.length + 100);
  const short = await runCli(['copy', '-', join(dir, 'cut.img')], { input: cut });
  assert.equal(short.code, 1, short.stderr);
  assert.match(short.stderr, /\[ESRC_SHORT\]$/m);
});

test('a streamed zip is read to its central directory: cut after the image, or a data descriptor entry damaged', async (t) => {
  if (!(await needTool(t, 'python3', 'python3'))) return;
  const dir = await tempDir(t);
  const data = Buffer.concat([seededBytes(300 * KiB, 41), Buffer.alloc(200 * KiB)]);
  const img = join(dir, 'os.img');
  await writeFile(img, data);
  const zip = join(dir, 'os.zip');
  await zipOf(zip, [['os.img', img]], true);
  const good = await readFile(zip);
  const central = good.lastIndexOf(Buffer.from('PK\x01\x02', 'latin1'));
  const cut = await runCli(['copy', '-', join(dir, 'cut.img')], {
    input: good.subarray(0, central),
  });
  assert.equal(cut.code, 1, cut.stderr);
  assert.match(cut.stderr, /ends without its central directory.*\[ESRC_SHORT\]$/m);
  assert.equal(existsSync(join(dir, 'cut.img')), false);
  // written to a pipe: the sizes and CRC-32 follow the data, in a descriptor; the central
  // directory's CRC-32 is the one left to check it against
  const piped = join(dir, 'piped.zip');
  await run('sh', [
    '-c',
    "python3 -c \"import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.stdout.buffer, 'w', zipfile.ZIP_DEFLATED) as z, z.open('os.img', 'w') as d, open(sys.argv[1], 'rb') as s: shutil.copyfileobj(s, d)\" \"$0\" | cat > \"$1\"",
    img,
    piped,
  ]);
  const p = await readFile(piped);
  assert.equal(p.readUInt16LE(6) & 8, 8, 'a data descriptor');
  const ok = await runCli(['copy', '--size', String(data.length), '-', join(dir, 'ok.img')], {
    input: p,
  });
  assert.equal(ok.code, 0, ok.stderr);
  assert.ok((await readFile(join(dir, 'ok.img'))).equals(data));
  const pc = p.lastIndexOf(Buffer.from('PK\x01\x02', 'latin1'));
  const bad = Buffer.from(p);
  bad[pc + 16]! ^= 0xff; // the directory's CRC-32
  const d = p.lastIndexOf(Buffer.from('PK\x07\x08', 'latin1'));
  bad[d + 4]! ^= 0xff; // and the descriptor's
  const r = await runCli(['copy', '--size', String(data.length), '-', join(dir, 'bad.img')], {
    input: bad,
  });
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /CRC-32 does not match.*\[ESRC_CORRUPT\]$/m);
  assert.equal(existsSync(join(dir, 'bad.img')), false);
});

test('a fixed VHD streamed (stdin, xz, a URL) is refused at its end, its footer never written; --raw writes it', async (t) => {
  if (!(await needTool(t, 'qemu-img', 'qemu-utils'))) return;
  if (!(await needTool(t, 'xz', 'xz-utils'))) return;
  const dir = await tempDir(t);
  const data = Buffer.concat([seededBytes(2 * MiB, 51), Buffer.alloc(MiB), seededBytes(MiB, 52)]);
  const img = join(dir, 'os.img');
  await writeFile(img, data);
  const vhd = join(dir, 'os.vhd');
  await run('qemu-img', [
    'convert',
    '-f',
    'raw',
    '-O',
    'vpc',
    '-o',
    'subformat=fixed,force_size=on',
    img,
    vhd,
  ]);
  const v = await readFile(vhd);
  assert.equal(v.length, data.length + 512);
  await run('xz', ['-k', '-0', '-T1', vhd]);
  const server = createServer((req, res) => {
    res.writeHead(200, { 'content-length': v.length });
    res.end(v);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/os.vhd`;
  const runs: [string, string[], Buffer | undefined][] = [
    ['stdin', ['--size', String(v.length), '-'], v],
    ['xz', [`${vhd}.xz`], undefined],
    ['url', [url], undefined],
  ];
  for (const [how, args, input] of runs) {
    const dst = join(dir, `${how}.img`);
    const r = await runCli(['copy', ...args, dst], input !== undefined ? { input } : {});
    assert.equal(r.code, 1, `${how}: ${r.stderr}`);
    assert.match(r.stderr, /ends with a fixed VHD's 512-byte footer.*\[ESRC_CONTAINER\]$/m, how);
    const written = await readFile(dst);
    assert.equal(written.indexOf('conectix'), -1, `${how}: the footer is not in DST`);
  }
  // from the file it decodes; --raw writes the stream as it is
  const fromFile = await runCli(['copy', vhd, join(dir, 'file.img')]);
  assert.equal(fromFile.code, 0, fromFile.stderr);
  assert.ok((await readFile(join(dir, 'file.img'))).equals(data));
  const raw = await runCli(
    ['copy', '--raw', '--size', String(v.length), '-', join(dir, 'raw.img')],
    {
      input: v,
    },
  );
  assert.equal(raw.code, 0, raw.stderr);
  assert.ok((await readFile(join(dir, 'raw.img'))).equals(v));
});

test('fuzz: mutated zips and tars streamed from a URL decode or fail with a BlksyncError, never anything else', async (t) => {
  if (!(await needTool(t, 'python3', 'python3'))) return;
  const dir = await tempDir(t);
  const img = join(dir, 'os.img');
  await writeFile(img, seededBytes(12 * KiB, 61));
  await writeFile(join(dir, 'b.txt'), 'b\n');
  const samples: Buffer[] = [];
  await zipOf(
    join(dir, 'a.zip'),
    [
      ['os.img', img],
      ['b.txt', join(dir, 'b.txt')],
    ],
    true,
  );
  samples.push(await readFile(join(dir, 'a.zip')));
  await zipOf(
    join(dir, 's.zip'),
    [
      ['os.img', img],
      ['os.img', img],
    ],
    false,
  );
  samples.push(await readFile(join(dir, 's.zip')));
  await run('sh', [
    '-c',
    'python3 -c "import sys, zipfile\nwith zipfile.ZipFile(sys.stdout.buffer, \'w\', zipfile.ZIP_DEFLATED) as z: z.write(sys.argv[1], \'os.img\')" "$0" | cat > "$1"',
    img,
    join(dir, 'p.zip'),
  ]);
  samples.push(await readFile(join(dir, 'p.zip')));
  await run('tar', ['-C', dir, '--format=posix', '-cf', join(dir, 'a.tar'), 'os.img', 'b.txt']);
  samples.push(await readFile(join(dir, 'a.tar')));
  let body = Buffer.alloc(0);
  const server = createServer((req, res) => {
    res.writeHead(200, { 'content-length': body.length });
    res.end(body);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/x`;
  let x = 97531;
  const r = (): number => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
  for (let i = 0; i < 300; i++) {
    const good = samples[i % samples.length]!;
    let m = Buffer.from(good);
    const at = Math.floor(r() * m.length);
    const kind = Math.floor(r() * 3);
    if (kind === 0) m[at] = Math.floor(r() * 256);
    else if (kind === 1) m = m.subarray(0, at);
    else if (at + 4 <= m.length) m.writeUInt32LE(Math.floor(r() * 2 ** 32), at);
    body = m;
    try {
      await copy(url, join(dir, 'fuzz.out'), {
        dryRun: true,
        entry: 'os.img',
        size: 12 * KiB,
      });
    } catch (err) {
      assert.ok(err instanceof BlksyncError, `case ${i}: ${String(err)}`);
    }
  }
});

test("with a bmap whose mapped ranges end before the image's end, the stream's end is checked all the same", async (t) => {
  if (!(await needTool(t, 'python3', 'python3'))) return;
  const dir = await tempDir(t);
  // data at the start of each 1.5 MiB, holes between and 2 MiB of hole at the end: 8 ranges
  const img = join(dir, 'sp.img');
  const fh = await open(img, 'w');
  for (let i = 0; i < 8; i++)
    await fh.write(seededBytes(512 * KiB, 70 + i), 0, 512 * KiB, i * 1536 * KiB);
  await fh.truncate(14 * MiB);
  await fh.close();
  const bmap = join(dir, 'sp.bmap');
  const made = await runCli(['bmap', 'create', img, '-o', bmap]);
  assert.equal(made.code, 0, made.stderr);
  assert.match(made.stderr + made.stdout, /in 8 ranges/);
  const zip = join(dir, 'sp.zip');
  await zipOf(zip, [['sp.img', img]], false);
  const bytes = await readFile(zip);
  bytes[30 + 'sp.img'.length + 13 * MiB]! ^= 0xff; // past the last mapped range
  await writeFile(zip, bytes);
  for (const from of ['file', 'stdin']) {
    const dst = join(dir, `${from}.img`);
    const args = ['copy', '--bmap', bmap, '--no-verify-checksums'];
    const r =
      from === 'file'
        ? await runCli([...args, zip, dst])
        : await runCli([...args, '-', dst], { input: bytes });
    assert.equal(r.code, 1, `${from}: ${r.stderr}`);
    assert.match(r.stderr, /CRC-32 does not match.*\[ESRC_CORRUPT\]$/m, from);
  }
});
