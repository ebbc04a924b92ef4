/**
 * Getting the agent onto the remote without installing anything: ssh runs
 * `node -e <BOOTSTRAP>`, and the bootstrap reads the agent from stdin,
 *
 *   +-----------+----------------------------------+-------------------------
 *   | n (u32 BE)| agent bundle, raw deflate (n B)  | protocol frames ...
 *   +-----------+----------------------------------+-------------------------
 *
 * inflates it, runs it as a CommonJS module and hands it the bytes it read past the bundle,
 * so stdin and stdout then carry the protocol. Nothing is written to the remote's disk.
 *
 * The agent bundle (one CommonJS file made by esbuild from agent-entry.ts) is dist/agent.cjs
 * in a built package (`npm run build:agent`); when blksync runs from its TypeScript sources
 * (tests, development) it is built in memory on first use so it can never be stale.
 */

import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { deflateRawSync } from 'node:zlib';
import { BlksyncError } from '../errors.js';

/** Exit status of the bootstrap when the remote node is older than the agent needs. */
export const EXIT_NODE_TOO_OLD = 96;
/** Oldest Node.js major the agent runs on. */
export const MIN_REMOTE_NODE = 18;

/** Small, and free of single quotes so it survives the remote shell's quoting unchanged. */
export const BOOTSTRAP =
  `var v=+process.versions.node.split(".")[0];if(v<${MIN_REMOTE_NODE}){process.stderr.write(` +
  `"blksync: remote node "+process.version+" is too old; blksync needs node >= ${MIN_REMOTE_NODE}\\n");` +
  `process.exit(${EXIT_NODE_TOO_OLD})}var b=Buffer.alloc(0);process.stdin.on("data",function f(d){` +
  `b=Buffer.concat([b,d]);if(b.length<4)return;var n=b.readUInt32BE(0);if(b.length<4+n)return;` +
  `process.stdin.removeListener("data",f);process.stdin.pause();var m={exports:{}};` +
  `new Function("require","module","exports",require("zlib").inflateRawSync(b.subarray(4,4+n))` +
  `.toString())(require,m,m.exports);m.exports.main(b.subarray(4+n))})`;

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
  // esbuild is a devDependency: present wherever the sources are run
  const esbuild = await import('esbuild');
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
