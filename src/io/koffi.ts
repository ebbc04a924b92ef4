/**
 * koffi, the foreign-function interface through which blksync calls the libc functions Node
 * has no binding for (lseek SEEK_DATA, fallocate, posix_fadvise, flock). A native
 * addon (~10 ms to load), so it is loaded on first use: a plain copy onto a new file never
 * needs it. Where it cannot be loaded (the agent bundle on a remote host has no native
 * addons), `loadKoffi` throws and each caller falls back to doing without.
 */

import { createRequire } from 'node:module';

export type Koffi = typeof import('koffi');

let koffiModule: Koffi | undefined;

export function loadKoffi(): Koffi {
  koffiModule ??= createRequire(import.meta.url)('koffi') as Koffi;
  return koffiModule;
}
