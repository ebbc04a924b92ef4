/**
 * The command line. The only code that reads process.argv, writes to stdout/stderr, sets
 * process.exitCode and handles signals (with common.ts and the *-command.ts files it
 * registers); everything else is the library.
 */

import { Command, type OptionValues } from '@commander-js/extra-typings';
import { BlksyncError } from '../errors.js';
import { registerApply } from './apply-command.js';
import { registerBmap } from './bmap-command.js';
import { reportError } from './common.js';
import { registerCompare } from './compare-command.js';
import { registerCopy } from './copy-command.js';
import { registerDiff } from './diff-command.js';
import { registerIndex } from './index-command.js';
import { registerInfo } from './info-command.js';
import { registerPublish } from './publish-command.js';
import { startTrace, trace, TRACE_PREFIX } from '../trace.js';

function buildProgram(setExit: (code: number) => void, errText: { text: string }): Command {
  const program = new Command()
    .name('blksync')
    .description('Update disk images and block devices, writing only the blocks that differ.')
    .version('0.1.0')
    // commander's errors are reported by reportError, in the project's form
    // (`blksync: message [EUSAGE]`); what commander writes on stderr (help after a missing
    // command) is kept for after that line. Set before the commands: they inherit it.
    .configureOutput({
      writeErr: (str) => (errText.text += str),
      outputError: () => {},
    })
    .exitOverride();
  registerCopy(program, setExit);
  registerCompare(program, setExit);
  registerIndex(program, setExit);
  registerInfo(program, setExit);
  registerBmap(program, setExit);
  registerDiff(program, setExit);
  registerApply(program, setExit);
  registerPublish(program, setExit);
  refuseContradictions(program);
  return program;
}

/**
 * `--bmap FILE --no-bmap` (in either order) sets one value, the last: commander takes the pair
 * as "last one wins". A user who wrote both meant something the run cannot do, so it is
 * refused, for every `--x` / `--no-x` pair of every command.
 */
function refuseContradictions(cmd: Command<unknown[], OptionValues, OptionValues>): void {
  const byAttribute = new Map<string, { positive?: string; negative?: string }>();
  for (const option of cmd.options) {
    const pair = byAttribute.get(option.attributeName()) ?? {};
    if (option.negate) pair.negative = option.name();
    else pair.positive = option.name();
    byAttribute.set(option.attributeName(), pair);
  }
  for (const { positive, negative } of byAttribute.values()) {
    if (positive === undefined || negative === undefined) continue;
    const seen = new Set<string>();
    for (const name of [positive, negative]) {
      cmd.on(`option:${name}`, () => {
        seen.add(name);
        if (seen.size === 2) {
          throw new BlksyncError(
            'EUSAGE',
            `--${positive} and --${negative} contradict each other; give one of them`,
          );
        }
      });
    }
  }
  for (const sub of cmd.commands) refuseContradictions(sub);
}

/** Runs the CLI with `argv` (process.argv layout); sets process.exitCode. */
export async function main(argv: readonly string[]): Promise<void> {
  if (process.env.BLKSYNC_TRACE === '1') startTrace(printTrace);
  trace('cli started (node and the CLI bundle loaded)');
  let exitCode: number | undefined;
  // Node ends a process whose event loop ran empty with status 0, also while the command
  // still awaited something that could no longer happen (a bug): that must not pass as done
  const unfinished = (): void => {
    process.exitCode = reportError(
      new BlksyncError(
        'EINTERNAL',
        'internal error: the command stopped before it finished; what it wrote may be incomplete, rerun it',
      ),
      { json: argv.includes('--json') },
    );
  };
  process.once('exit', unfinished);
  const errText = { text: '' };
  const program = buildProgram((code) => {
    exitCode = code;
  }, errText);
  try {
    await program.parseAsync([...argv]);
  } catch (err) {
    exitCode = reportError(
      err,
      { debug: argv.includes('--debug'), json: argv.includes('--json') },
      { usageText: errText.text },
    );
  }
  process.removeListener('exit', unfinished);
  process.exitCode = exitCode ?? 0;
  trace(`exit ${process.exitCode}`);
}

/**
 * BLKSYNC_TRACE=1: the timeline on stderr, one line per event, in ms since this process
 * started (an agent's events placed by their wall-clock time; exact on one machine).
 */
function printTrace(line: string): void {
  const m = new RegExp(`^${TRACE_PREFIX} ([\\d.]+) ([\\d.]+) (\\S+) (.*)$`).exec(line.trimEnd());
  if (m === null) return;
  const at = Number(m[1]) - performance.timeOrigin;
  const own = m[3] === 'local' ? '' : ` (${m[2]} ms into its process)`;
  process.stderr.write(`trace ${at.toFixed(1).padStart(8)} ms  ${m[3]!.padEnd(6)} ${m[4]}${own}\n`);
}
