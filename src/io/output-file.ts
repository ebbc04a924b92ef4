/**
 * The one rule for every file blksync writes as an output (an index, a patch, a bmap, an
 * index kept in the cache): what is at the path decides how it is written.
 *
 *   nothing there, a regular file  →  a temporary beside it, created with O_EXCL ('wx') under
 *                                     a random name, written, fsynced, renamed over the path,
 *                                     the directory fsynced: the path holds the old file or
 *                                     the new one, whole, and a link planted at a guessable
 *                                     name is never followed (O_EXCL refuses any existing name)
 *   character device, FIFO         →  written in place (opened without O_CREAT/O_TRUNC and
 *                                     without following a link): `-o /dev/null` stays
 *                                     /dev/null, a FIFO's reader gets the bytes (opening
 *                                     a FIFO waits for its reader, as a shell's `>` does)
 *   symbolic link                  →  refused (EOUTPUT_KIND): neither followed into wherever it
 *                                     points (a link planted at the output name would aim a
 *                                     root-run write at any file) nor silently replaced; except
 *                                     a link of root's or the user's own to a character device
 *                                     or FIFO (`-o /dev/stdout`), written in place (planFor)
 *   block device, directory,       →  refused (EOUTPUT_KIND): an index or patch written over a
 *   socket                            disk would destroy it; the node is never replaced
 *
 * The kind is checked when the output is opened and again just before the rename, so a node
 * that appears meanwhile is not replaced either. The directory is trusted as the user's: in
 * a directory another user may write without the sticky bit, that user can replace the
 * output after the rename, and nothing here can prevent it.
 */

