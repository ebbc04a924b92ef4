/**
 * zip (python3's zipfile: stored, deflated, zip64, data descriptors) and tar (GNU tar:
 * ustar, gnu, pax; plain and compressed) holding an image, from a file and from stdin: DST
 * ends equal to the image, the delta is kept, the entry is chosen or named with --entry, and
 * damaged archives are refused before anything is written. Both parsers are fuzzed.
 */

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { promisify } from 'node:util';
import { copy } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import { runCli } from './helpers/cli.js';
import { needTool } from './helpers/loop.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const run = promisify(execFile);
const BS = 4096;

/** An image: data, zeros, data (so the delta shows). */
function image(seed: number): Buffer {
  return Buffer.concat([
    seededBytes(200 * BS, seed),
    Buffer.alloc(300 * BS),
    seededBytes(37 * BS + 100, seed + 1),
  ]);
}

/**
 * Makes a zip with python3's zipfile: `files` as name → path; `mode`: stored, deflated,
 * zip64 (forced zip64 headers), stream (written to a pipe: sizes in data descriptors).
 */
async function makeZip(
  out: string,
  files: Record<string, string>,
  mode: 'stored' | 'deflated' | 'zip64' | 'stream',
): Promise<void> {
  const script = `
import sys, json, zipfile, shutil
mode, out, files = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
method = zipfile.ZIP_STORED if mode == 'stored' else zipfile.ZIP_DEFLATED
target = sys.stdout.buffer if mode == 'stream' else out
with zipfile.ZipFile(target, 'w', method) as z:
    for name, path in files.items():
        with open(path, 'rb') as src, z.open(name, 'w', force_zip64=(mode == 'zip64')) as dst:
            shutil.copyfileobj(src, dst)
`;
  if (mode === 'stream') {
    await run('sh', [
      '-c',
      `python3 -c "$0" "$@" | cat > "$2"`,
      script,
      mode,
      out,
      JSON.stringify(files),
    ]);
  } else {
    await run('python3', ['-c', script, mode, out, JSON.stringify(files)]);
  }
}

async function needZip(t: TestContext): Promise<boolean> {
  return needTool(t, 'python3', 'python3');
}

test('zips (stored, deflated, zip64, data descriptors) decode from a file and from stdin', async (t) => {
  if (!(await needZip(t))) return;
  const dir = await tempDir(t);
  const img = join(dir, 'os.img');
  const bytes = image(1);
  await writeFile(img, bytes);
  for (const mode of ['stored', 'deflated', 'zip64', 'stream'] as const) {
    const zip = join(dir, `${mode}.zip`);
    await makeZip(zip, { 'os.img': img, 'os.img.sha256': img.replace('os.img', 'os.img') }, mode);
    const dst = join(dir, `${mode}.out`);
    const r = await copy(zip, dst);
    assert.ok((await readFile(dst)).equals(bytes), `${mode}: file`);
    assert.equal(r.bytesWritten, 237 * BS + 100);
    const again = await copy(zip, dst);
    assert.equal(again.bytesWritten, 0, `${mode}: the delta is kept`);
    if (mode !== 'stream') {
      // from a stream, the first file named like an image is the image
      const viaStdin = join(dir, `${mode}.stdin.out`);
      const c = await runCli(['copy', '-', viaStdin], { input: await readFile(zip) });
      assert.equal(c.code, 0, `${mode}: ${c.stderr}`);
      assert.ok((await readFile(viaStdin)).equals(bytes), `${mode}: stdin`);
    }
  }
  // a descriptor-sized entry from a stream: its size is not known before its data
  const streamZip = await readFile(join(dir, 'stream.zip'));
  const unknown = await runCli(['copy', '-', join(dir, 'u.out')], { input: streamZip });
  assert.notEqual(unknown.code, 0);
  assert.match(unknown.stderr, /--size/);
  const sized = await runCli(['copy', '--size', String(bytes.length), '-', join(dir, 'u.out')], {
    input: streamZip,
  });
  assert.equal(sized.code, 0, sized.stderr);
  assert.ok((await readFile(join(dir, 'u.out'))).equals(bytes));
});

