/**
 * A remote SRC that only this machine decodes (a container or a compressed file: the agent
 * compares bytes as they are and refuses it) is streamed whole through ssh (`cat`) and read
 * here as stdin would be (engine/copy-source.ts `stream`): pulled onto a local DST, or
 * relayed to another host's DST. Nothing of it is compared on its host, so all of it crosses
 * the wire, which the warning WSRC_STREAMED says. A stream cut short, or an ssh that fails,
 * is an error (ESRC_OPEN), never an image that ends early.
 */

import { spawn } from 'node:child_process';
import { PassThrough, type Readable } from 'node:stream';
import type { CopyResult } from '../../engine/copy-options.js';
import { BlksyncError } from '../../errors.js';
import { splitCommand, shellQuote, type RemoteSpec } from '../spec.js';
import type { RemoteCopyOptions } from './options.js';

/** The agent's refusals that mean "decode it on the machine blksync runs on". */
export function decodedHereOnly(err: unknown): err is BlksyncError {
  return (
    err instanceof BlksyncError && (err.code === 'ESRC_CONTAINER' || err.code === 'ESRC_COMPRESSED')
  );
}

/** SRC's bytes as ssh's `cat` sends them; ends only when ssh exits 0. */
function catOverSsh(src: string, from: RemoteSpec, options: RemoteCopyOptions): Readable {
  const [cmd, ...args] = splitCommand(options.ssh ?? 'ssh');
  if (cmd === undefined) throw new BlksyncError('EUSAGE', '--ssh: empty command');
  const cat = `exec ${options.sudo === true ? 'sudo -n ' : ''}cat -- ${shellQuote(from.path)}`;
  const child = spawn(cmd, [...args, from.destination, cat], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const out = new PassThrough();
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (s: string) => (stderr = (stderr + s).slice(-4096)));
  child.stdout.pipe(out, { end: false });
  const fail = (why: string): void => {
    out.destroy(
      new BlksyncError(
        'ESRC_OPEN',
        `${src} could not be read through ssh (${why}); check the host and the path, and rerun`,
        { path: src },
      ),
    );
  };
  child.on('error', (err) => fail(err.message));
  child.on('close', (code, signal) => {
    if (code === 0) out.end();
    else {
      const line = stderr.split('\n').find((l) => l.trim() !== '');
      fail(line?.trim() ?? (signal !== null ? `ssh ended by ${signal}` : `ssh exited ${code}`));
    }
  });
  // the reader stopped (an error, a refusal, the end of a container read): ssh stops too
  out.on('close', () => {
    if (child.exitCode === null) child.kill();
  });
  return out;
}

/**
 * Copies remote SRC (refused by its agent as `refused`) onto `dst`, local or `to`'s, by
 * streaming it here.
 */
export async function copyStreamedRemote(
  src: string,
  dst: string,
  from: RemoteSpec,
  to: RemoteSpec | undefined,
  options: RemoteCopyOptions,
  refused: BlksyncError,
): Promise<CopyResult> {
  if (typeof options.srcIndex === 'string') {
    throw new BlksyncError(
      'EUSAGE',
      `${refused.message}: it is streamed whole through this machine and decoded here, where an index of SRC has nothing to stand for; drop --src-index`,
    );
  }
  const stream = catOverSsh(src, from, options);
  // a bmap beside a remote SRC is not looked for here: --bmap FILE names a local one
  const opts = { ...options, stream, noBmap: options.noBmap ?? options.bmap === undefined };
  const { openCopySource } = await import('../../engine/copy-source.js');
  let opened;
  try {
    opened = await openCopySource(src, opts);
  } catch (err) {
    stream.destroy();
    if (
      refused.code === 'ESRC_COMPRESSED' &&
      err instanceof BlksyncError &&
      err.code === 'EUSAGE' &&
      options.size === undefined
    ) {
      // a compressed image (no container inside) whose decoded size a stream cannot tell
      throw new BlksyncError(
        'ESRC_COMPRESSED',
        `${refused.message}, and blksync decodes only where it runs: give --size BYTES (its decoded size) or --bmap FILE to stream it through here, or decompress it on ${from.destination} first`,
        { cause: err, path: src },
      );
    }
    throw err;
  }
  options.onWarning?.({
    code: 'WSRC_STREAMED',
    message: `${refused.message}, which blksync decodes only where it runs: streamed whole through ssh and decoded here (no part of it is compared on ${from.destination})`,
    path: src,
  });
  if (to === undefined) {
    const { copyLocal } = await import('../../engine/copy.js');
    return copyLocal(src, dst, opts, opened);
  }
  const { push } = await import('./push.js');
  return push(src, dst, to, opts, opened);
}