import { randomBytes } from 'node:crypto';
import { constants, type Stats } from 'node:fs';
import { access, lstat, open, readlink, rename, rm, stat, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { Writable } from 'node:stream';
import { BlksyncError, fromSystemError, isSystemError, type ErrorCode } from '../errors.js';

export interface OutputOptions {
  /** What is written, for messages: "patch", "index", "bmap". */
  what: string;
  /** The code of a failed write (EWRITE, EINDEX_WRITE). */
  code: ErrorCode;
  /** Permission bits of a new file, before the umask (default 0o666, as other tools). */
  mode?: number;
}

/** Random bytes in a temporary's name: 2^64 names, so none can be planted in advance. */
const TEMP_RANDOM_BYTES = 8;
/** A temporary's name keeps this much of the output's, under NAME_MAX (255). */
const TEMP_NAME_KEEP = 200;

/** The temporary an output is written to, beside it: `.NAME.<16 hex>.blksync-partial`. */
export function temporaryName(path: string): string {
  const name = basename(path).slice(0, TEMP_NAME_KEEP);
  return join(
    dirname(path),
    `.${name}.${randomBytes(TEMP_RANDOM_BYTES).toString('hex')}.blksync-partial`,
  );
}

/**
 * How the node at an output path is written: through a temporary renamed over it, or in
 * place (`node`: what is written, `follow`: reached through a link).
 */
type Plan = { how: 'replace' } | { how: 'in-place'; node: Stats; follow: boolean };

function refuse(path: string, what: string, kind: string, todo: string): never {
  throw new BlksyncError('EOUTPUT_KIND', `the ${what} output ${path} is ${kind}; ${todo}`, {
    path,
  });
}

/** Decides by what is at the path (not following a link); refuses what must not be written. */
function planByKind(path: string, st: Stats | undefined, what: string): Plan {
  if (st === undefined || st.isFile()) return { how: 'replace' };
  if (st.isCharacterDevice() || st.isFIFO()) return { how: 'in-place', node: st, follow: false };
  if (st.isBlockDevice())
    return refuse(path, what, 'a block device', `write the ${what} to a file`);
  if (st.isDirectory())
    return refuse(path, what, 'a directory', `give a file name for the ${what}`);
  return refuse(path, what, 'a socket or other special file', `write the ${what} to a file`);
}

async function lstatOrNone(path: string): Promise<Stats | undefined> {
  try {
    return await lstat(path);
  } catch (err) {
    if (isSystemError(err) && err.code === 'ENOENT') return undefined;
    throw err;
  }
}

/**
 * The plan for `path`. A link is followed only to a character device or FIFO (`-o
 * /dev/stdout`, `-o >(gzip > f)`), and only when the link is root's or the user's own: a
 * link another user planted is refused whatever it points to (it could aim a root-run write
 * at /dev/port), and a link to a file is refused rather than replaced or written through.
 */
async function planFor(path: string, what: string): Promise<Plan> {
  const st = await lstatOrNone(path);
  if (st === undefined || !st.isSymbolicLink()) return planByKind(path, st, what);
  const uid = process.geteuid?.();
  if (st.uid !== 0 && st.uid !== uid) {
    return refuse(
      path,
      what,
      `a symbolic link owned by uid ${st.uid}, not by you or root`,
      'blksync does not follow a link another user could have planted: name the file it points to, or remove the link',
    );
  }
  const target = await stat(path).catch(() => undefined);
  if (target !== undefined && (target.isCharacterDevice() || target.isFIFO())) {
    return { how: 'in-place', node: target, follow: true };
  }
  const to = await readlink(path).catch(() => undefined);
  return refuse(
    path,
    what,
    `a symbolic link${to !== undefined ? ` (to ${to})` : ''}`,
    'blksync writes through a link only to a device or FIFO (as /dev/stdout), and does not replace one: name the file it points to, or remove the link',
  );
}

/**
 * Refuses now what OutputFile.open would refuse at the end (a link, a block device, a
 * directory, a directory that cannot take the temporary: missing, not writable), so a long
 * run (hashing a whole disk, writing DST) does not end in that refusal.
 */
export async function checkOutput(path: string, options: OutputOptions): Promise<void> {
  try {
    const plan = await planFor(path, options.what);
    if (plan.how === 'replace') await access(dirname(path), constants.W_OK);
  } catch (err) {
    throw fromSystemError(options.code, `cannot write the ${options.what}`, path, err);
  }
}

/**
 * An output being written. Bytes are appended in order (a FIFO or a device written in place
 * cannot seek); `commit()` makes them the output, `abort()` leaves the path as it was (a
 * device or FIFO written in place keeps what was already written to it).
 */
export class OutputFile {
  /** The output's path. */
  readonly path: string;
  /** Written at the path itself (a character device or FIFO), not through a temporary. */
  readonly inPlace: boolean;
  readonly #fh: FileHandle;
  readonly #temp: string | undefined;
  readonly #options: OutputOptions;
  #closed = false;

  private constructor(path: string, fh: FileHandle, temp: string | undefined, o: OutputOptions) {
    this.path = path;
    this.inPlace = temp === undefined;
    this.#fh = fh;
    this.#temp = temp;
    this.#options = o;
  }

  /** Opens `path` for writing by the rule above; refuses (EOUTPUT_KIND) what it must not write. */
  static async open(path: string, options: OutputOptions): Promise<OutputFile> {
    const fail = (err: unknown): BlksyncError =>
      fromSystemError(options.code, `cannot write the ${options.what}`, path, err);
    let plan: Plan;
    try {
      plan = await planFor(path, options.what);
    } catch (err) {
      throw fail(err);
    }
    if (plan.how === 'in-place') {
      let fh: FileHandle;
      try {
        // no O_CREAT: if the node went away meanwhile, nothing is created in its place
        fh = await open(path, constants.O_WRONLY | (plan.follow ? 0 : constants.O_NOFOLLOW));
      } catch (err) {
        throw fail(err);
      }
      try {
        const now = await fh.stat();
        if (now.ino !== plan.node.ino || now.dev !== plan.node.dev) {
          throw new BlksyncError(
            'EOUTPUT_KIND',
            `the ${options.what} output ${path} was replaced while it was being opened; rerun the command`,
            { path },
          );
        }
      } catch (err) {
        await fh.close().catch(() => {});
        throw err instanceof BlksyncError ? err : fail(err);
      }
      return new OutputFile(path, fh, undefined, options);
    }
    // 'wx' is O_CREAT|O_EXCL: an existing name (a planted link above all) is an error, not
    // followed; a fresh random name makes a collision all but impossible, retried anyway
    for (let attempt = 0; ; attempt++) {
      const temp = temporaryName(path);
      try {
        const fh = await open(temp, 'wx', options.mode ?? 0o666);
        return new OutputFile(path, fh, temp, options);
      } catch (err) {
        if (isSystemError(err) && err.code === 'EEXIST' && attempt < 2) continue;
        if (isSystemError(err) && (err.code === 'EACCES' || err.code === 'EPERM')) {
          // the file itself may be writable: say that it is the directory that is not
          throw new BlksyncError(
            options.code,
            `cannot write the ${options.what} ${path}: its directory ${dirname(path)} does not let a file be created there, ` +
              `and blksync writes through a temporary file beside it (${err.code}); choose another directory`,
            { cause: err, path },
          );
        }
        throw fail(err);
      }
    }
  }

  /** Appends `data`. */
  async write(data: Uint8Array): Promise<void> {
    try {
      for (let done = 0; done < data.length;) {
        const { bytesWritten } = await this.#fh.write(data, done, data.length - done);
        done += bytesWritten;
      }
    } catch (err) {
      throw this.#failed(err);
    }
  }

  /**
   * Writes `data` at `position`, over what was appended there: only for an output written
   * through a temporary (a FIFO or a device written in place cannot seek). For formats whose
   * header is known only at the end (an Android sparse image's chunk count).
   */
  async writeAt(data: Uint8Array, position: number): Promise<void> {
    if (this.inPlace) throw new Error('OutputFile.writeAt: the output is written in place');
    try {
      for (let done = 0; done < data.length;) {
        const { bytesWritten } = await this.#fh.write(
          data,
          done,
          data.length - done,
          position + done,
        );
        done += bytesWritten;
      }
    } catch (err) {
      throw this.#failed(err);
    }
  }

  /**
   * A stream over the output, for writers that take one; ending it leaves the output open
   * for commit() (and destroying it does not remove the temporary: abort() does).
   */
  stream(): Writable {
    // not fh.createWriteStream(): a stream that does not close the handle keeps a reference
    // on it, and then fh.close() in commit() never returns
    return new Writable({
      write: (chunk: Buffer, _encoding, done) => {
        this.write(chunk).then(() => done(), done);
      },
      // what queued up while a write was in flight goes as one (as fs.WriteStream does)
      writev: (chunks, done) => {
        this.write(Buffer.concat(chunks.map((c) => c.chunk as Buffer))).then(() => done(), done);
      },
    });
  }

  /** Makes what was written the output: fsync, close, rename into place, fsync the directory. */
  async commit(): Promise<void> {
    try {
      if (this.#temp === undefined) {
        await this.#close();
        return;
      }
      await this.#fh.sync();
      await this.#close();
      // a node that appeared since open() (a device, a link) is not replaced either
      const now = await lstatOrNone(this.path);
      if (now !== undefined && !now.isFile()) {
        throw new BlksyncError(
          'EOUTPUT_KIND',
          `the ${this.#options.what} output ${this.path} became something other than a file while it was being written; nothing was written there`,
          { path: this.path },
        );
      }
      await rename(this.#temp, this.path);
      const dir = await open(dirname(this.path), 'r');
      try {
        await dir.sync();
      } finally {
        await dir.close();
      }
    } catch (err) {
      await this.abort();
      throw this.#failed(err);
    }
  }

  /** Gives up: closes, and removes the temporary (the output is left as it was). */
  async abort(): Promise<void> {
    await this.#close().catch(() => {});
    if (this.#temp !== undefined) await rm(this.#temp, { force: true }).catch(() => {});
  }

  async #close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#fh.close();
  }

  #failed(err: unknown): BlksyncError {
    return fromSystemError(
      this.#options.code,
      `cannot write the ${this.#options.what}`,
      this.path,
      err,
    );
  }
}

/** Writes `data` (or its parts, in order) as the output `path`, by the rule above. */
export async function writeOutputFile(
  path: string,
  data: string | Uint8Array | Iterable<Uint8Array>,
  options: OutputOptions,
): Promise<void> {
  const out = await OutputFile.open(path, options);
  try {
    if (typeof data === 'string') await out.write(Buffer.from(data));
    else if (data instanceof Uint8Array) await out.write(data);
    else for (const part of data) await out.write(part);
  } catch (err) {
    await out.abort();
    throw err;
  }
  await out.commit();
}
