/**
 * The bytes sent ahead of the protocol: the agent bundle, deflated and length-prefixed (see
 * bootstrap.ts). The bundle (one CommonJS file made by esbuild from agent-entry.ts) is
 * dist/agent.cjs in a built package (`npm run build:agent`); when blksync runs from its
 * TypeScript sources (tests, development) it is built in memory on first use so it can never
 * be stale. Kept out of the agent bundle: it reaches for esbuild and import.meta.
 */

import { createRequire } from 'node:module';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { deflateRawSync } from 'node:zlib';
import { BlksyncError } from '../errors.js';
import { MIN_REMOTE_NODE } from './bootstrap.js';

const HERE = fileURLToPath(import.meta.url);
/** Same relative path from src/remote/*.ts and dist/remote/*.js. */
const BUNDLE_PATH = fileURLToPath(new URL('../../dist/agent.cjs', import.meta.url));
const ENTRY_PATH = fileURLToPath(new URL('./agent-entry.ts', import.meta.url));

/** esbuild options shared by the build script and the in-memory build. */
export const AGENT_BUILD = {
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: `node${MIN_REMOTE_NODE}`,
  minify: true,
  legalComments: 'none',
} as const;

let cached: Promise<Buffer> | undefined;

async function buildInMemory(): Promise<string> {
  // esbuild is a devDependency: present wherever the sources are run. Required, not
  // import()ed: a script compiled from V8's code cache (bin/load-cli.cjs) cannot import()
  const esbuild = createRequire(import.meta.url)('esbuild') as typeof import('esbuild');
  const out = await esbuild.build({ ...AGENT_BUILD, entryPoints: [ENTRY_PATH], write: false });
  const file = out.outputFiles[0];
  if (file === undefined) throw new Error('esbuild produced no output');
  return file.text;
}

async function loadAgent(): Promise<Buffer> {
  let code: string;
  try {
    code = HERE.endsWith('.ts') ? await buildInMemory() : await readFile(BUNDLE_PATH, 'utf8');
  } catch (err) {
    throw new BlksyncError(
      'EREMOTE',
      `cannot load the remote agent (${BUNDLE_PATH}): ${String(err)}; run npm run build:agent`,
      { cause: err },
    );
  }
  const packed = deflateRawSync(Buffer.from(code, 'utf8'), { level: 9 });
  const head = Buffer.allocUnsafe(4);
  head.writeUInt32BE(packed.length, 0);
  return Buffer.concat([head, packed]);
}

/** The bytes sent ahead of the protocol: length-prefixed, deflated agent bundle. */
export function agentPayload(): Promise<Buffer> {
  cached ??= loadAgent();
  cached.catch(() => (cached = undefined));
  return cached;
}
