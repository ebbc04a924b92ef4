/**
 * A regular file's ctime kept continuous through a copy's own writes: fstat before each write
 * (and before the final sync) must show the ctime seen after the previous one (or at open).
 * Any other change is another writer's, and an index stamped after the copy would vouch for
 * it (engine/index-session.ts, remote/agent-index.ts). What remains: a foreign write in the
 * same clock tick as one of ours, or between our write and the fstat after it, is not seen.
 *
 * A ctime has the file system's granularity (a clock tick, a whole second on ext4 with
 * 128-byte inodes): a write in the same tick as the last one the stamp records leaves the
 * ctime as stamped. So before a stamp is recorded, `settle` waits until the clock is clearly
 * past that ctime (as git does with "racily clean" entries): a later write then moves it.
 */

import type { FileHandle } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';

/** Longer than a clock tick (HZ >= 100) plus the lag of the kernel's coarse clock. */
const TICK_MARGIN_NS = 20_000_000n;
/** Coarse-timestamp file systems (whole seconds; FAT's two): their ctime ends in zeros. */
const COARSE_GRANULARITY_NS = 2_000_000_000n;
const NS_PER_MS = 1_000_000n;

/** How long after `ctimeNs` a later change is sure to show another ctime on its file system. */
function settleNs(ctimeNs: bigint): bigint {
  // a nanosecond clock ends in a whole millisecond once in a million; a coarse one always
  return ctimeNs % NS_PER_MS === 0n ? COARSE_GRANULARITY_NS + TICK_MARGIN_NS : TICK_MARGIN_NS;
}

/**
 * Waits until a change made from now on cannot get the ctime `ctimeNs` (at most the file
 * system's granularity); false when that ctime is still ahead of this machine's clock then.
 */
export async function settledPast(ctimeNs: bigint): Promise<boolean> {
  const most = settleNs(ctimeNs);
  const until = ctimeNs + most;
  // a timer may fire a little early: wait again, up to twice the granularity in all
  const giveUp = BigInt(Date.now()) * NS_PER_MS + 2n * most;
  // a ctime further ahead than that (a clock set back, another host's) is given up at once
  if (until > giveUp) return false;
  for (;;) {
    const now = BigInt(Date.now()) * NS_PER_MS;
    if (now >= until) return true;
    if (now >= giveUp) return false;
    const waitNs = until - now;
    await sleep(Number((waitNs < most ? waitNs : most) / NS_PER_MS) + 1);
  }
}

export class CtimeWatch {
  readonly #fh: FileHandle;
  #last: bigint | undefined;
  #broken = false;
  #unsettled = false;

  private constructor(fh: FileHandle, ctime: bigint) {
    this.#fh = fh;
    this.#last = ctime;
  }

  /** Starts watching `fh` (a regular file) from its ctime now; undefined for a device. */
  static async start(fh: FileHandle): Promise<CtimeWatch | undefined> {
    const st = await fh.stat({ bigint: true });
    return st.isFile() ? new CtimeWatch(fh, st.ctimeNs) : undefined;
  }

  /** Before one of this copy's own changes: was the file changed since the last one? */
  async before(): Promise<void> {
    if (this.#broken) return;
    const st = await this.#fh.stat({ bigint: true });
    if (st.ctimeNs !== this.#last) this.#broken = true;
  }

  /** After one of this copy's own changes: its ctime is ours. */
  async after(): Promise<void> {
    if (this.#broken) return;
    this.#last = (await this.#fh.stat({ bigint: true })).ctimeNs;
  }

  /** The stamp about to be recorded shows `ctimeNs`: anything but the last seen is another writer's. */
  stamped(ctimeNs: string | undefined): void {
    if (!this.#broken && ctimeNs !== this.#last?.toString()) this.#broken = true;
  }

  /**
   * Before a stamp is recorded: waits until a change from now on cannot leave the ctime last
   * seen (at most the file system's granularity). A ctime still ahead of this machine's clock
   * then (a network file system's clock, a clock set back) cannot vouch: `unsettled`.
   */
  async settle(): Promise<void> {
    if (this.#broken || this.#last === undefined) return;
    if (!(await settledPast(this.#last))) this.#unsettled = true;
  }

  /** Whether the last ctime was too recent to vouch for the file when the stamp was taken. */
  get unsettled(): boolean {
    return this.#unsettled;
  }

  /** Whether another writer changed the file while it was watched. */
  get broken(): boolean {
    return this.#broken;
  }
}
