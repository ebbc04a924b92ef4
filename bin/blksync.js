#!/usr/bin/env node
// the CLI as one esbuild bundle (npm run build:cli): loading ~40 ES modules one by one took
// ~15 ms more at every start; the library (dist/index.js) is tsc's output
import { main } from '../dist/cli-bundle/main.js';

await main(process.argv);