test('a large deflated entry decodes without a word on stderr (no listener piles up per drain)', async (t) => {
  if (!(await needZip(t))) return;
  const dir = await tempDir(t);
  const img = join(dir, 'os.img');
  // incompressible: the inflater's output outruns the pipeline, many waits for 'drain'
  const bytes = seededBytes(16 * 1024 * 1024, 9);
  await writeFile(img, bytes);
  const zip = join(dir, 'os.zip');
  await makeZip(zip, { 'os.img': img }, 'deflated');
  for (const args of [[zip], ['-']]) {
    const dst = join(dir, `${args[0] === '-' ? 'stdin' : 'file'}.out`);
    const r = await runCli(['copy', '-q', ...args, dst], { input: await readFile(zip) });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, '');
    assert.ok((await readFile(dst)).equals(bytes));
  }
});

test('a stored entry sized only after its data, from a stream, is refused without suggesting --entry', async (t) => {
  if (!(await needZip(t))) return;
  const dir = await tempDir(t);
  const img = join(dir, 'os.img');
  await writeFile(img, image(3));
  const zip = join(dir, 'stored-stream.zip');
  // python's zipfile writing to a pipe: a data descriptor after the stored data
  const script = `
import sys, zipfile, shutil
with zipfile.ZipFile(sys.stdout.buffer, 'w', zipfile.ZIP_STORED) as z:
    with open(sys.argv[1], 'rb') as src, z.open('os.img', 'w') as dst:
        shutil.copyfileobj(src, dst)
`;
  await run('sh', ['-c', 'python3 -c "$0" "$1" | cat > "$2"', script, img, zip]);
  const dst = join(dir, 'dst');
  for (const extra of [[], ['--entry', 'os.img']]) {
    const r = await runCli(['copy', ...extra, '-', dst], { input: await readFile(zip) });
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /os\.img in the zip .*stored.*save the zip to a file.*\[ESRC_CONTAINER\]/,
    );
    assert.doesNotMatch(r.stderr, /--entry/);
    assert.equal(existsSync(dst), false);
  }
});

test('a zip with several images is refused listing them; --entry picks one; a missing --entry is refused', async (t) => {
  if (!(await needZip(t))) return;
  const dir = await tempDir(t);
  const a = join(dir, 'a.img');
  const b = join(dir, 'b.img');
  await writeFile(a, image(2));
  await writeFile(b, image(3));
  const zip = join(dir, 'two.zip');
  await makeZip(zip, { 'boot.img': a, 'rootfs.img': b }, 'deflated');
  const dst = join(dir, 'dst');
  await assert.rejects(copy(zip, dst), (err: unknown) => {
    assert.ok(err instanceof BlksyncError);
    assert.equal(err.code, 'ESRC_ENTRY');
    assert.match(err.message, /boot\.img.*rootfs\.img/);
    assert.match(err.message, /--entry/);
    return true;
  });
  assert.equal(existsSync(dst), false);
  await copy(zip, dst, { entry: 'rootfs.img' });
  assert.ok((await readFile(dst)).equals(await readFile(b)));
  await assert.rejects(copy(zip, join(dir, 'x'), { entry: 'nope.img' }), /no file named nope\.img/);
  assert.equal(existsSync(join(dir, 'x')), false);
});

