/**
 * Containers are recognised by their magic bytes and decoded or refused; raw images (ext4,
 * FAT, MBR, GPT, random bytes) are never taken for one. A refused SRC writes nothing and
 * creates no DST; --raw writes SRC as it is.
 */

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { detectContainer } from '../src/containers/detect.js';
import { copy } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import { runCli } from './helpers/cli.js';
import { needTool } from './helpers/loop.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const run = promisify(execFile);

/** The head and tail of a file, as copy-source reads them. */
async function detectFile(path: string): Promise<ReturnType<typeof detectContainer>> {
  const b = await readFile(path);
  return detectContainer(
    b.subarray(0, 512),
    b.length >= 512 ? b.subarray(b.length - 512) : undefined,
  );
}

test('a zip holding one image is decoded, not written as it is (the zip bytes never reach DST)', async (t) => {
  if (!(await needTool(t, 'python3', 'python3'))) return;
  const dir = await tempDir(t);
  const image = join(dir, 'os.img');
  await writeFile(image, seededBytes(3 * 1024 * 1024 + 512, 7));
  const zip = join(dir, 'os.zip');
  await run('python3', [
    '-c',
    'import sys,zipfile\nwith zipfile.ZipFile(sys.argv[1],"w",zipfile.ZIP_DEFLATED) as z: z.write(sys.argv[2],"os.img")',
    zip,
    image,
  ]);
  const dst = join(dir, 'dst');
  const r = await runCli(['copy', zip, dst]);
  assert.equal(r.code, 0, r.stderr);
  assert.ok((await readFile(dst)).equals(await readFile(image)), 'DST holds the image');
});

test('7z, rar, cpio, ar and a dmg are refused by name (ESRC_CONTAINER), nothing written, no DST', async (t) => {
  const dir = await tempDir(t);
  const cases: [string, Buffer, string][] = [
    ['a.7z', Buffer.from([0x37, 0x7a, 0xbc, 0xaf, 0x27, 0x1c, 0, 4]), '7-Zip'],
    ['a.rar', Buffer.from('Rar!\x1a\x07\x01\x00', 'latin1'), 'RAR'],
    ['a.cpio', Buffer.from('070701000000'), 'cpio'],
    ['a.deb', Buffer.from('!<arch>\ndebian-binary'), 'ar archive'],
  ];
  for (const [name, magic, says] of cases) {
    const src = join(dir, name);
    await writeFile(src, Buffer.concat([magic, seededBytes(64 * 1024, 3)]));
    const dst = join(dir, `${name}.out`);
    await assert.rejects(copy(src, dst), (err: unknown) => {
      assert.ok(err instanceof BlksyncError);
      assert.equal(err.code, 'ESRC_CONTAINER');
      assert.match(err.message, new RegExp(says));
      assert.match(err.message, /--raw/);
      return true;
    });
    assert.equal(existsSync(dst), false, `${name}: no DST created`);
  }
  // a dmg is known by its trailer
  const dmg = join(dir, 'a.dmg');
  const trailer = Buffer.alloc(512);
  trailer.write('koly', 0, 'latin1');
  await writeFile(dmg, Buffer.concat([seededBytes(8192, 5), trailer]));
  await assert.rejects(copy(dmg, join(dir, 'dmg.out')), /Apple disk image/);
  assert.equal(existsSync(join(dir, 'dmg.out')), false);
});

test('the CLI refuses a 7z archive with a one-line error and a non-zero exit; --raw writes it as it is', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'image.7z');
  const bytes = Buffer.concat([
    Buffer.from([0x37, 0x7a, 0xbc, 0xaf, 0x27, 0x1c]),
    seededBytes(20000, 9),
  ]);
  await writeFile(src, bytes);
  const dst = join(dir, 'dst');
  const refused = await runCli(['copy', src, dst]);
  assert.notEqual(refused.code, 0);
  assert.match(refused.stderr, /7-Zip archive/);
  assert.equal(existsSync(dst), false);
  const raw = await runCli(['copy', '--raw', src, dst]);
  assert.equal(raw.code, 0, raw.stderr);
  assert.ok((await readFile(dst)).equals(bytes));
});

