/**
 * Streaming decompression of images, recognised by their magic bytes (not their names).
 *
 * gzip goes through node:zlib. xz, zstd, bzip2 and lz4 go through the system's own binaries
 * (`xz -dc`, `zstd -dc`, `lbzip2 -dc` or `bzip2 -dc`, `lz4 -dc`), spawned with the image on
 * their stdin and read from their stdout: they are two to four times faster than the
 * libraries that install on Node 20 (measured when this was written), and run on another
 * core.
 * Nothing is unpacked to a temporary file.
 *
 * A decoder that fails, or input that ends too soon, is an error at the end of the stream
 * (ESRC_CORRUPT, or ESRC_SHORT for a truncated file), never a silently short image: the
 * output stream ends only after the decoder exited with status 0.
 *
 * Data after the end of the compressed stream is ESRC_CORRUPT for every format: xz, zstd
 * and lz4 refuse it themselves, zlib refuses it for gzip, and bzip2 (which only warns,
 * "trailing garbage after EOF ignored", and exits 0) is held to the same rule here. Such a
 * file is not the image it claims to be (two files glued, a damaged download), and a stdin
 * or URL source cannot be told from a complete one any other way. The exceptions are the
 * formats' own padding: zeros after a gzip member (zlib skips them, as gzip does) and xz's
 * stream padding.
 */

import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, createReadStream } from 'node:fs';
import { delimiter, join } from 'node:path';
import { PassThrough, type Readable } from 'node:stream';
import { createGunzip } from 'node:zlib';
import { BlksyncError } from '../errors.js';
import type { Compression } from './compression-magic.js';

export { detectCompression, MAGIC_BYTES, type Compression } from './compression-magic.js';

/** Bytes per chunk out of zlib. */
const GUNZIP_CHUNK_BYTES = 256 * 1024;
/** Decoder messages kept for the error. */
const MAX_STDERR_CHARS = 2000;

function onPath(name: string): boolean {
  for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(delimiter)) {
    try {
      accessSync(join(dir, name), constants.X_OK);
      return true;
    } catch {
      // not in this directory
    }
  }
  return false;
}

/** The decoder command for a format: program, arguments and the package that has it. */
function decoderFor(kind: Exclude<Compression, 'gzip'>): {
  cmd: string;
  args: string[];
  pkg: string;
} {
  switch (kind) {
    case 'xz':
      return { cmd: 'xz', args: ['-dc', '-T0'], pkg: 'xz-utils' };
    case 'zstd':
      return { cmd: 'zstd', args: ['-dcq'], pkg: 'zstd' };
    case 'bzip2':
      // lbzip2 decodes on every core; bzip2 on one
      return onPath('lbzip2')
        ? { cmd: 'lbzip2', args: ['-dc'], pkg: 'lbzip2' }
        : { cmd: 'bzip2', args: ['-dc'], pkg: 'bzip2' };
    case 'lz4':
      return { cmd: 'lz4', args: ['-dc'], pkg: 'lz4' };
  }
}

const TRUNCATED_RE = /unexpected end|premature end|ends unexpectedly|unfinished stream|truncated/i;
/** bzip2's warning (it exits 0) about bytes after its stream's end. */
const TRAILING_RE = /trailing garbage/i;

function trailingDataError(kind: Compression, name: string, cause?: unknown): BlksyncError {
  return new BlksyncError(
    'ESRC_CORRUPT',
    `${name}: there is data after the end of the ${kind} stream (trailing garbage); the image is damaged ` +
      'or two files were joined: get a good copy of the image',
    { path: name, cause },
  );
}

function decodeError(
  kind: Compression,
  name: string,
  detail: string,
  cause?: unknown,
): BlksyncError {
  const short = TRUNCATED_RE.test(detail);
  return new BlksyncError(
    short ? 'ESRC_SHORT' : 'ESRC_CORRUPT',
    short
      ? `${name}: the ${kind} data ends too soon (${detail}); the file is truncated: download or copy it again`
      : `${name}: the ${kind} data is damaged (${detail}); get a good copy of the image`,
    { path: name, cause },
  );
}

/** A running decoder: its output, and a way to stop it early. */
export interface Decoder {
  readonly kind: Compression;
  readonly output: Readable;
  /** Stops the decoder (when the copy needs no more of the image, or failed). */
  stop(): void;
}

/**
 * Starts decoding `input`: a file descriptor read from offset 0 (not closed here), or a
 * stream. `name` is used in errors.
 */
