/**
 * A zip entry's CRC-32 and declared size are checked: a damaged entry, or one whose deflate
 * stream runs past its declared size, fails instead of being written with exit 0.
 */

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { runCli } from './helpers/cli.js';
import { seededBytes, tempDir } from './helpers/tmp.js';

const SIZE = 1024 * 1024;

/** A zip of one entry `os.img` built by python3's zipfile (stored or deflated). */
function zipOf(dir: string, image: string, deflated: boolean, out: string): void {
  execFileSync('python3', [
    '-c',
    'import sys, zipfile\n' +
      'm = zipfile.ZIP_DEFLATED if sys.argv[3] == "1" else zipfile.ZIP_STORED\n' +
      'with zipfile.ZipFile(sys.argv[2], "w", m) as z: z.write(sys.argv[1], "os.img")',
    image,
    out,
    deflated ? '1' : '0',
  ]);
}

test('a zip entry with a wrong CRC-32 is ESRC_CORRUPT, from a file and from stdin', async (t) => {
  const dir = await tempDir(t);
  const image = join(dir, 'os.img');
  // compressible, so the deflated entry is small and its CRC field easy to find
  const data = Buffer.concat([seededBytes(SIZE / 2, 5), Buffer.alloc(SIZE / 2, 7)]);
  await writeFile(image, data);
  for (const deflated of [true, false]) {
    const zip = join(dir, `os-${deflated ? 'deflated' : 'stored'}.zip`);
    zipOf(dir, image, deflated, zip);
    const bytes = await readFile(zip);
    // flip the CRC in the local header (offset 14) and the central directory (+16)
    bytes[14] = bytes[14]! ^ 0xff;
    const central = bytes.lastIndexOf(Buffer.from('PK\x01\x02', 'latin1'));
    bytes[central + 16] = bytes[central + 16]! ^ 0xff;
    await writeFile(zip, bytes);
    const sources = deflated ? ['file', 'stdin'] : ['stdin'];
    for (const from of sources) {
      const dst = join(dir, `dst-${deflated}-${from}.img`);
      const r =
        from === 'file'
          ? await runCli(['copy', zip, dst])
          : await runCli(['copy', '--size', String(SIZE), '-', dst], { input: bytes });
      assert.equal(r.code, 1, `${deflated ? 'deflated' : 'stored'} from ${from}: ${r.stderr}`);
      assert.match(r.stderr, /CRC-32.*\[ESRC_CORRUPT\]/);
    }
  }
});
