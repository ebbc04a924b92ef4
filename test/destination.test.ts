/**
 * DST is prepared the same way by every copy (io/prepare-destination.ts): a local copy, a pull
 * (DST here) and a push or relay (DST on the agent's host) create a missing DST, grow an empty
 * file, refuse a smaller one with one EDEST_TOO_SMALL wording, and report the same result.
 */

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { copy } from '../src/copy.js';
import { BlksyncError } from '../src/errors.js';
import { sharedSshd, type Sshd } from './helpers/sshd.js';
import { tempDir } from './helpers/tmp.js';

const MiB = 1024 * 1024;

/** The message of the EDEST_TOO_SMALL that `p` rejects with. */
async function tooSmallMessage(p: Promise<unknown>): Promise<string> {
  let message = '';
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof BlksyncError, `not a BlksyncError: ${String(err)}`);
    assert.equal(err.code, 'EDEST_TOO_SMALL', err.message);
    message = err.message;
    return true;
  });
  return message;
}

describe('DST preparation', () => {
  const server = sharedSshd();
  const at = (s: Sshd, path: string): string => `${s.host}:${path}`;

  test('a smaller DST is refused with one wording, locally, pushed, pulled and relayed', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const src = join(dir, 'src.img');
    const small = join(dir, 'small.img');
    const old = randomBytes(MiB);
    await writeFile(src, randomBytes(2 * MiB));
    await writeFile(small, old);
    const opts = { remote: { ssh: s.ssh } };
    const said = `${small} is 1048576 bytes (1.00 MiB) but the source is 2097152 bytes (2.00 MiB); grow it first (truncate -s 2097152 ${small}) or choose another destination`;
    assert.equal(await tooSmallMessage(copy(src, small)), said);
    assert.equal(await tooSmallMessage(copy(at(s, src), small, opts)), said);
    // from the agent, its host named first
    const pushed = await tooSmallMessage(copy(src, at(s, small), opts));
    assert.ok(pushed.endsWith(said), pushed);
    const relayed = await tooSmallMessage(copy(at(s, src), at(s, small), opts));
    assert.ok(relayed.endsWith(said), relayed);
    assert.deepEqual(await readFile(small), old);
  });

  test('an empty DST file is grown and reported with no bytes past the image, every way', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const src = join(dir, 'src.img');
    const data = randomBytes(2 * MiB + 512);
    await writeFile(src, data);
    const opts = { remote: { ssh: s.ssh } };
    const ends: [string, (dst: string) => [string, string]][] = [
      ['local', (dst) => [src, dst]],
      ['pull', (dst) => [at(s, src), dst]],
      ['push', (dst) => [src, at(s, dst)]],
    ];
    for (const [name, ends_] of ends) {
      const dst = join(dir, `${name}.img`);
      await writeFile(dst, '');
      const [from, to] = ends_(dst);
      const r = await copy(from, to, opts);
      assert.equal(r.created, false, name);
      assert.equal(r.destinationExtraBytes, 0, name);
      assert.equal((await stat(dst)).size, data.length, name);
      assert.deepEqual(await readFile(dst), data, name);
    }
  });
});