export function decompress(input: number | Readable, kind: Compression, name: string): Decoder {
  const out = new PassThrough({ highWaterMark: 1024 * 1024 });
  // the reader gets a failure when it reads (the stream keeps it); this listener only stops
  // a decoder that fails before the first read from crashing the process
  out.on('error', () => {});
  if (kind === 'gzip') {
    const src =
      typeof input === 'number'
        ? createReadStream('', {
            fd: input,
            start: 0,
            autoClose: false,
            highWaterMark: 1024 * 1024,
          })
        : input;
    const gunzip = createGunzip({ chunkSize: GUNZIP_CHUNK_BYTES });
    // a header error after output came is the header of a next member that is not one:
    // trailing data (the first member's header is checked before any output)
    let produced = false;
    gunzip.once('data', () => (produced = true));
    src.on('error', (err: Error) => out.destroy(err));
    gunzip.on('error', (err: NodeJS.ErrnoException) => {
      out.destroy(
        produced && err.code === 'Z_DATA_ERROR' && /header/i.test(err.message)
          ? trailingDataError(kind, name, err)
          : decodeError(
              kind,
              name,
              err.code === 'Z_BUF_ERROR' ? 'unexpected end of file' : err.message,
              err,
            ),
      );
    });
    src.pipe(gunzip).pipe(out);
    return {
      kind,
      output: out,
      stop: () => {
        src.unpipe(gunzip);
        if (typeof input !== 'number') src.destroy();
        gunzip.destroy();
      },
    };
  }

  const { cmd, args, pkg } = decoderFor(kind);
  let child: ChildProcess;
  try {
    child = spawn(cmd, args, {
      stdio: [typeof input === 'number' ? input : 'pipe', 'pipe', 'pipe'],
    });
  } catch (err) {
    throw new BlksyncError('ESRC_OPEN', `${name} is ${kind}-compressed but ${cmd} cannot start`, {
      path: name,
      cause: err,
    });
  }
  let stderr = '';
  let stopped = false;
  child.stderr!.setEncoding('utf8').on('data', (d: string) => {
    if (stderr.length < MAX_STDERR_CHARS) stderr += d;
  });
  if (typeof input !== 'number') {
    input.on('error', (err) => out.destroy(err));
    child.stdin!.on('error', () => {}); // EPIPE when the decoder quits first; its status tells
    input.pipe(child.stdin!);
  }
  child.stdout!.pipe(out, { end: false });
  let stdoutEnded = false;
  let exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  const settle = (): void => {
    if (!stdoutEnded || exit === undefined || out.destroyed) return;
    if (exit.code === 0 && TRAILING_RE.test(stderr) && !stopped) {
      out.destroy(trailingDataError(kind, name));
    } else if (exit.code === 0) out.end();
    else if (!stopped) {
      // the first line names the fault; bzip2 adds a screenful of advice after it
      const first = stderr.trim().split('\n')[0]!.replace(/\s+/g, ' ');
      const why = first || `${cmd} exited with ${exit.code ?? exit.signal}`;
      out.destroy(decodeError(kind, name, why));
    }
  };
  child.stdout!.on('end', () => {
    stdoutEnded = true;
    settle();
  });
  child.on('close', (code, signal) => {
    exit = { code, signal };
    stdoutEnded = true;
    settle();
  });
  child.on('error', (err: NodeJS.ErrnoException) => {
    out.destroy(
      err.code === 'ENOENT'
        ? new BlksyncError(
            'ESRC_OPEN',
            `${name} is ${kind}-compressed but ${cmd} is not installed (apt-get install ${pkg})`,
            { path: name, cause: err },
          )
        : new BlksyncError('ESRC_OPEN', `${name}: cannot run ${cmd}: ${err.message}`, {
            path: name,
            cause: err,
          }),
    );
  });
  return {
    kind,
    output: out,
    stop: () => {
      stopped = true;
      if (typeof input !== 'number') {
        input.unpipe(child.stdin!);
        input.destroy();
      }
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      out.destroy();
    },
  };
}

/** Decodes everything once to learn the image size (for a compressed file without a bmap). */
export async function decompressedSize(
  fd: number,
  kind: Compression,
  name: string,
): Promise<number> {
  const d = decompress(fd, kind, name);
  let n = 0;
  try {
    for await (const chunk of d.output) n += (chunk as Buffer).length;
  } finally {
    d.stop();
  }
  return n;
}
