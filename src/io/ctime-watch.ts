/**
 * A regular file's ctime kept continuous through a copy's own writes: fstat before each write
 * (and before the final sync) must show the ctime seen after the previous one (or at open).
 * Any other change is another writer's, and an index stamped after the copy would vouch for
 * it (engine/index-session.ts, remote/agent-index.ts). What remains: a foreign write in the
 * same clock tick as one of ours, or between our write and the fstat after it, is not seen.
 */

import type { FileHandle } from 'node:fs/promises';

export class CtimeWatch {
  readonly #fh: FileHandle;
  #last: bigint | undefined;
  #broken = false;

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

  /** Whether another writer changed the file while it was watched. */
  get broken(): boolean {
    return this.#broken;
  }
}
