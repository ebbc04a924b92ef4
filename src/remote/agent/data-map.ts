/**
 * Where the agent's file holds data, so its scan skips the holes (three quarters of an OS
 * image) as the local end does. Node has no binding for lseek's SEEK_DATA / SEEK_HOLE and the
 * agent carries no native code, so it asks perl, which nearly every Linux host has (Debian's
 * perl-base is essential): one short process, in parallel with nothing else the scan needs.
 *
 * Best effort, never trusted blindly: only on Linux (the whence values 3 and 4 are Linux's),
 * only for a regular file, through /proc/<pid>/fd (the very file the agent opened, not
 * whatever the path names now). No perl, a failure, a timeout, output that is not complete
 * (the script prints `end` only after SEEK_DATA said ENXIO, no data past there) or not in
 * ascending order: undefined, and every unit is read as before.
 */

import { execFile } from 'node:child_process';

/** The longest the map may take; reading the file is the fallback. */
const MAP_TIMEOUT_MS = 3000;
/** Output beyond this (a file in ~100,000 pieces) is not worth parsing: read it instead. */
const MAP_MAX_OUTPUT_BYTES = 4 * 1024 * 1024;

/**
 * Prints `start end` for each data run below $ARGV[1], then `end` once SEEK_DATA fails with
 * ENXIO (6): nothing but holes remain. Any other failure exits without `end`.
 */
const SCRIPT =
  'open(F,"<",$ARGV[0])||exit 2;$s=$ARGV[1];$p=0;while($p<$s){$d=sysseek(F,$p,3);' +
  'if(!defined $d){exit 3 unless $!+0==6;last}$h=sysseek(F,$d,4);exit 4 unless defined $h;' +
  'print int($d)," ",int($h),"\\n";$p=$h}print "end\\n"';

export interface DataRange {
  start: number;
  end: number;
}

/** The data ranges of [0, size) of the open file `fd`; undefined when they cannot be told. */
export function agentDataMap(fd: number, size: number): Promise<DataRange[] | undefined> {
  if (process.platform !== 'linux') return Promise.resolve(undefined);
  return new Promise((resolve) => {
    execFile(
      'perl',
      ['-e', SCRIPT, `/proc/${process.pid}/fd/${fd}`, String(size)],
      { timeout: MAP_TIMEOUT_MS, maxBuffer: MAP_MAX_OUTPUT_BYTES, encoding: 'utf8' },
      (err, stdout) => resolve(err === null ? parseDataMap(stdout, size) : undefined),
    );
  });
}

/** The script's output as ascending, clamped ranges; undefined unless it is whole and sane. */
export function parseDataMap(out: string, size: number): DataRange[] | undefined {
  const lines = out.split('\n');
  if (lines.pop() !== '' || lines.pop() !== 'end') return undefined;
  const ranges: DataRange[] = [];
  let last = 0;
  for (const line of lines) {
    const m = /^(\d{1,16}) (\d{1,16})$/.exec(line);
    if (m === null) return undefined;
    const start = Number(m[1]);
    const end = Math.min(Number(m[2]), size);
    if (start < last || end <= start || start >= size) return undefined;
    ranges.push({ start, end });
    last = end;
  }
  return ranges;
}
