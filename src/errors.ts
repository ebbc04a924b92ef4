/**
 * One error class for the whole library. Every failure a user can meet has a stable `code`
 * that callers switch on and the CLI maps to an exit status; the message says what to do.
 */

/** Stable error codes. New codes are added, never renamed. */
export type ErrorCode =
  | 'EUSAGE'
  | 'ESRC_OPEN'
  | 'ESRC_KIND'
  | 'ESRC_SHORT'
  | 'EDEST_OPEN'
  | 'EDEST_KIND'
  | 'EDEST_MISSING'
  | 'EDEST_TOO_SMALL'
  /** DST is a read-only block device (write-protect switch, `losetup -r`, `blockdev --setro`). */
  | 'EDEST_READONLY'
  | 'EDEST_MOUNTED'
  | 'EDEST_BUSY'
  | 'EDEST_SHORT'
  /** DST was written by another program while a copy read what it holds (published update's seeds). */
  | 'EDEST_CHANGED'
  | 'ESAME_FILE'
  | 'EREAD'
  | 'EWRITE'
  | 'EINTERRUPTED'
  | 'EINDEX_FORMAT'
  | 'EINDEX_MISMATCH'
  | 'EINDEX_STALE'
  | 'EINDEX_OPEN'
  | 'EINDEX_WRITE'
  | 'EINFO_UNKNOWN'
  | 'EBMAP_OPEN'
  | 'EBMAP_FORMAT'
  | 'EBMAP_CHECKSUM'
  | 'EBMAP_MISMATCH'
  | 'ESRC_CORRUPT'
  | 'ESRC_HTTP'
  /**
   * SRC was written while it was read: `blksync index` would record old content, a copy would
   * leave DST a mix of old and new.
   */
  | 'ESRC_CHANGED'
  /** A remote SRC is compressed: blksync decodes only on the machine it runs on. */
  | 'ESRC_COMPRESSED'
  /** apply: TARGET holds neither the old nor the new content where a patch record goes. */
  | 'EBASE_MISMATCH'
  /** A patch file is malformed: bad magic, version, field, bound or record order. */
  | 'EPATCH_FORMAT'
  /** A patch file ends before its trailer. */
  | 'EPATCH_TRUNCATED'
  /** A patch's SHA-256 checksum, a header/record CRC or a payload hash does not match. */
  | 'EPATCH_CHECKSUM'
  /** apply --reverse on a patch made without --reversible. */
  | 'EPATCH_NOT_REVERSIBLE'
  /** A patch uses a compression this installation cannot read or write (zstd without zstd-napi). */
  | 'EPATCH_UNSUPPORTED'
  /** ssh could not connect or log in (its exit status 255), or could not be started. */
  | 'ESSH'
  /** The remote has no node at the path tried (`--remote-node PATH` names another). */
  | 'ENODE_MISSING'
  /** The remote node is older than the agent needs (18). */
  | 'ENODE_TOO_OLD'
  /** The ssh link dropped during a run; rerunning converges. */
  | 'ECONNECTION_LOST'
  /** A frame broke the remote protocol, or the two ends speak different versions. */
  | 'EREMOTE_PROTOCOL'
  /** The remote agent failed in a way that has no code of its own. */
  | 'EREMOTE'
  /** copy --direct: SRC's host could not reach DST's host over ssh (drop --direct to relay). */
  | 'EREMOTE_UNREACHABLE'
  /** The data written (remotely, or read back by copy --verify) does not match what was sent. */
  | 'EVERIFY'
  /** A bmap's OpenPGP signature is bad, expired, revoked, malformed or by another key than --fingerprint. */
  | 'ESIG_INVALID'
  /** A bmap is signed but neither gpg nor gpgv is installed to check it. */
  | 'ESIG_UNAVAILABLE'
  /** A bmap's signature was made by a key that is not in the keyring used. */
  | 'ESIG_UNKNOWN_KEY'
  /** --fingerprint or --keyring was given but the bmap has no signature. */
  | 'ESIG_MISSING'
  /** A peer (web server, ssh agent) sent nothing for `timeout` seconds while an answer was due. */
  | 'ETIMEOUT'
  /** An https URL redirected to plain http (an https → http downgrade): refused. */
  | 'ESRC_DOWNGRADE'
  /** A redirect that cannot be followed: to a scheme other than http(s), or a malformed Location. */
  | 'ESRC_REDIRECT'
  /** An output path (-o, an index) is a symbolic link, block device, directory or socket: not written. */
  | 'EOUTPUT_KIND'
  /** The cache directory (--index auto) is another user's, or others may write in it. */
  | 'ECACHE_UNSAFE'
  /** The cache directory (--index auto) cannot be created or used (permissions, not a directory). */
  | 'ECACHE_DIR'
  /**
   * SRC is a container (archive, virtual disk) that is not decoded: a format blksync does not
   * read, or one it decodes with a tool that is not installed. Nothing is written (--raw
   * writes SRC as it is).
   */
  | 'ESRC_CONTAINER'
  /** An archive SRC holds several files and none or several could be the image (--entry NAME). */
  | 'ESRC_ENTRY'
  /** A published index (IMG.blkpub) or its data is malformed: truncated, absurd sizes, offsets past the end. */
  | 'EPUB_FORMAT'
  /** A published chunk or hash level does not match its hash: damaged, tampered with, or changed while read. */
  | 'EPUB_CHECKSUM'
  /** The published files changed on the server between two requests of one copy (ETag/Last-Modified). */
  | 'EPUB_CHANGED'
  /** A web server's answer to a range request is not what was asked (wrong Content-Range, 416, bad multipart). */
  | 'ESRC_RANGE'
  /** The CLI's command stopped before it finished without an error (a bug): not reported as done. */
  | 'EINTERNAL';

