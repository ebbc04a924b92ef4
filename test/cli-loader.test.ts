/**
 * bin/load-cli.cjs compiles the CLI bundle from a V8 code cache. V8 checks a cache against
 * the length of the source only, and does not checksum its own data: a cache left from
 * another build of the same length would run that build's code, a damaged one anything. The
 * loader must use a cache only for the bytes it was made from, and only when it is whole.
 */

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { need } from './helpers/resources.js';

const require = createRequire(import.meta.url);
const ROOT = fileURLToPath(new URL('../', import.meta.url));

interface Loaded {
  cli: { which(): string; base(): string };
  script: { createCachedData(): Buffer };
  cacheUsed: boolean;
}
const loader = require('../bin/load-cli.cjs') as {
  loadCli(useCache: boolean, bundle: string): Loaded;
  cacheFile(source: Buffer, data: Buffer): Buffer;
};

/** A bundle answering `which()` with `word`: the same length whatever the (4-letter) word. */
function bundleSaying(word: string): string {
  return `exports.which = () => ${JSON.stringify(word)};
exports.base = () => require('node:path').basename('/x/${word}');
`;
}

function withBundle(fn: (bundle: string) => Promise<void> | void): Promise<void> | void {
  const dir = mkdtempSync(join(tmpdir(), 'blksync-loader-'));
  const done = (): void => rmSync(dir, { recursive: true, force: true });
  try {
    const out = fn(join(dir, 'main.cjs'));
    if (out instanceof Promise) return out.finally(done);
    done();
  } catch (err) {
    done();
    throw err;
  }
}

/** A cache of the bundle as the build makes one: after a workload ran its functions. */
function makeCache(bundle: string): void {
  const { cli, script } = loader.loadCli(false, bundle);
  cli.which(); // compiled now, so its bytecode is in the cache
  writeFileSync(
    `${bundle}.cache`,
    loader.cacheFile(readFileSync(bundle), script.createCachedData()),
  );
}

test('the code cache is used for the bundle it was made from', () =>
  withBundle((bundle) => {
    writeFileSync(bundle, bundleSaying('AAAA'));
    makeCache(bundle);
    const loaded = loader.loadCli(true, bundle);
    assert.equal(loaded.cacheUsed, true);
    assert.equal(loaded.cli.which(), 'AAAA');
    assert.equal(loaded.cli.base(), 'AAAA', 'require works in a script compiled from a cache');
  }));

test('a cache made from other bytes of the same length is not used: the new code runs', () =>
  withBundle((bundle) => {
    writeFileSync(bundle, bundleSaying('AAAA'));
    makeCache(bundle);
    writeFileSync(bundle, bundleSaying('BBBB'));
    const loaded = loader.loadCli(true, bundle);
    assert.equal(loaded.cacheUsed, false);
    assert.equal(loaded.cli.which(), 'BBBB');
  }));

test('a cache whose V8 data was damaged is not used: the bundle runs as compiled afresh', () =>
  withBundle((bundle) => {
    writeFileSync(bundle, bundleSaying('AAAA'));
    makeCache(bundle);
    const whole = readFileSync(`${bundle}.cache`);
    // every byte of V8's data (after the 21-byte magic and two digests) counts
    for (const at of [85, 85 + 40, whole.length - 1]) {
      const damaged = Buffer.from(whole);
      damaged[at]! ^= 0xff;
      writeFileSync(`${bundle}.cache`, damaged);
      const loaded = loader.loadCli(true, bundle);
      assert.equal(loaded.cacheUsed, false, `a flipped byte at ${at}`);
      assert.equal(loaded.cli.which(), 'AAAA');
    }
  }));

test('a damaged cache file is not used, and the bundle still runs', () =>
  withBundle((bundle) => {
    writeFileSync(bundle, bundleSaying('AAAA'));
    for (const junk of [
      Buffer.alloc(0),
      Buffer.from('blksync-code-cache-2\n'),
      Buffer.alloc(99, 1),
    ]) {
      writeFileSync(`${bundle}.cache`, junk);
      const loaded = loader.loadCli(true, bundle);
      assert.equal(loaded.cacheUsed, false);
      assert.equal(loaded.cli.which(), 'AAAA');
    }
  }));

test('the built CLI starts from its code cache and runs', (t) => {
  const bundle = join(ROOT, 'dist', 'cli-bundle', 'main.cjs');
  if (
    !need(t, existsSync(`${bundle}.cache`), 'no dist/cli-bundle/main.cjs.cache: run npm run build')
  ) {
    return;
  }
  const version = (
    JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }
  ).version;
  const out = execFileSync(process.execPath, [join(ROOT, 'bin', 'blksync.js'), '--version'], {
    encoding: 'utf8',
  });
  assert.equal(out.trim(), version);
  const used = execFileSync(
    process.execPath,
    [
      '-e',
      `process.stdout.write(String(require('./bin/load-cli.cjs').loadCli(true, ${JSON.stringify(bundle)}).cacheUsed))`,
    ],
    { cwd: ROOT, encoding: 'utf8' },
  );
  assert.equal(used, 'true');
  // Node 20 drops a script's dynamic import hook when it is compiled from a cache: the bundle
  // must require() what it loads late (zstd-napi, esbuild), never import() it
  const calls = readFileSync(bundle, 'utf8').match(/\bimport\s*\(/g) ?? [];
  assert.deepEqual(calls, [], 'the CLI bundle has no dynamic import()');
  // what a hostile review found broken with the cache: a zstd patch, made and applied
  const dir = mkdtempSync(join(tmpdir(), 'blksync-loader-zstd-'));
  try {
    const base = Buffer.alloc(300_000, 'blksync ');
    const next = Buffer.from(base);
    next.write('changed', 123_456);
    writeFileSync(join(dir, 'base'), base);
    writeFileSync(join(dir, 'next'), next);
    writeFileSync(join(dir, 'target'), base);
    const cli = (...args: string[]): string =>
      execFileSync(process.execPath, [join(ROOT, 'bin', 'blksync.js'), ...args], {
        cwd: dir,
        encoding: 'utf8',
      });
    cli('diff', '-q', '--compress', 'zstd', '-o', 'p.bsp', 'base', 'next');
    assert.match(cli('info', 'p.bsp'), /compression zstd/);
    cli('apply', '-q', 'p.bsp', 'target');
    assert.ok(readFileSync(join(dir, 'target')).equals(next), 'the zstd patch applied');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
