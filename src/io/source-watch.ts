/**
 * Whether another program wrote SRC (a local file or block device) while a copy read it: the
 * copy would then end with DST holding some blocks of the old SRC and some of the new, a mix
 * no one made. A regular file: its ctime, mtime and size, from the open descriptor (a file
 * renamed over SRC's name meanwhile is not what was read). A block device: the kernel's count
 * of sectors written to it (its own, a partition's, not its disk's, which DST on another
 * partition of the same disk moves), after a sync so that what was left dirty before the copy
 * is not counted as written during it.
 *
 * What is not seen: a write through a partition's whole disk into it, a device without a
 * write counter, and a file's write within the same clock tick as the first stat.
 */

import type { FileHandle } from 'node:fs/promises';
import { BlksyncError } from '../errors.js';
import { sectorsWritten } from './write-counter.js';

interface Stamp {
  ctimeNs?: bigint;
  mtimeNs?: bigint;
  size?: bigint;
  sectorsWritten?: bigint;
}

async function stampOf(fh: FileHandle): Promise<Stamp | undefined> {
  const st = await fh.stat({ bigint: true });
  if (st.isFile()) return { ctimeNs: st.ctimeNs, mtimeNs: st.mtimeNs, size: st.size };
  if (!st.isBlockDevice()) return undefined;
  const written = await sectorsWritten(Number(st.rdev));
  return written === undefined ? undefined : { sectorsWritten: written };
}

function whatMoved(before: Stamp, now: Stamp): string | undefined {
  if (before.size !== now.size) return `its size went from ${before.size} to ${now.size} bytes`;
  if (before.mtimeNs !== now.mtimeNs) return 'it was modified';
  if (before.ctimeNs !== now.ctimeNs) return 'its ctime moved';
  if (before.sectorsWritten !== now.sectorsWritten) {
    return "the kernel's count of sectors written to it moved";
  }
  return undefined;
}

export class SourceWatch {
  readonly #fh: FileHandle;
  readonly #path: string;
  readonly #before: Stamp;

  private constructor(fh: FileHandle, path: string, before: Stamp) {
    this.#fh = fh;
    this.#path = path;
    this.#before = before;
  }

  /** Starts watching SRC, open as `fh`; undefined when nothing can tell (no write counter). */
  static async start(fh: FileHandle, path: string): Promise<SourceWatch | undefined> {
    const st = await fh.stat();
    // a device's pages another program left dirty would be counted when written back
    if (st.isBlockDevice()) await fh.sync().catch(() => {});
    const before = await stampOf(fh);
    return before === undefined ? undefined : new SourceWatch(fh, path, before);
  }

  /**
   * After SRC was read: throws ESRC_CHANGED if another program wrote it meanwhile. `written`
   * says what the error adds about DST.
   */
  async check(written: string): Promise<void> {
    const st = await this.#fh.stat();
    if (st.isBlockDevice()) await this.#fh.sync().catch(() => {});
    const now = await stampOf(this.#fh);
    const moved = now === undefined ? 'it can no longer be examined' : whatMoved(this.#before, now);
    if (moved === undefined) return;
    throw new BlksyncError(
      'ESRC_CHANGED',
      `${this.#path} was written while it was copied (${moved}), so ${written}; stop what writes it and rerun the same command`,
      { path: this.#path },
    );
  }
}