/**
 * Stable codes of warnings: problems the library worked around, or that do not stop the run
 * but should be known, reported through `onWarning`.
 */
export type WarningCode =
  /** A file probed beside a URL (a bmap, a signature) was not one: a web server's "not found" page. */
  | 'WPROBE_NOT_FOUND'
  /** The files `blksync publish` wrote beside an image URL are older than the image: it is streamed. */
  | 'WPUB_STALE'
  /**
   * The image beside published files is compressed or a container (zip, qcow2, ...), published
   * as it is: it is read and decoded as without them (--raw writes it as it is, by ranges).
   */
  | 'WPUB_CONTAINER'
  /** SRC is a block device mounted read-write: what is read may change while it is read. */
  | 'WSRC_MOUNTED_RW'
  /** A streamed SRC that qemu-img decodes (qcow2, VMDK, ...) is spooled to a temporary file first. */
  | 'WSPOOLED'
  /** A remote SRC that only this machine decodes (a container, compressed) is streamed whole through ssh. */
  | 'WSRC_STREAMED'
  /** A virtual disk SRC is an overlay: its backing file (named inside SRC) is read too. */
  | 'WSRC_BACKING'
  /** An archive SRC holds its image's name more than once: the last one is decoded, as extracting gives. */
  | 'WSRC_DUPLICATE_ENTRY'
  /**
   * DST was written by something other than this copy while it ran (a device's write counter
   * moved more than its own writes account for, a file's ctime moved between them): the index
   * written then vouches for no block, and the next copy compares all of DST.
   */
  | 'WDST_WRITTEN_MEANWHILE';

/** A recoverable problem, reported to the caller (the CLI prints it) and not thrown. */
export interface BlksyncWarning {
  code: WarningCode;
  message: string;
  path?: string;
}

/** What an `onWarning` option takes. */
export type WarningListener = (warning: BlksyncWarning) => void;

export interface BlksyncErrorOptions {
  cause?: unknown;
  path?: string;
  syscall?: string;
  /** Partial result of an operation that was interrupted or failed half-way. */
  partial?: unknown;
}

export class BlksyncError extends Error {
  readonly code: ErrorCode;
  readonly path: string | undefined;
  readonly syscall: string | undefined;
  readonly partial: unknown;

  constructor(code: ErrorCode, message: string, options: BlksyncErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'BlksyncError';
    this.code = code;
    this.path = options.path;
    this.syscall = options.syscall;
    this.partial = options.partial;
  }
}

/** A Node system error (ENOENT, EACCES, ...) as thrown by node:fs. */
export interface SystemError extends Error {
  code: string;
  syscall?: string;
  path?: string;
}

export function isSystemError(err: unknown): err is SystemError {
  return err instanceof Error && typeof (err as Partial<SystemError>).code === 'string';
}

/** Whether this process runs as root: then "run as root" is no advice. */
const AS_ROOT = process.getuid?.() === 0;

const ERRNO_TEXT: Record<string, string> = {
  ENOENT: 'no such file or directory',
  EACCES: AS_ROOT
    ? 'permission denied, even to root (a network file system or a security module such as SELinux refused it)'
    : 'permission denied (run as root or fix the permissions)',
  EPERM: AS_ROOT
    ? 'operation not permitted, even to root (an immutable or append-only file? lsattr shows it, chattr -i / -a clears it)'
    : 'operation not permitted (run as root)',
  EISDIR: 'is a directory',
  EBUSY: 'device or resource busy',
  EROFS: 'read-only file system',
  ENOSPC: 'no space left on device',
  EIO: 'input/output error (the medium may be failing)',
  ENXIO: 'no such device',
};

/** Wraps a system error from node:fs into a BlksyncError with a readable message. */
export function fromSystemError(
  code: ErrorCode,
  what: string,
  path: string,
  err: unknown,
): BlksyncError {
  if (err instanceof BlksyncError) return err;
  if (isSystemError(err)) {
    const text = ERRNO_TEXT[err.code] ?? err.message;
    return new BlksyncError(code, `${what} ${path}: ${text} (${err.code})`, {
      cause: err,
      path,
      syscall: err.syscall,
    });
  }
  return new BlksyncError(code, `${what} ${path}: ${String(err)}`, { cause: err, path });
}
