/**
 * A file mapped shared and writable (mmap(2) through koffi, which Node lacks), as a program
 * that writes an image through a map holds it: the first write to a clean page faults and
 * moves the file's mtime; later writes to that page move nothing until writeback cleans it.
 */

import { open, statfs, type FileHandle } from 'node:fs/promises';
import type { TestContext } from 'node:test';
import { loadKoffi } from '../../src/io/koffi.js';
import { need } from './resources.js';

const PROT_READ = 1;
const PROT_WRITE = 2;
const MAP_SHARED = 1;
const MAP_FAILED = -1;
/** tmpfs never writes a page back, so nothing makes a mapped page fault (and move the mtime) again. */
const TMPFS_MAGIC = 0x01021994;

type Mmap = (
  addr: number,
  len: number,
  prot: number,
  flags: number,
  fd: number,
  off: number,
) => number;
type Munmap = (addr: number, len: number) => number;
type Memcpy = (dst: bigint, src: Buffer, len: number) => bigint;

/**
 * Skips (or fails under strict) unless a write through a map in `dir` can be told by the
 * mtime once the file was synced: not on tmpfs.
 */
export async function needMapWrites(t: TestContext, dir: string): Promise<boolean> {
  const shows = (await statfs(dir)).type !== TMPFS_MAGIC;
  return need(t, shows, `${dir} is on tmpfs, where nothing shows a second write through a map`);
}

export class SharedMap {
  readonly #fh: FileHandle;
  readonly #addr: number;
  readonly #length: number;
  readonly #memcpy: Memcpy;
  readonly #munmap: Munmap;

  private constructor(
    fh: FileHandle,
    addr: number,
    length: number,
    memcpy: Memcpy,
    munmap: Munmap,
  ) {
    this.#fh = fh;
    this.#addr = addr;
    this.#length = length;
    this.#memcpy = memcpy;
    this.#munmap = munmap;
  }

  /** Maps the first `length` bytes of `path`, shared and writable. */
  static async open(path: string, length: number): Promise<SharedMap> {
    const libc = loadKoffi().load('libc.so.6');
    const mmap = libc.func('intptr_t mmap(uintptr_t, size_t, int, int, int, int64_t)') as Mmap;
    const munmap = libc.func('int munmap(uintptr_t, size_t)') as Munmap;
    const memcpy = libc.func('uintptr_t memcpy(uintptr_t, const uint8_t *, size_t)') as Memcpy;
    const fh = await open(path, 'r+');
    const addr = mmap(0, length, PROT_READ | PROT_WRITE, MAP_SHARED, fh.fd, 0);
    if (addr === MAP_FAILED) {
      await fh.close();
      throw new Error(`mmap of ${path} failed`);
    }
    return new SharedMap(fh, addr, length, memcpy, munmap);
  }

  /** Stores `bytes` at `offset` of the file through the map (no system call). */
  write(offset: number, bytes: Buffer): void {
    if (offset + bytes.length > this.#length) throw new RangeError('write past the map');
    this.#memcpy(BigInt(this.#addr) + BigInt(offset), bytes, bytes.length);
  }

  async close(): Promise<void> {
    this.#munmap(this.#addr, this.#length);
    await this.#fh.close();
  }
}
