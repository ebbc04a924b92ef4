/** Half-open byte ranges [start, end) and a list that merges neighbours as they are added. */

export interface Range {
  start: number;
  end: number;
}

/**
 * Collects ranges added in ascending order, merging a range into the previous one when they
 * touch or are less than `gap` bytes apart. Keeps at most `limit` ranges in memory but counts
 * them all, so a run over a 2 TB device with millions of scattered changes stays bounded.
 */
export class RangeList {
  readonly #gap: number;
  readonly #limit: number;
  #ranges: Range[] = [];
  #count = 0;
  #bytes = 0;
  #last: Range | undefined;

  constructor(options: { gap?: number; limit?: number } = {}) {
    this.#gap = options.gap ?? 0;
    this.#limit = options.limit ?? 100_000;
  }

  add(start: number, end: number): void {
    if (end <= start) return;
    const last = this.#last;
    if (last !== undefined && start - last.end <= this.#gap && start >= last.start) {
      if (end > last.end) {
        this.#bytes += end - Math.max(start, last.end);
        last.end = end;
      }
      return;
    }
    const r = { start, end };
    this.#count++;
    this.#bytes += end - start;
    this.#last = r;
    if (this.#ranges.length < this.#limit) this.#ranges.push(r);
  }

  /** Number of merged ranges, including those past the memory limit. */
  get count(): number {
    return this.#count;
  }

  /** Bytes of the ranges added, each counted once (the gaps merged over are not counted). */
  get bytes(): number {
    return this.#bytes;
  }

  /** The first `limit` merged ranges. */
  get ranges(): readonly Range[] {
    return this.#ranges;
  }

  /** True when some ranges were counted but not kept. */
  get truncated(): boolean {
    return this.#count > this.#ranges.length;
  }
}

/** The union of two ascending, non-overlapping range lists, merging ranges less than `gap` apart. */
export function unionRanges(a: readonly Range[], b: readonly Range[], gap = 0): Range[] {
  const out: Range[] = [];
  let i = 0;
  let j = 0;
  while (i < a.length || j < b.length) {
    const next = j >= b.length || (i < a.length && a[i]!.start <= b[j]!.start) ? a[i++]! : b[j++]!;
    const last = out[out.length - 1];
    if (last !== undefined && next.start - last.end <= gap) last.end = Math.max(last.end, next.end);
    else out.push({ start: next.start, end: next.end });
  }
  return out;
}

/** The bytes `ranges` cover (they must not overlap). */
export function rangesBytes(ranges: readonly Range[]): number {
  return ranges.reduce((n, r) => n + r.end - r.start, 0);
}

/** The parts of `ranges` that lie inside `keep` (both ascending and non-overlapping). */
export function intersectRanges(ranges: readonly Range[], keep: readonly Range[]): Range[] {
  const out: Range[] = [];
  let j = 0;
  for (const r of ranges) {
    while (j < keep.length && keep[j]!.end <= r.start) j++;
    for (let k = j; k < keep.length && keep[k]!.start < r.end; k++) {
      const start = Math.max(r.start, keep[k]!.start);
      const end = Math.min(r.end, keep[k]!.end);
      if (start < end) out.push({ start, end });
    }
  }
  return out;
}