test('--raw writes a zip as it is', async (t) => {
  if (!(await needTool(t, 'python3', 'python3'))) return;
  const dir = await tempDir(t);
  const zip = join(dir, 'a.zip');
  await run('python3', [
    '-c',
    'import sys,zipfile\nwith zipfile.ZipFile(sys.argv[1],"w") as z: z.writestr("x.img", b"x"*100000)',
    zip,
  ]);
  const dst = join(dir, 'dst');
  await copy(zip, dst, { raw: true });
  assert.ok((await readFile(dst)).equals(await readFile(zip)));
});

test('raw images are never taken for containers: random bytes, MBR, GPT, ext4, FAT', async (t) => {
  const dir = await tempDir(t);
  // random heads, including ones that start like a zip local header or have "ustar" at 257
  for (let seed = 1; seed <= 2000; seed++) {
    const head = seededBytes(512, seed);
    if (seed % 3 === 0) head.write('PK\x03\x04', 0, 'latin1');
    if (seed % 5 === 0) head.write('ustar', 257, 'latin1');
    const d = detectContainer(head, seededBytes(512, seed + 99991));
    if (d !== undefined) {
      // a random head that happens to be a valid header is a container indeed: only zip's
      // loose check could match, with a plausible version, method and name length
      assert.equal(d.format, 'zip', `seed ${seed}: ${d.name}`);
    }
  }
  const images: string[] = [];
  const mbr = join(dir, 'mbr.img');
  await writeFile(mbr, seededBytes(4 * 1024 * 1024, 11));
  if (await needTool(t, 'sfdisk', 'fdisk')) {
    await run('sh', ['-c', `printf 'label: dos\\n,2M,L\\n,,c\\n' | sfdisk -q ${mbr}`]);
    const gpt = join(dir, 'gpt.img');
    await writeFile(gpt, seededBytes(4 * 1024 * 1024, 12));
    await run('sh', ['-c', `printf 'label: gpt\\n,2M,L\\n,,L\\n' | sfdisk -q ${gpt}`]);
    images.push(mbr, gpt);
  }
  if (await needTool(t, 'mkfs.ext4', 'e2fsprogs')) {
    const ext4 = join(dir, 'ext4.img');
    await writeFile(ext4, Buffer.alloc(8 * 1024 * 1024));
    await run('mkfs.ext4', ['-q', '-F', ext4]);
    images.push(ext4);
  }
  // a FAT boot sector as mkfs.vfat writes it (jump, OEM name, BPB, 0x55AA)
  const fat = join(dir, 'fat.img');
  const boot = Buffer.alloc(1024 * 1024);
  Buffer.from([0xeb, 0x3c, 0x90]).copy(boot, 0);
  boot.write('mkfs.fat', 3, 'latin1');
  boot.writeUInt16LE(512, 11);
  boot.write('FAT16   ', 54, 'latin1');
  boot[510] = 0x55;
  boot[511] = 0xaa;
  await writeFile(fat, boot);
  images.push(fat);
  const random = join(dir, 'random.img');
  await writeFile(random, seededBytes(1024 * 1024, 13));
  images.push(random);
  for (const img of images) {
    assert.equal(await detectFile(img), undefined, img);
    const dst = `${img}.out`;
    await copy(img, dst);
    assert.ok((await readFile(dst)).equals(await readFile(img)), `${img} copied as it is`);
  }
});

test('--entry with a SRC that is no archive, or with --raw, is a usage error; nothing is written', async (t) => {
  const dir = await tempDir(t);
  const img = join(dir, 'os.img');
  await writeFile(img, seededBytes(8192, 21));
  const dst = join(dir, 'dst');
  await assert.rejects(copy(img, dst, { entry: 'os.img' }), (err: unknown) => {
    assert.ok(err instanceof BlksyncError);
    assert.equal(err.code, 'EUSAGE');
    assert.match(err.message, /no archive/);
    return true;
  });
  await assert.rejects(copy(img, dst, { entry: 'os.img', raw: true }), /written as it is/);
  assert.equal(existsSync(dst), false);
});
