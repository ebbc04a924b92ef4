/**
 * The agent's lock on a regular file DST, the same flock(2) a local blksync takes
 * (io/file-lock.ts), so that two runs writing one file (a push and another push, or a local
 * copy) never mix their writes. The agent carries no native code, so perl takes it: a small
 * process that opens the very file the agent opened (through /proc/<pid>/fd), locks it
 * (exclusive, not waiting), says `held`, and keeps it until its stdin closes, which happens
 * when the agent exits, however it ends (kill -9 too).
 *
 * Best effort: no perl, or a file system without locks, and DST is written unlocked as
 * before. Only another holder of the lock is an error (EDEST_BUSY).
 */

import { spawn } from 'node:child_process';
import { BlksyncError } from '../../errors.js';

/** The longest perl may take to say whether it holds the lock. */
const LOCK_TIMEOUT_MS = 3000;
/** perl's exit status when another open file holds the lock. */
const EXIT_BUSY = 11;

const SCRIPT =
  'use Fcntl ":flock";open(F,"<",$ARGV[0])||exit 2;' +
  `flock(F,LOCK_EX|LOCK_NB)||exit($!{EWOULDBLOCK}?${EXIT_BUSY}:3);` +
  '$|=1;print "held\\n";while(<STDIN>){}';

/** Locks the regular file open as `fd` until this process exits; EDEST_BUSY if another holds it. */
export function lockAgentTarget(fd: number, path: string): Promise<void> {
  if (process.platform !== 'linux') return Promise.resolve();
  return new Promise((resolve, reject) => {
    let child: ReturnType<typeof spawn>;
    try {
      child = spawn('perl', ['-e', SCRIPT, `/proc/${process.pid}/fd/${fd}`], {
        stdio: ['pipe', 'pipe', 'ignore'],
      });
    } catch {
      resolve();
      return;
    }
    let done = false;
    const finish = (err?: BlksyncError): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (err !== undefined) reject(err);
      else resolve();
    };
    const timer = setTimeout(() => finish(), LOCK_TIMEOUT_MS);
    child.on('error', () => finish());
    child.stdout?.once('data', () => {
      // held: the child lives on with the lock; it must not keep the agent alive
      child.unref();
      child.stdout?.destroy();
      (child.stdin as unknown as { unref?: () => void } | null)?.unref?.();
      finish();
    });
    child.on('exit', (code) => {
      if (code === EXIT_BUSY) {
        finish(
          new BlksyncError(
            'EDEST_BUSY',
            `${path} is being written by another blksync (it holds a lock on the file); wait for it to end, or choose another destination`,
            { path },
          ),
        );
      } else finish();
    });
  });
}
