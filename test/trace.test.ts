/**
 * `BLKSYNC_TRACE=1` (src/trace.ts): a remote copy prints its timeline on stderr, the agent's
 * lines (sent back on ssh's stderr) among this end's, each phase once and in order; without
 * it nothing of the kind is printed and the agent writes no trace.
 */

import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { runCli } from './helpers/cli.js';
import { sharedSshd } from './helpers/sshd.js';
import { seededBytes, tempDir, writeSparseFile } from './helpers/tmp.js';

const MiB = 1024 * 1024;

/** `trace <ms> ms  <who> <event>` lines as [ms, who, event]. */
function timeline(stderr: string): [number, string, string][] {
  const out: [number, string, string][] = [];
  for (const line of stderr.split('\n')) {
    const m = /^trace +([\d.]+) ms {2}(\S+) +(.*)$/.exec(line);
    if (m !== null) out.push([Number(m[1]), m[2]!, m[3]!]);
  }
  return out;
}

describe('BLKSYNC_TRACE', () => {
  const server = sharedSshd();

  test('a push prints both ends’ phases in order; without it, nothing', async (t) => {
    const s = server(t);
    if (!s) return;
    const dir = await tempDir(t);
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await writeSparseFile(src, 12 * MiB, [{ offset: 5 * MiB, data: seededBytes(MiB, 1) }]);
    await writeSparseFile(dst, 12 * MiB, [{ offset: 5 * MiB, data: seededBytes(MiB, 2) }]);
    const args = ['copy', '-q', '--no-bmap', '--ssh', s.ssh, src, `${s.host}:${dst}`];

    const traced = await runCli(args, { env: { BLKSYNC_TRACE: '1' } });
    assert.equal(traced.code, 0, traced.stderr);
    assert.deepEqual(await readFile(dst), await readFile(src));
    const lines = timeline(traced.stderr);
    const at = (who: string, event: RegExp): number => {
      const found = lines.filter(([, w, e]) => w === who && event.test(e));
      assert.equal(found.length, 1, `${who} ${String(event)} in:\n${traced.stderr}`);
      return found[0]![0];
    };
    const phases = [
      at('local', /^cli started/),
      at('local', /^ssh spawned/),
      at('agent', /^agent running/),
      at('agent', /^HELLO received \(target\)/),
      at('local', /^READY from/),
      at('local', /^pipeline done/),
      at('local', /^DONE sent/),
      at('agent', /^SUMMARY sent/),
      at('local', /^exit 0/),
    ];
    // the agent's clock is this machine's: one timeline, in order (1 ms for rounding and the
    // lines of two processes)
    for (let i = 1; i < phases.length; i++) {
      assert.ok(phases[i]! >= phases[i - 1]! - 1, `phase ${i} before ${i - 1}:\n${traced.stderr}`);
    }
    at('agent', /^data map: /);
    at('local', /scan done \(\d+ bytes read\)$/);
    // nothing but trace lines on stderr
    assert.equal(lines.length, traced.stderr.trim().split('\n').length, traced.stderr);

    const quiet = await runCli(args);
    assert.equal(quiet.code, 0, quiet.stderr);
    assert.equal(quiet.stderr, '');
  });
});
