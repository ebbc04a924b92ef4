import { main } from '../../src/cli/main.js';

// no top-level await: the tests bundle this as CommonJS, as bin/blksync.js runs the CLI
void main(process.argv);