test('tars (v7, ustar, gnu, pax; long names; gz, xz, zst) decode from a file and from stdin', async (t) => {
  if (!(await needTool(t, 'tar', 'tar'))) return;
  if (!(await needTool(t, 'zstd', 'zstd'))) return;
  const dir = await tempDir(t);
  const long = `${'d'.repeat(60)}/${'n'.repeat(70)}.img`;
  await run('mkdir', ['-p', join(dir, 'd'.repeat(60))]);
  const bytes = image(4);
  await writeFile(join(dir, long), bytes);
  await writeFile(join(dir, 'notes.txt'), 'release notes\n');
  await writeFile(join(dir, 'os.img'), bytes);
  // v7: no magic at 257 and names of 99 bytes at most (`tar --format=v7`, old archives)
  for (const format of ['v7', 'ustar', 'gnu', 'posix'] as const) {
    const name = format === 'ustar' || format === 'v7' ? 'os.img' : long;
    for (const z of ['', 'z', 'J', '--zstd'] as const) {
      const tar = join(dir, `${format}${z}.tar`);
      await run('tar', [
        '-C',
        dir,
        `--format=${format}`,
        z === '' ? '-c' : z.startsWith('-') ? z : `-c${z}`,
        ...(z.startsWith('-') ? ['-c'] : []),
        '-f',
        tar,
        'notes.txt',
        name,
      ]);
      const dst = join(dir, `${format}${z}.out`);
      await copy(tar, dst);
      assert.ok((await readFile(dst)).equals(bytes), `${format} ${z}: file`);
      const again = await copy(tar, dst);
      assert.equal(again.bytesWritten, 0);
      const viaStdin = join(dir, `${format}${z}.stdin`);
      const c = await runCli(['copy', '-', viaStdin], { input: await readFile(tar) });
      assert.equal(c.code, 0, c.stderr);
      assert.ok((await readFile(viaStdin)).equals(bytes), `${format} ${z}: stdin`);
    }
  }
});

test('truncated and lying archives are refused before any write', async (t) => {
  if (!(await needZip(t))) return;
  const dir = await tempDir(t);
  const img = join(dir, 'os.img');
  await writeFile(img, image(5));
  const zip = join(dir, 'os.zip');
  await makeZip(zip, { 'os.img': img }, 'deflated');
  const z = await readFile(zip);
  await run('tar', ['-C', dir, '-cf', join(dir, 'os.tar'), 'os.img']);
  const tarBytes = await readFile(join(dir, 'os.tar'));
  const lyingZip = Buffer.from(z);
  // the central directory's uncompressed size of the entry: one byte more than the data
  const central = lyingZip.lastIndexOf(Buffer.from('PK\x01\x02', 'latin1'));
  lyingZip.writeUInt32LE(lyingZip.readUInt32LE(central + 24) + BS, central + 24);
  const cases: [string, Buffer, string][] = [
    ['cut.zip', z.subarray(0, z.length - 200), 'ESRC_SHORT'],
    ['cut-data.zip', Buffer.concat([z.subarray(0, 5000), z.subarray(z.length - 100)]), 'ESRC_'],
    ['lying.zip', lyingZip, 'ESRC_CORRUPT'],
    ['cut.tar', tarBytes.subarray(0, 512 + 1000), 'ESRC_SHORT'],
  ];
  for (const [name, data, code] of cases) {
    const src = join(dir, name);
    await writeFile(src, data);
    const dst = join(dir, `${name}.out`);
    await assert.rejects(copy(src, dst), (err: unknown) => {
      assert.ok(err instanceof BlksyncError, String(err));
      assert.ok(err.code.startsWith(code), `${name}: ${err.code} ${err.message}`);
      return true;
    });
    if (name !== 'lying.zip') assert.equal(existsSync(dst), false, `${name}: no DST`);
  }
});

test('fuzz: mutated zips and tars decode or fail with a BlksyncError, never anything else', async (t) => {
  if (!(await needZip(t))) return;
  const dir = await tempDir(t);
  const img = join(dir, 'os.img');
  await writeFile(img, seededBytes(3 * BS, 9));
  const zip = join(dir, 'os.zip');
  await makeZip(zip, { 'os.img': img, 'b.txt': img }, 'deflated');
  await run('tar', ['-C', dir, '--format=posix', '-cf', join(dir, 'os.tar'), 'os.img']);
  // a sparse entry with extension blocks (old GNU) and one with a pax 1.0 map
  const sparse = join(dir, 'sparse.img');
  const sfh = await open(sparse, 'w');
  for (let i = 0; i < 6; i++) await sfh.write(seededBytes(BS, i), 0, BS, i * 5 * BS);
  await sfh.truncate(40 * BS);
  await sfh.close();
  await run('tar', ['-C', dir, '--format=gnu', '-cSf', join(dir, 'gnu.tar'), 'sparse.img']);
  await run('tar', ['-C', dir, '--format=posix', '-cSf', join(dir, 'pax.tar'), 'sparse.img']);
  const samples = [
    await readFile(zip),
    await readFile(join(dir, 'os.tar')),
    await readFile(join(dir, 'gnu.tar')),
    await readFile(join(dir, 'pax.tar')),
  ];
  let x = 424242;
  const r = (): number => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
  const src = join(dir, 'fuzz');
  for (let i = 0; i < 400; i++) {
    const good = samples[i % samples.length]!;
    let m = Buffer.from(good);
    const at = Math.floor(r() * m.length);
    const kind = Math.floor(r() * 3);
    if (kind === 0) m[at] = Math.floor(r() * 256);
    else if (kind === 1) m = m.subarray(0, at);
    else if (at + 4 <= m.length) m.writeUInt32LE(Math.floor(r() * 2 ** 32), at);
    await writeFile(src, m);
    try {
      await copy(src, join(dir, 'fuzz.out'), {
        dryRun: true,
        entry: i % samples.length < 2 ? 'os.img' : 'sparse.img',
      });
    } catch (err) {
      assert.ok(err instanceof BlksyncError, `case ${i}: ${String(err)}`);
    }
  }
});

