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
import { mkdtemp, open, rm, stat, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { BlksyncError, isSystemError } from '../errors.js';
import { FileSource } from '../io/file-source.js';
import { readFully } from '../io/read-fully.js';
import type { Range } from '../ranges.js';
import type { Source } from '../types.js';

/** Characters of qemu-img's messages kept for an error. */
const MAX_STDERR_CHARS = 2000;

function run(
  args: string[],
  name: string,
  what: string,
  ok: readonly number[] = [0],
  failure?: (why: string) => BlksyncError | undefined,
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
          failure?.(why) ??
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
  /** Other files read for the image's data: a qcow2's external data file, a VMDK's extents. */
  others: string[];
  /** The temporary directory holding the converted image (and a spooled SRC); none for an overlay of DST. */
  temporary: string | undefined;
  /**
   * An overlay whose backing file is DST itself: only these ranges (the overlay's own
   * clusters) are the copy's business, the rest is DST's already.
   */
  only: Range[] | undefined;
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
  destination?: string,
  onSpool?: (path: string) => void,
): Promise<QemuDecoded> {
  const dir = await mkdtemp(join(tmpdir(), 'blksync-'));
  const remove = (): Promise<void> => rm(dir, { recursive: true, force: true });
  try {
    let path: string;
    if ('stream' in input) {
      path = join(dir, 'spooled');
      onSpool?.(path);
      const spool = createWriteStream(path, { flags: 'wx' });
      try {
        await pipeline(input.stream, spool);
      } catch (err) {
        if (spool.errored === err && isSystemError(err)) throw tempFull(name, dir, err.message);
        throw err;
      }
    } else {
      path = input.path;
    }
    const info = JSON.parse(
      await run(['info', '--output=json', '-f', format, path], name, what),
    ) as {
      'virtual-size'?: unknown;
      'backing-filename'?: unknown;
      'backing-filename-format'?: unknown;
      'format-specific'?: { data?: { 'data-file'?: unknown; extents?: unknown } };
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
    const others = otherFiles(info['format-specific']?.data, path);
    if (others.length > 0 && 'stream' in input) {
      throw new BlksyncError(
        'ESRC_CONTAINER',
        `${name} is a ${what} image whose data is in ${others.join(', ')}, which cannot be resolved from a stream; copy from the image's file beside its data`,
        { path: name },
      );
    }
    // convert reads through damaged tables (an L1 table past the end reads as zeros) and
    // exits 0: check first. Its statuses: 0 clean, 3 only leaked clusters (harmless), 63 the
    // format has no check; 2 corrupted, 1 the check could not finish
    await run(['check', '-q', '-f', format, path], name, what, [0, 3, 63]);
    // check does not look for data past the file's end in every format (VDI; qcow has no
    // check): a truncated image would convert with zeros there and exit 0
    if (others.length === 0) await checkDataInFile(path, format, what, name);
    if (
      backing !== undefined &&
      others.length === 0 && // the overlay's clusters would be in another file
      destination !== undefined &&
      !('stream' in input) &&
      info['backing-filename-format'] === 'raw' &&
      (await sameFile(isAbsolute(backing) ? backing : resolve(dirname(path), backing), destination))
    ) {
      const overlay = await overlayOfDestination(path, format, what, name, size);
      if (overlay !== undefined) {
        await remove();
        return { size, backing, others, temporary: undefined, ...overlay };
      }
    }
    const raw = join(dir, 'image.raw');
    // its output failing is not the image's fault: the temporary directory is full, or cannot
    // hold a file of the image's size
    await run(['convert', '-q', '-f', format, '-O', 'raw', path, raw], name, what, [0], (why) =>
      why.includes(raw) || /error while writing/.test(why)
        ? tempFull(name, dir, `${why.replace(/^.*: /, '')}, writing ${size} bytes`)
        : undefined,
    );
    if ('stream' in input) await rm(path, { force: true });
    const fh = await open(raw, 'r');
    const source = new FileSource(fh, name, size);
    return {
      size,
      source,
      backing,
      others,
      temporary: dir,
      only: undefined,
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

/**
 * The files other than `path` that qemu-img reads the image's data from, as `qemu-img info`
 * names them (relative to this process's directory): a qcow2's external data file, a VMDK
 * descriptor's extents. Like a backing file, the image decides which files these are.
 */
function otherFiles(
  data: { 'data-file'?: unknown; extents?: unknown } | undefined,
  path: string,
): string[] {
  const named: unknown[] = [data?.['data-file']];
  if (Array.isArray(data?.extents)) {
    for (const e of data.extents as unknown[]) named.push((e as { filename?: unknown }).filename);
  }
  return named.filter((f): f is string => typeof f === 'string' && resolve(f) !== resolve(path));
}

/**
 * Refuses an image whose own data clusters (`qemu-img map`, depth 0) lie past its file's end:
 * the file was cut short. (Its extents or data file, when it names others, are not its own.)
 */
async function checkDataInFile(
  path: string,
  format: string,
  what: string,
  name: string,
): Promise<void> {
  const map = JSON.parse(
    await run(['map', '--output=json', '-f', format, path], name, what),
  ) as MapEntry[];
  const { size: fileSize } = await stat(path);
  const past = map.find(
    (e) =>
      e.depth === 0 && e.data && typeof e.offset === 'number' && e.offset + e.length > fileSize,
  );
  if (past === undefined) return;
  throw new BlksyncError(
    'ESRC_SHORT',
    `${name}: the ${what} image's data for bytes ${past.start}-${past.start + past.length} is past the end of the file (${fileSize} bytes); the file is truncated: download or copy it again`,
    { path: name },
  );
}

/** The temporary directory could not take the spooled SRC or the converted image. */
function tempFull(name: string, dir: string, why: string): BlksyncError {
  return new BlksyncError(
    'EWRITE',
    `${name}: cannot write to the temporary directory ${dirname(dir)} (${why}); free space there, or set TMPDIR to a directory with room for the image`,
    { path: dirname(dir) },
  );
}

/** True when both paths name the same file, or the same block device. */
async function sameFile(a: string, b: string): Promise<boolean> {
  try {
    const [x, y] = await Promise.all([stat(a), stat(b)]);
    if (x.isBlockDevice() && y.isBlockDevice()) return x.rdev === y.rdev;
    return x.dev === y.dev && x.ino === y.ino;
  } catch {
    return false; // DST may not exist yet
  }
}

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/**
 * The seed's `qemu-img commit`, done better: an overlay made on DST itself
 * (`qemu-img create -f qcow2 -b /dev/sdX -F raw overlay.qcow2`). The image is DST but for
 * the overlay's own clusters (`qemu-img map`, depth 0), so only those are planned, read from
 * the overlay file where qemu-img says they are (zero clusters as zeros) and compared with
 * DST; DST is read only there, never through qemu-img. Undefined when a cluster of the
 * overlay's has no plain offset (compressed): then the whole image is converted.
 */
async function overlayOfDestination(
  path: string,
  format: string,
  what: string,
  name: string,
  size: number,
): Promise<{ source: Source; only: Range[]; close(): Promise<void> } | undefined> {
  const map = JSON.parse(
    await run(['map', '--output=json', '-f', format, path], name, what),
  ) as MapEntry[];
  const own = map.filter((e) => e.depth === 0 && (e.data || e.zero));
  if (own.some((e) => !e.zero && typeof e.offset !== 'number')) return undefined;
  const fh = await open(path, 'r');
  const { size: fileSize } = await fh.stat();
  for (const e of own) {
    const bad =
      e.start < 0 ||
      e.start + e.length > size ||
      (!e.zero && (e.offset! < 0 || e.offset! + e.length > fileSize));
    if (bad) {
      await fh.close();
      throw new BlksyncError(
        'ESRC_CORRUPT',
        `${name}: a cluster of the ${what} overlay lies outside it`,
        {
          path: name,
        },
      );
    }
  }
  const only: Range[] = [];
  for (const e of own) {
    const last = only[only.length - 1];
    if (last !== undefined && last.end === e.start) last.end = e.start + e.length;
    else only.push({ start: e.start, end: e.start + e.length });
  }
  const source = new OverlaySource(fh, own, size, name);
  return { source, only, close: () => fh.close() };
}

/** The overlay's own clusters, read by offset from its file; nothing else is ever asked for. */
class OverlaySource implements Source {
  readonly size: number;
  readonly #fh: FileHandle;
  readonly #own: MapEntry[];
  readonly #name: string;

  constructor(fh: FileHandle, own: MapEntry[], size: number, name: string) {
    this.#fh = fh;
    this.#own = own;
    this.size = size;
    this.#name = name;
  }

  async read(buf: Buffer, offset: number, length: number): Promise<number> {
    const end = Math.min(offset + length, this.size);
    buf.fill(0, 0, end - offset);
    for (const e of this.#own) {
      const from = Math.max(offset, e.start);
      const to = Math.min(end, e.start + e.length);
      if (from >= to || e.zero) continue;
      const got = await readFully(
        this.#fh,
        buf,
        from - offset,
        to - from,
        e.offset! + from - e.start,
      );
      if (got !== to - from) {
        throw new BlksyncError(
          'ESRC_SHORT',
          `${this.#name}: the overlay file shrank while copying`,
          {
            path: this.#name,
          },
        );
      }
    }
    return Math.max(0, end - offset);
  }

  async close(): Promise<void> {}
}
