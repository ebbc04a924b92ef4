/**
 * Payload compression for patches: each payload is compressed on its own (a gzip member or a
 * zstd frame), so a reader knows the exact size it must inflate to and can cap it, and a
 * record can be verified and written as soon as it arrives.
 *
 * gzip is node:zlib. zstd is the optional zstd-napi package (Node 20's zlib has no zstd and
 * @mongodb-js/zstd will not install here); without it, zstd patches are refused with
 * EPATCH_UNSUPPORTED.
 */

import { createRequire } from 'node:module';
import { promisify } from 'node:util';
import { gunzip, gzip } from 'node:zlib';
import { BlksyncError } from '../errors.js';
import type { Compression } from './patch.js';

const gzipAsync = promisify(gzip);
const gunzipAsync = promisify(gunzip);

/** Level 1: payloads are mostly changed filesystem blocks; higher levels cost 3x for a few %. */
const GZIP_LEVEL = 1;
const ZSTD_LEVEL = 3;

interface Zstd {
  compress(data: Buffer, params?: Record<string, number>): Buffer;
  /** The native context: decompresses into a buffer we size, never one the frame asks for. */
  DCtx: new () => { decompress(dst: Uint8Array, src: Uint8Array): number };
}

let zstd: Promise<Zstd | undefined> | undefined;

function loadZstd(): Promise<Zstd | undefined> {
  // required, not import()ed: the CLI bundle is compiled from V8's code cache
  // (bin/load-cli.cjs), and on Node 20 a script compiled from a cache cannot import()
  zstd ??= new Promise((resolve) => {
    try {
      const load = createRequire(import.meta.url);
      const m = load('zstd-napi') as Partial<Pick<Zstd, 'compress'>>;
      const b = load('zstd-napi/binding.js') as Partial<Pick<Zstd, 'DCtx'>>;
      resolve(m.compress && b.DCtx ? { compress: m.compress, DCtx: b.DCtx } : undefined);
    } catch {
      resolve(undefined);
    }
  });
  return zstd;
}

async function needZstd(): Promise<Zstd> {
  const z = await loadZstd();
  if (z === undefined) {
    throw new BlksyncError(
      'EPATCH_UNSUPPORTED',
      'zstd needs the optional package zstd-napi (npm install zstd-napi); diff makes gzip patches without it (--compress gzip)',
    );
  }
  return z;
}

/** True when this installation can read and write `method`. */
export async function compressionAvailable(method: Compression): Promise<boolean> {
  return method !== 'zstd' || (await loadZstd()) !== undefined;
}

/** Compresses `data`; the caller stores it raw when this is not smaller. */
export async function compressPayload(method: Compression, data: Buffer): Promise<Buffer> {
  if (method === 'gzip') return gzipAsync(data, { level: GZIP_LEVEL });
  if (method === 'zstd') return (await needZstd()).compress(data, { compressionLevel: ZSTD_LEVEL });
  return data;
}

/**
 * Decompresses a payload that must inflate to exactly `rawLength` bytes; a payload that
 * inflates to more is stopped at rawLength + 1 bytes, so a hostile patch cannot make the
 * reader allocate more than its declared (and capped) record size.
 */
export async function decompressPayload(
  method: Compression,
  data: Buffer,
  rawLength: number,
): Promise<Buffer> {
  let out: Buffer;
  try {
    if (method === 'gzip') out = await gunzipAsync(data, { maxOutputLength: rawLength + 1 });
    else if (method === 'zstd') {
      // zstd-napi's decompress() allocates whatever size the frame header declares
      const z = await needZstd();
      const dst = Buffer.allocUnsafe(rawLength);
      out = dst.subarray(0, new z.DCtx().decompress(dst, data));
    } else out = data;
  } catch (err) {
    if (err instanceof BlksyncError) throw err;
    throw new BlksyncError(
      'EPATCH_CHECKSUM',
      `the patch is corrupted: a ${method} payload does not decompress (${(err as Error).message})`,
      { cause: err },
    );
  }
  if (out.length !== rawLength) {
    throw new BlksyncError(
      'EPATCH_CHECKSUM',
      `the patch is corrupted: a payload decompresses to ${out.length} bytes, expected ${rawLength}`,
    );
  }
  return out;
}
