// Build step (npm run build:cli): makes dist/cli-bundle/main.cjs.cache, the V8 code cache
// that bin/load-cli.cjs compiles the CLI bundle from. V8 puts in a cache the functions
// compiled so far, so the bundle first runs a workload: two local copies of a small file,
// one onto a new file and one onto a file holding most of it (the commands run most often).
// Without a cache blksync still runs, only ~20 ms slower to start: a failure here is a
// warning, not a failed build.
'use strict';

const { mkdtempSync, rmSync, writeFileSync, readFileSync } = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { loadCli, cacheFile, BUNDLE } = require('./load-cli.cjs');

const CACHE = `${BUNDLE}.cache`;

async function makeCache() {
  rmSync(CACHE, { force: true });
  const { cli, script, source } = loadCli(false);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'blksync-code-cache-'));
  try {
    const src = path.join(dir, 'src.img');
    const dst = path.join(dir, 'dst.img');
    const data = Buffer.alloc(3 * 1024 * 1024);
    for (let i = 0; i < data.length; i += 4096) data[i] = i & 0xff;
    writeFileSync(src, data);
    await cli.main(['node', 'blksync', 'copy', '-q', src, dst]);
    data[5 * 4096] ^= 1;
    writeFileSync(src, data);
    await cli.main(['node', 'blksync', 'copy', '-q', src, dst]);
    if (process.exitCode !== 0) throw new Error(`the workload's copy exited ${process.exitCode}`);
    if (!readFileSync(dst).equals(data))
      throw new Error("the workload's copy differs from its source");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  // the digest of the bytes V8 compiled, not of a second read: the file may change meanwhile
  writeFileSync(CACHE, cacheFile(source, script.createCachedData()));
}

makeCache().then(
  () => {
    process.exitCode = 0;
  },
  (err) => {
    process.exitCode = 0;
    console.warn(`warning: no code cache for the CLI (it starts ~20 ms slower): ${err.message}`);
  },
);
