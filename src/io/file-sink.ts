/**
 * A Sink writing into a regular file or block device with pwrite.
 *
 * Block devices are fsynced at a bounded cadence (by dirty bytes and by time) so that the
 * kernel never holds gigabytes of dirty pages: Ctrl-C then returns in about a second instead
 * of waiting for a slow USB stick to drain. Regular files are fsynced once, at the end.
 */

import type { FileHandle } from 'node:fs/promises';
import { fromSystemError } from '../errors.js';
import type { Sink } from '../engine/types.js';

/** Dirty bytes after which a block device is fsynced. */
export const SYNC_EVERY_BYTES = 64 * 1024 * 1024;
/** Time after which a block device with dirty data is fsynced. */
export const SYNC_EVERY_MS = 1000;

export class FileSink implements Sink {
  readonly #fh: FileHandle;
  readonly #path: string;
  readonly #boundedSync: boolean;
  #dirty = 0;
  #lastSync = Date.now();
  #finished = false;

  constructor(fh: FileHandle, path: string, options: { boundedSync: boolean }) {
    this.#fh = fh;
    this.#path = path;
    this.#boundedSync = options.boundedSync;
  }

  async write(data: Buffer, offset: number): Promise<void> {
    try {
      let done = 0;
      while (done < data.length) {
        const { bytesWritten } = await this.#fh.write(
          data,
          done,
          data.length - done,
          offset + done,
        );
        done += bytesWritten;
      }
      this.#dirty += data.length;
      if (
        this.#boundedSync &&
        (this.#dirty >= SYNC_EVERY_BYTES || Date.now() - this.#lastSync >= SYNC_EVERY_MS)
      ) {
        await this.#sync();
      }
    } catch (err) {
      throw fromSystemError('EWRITE', 'cannot write', this.#path, err);
    }
  }

  async #sync(): Promise<void> {
    await this.#fh.sync();
    this.#dirty = 0;
    this.#lastSync = Date.now();
  }

  async finish(): Promise<void> {
    if (this.#finished) return;
    this.#finished = true;
    try {
      if (this.#dirty > 0) await this.#sync();
    } catch (err) {
      throw fromSystemError('EWRITE', 'cannot flush', this.#path, err);
    }
  }
}

/** Counts what would be written and writes nothing (--dry-run, compare). */
export class NullSink implements Sink {
  write(): Promise<void> {
    return Promise.resolve();
  }
  finish(): Promise<void> {
    return Promise.resolve();
  }
}