test('an archive whose image is itself compressed or a container is refused, not written as those bytes', async (t) => {
  if (!(await needZip(t))) return;
  if (!(await needTool(t, 'xz', 'xz-utils'))) return;
  const dir = await tempDir(t);
  const img = join(dir, 'os.img');
  await writeFile(img, image(6));
  await run('xz', ['-k', '-1', img]);
  const zip = join(dir, 'os.zip');
  await makeZip(zip, { 'os.img.xz': `${img}.xz` }, 'stored');
  const deflated = join(dir, 'd.zip');
  await makeZip(deflated, { 'os.img.xz': `${img}.xz` }, 'deflated');
  await run('tar', ['-C', dir, '-czf', join(dir, 'os.tar.gz'), 'os.img.xz']);
  for (const src of [zip, deflated, join(dir, 'os.tar.gz')]) {
    const dst = `${src}.out`;
    await assert.rejects(copy(src, dst), (err: unknown) => {
      assert.ok(err instanceof BlksyncError);
      assert.equal(err.code, 'ESRC_CONTAINER');
      assert.match(err.message, /os\.img\.xz is itself xz-compressed/);
      return true;
    });
    assert.equal(existsSync(dst), false, `${src}: no DST`);
  }
});

test('sparse tar entries (GNU tar -S: old GNU and pax 1.0 maps, many regions) decode; holes are zeros written over DST', async (t) => {
  if (!(await needTool(t, 'tar', 'tar'))) return;
  const dir = await tempDir(t);
  const img = join(dir, 'disk.img');
  const size = 48 * 1024 * 1024;
  const want = Buffer.alloc(size);
  const fh = await open(img, 'w');
  await fh.truncate(size);
  // 40 scattered regions: more than the 4 a GNU header holds, so extension blocks follow
  for (let i = 0; i < 40; i++) {
    const data = seededBytes(BS * (1 + (i % 3)), 100 + i);
    const at = i * 1_200_000 - ((i * 1_200_000) % BS);
    data.copy(want, at);
    await fh.write(data, 0, data.length, at);
  }
  await fh.close();
  for (const format of ['gnu', 'posix'] as const) {
    for (const z of ['', 'z'] as const) {
      const tar = join(dir, `${format}${z}.tar`);
      await run('tar', ['-C', dir, `--format=${format}`, `-cS${z}f`, tar, 'disk.img']);
      const dst = join(dir, `${format}${z}.out`);
      // DST holds something else everywhere, holes included: they must end as zeros
      await writeFile(dst, seededBytes(size, 5));
      await copy(tar, dst);
      assert.ok((await readFile(dst)).equals(want), `${format}${z}: file`);
      assert.equal((await copy(tar, dst)).bytesWritten, 0);
      const viaStdin = join(dir, `${format}${z}.stdin`);
      const c = await runCli(['copy', '-', viaStdin], { input: await readFile(tar) });
      assert.equal(c.code, 0, c.stderr);
      assert.ok((await readFile(viaStdin)).equals(want), `${format}${z}: stdin`);
    }
  }
});
