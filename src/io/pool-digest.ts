/**
 * Hashing on libuv's thread pool, without a worker thread: OpenSSL's EVP digest functions,
 * which Node's own binary carries (it links OpenSSL, statically or not), called through
 * koffi's asynchronous calls, which run on the pool. `crypto.createHash` hashes on the
 * calling thread; a worker thread to hash on costs ~20-45 ms of CPU to start (a V8 isolate
 * and Node's bootstrap), more than a bmap copy of an OS image spends on anything but the
 * hash itself. The digests are OpenSSL's, the same as createHash's (the tests compare them).
 *
 * Where the functions cannot be had (koffi cannot load, or a Node built without them),
 * `poolDigests` returns undefined and callers hash as before.
 */

import { loadKoffi } from './koffi.js';

/** One digest being computed: updates one at a time, in order, then `digest` once. */
export interface PoolDigest {
  /**
   * Feeds `data` on a pool thread, read in place: it must not change until the promise
   * settles, and must not be in a buffer that can move (no Node buffer's bytes do).
   */
  update(data: Buffer): Promise<void>;
  /** The hex digest; frees the context. */
  digest(): string;
  /** Frees the context without a digest (nothing may be in flight). */
  free(): void;
}

type Callback = (err: unknown, result: number) => void;
interface AsyncFn<A extends unknown[]> {
  (...args: A): number;
  async(...args: [...A, Callback]): void;
}

interface Evp {
  byName: (name: string) => unknown;
  newCtx: () => unknown;
  init: (ctx: unknown, md: unknown, engine: null) => number;
  update: AsyncFn<[unknown, bigint | number, number]>;
  /** The address of a buffer's bytes: memset(buf, 0, 0) returns its first argument. */
  addressOf: (buf: Buffer, c: 0, n: 0) => bigint | number;
  final: (ctx: unknown, out: Buffer, len: Uint32Array) => number;
  freeCtx: (ctx: unknown) => void;
}

let evp: Evp | null | undefined;

function load(): Evp | null {
  if (evp !== undefined) return evp;
  try {
    const koffi = loadKoffi();
    // the process itself: Node's binary, and the libraries it loaded (a shared libcrypto)
    const self = koffi.load(null);
    evp = {
      byName: self.func('const void *EVP_get_digestbyname(const char *name)') as Evp['byName'],
      newCtx: self.func('void *EVP_MD_CTX_new()') as Evp['newCtx'],
      init: self.func(
        'int EVP_DigestInit_ex(void *ctx, const void *type, void *engine)',
      ) as Evp['init'],
      // the data as an address, not a buffer: koffi copies a buffer an asynchronous call is
      // given (~0.2 ms a MiB, on the calling thread), where a synchronous call gets it in place
      update: self.func(
        'int EVP_DigestUpdate(void *ctx, uintptr_t data, size_t count)',
      ) as unknown as Evp['update'],
      addressOf: self.func('uintptr_t memset(void *s, int c, size_t n)') as Evp['addressOf'],
      final: self.func(
        'int EVP_DigestFinal_ex(void *ctx, _Out_ uint8_t *md, _Out_ uint32_t *len)',
      ) as Evp['final'],
      freeCtx: self.func('void EVP_MD_CTX_free(void *ctx)') as Evp['freeCtx'],
    };
  } catch {
    evp = null; // no koffi here, or no OpenSSL symbols in this process
  }
  return evp;
}

/** Whether pool digests can be had here (loads koffi and looks the functions up). */
export function poolDigestsAvailable(): boolean {
  return load() !== null;
}

/**
 * A digest of `algorithm` (OpenSSL's name: sha256, sha1, md5, sha512 …) computed on the pool,
 * or undefined when that cannot be had here.
 */
export function poolDigest(algorithm: string): PoolDigest | undefined {
  const f = load();
  if (f === null) return undefined;
  const md = f.byName(algorithm);
  if (md === null) return undefined;
  const ctx = f.newCtx();
  if (ctx === null) return undefined;
  if (f.init(ctx, md, null) !== 1) {
    f.freeCtx(ctx);
    return undefined;
  }
  let freed = false;
  const free = (): void => {
    if (!freed) f.freeCtx(ctx);
    freed = true;
  };
  return {
    update: (data) =>
      new Promise((resolve, reject) => {
        if (freed) {
          reject(new Error('pool digest used after it was freed'));
          return;
        }
        // `data` stays where it is (and referenced, in this closure) until the call returns
        f.update.async(ctx, f.addressOf(data, 0, 0), data.length, (err, ok) => {
          void data;
          if (err !== null && err !== undefined)
            reject(err instanceof Error ? err : new Error('EVP_DigestUpdate could not be called'));
          else if (ok !== 1) reject(new Error('EVP_DigestUpdate failed'));
          else resolve();
        });
      }),
    digest: () => {
      const out = Buffer.alloc(64);
      const len = new Uint32Array(1);
      const ok = f.final(ctx, out, len);
      free();
      if (ok !== 1) throw new Error('EVP_DigestFinal_ex failed');
      return out.subarray(0, len[0]).toString('hex');
    },
    free,
  };
}
