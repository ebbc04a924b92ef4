/**
 * The progress line: on a TTY a bar redrawn at most ten times a second; elsewhere nothing
 * until the summary. Hand-written because it is a dozen lines and shows blksync's own
 * figures (bytes differing) that generic bar libraries would need templating for.
 */

import type { Progress } from '../types.js';
import { formatBytes } from '../size.js';

const REDRAW_MS = 100;
const BAR_WIDTH = 24;

export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return '--:--';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
}

export class ProgressBar {
  readonly #out: NodeJS.WriteStream;
  readonly #started = performance.now();
  #last = 0;
  #drawn = false;

  constructor(out: NodeJS.WriteStream) {
    this.#out = out;
  }

  update(p: Progress, force = false): void {
    const now = performance.now();
    if (!force && now - this.#last < REDRAW_MS) return;
    this.#last = now;
    const elapsed = (now - this.#started) / 1000;
    const rate = elapsed > 0 ? p.bytesScanned / elapsed : 0;
    const eta = rate > 0 ? (p.bytesTotal - p.bytesScanned) / rate : Infinity;
    const frac = p.bytesTotal > 0 ? p.bytesScanned / p.bytesTotal : 1;
    const filled = Math.round(frac * BAR_WIDTH);
    const bar = '#'.repeat(filled) + '-'.repeat(BAR_WIDTH - filled);
    const line =
      (p.phase !== undefined ? `${p.phase} ` : '') +
      `[${bar}] ${(frac * 100).toFixed(0).padStart(3)}% ` +
      `${formatBytes(p.bytesScanned)} / ${formatBytes(p.bytesTotal)}  ` +
      `${formatBytes(rate)}/s  ETA ${formatDuration(eta)}  differing ${formatBytes(p.bytesDiffering)}` +
      (p.bytesFetched !== undefined ? `  fetched ${formatBytes(p.bytesFetched)}` : '') +
      (p.channelBytesSent !== undefined
        ? `  ssh ↑${formatBytes(p.channelBytesSent)} ↓${formatBytes(p.channelBytesReceived ?? 0)}`
        : '');
    const cols = this.#out.columns || 100;
    this.#out.write(`\r${line.slice(0, cols - 1)}\x1b[K`);
    this.#drawn = true;
  }

  /** Clears the bar so the summary prints on a clean line. */
  clear(): void {
    if (this.#drawn) this.#out.write('\r\x1b[K');
    this.#drawn = false;
  }
}
