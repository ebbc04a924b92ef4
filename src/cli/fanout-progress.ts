/**
 * Progress of `copy SRC DST1 DST2 …` on a terminal: one line per destination and a total
 * line, redrawn in place at most ten times a second (the cursor moves back up over them).
 *
 *   /dev/sdb            [######------]  52%  133 MiB / 256 MiB  differing 12.0 MiB
 *   pi@lab1:/dev/mmc…   [####--------]  34%   87 MiB / 256 MiB  differing 0 B
 *   total               [#####-------]  43%  220 MiB / 512 MiB  4 destinations
 */

import type { Progress } from '../types.js';
import { formatBytes } from '../size.js';
import { escapeControl } from './common.js';

const REDRAW_MS = 100;
const BAR_WIDTH = 12;
const NAME_WIDTH = 24;

function bar(done: number, total: number): string {
  const frac = total > 0 ? Math.min(1, done / total) : 1;
  const filled = Math.round(frac * BAR_WIDTH);
  return `[${'#'.repeat(filled)}${'-'.repeat(BAR_WIDTH - filled)}] ${(frac * 100).toFixed(0).padStart(3)}%`;
}

function name(text: string): string {
  const safe = escapeControl(text);
  return safe.length <= NAME_WIDTH ? safe.padEnd(NAME_WIDTH) : `${safe.slice(0, NAME_WIDTH - 1)}…`;
}

export class FanoutProgress {
  readonly #out: NodeJS.WriteStream;
  readonly #names: readonly string[];
  readonly #latest: (Progress | undefined)[];
  #total: Progress | undefined;
  #last = 0;
  #drawn = 0;

  constructor(out: NodeJS.WriteStream, destinations: readonly string[]) {
    this.#out = out;
    this.#names = destinations;
    this.#latest = destinations.map(() => undefined);
  }

  destination(i: number, p: Progress): void {
    this.#latest[i] = p;
    this.#draw();
  }

  total(p: Progress): void {
    this.#total = p;
    this.#draw();
  }

  #draw(): void {
    const now = performance.now();
    if (now - this.#last < REDRAW_MS) return;
    this.#last = now;
    const cols = this.#out.columns || 100;
    const lines = this.#names.map((n, i) => {
      const p = this.#latest[i];
      return p === undefined
        ? `${name(n)} preparing`
        : `${name(n)} ${bar(p.bytesScanned, p.bytesTotal)}  ${formatBytes(p.bytesScanned)} / ${formatBytes(p.bytesTotal)}  differing ${formatBytes(p.bytesDiffering)}`;
    });
    const t = this.#total;
    if (t !== undefined) {
      lines.push(
        `${name('total')} ${bar(t.bytesScanned, t.bytesTotal)}  ${formatBytes(t.bytesScanned)} / ${formatBytes(t.bytesTotal)}  ${this.#names.length} destinations`,
      );
    }
    let text = this.#drawn > 0 ? `\x1b[${this.#drawn}A` : '';
    for (const line of lines) text += `\r${line.slice(0, cols - 1)}\x1b[K\n`;
    this.#out.write(text);
    this.#drawn = lines.length;
  }

  /** Removes the lines so the summary prints where they were. */
  clear(): void {
    if (this.#drawn > 0) this.#out.write(`\x1b[${this.#drawn}A\r\x1b[J`);
    this.#drawn = 0;
  }
}
