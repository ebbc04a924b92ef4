/** A Source reading a regular file or block device by offset (pread through libuv's pool). */

import type { FileHandle } from 'node:fs/promises';
import { fromSystemError } from '../errors.js';
import type { Source } from '../types.js';
import { readFully } from './read-fully.js';

export class FileSource implements Source {
  readonly size: number;
  readonly #fh: FileHandle;
  readonly #path: string;
  readonly #owned: boolean;

  /** `owned`: close the handle in close(); false when the caller shares it. */
  constructor(fh: FileHandle, path: string, size: number, owned = true) {
    this.#fh = fh;
    this.#path = path;
    this.size = size;
    this.#owned = owned;
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    try {
      return await readFully(this.#fh, buf, 0, length, offset);
    } catch (err) {
      throw fromSystemError('EREAD', 'cannot read', this.#path, err);
    }
  }

  async close(): Promise<void> {
    if (this.#owned) await this.#fh.close();
  }
}
