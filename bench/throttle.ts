/**
 * Slow devices for the benchmarks: cgroup v1 blkio throttles on a (loop) device, applied to
 * every bio sent to it, writeback included. The limits are the whole machine's, so they are
 * lifted on dispose and when the bench is interrupted.
 */

import { existsSync } from 'node:fs';
import { stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { devId } from '../src/io/block-device.js';

const THROTTLE_DIR = '/sys/fs/cgroup/blkio';

/** True when this machine can throttle devices (cgroup v1 blkio, root). */
export function canThrottle(): boolean {
  return existsSync(path.join(THROTTLE_DIR, 'blkio.throttle.write_bps_device'));
}

export interface Throttle {
  /** Bytes per second for writes and reads; 0 lifts the limit. */
  set(writeBps: number, readBps: number): Promise<void>;
  /** Lifts the limits and stops watching for signals. */
  dispose(): Promise<void>;
}

export async function throttleDevice(dev: string): Promise<Throttle> {
  const majMin = devId((await stat(dev)).rdev);
  const set = async (writeBps: number, readBps: number): Promise<void> => {
    await writeFile(
      path.join(THROTTLE_DIR, 'blkio.throttle.write_bps_device'),
      `${majMin} ${writeBps}`,
    );
    await writeFile(
      path.join(THROTTLE_DIR, 'blkio.throttle.read_bps_device'),
      `${majMin} ${readBps}`,
    );
  };
  // an interrupted bench must not leave the limits behind
  const clearOnSignal = (signal: NodeJS.Signals): void => {
    void set(0, 0)
      .catch(() => {})
      .finally(() => process.kill(process.pid, signal));
  };
  process.once('SIGINT', clearOnSignal);
  process.once('SIGTERM', clearOnSignal);
  return {
    set,
    dispose: async () => {
      process.off('SIGINT', clearOnSignal);
      process.off('SIGTERM', clearOnSignal);
      await set(0, 0).catch(() => {});
    },
  };
}
