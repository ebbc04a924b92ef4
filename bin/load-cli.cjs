// Loads the CLI bundle (dist/cli-bundle/main.cjs) with V8's code cache when the build made
// one (dist/cli-bundle/main.cjs.cache, by bin/make-code-cache.cjs): compiling the ~0.9 MB
// bundle from source costs ~10–20 ms of every run; from the cache, V8 takes the bytecode of
// the functions a copy runs ready-made. Node 20 has no built-in cache for user code (22 does).
//
// V8 checks a cache against the source's length only, not its bytes, and a release build of
// V8 does not checksum the cache's own data: a cache from another build of the bundle would
// run that build's code, and a damaged one could run anything. So the cache file starts with
// the SHA-256 of the bundle it was made from and of V8's data, and is used only when both
// match. A cache V8 rejects (another Node version, other V8 flags) costs nothing but the
// compile it would have saved.
//
//   main.cjs.cache:  "blksync-code-cache-2\n" │ SHA-256 of main.cjs │ SHA-256 of V8's data │ V8's data
//
// The bundle must not import(): Node 20 drops a script's dynamic import hook when it is
// compiled from a cache. Optional packages are require()d (test/cli-loader.test.ts checks).
'use strict';

const { hash } = require('node:crypto');
const { readFileSync } = require('node:fs');
const Module = require('node:module');
const path = require('node:path');
const vm = require('node:vm');

const BUNDLE = path.join(__dirname, '..', 'dist', 'cli-bundle', 'main.cjs');
const MAGIC = Buffer.from('blksync-code-cache-2\n', 'latin1');
const DIGEST_BYTES = 32;
const HEAD_BYTES = MAGIC.length + 2 * DIGEST_BYTES;

const sha256 = (data) => hash('sha256', data, 'buffer');

/** The V8 code cache at `cache`, if it is whole and was made from exactly the bytes `source`. */
function cacheFor(source, cache) {
  let file;
  try {
    file = readFileSync(cache);
  } catch {
    return undefined;
  }
  if (file.length <= HEAD_BYTES || !file.subarray(0, MAGIC.length).equals(MAGIC)) return undefined;
  const data = file.subarray(HEAD_BYTES);
  const ofSource = file.subarray(MAGIC.length, MAGIC.length + DIGEST_BYTES);
  const ofData = file.subarray(MAGIC.length + DIGEST_BYTES, HEAD_BYTES);
  return ofSource.equals(sha256(source)) && ofData.equals(sha256(data)) ? data : undefined;
}

/**
 * Compiles and runs the bundle as Node's CommonJS loader would, with its code cache unless
 * `useCache` is false; returns its exports and the compiled script (make-code-cache.cjs asks
 * it for a new cache after running a workload). `bundle`: another bundle (the tests').
 */
function loadCli(useCache = true, bundle = BUNDLE) {
  const source = readFileSync(bundle);
  const cachedData = useCache ? cacheFor(source, `${bundle}.cache`) : undefined;
  const script = new vm.Script(Module.wrap(source.toString('utf8')), {
    filename: bundle,
    ...(cachedData !== undefined ? { cachedData } : {}),
  });
  const mod = { exports: {}, filename: bundle, id: bundle, loaded: false };
  const wrapper = script.runInThisContext();
  const dir = path.dirname(bundle);
  wrapper.call(mod.exports, mod.exports, Module.createRequire(bundle), mod, bundle, dir);
  mod.loaded = true;
  return {
    cli: mod.exports,
    script,
    // the bytes compiled: a cache made from `script` must name these, not a later read
    source,
    cacheUsed: cachedData !== undefined && !script.cachedDataRejected,
  };
}

/** The contents of a cache file for the bundle `source`, from V8's cache `data`. */
function cacheFile(source, data) {
  return Buffer.concat([MAGIC, sha256(source), sha256(data), data]);
}

module.exports = { loadCli, cacheFile, BUNDLE };
