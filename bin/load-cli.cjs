// Loads the CLI bundle (dist/cli-bundle/main.cjs) with V8's code cache when the build made
// one (dist/cli-bundle/main.cjs.cache, by bin/make-code-cache.cjs): compiling the ~0.9 MB
// bundle from source costs ~20 ms of every run; from the cache, V8 takes the bytecode of the
// functions a copy runs ready-made. Node 20 has no built-in cache for user code (22 does).
//
// V8 checks a cache against the source's length only, not its bytes, so a cache made from
// another build of the bundle could run stale bytecode. The cache file therefore starts with
// the SHA-256 of the bundle it was made from, and is used only when that matches. A cache V8
// rejects (another Node version, other V8 flags) costs nothing but the compile it would have
// saved.
//
//   main.cjs.cache:  "blksync-code-cache-1\n" │ SHA-256 of main.cjs (32 bytes) │ V8's data
'use strict';

const { hash } = require('node:crypto');
const { readFileSync } = require('node:fs');
const Module = require('node:module');
const path = require('node:path');
const vm = require('node:vm');

const BUNDLE = path.join(__dirname, '..', 'dist', 'cli-bundle', 'main.cjs');
const MAGIC = Buffer.from('blksync-code-cache-1\n', 'latin1');
const DIGEST_BYTES = 32;

/** The V8 code cache at `cache`, if there is one made from exactly the bytes `source`. */
function cacheFor(source, cache) {
  let file;
  try {
    file = readFileSync(cache);
  } catch {
    return undefined;
  }
  const head = MAGIC.length + DIGEST_BYTES;
  if (file.length <= head || !file.subarray(0, MAGIC.length).equals(MAGIC)) return undefined;
  const digest = hash('sha256', source, 'buffer');
  return file.subarray(MAGIC.length, head).equals(digest) ? file.subarray(head) : undefined;
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
    // the bundle's import() of optional packages (zstd-napi, esbuild) resolves as in a module
    importModuleDynamically: vm.constants.USE_MAIN_CONTEXT_DEFAULT_LOADER,
  });
  const mod = { exports: {}, filename: bundle, id: bundle, loaded: false };
  const wrapper = script.runInThisContext();
  const dir = path.dirname(bundle);
  wrapper.call(mod.exports, mod.exports, Module.createRequire(bundle), mod, bundle, dir);
  mod.loaded = true;
  return {
    cli: mod.exports,
    script,
    cacheUsed: cachedData !== undefined && !script.cachedDataRejected,
  };
}

/** The header a cache of the bundle `source` starts with. */
function cacheHeader(source) {
  return Buffer.concat([MAGIC, hash('sha256', source, 'buffer')]);
}

module.exports = { loadCli, cacheHeader, BUNDLE };
