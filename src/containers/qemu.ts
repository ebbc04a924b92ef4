/**
 * Virtual disk formats (qcow2, VHD dynamic, VMDK, VDI, VHDX, QED) decoded by qemu-img, the
 * reference implementation, rather than natively: each format has its corner cases (qcow2's
 * compressed, zero and external-data clusters and backing chains; VMDK's descriptor and
 * extents; VHD's differencing disks) that qemu-img already gets right, and these images come
 * from virtualisation workflows where qemu-utils is at hand.
 *
 * qemu-img cannot write raw to a pipe (it resizes its output), so the image is converted to
 * a sparse temporary file in the system's temporary directory ($TMPDIR, else /tmp): it takes
 * the image's allocated bytes there, and is removed when the copy ends. The format is given
 * with -f, never probed. A streamed SRC (stdin, a URL) is spooled to a temporary file first;
 * there a backing file is refused: its name would be resolved on this machine.
 */

import { spawn } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { BlksyncError } from '../errors.js';
import { FileSource } from '../io/file-source.js';
import type { Source } from '../types.js';

/** Characters of qemu-img's messages kept for an error. */
const MAX_STDERR_CHARS = 2000;

function run(
  args: string[],
  name: string,
  what: string,
  ok: readonly number[] = [0],
): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('qemu-img', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      if (err.length < MAX_STDERR_CHARS) err += d;
    });
    child.on('error', (e: NodeJS.ErrnoException) => {
      reject(
        e.code === 'ENOENT'
          ? new BlksyncError(
              'ESRC_CONTAINER',
              `${name} is a ${what} image, which blksync decodes with qemu-img; install it (apt-get install qemu-utils), or --raw to write the file as it is`,
              { path: name, cause: e },
            )
          : new BlksyncError('ESRC_OPEN', `${name}: cannot run qemu-img: ${e.message}`, {
              path: name,
              cause: e,
            }),
      );
    });
    child.on('close', (code) => {
      if (code !== null && ok.includes(code)) resolve(out);
      else {
        const why =
          (err.trim() || out.trim()).replace(/\s+/g, ' ').slice(0, MAX_STDERR_CHARS) ||
          `qemu-img exited with ${code}`;
        reject(
          new BlksyncError(
            'ESRC_CORRUPT',
            `${name}: qemu-img cannot read this ${what} image (${why}); get a good copy of it`,
            { path: name },
          ),
        );
      }
    });
  });
}

export interface QemuDecoded {
  size: number;
  source: Source;
  /** The backing file qemu-img read through, if any (as the image names it). */
  backing: string | undefined;
  /** The temporary directory holding the converted image (and a spooled SRC). */
  temporary: string;
  close(): Promise<void>;
}

/**
 * Converts `path` (a `format` image, qemu-img's name) to raw in a temporary file; `stream`:
 * SRC is a stream, spooled first (and refused when it names a backing file).
 */
export async function qemuDecode(
  input: { path: string } | { stream: AsyncIterable<Buffer> },
  format: string,
  what: string,
  name: string,
): Promise<QemuDecoded> {
  const dir = await mkdtemp(join(tmpdir(), 'blksync-'));
  const remove = (): Promise<void> => rm(dir, { recursive: true, force: true });
  try {
    let path: string;
    if ('stream' in input) {
      path = join(dir, 'spooled');
      await pipeline(input.stream, createWriteStream(path, { flags: 'wx' }));
    } else {
      path = input.path;
    }
    const info = JSON.parse(
      await run(['info', '--output=json', '-f', format, path], name, what),
    ) as {
      'virtual-size'?: unknown;
      'backing-filename'?: unknown;
    };
    const size = info['virtual-size'];
    if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) {
      throw new BlksyncError(
        'ESRC_CORRUPT',
        `${name}: qemu-img gives no size for this ${what} image`,
        {
          path: name,
        },
      );
    }
    const backing =
      typeof info['backing-filename'] === 'string' ? info['backing-filename'] : undefined;
    if (backing !== undefined && 'stream' in input) {
      throw new BlksyncError(
        'ESRC_CONTAINER',
        `${name} is a ${what} overlay of ${backing}, which cannot be resolved from a stream; copy from the overlay's file beside its backing file`,
        { path: name },
      );
    }
    // convert reads through damaged tables (an L1 table past the end reads as zeros) and
    // exits 0: check first. Its statuses: 0 clean, 3 only leaked clusters (harmless), 63 the
    // format has no check; 2 corrupted, 1 the check could not finish
    await run(['check', '-q', '-f', format, path], name, what, [0, 3, 63]);
    const raw = join(dir, 'image.raw');
    await run(['convert', '-q', '-f', format, '-O', 'raw', path, raw], name, what);
    if ('stream' in input) await rm(path, { force: true });
    const fh = await open(raw, 'r');
    const source = new FileSource(fh, name, size);
    return {
      size,
      source,
      backing,
      temporary: dir,
      close: async () => {
        await source.close();
        await remove();
      },
    };
  } catch (err) {
    await remove();
    throw err;
  }
}
