/**
 * Pools of equally sized, page-aligned buffers for the bulk reads, so the hot loop allocates
 * nothing and the kernel copies from the page cache at full speed.
 *
 * Why aligned: `pread` into a buffer that starts 16 bytes past a page (where malloc puts a
 * 1 MiB `Buffer.allocUnsafe`, and where V8 puts a SharedArrayBuffer) copies 1.6–1.9× slower
 * than into a page-aligned one on x86-64 (272 MiB of two files' data: 48 ms aligned against
 * 80–100 ms; the same gap with a C loop, aligned_alloc against aligned_alloc + 16).
 * Node has no aligned allocator, but WebAssembly.Memory is mmap'd by V8 and so starts on a
 * page: each slab is one Memory, carved into buffers at multiples of 64 KiB. Its pages are
 * committed only when touched, like malloc's. Where a Memory cannot be had, or the address
 * space is limited (V8 reserves guard regions for each), plain buffers serve, only slower.
 *
 *   slab (one WebAssembly.Memory, never grown: growing would detach every buffer in it)
 *   ┌────────────┬────────────┬─────┬────────────┐
 *   │ buffer 0   │ buffer 1   │ ... │ buffer n-1 │   stride = size rounded up to 64 KiB
 *   └────────────┴────────────┴─────┴────────────┘
 */

import { addressSpaceLimited } from './address-space.js';

/** WebAssembly's page: Memory sizes are multiples of it. */
const WASM_PAGE_BYTES = 64 * 1024;
/** A slab's size when buffers are small: few Memories (each reserves address space), little waste. */
const SLAB_BYTES = 16 * 1024 * 1024;

/** `count` buffers of `size` bytes each, page-aligned, from one WebAssembly.Memory. */
function alignedSlab(size: number, count: number, shared: boolean): Buffer[] {
  const stride = Math.ceil(size / WASM_PAGE_BYTES) * WASM_PAGE_BYTES;
  const pages = Math.max(1, (stride * count) / WASM_PAGE_BYTES);
  const memory = new WebAssembly.Memory(
    shared ? { initial: pages, maximum: pages, shared: true } : { initial: pages, maximum: pages },
  );
  const out: Buffer[] = [];
  for (let i = 0; i < count; i++) out.push(Buffer.from(memory.buffer, i * stride, size));
  return out;
}

/** Plain buffers only: the address space is limited, or WebAssembly.Memory failed once. */
let unaligned: boolean | undefined;

/**
 * `count` page-aligned buffers of `size` bytes, or plain ones where no Memory can be had.
 * `shared`: backed by shared memory, so worker threads can read them in place.
 */
export function alignedBuffers(size: number, count: number, shared = false): Buffer[] {
  // under `ulimit -v` a Memory's reservation could leave a worker thread no room (address-space.ts)
  unaligned ??= addressSpaceLimited();
  if (!unaligned && size > 0) {
    try {
      return alignedSlab(size, count, shared);
    } catch {
      unaligned = true;
    }
  }
  const out: Buffer[] = [];
  for (let i = 0; i < count; i++) {
    out.push(shared ? Buffer.from(new SharedArrayBuffer(size)) : Buffer.allocUnsafeSlow(size));
  }
  return out;
}

/** A pool of equally sized, page-aligned buffers, taken from slabs as the pool grows. */
export class BufferPool {
  readonly #size: number;
  readonly #shared: boolean;
  readonly #free: Buffer[] = [];
  /** Buffers of the last slab not yet handed out. */
  #spare: Buffer[] = [];

  /** `shared`: backed by shared memory, so hashing workers can read them in place. */
  constructor(size: number, shared = false) {
    this.#size = size;
    this.#shared = shared;
  }

  get(): Buffer {
    const buf = this.#free.pop() ?? this.#spare.pop();
    if (buf !== undefined) return buf;
    const count = Math.max(1, Math.floor(SLAB_BYTES / Math.max(this.#size, WASM_PAGE_BYTES)));
    this.#spare = alignedBuffers(this.#size, count, this.#shared).reverse();
    return this.#spare.pop()!;
  }

  put(buf: Buffer): void {
    this.#free.push(buf);
  }
}

/** A BufferPool of shared memory, so hashing workers can read the buffers in place. */
export class SharedBufferPool extends BufferPool {
  constructor(size: number) {
    super(size, true);
  }
}
