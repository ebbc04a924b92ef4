/**
 * A pull's `--verify`: DST is local, so it is read back here after the fsync — the mapped
 * ranges against a bmap's checksums (as a local bmap copy), or what this run wrote against the
 * digests of the bytes it wrote.
 */

import type { BmapSourcing } from '../../engine/copy-source.js';
import type { VerifyReport } from '../../engine/verify-written.js';
import { compareWritten, readBackWritten, type WrittenSink } from '../../engine/written-log.js';
import type { Opened } from '../../io/open.js';

/** A pull's --verify with a bmap's checksums: DST's mapped ranges read back and compared, as locally. */
export async function verifyAgainstBmap(
  dst: string,
  target: Opened,
  checksums: NonNullable<BmapSourcing['checksums']>,
  signal: AbortSignal | undefined,
): Promise<VerifyReport> {
  const t0 = performance.now();
  const { verifyWritten } = await import('../../engine/verify-written.js');
  const r = await verifyWritten(dst, checksums.units, checksums.algorithm, {
    fd: target.fh.fd,
    signal,
  });
  return {
    ...r,
    against: 'bmap',
    algorithm: checksums.algorithm,
    seconds: (performance.now() - t0) / 1000,
  };
}

/** A pull's --verify without bmap checksums: what `logged` saw written, read back (O_DIRECT). */
export async function verifyLogged(
  dst: string,
  target: Opened,
  logged: WrittenSink,
  signal: AbortSignal | undefined,
): Promise<VerifyReport> {
  // DST is local: the local --verify's read-back (O_DIRECT, koffi's aligned buffer)
  const t0 = performance.now();
  const { alignedBuffer } = await import('../../engine/verify-written.js');
  const back = await readBackWritten(dst, logged.ranges, {
    fd: target.fh.fd,
    signal,
    alignedBuffer,
  });
  const r = compareWritten(logged.digests.digests(), back.digests, dst, back.direct);
  return {
    ...r,
    direct: back.direct,
    against: 'written',
    algorithm: 'sha256',
    seconds: (performance.now() - t0) / 1000,
  };
}
