/**
 * The command line. The only code that reads process.argv, writes to stdout/stderr, sets
 * process.exitCode and handles signals (with common.ts and the *-command.ts files it
 * registers); everything else is the library.
 */

import { Command } from '@commander-js/extra-typings';
import { registerApply } from './apply-command.js';
import { registerBmap } from './bmap-command.js';
import { reportError } from './common.js';
import { registerCompare } from './compare-command.js';
import { registerCopy } from './copy-command.js';
import { registerDiff } from './diff-command.js';
import { registerIndex } from './index-command.js';
import { registerInfo } from './info-command.js';
import { registerPublish } from './publish-command.js';

function buildProgram(setExit: (code: number) => void): Command {
  const program = new Command()
    .name('blksync')
    .description('Update disk images and block devices, writing only the blocks that differ.')
    .version('0.1.0')
    .showHelpAfterError('(run blksync --help for usage)')
    .exitOverride();
  registerCopy(program, setExit);
  registerCompare(program, setExit);
  registerIndex(program, setExit);
  registerInfo(program, setExit);
  registerBmap(program, setExit);
  registerDiff(program, setExit);
  registerApply(program, setExit);
  registerPublish(program, setExit);
  return program;
}
/** Runs the CLI with `argv` (process.argv layout); sets process.exitCode. */
export async function main(argv: readonly string[]): Promise<void> {
  let exitCode: number | undefined;
  const program = buildProgram((code) => {
    exitCode = code;
  });
  try {
    await program.parseAsync([...argv]);
  } catch (err) {
    exitCode = reportError(err, argv.includes('--debug'));
  }
  process.exitCode = exitCode ?? 0;
}
