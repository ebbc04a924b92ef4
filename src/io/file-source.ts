/** A Source reading a regular file or block device by offset (pread through libuv's pool). */

import type { FileHandle } from 'node:fs/promises';
import { fromSystemError } from '../errors.js';
import type { Source } from '../engine/types.js';

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
    let got = 0;
    try {
      while (got < length) {
        const { bytesRead } = await this.#fh.read(buf, got, length - got, offset + got);
        if (bytesRead === 0) break;
        got += bytesRead;
      }
    } catch (err) {
      throw fromSystemError('EREAD', 'cannot read', this.#path, err);
    }
    return got;
  }

  async close(): Promise<void> {
    if (this.#owned) await this.#fh.close();
  }
}
