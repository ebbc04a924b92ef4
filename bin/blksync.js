#!/usr/bin/env node
// The CLI is one CommonJS file bundled by esbuild (npm run build:cli), and this a CommonJS
// script (bin/package.json): Node 20 starts ~20 ms sooner than through its ES module loader
// (the code-split ES bundle of ~30 chunks before), ~40 ms sooner than tsc's ~40 modules. The
// bundle's engines still run only when their command does (esbuild wraps what is imported
// dynamically). The library (dist/index.js) is tsc's output. load-cli.cjs compiles the
// bundle from V8's code cache when the build made one.
'use strict';

require('./load-cli.cjs').loadCli().cli.main(process.argv);
