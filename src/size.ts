/** Parsing and printing byte sizes the way dd and bmaptool users write them. */

import { BlksyncError } from './errors.js';

const UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1024,
  kb: 1000,
  kib: 1024,
  m: 1024 ** 2,
  mb: 1000 ** 2,
  mib: 1024 ** 2,
  g: 1024 ** 3,
  gb: 1000 ** 3,
  gib: 1024 ** 3,
  t: 1024 ** 4,
  tb: 1000 ** 4,
  tib: 1024 ** 4,
};

/** Parses "4096", "4K", "64KiB", "1M", "1MB" (dd's rules: K = 1024, KB = 1000). */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = m ? UNITS[(m[2] ?? '').toLowerCase()] : undefined;
  if (!m || unit === undefined) {
    throw new BlksyncError('EUSAGE', `invalid ${what} "${text}": use a number with K, M or G`);
  }
  const value = Number(m[1]) * unit;
  if (!Number.isSafeInteger(value)) {
    throw new BlksyncError('EUSAGE', `invalid ${what} "${text}": too large`);
  }
  return value;
}

/** Formats a byte count for people: 1536 → "1.5 KiB". */
export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n;
  let i = -1;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}
