/**
 * The types of a copy's source (engine/copy-source.ts opens it): how SRC is read, and what
 * the copy learns of it. Apart, so that the file that opens SRC holds only how.
 */

import type { FileHandle } from 'node:fs/promises';
import type { Stats } from 'node:fs';
import type { Readable } from 'node:stream';
import type { ContainerReport } from '../containers/open.js';
import type { DeltaReport } from '../delta/published-source.js';
import type { Compression } from '../io/decompress.js';
import type { Opened } from '../io/open.js';
import type { SignatureReport } from '../io/signature.js';
import type { Plan, ProgressListener, Sink, Source } from '../types.js';
import type { VerifiedRange } from './bmap-verify.js';
import type { BmapOptions } from './find-bmap.js';

/** How SRC is read: its bmap (found as find-bmap.ts finds it), checksums and size. */
export interface CopySourceOptions extends BmapOptions {
  /** Skip the bmap's range checksums (they are verified by default). */
  noVerifyChecksums?: boolean | undefined;
  /**
   * The image size when a stream's cannot be known before reading it all (compressed stdin
   * or URL without a bmap); the stream must then end exactly there.
   */
  size?: number | undefined;
  /** Write SRC as it is even when it is a container (zip, tar, qcow2, ...). */
  raw?: boolean | undefined;
  /** The file of an archive SRC (zip, tar) that holds the image. */
  entry?: string | undefined;
  /**
   * The local DST of a copy, set by the router when DST's content may steer how SRC is read
   * (not with --full or --index): an http(s) SRC published with `blksync publish` is fetched
   * by ranges, only the chunks DST lacks (delta/); a qcow2 overlay whose backing file is DST
   * itself is copied by its own clusters only, as `qemu-img commit` would (containers/).
   */
  destination?: string | undefined;
  /**
   * Leave an Android sparse image's don't-care chunks out of the plan, as a bmap's unmapped
   * ranges (a copy without --full or --index); otherwise they read as zeros.
   */
  skipDontCare?: boolean | undefined;
  /**
   * SRC's bytes come from this stream, read as stdin is (a remote SRC that only this machine
   * decodes, streamed through ssh: remote/copy/streamed-source.ts); SRC names it.
   */
  stream?: Readable | undefined;
  /** Told while DST is hashed before a published image's chunks are fetched. */
  onProgress?: ProgressListener | undefined;
}

/** What a copy learned about its bmap. */
export interface BmapReport {
  path: string;
  version: string;
  blockSize: number;
  ranges: number;
  mappedBytes: number;
  /** Ranges whose checksum matched while copying (so far, in an interrupted copy's result). */
  rangesVerified: number;
  /**
   * Bytes of a file SRC's unmapped areas (where its file system reports data) read and found
   * to be zeros before the copy: a stale bmap cannot make the copy skip data.
   */
  unmappedBytesChecked?: number;
  /** The bmap's OpenPGP signature, when it had one and it was checked. */
  signature?: SignatureReport;
  /**
   * For an existing file destination: whether the unmapped areas were made holes (reading
   * as zeros, like the image's), false when its file system cannot punch holes.
   */
  unmappedPunched?: boolean;
}

/** How a DST's unmapped areas were made zeros: holes punched, or else zeros written. */
export interface UnmappedCleared {
  /** Holes were punched (false: the file system cannot, and zeros were written instead). */
  punched: boolean;
  /** Bytes of zeros written where holes could not be punched (0 when punched). */
  bytesZeroed: number;
}

export interface CopySource {
  /** SRC as given. */
  path: string;
  kind: 'file' | 'block-device' | 'stdin' | 'url' | 'stream';
  compression: Compression | undefined;
  /** The container SRC was decoded from (zip, tar, Android sparse, qcow2, ...). */
  container: ContainerReport | undefined;
  /** The (decompressed) image size in bytes. */
  size: number;
  source: Source;
  plan: Plan;
  bmap: BmapReport | undefined;
  /**
   * The bmap's range checksums, when every range has one and each is verified while
   * copying: what `--verify` compares DST with. Undefined otherwise.
   */
  checksums: { units: VerifiedRange[]; algorithm: string } | undefined;
  /** SRC when it is a file or device read by offset as it is (not decoded, not stdin). */
  file: Opened | undefined;
  /**
   * The local file or device SRC names, as opened, also when it is decoded (undefined for
   * stdin and URLs): what names a compressed image, for an index's identity.
   */
  opened: Opened | undefined;
  /**
   * The local file or device SRC's bytes come from (also stdin redirected from a file), watched
   * for another program's writes during the copy (io/source-watch.ts); undefined for a stream.
   */
  watched: FileHandle | undefined;
  /** True when DST (with these stats) is SRC itself. */
  sameAs(stats: Stats): boolean;
  /**
   * For an existing regular-file DST: a sink that, when finished, also punches holes in the
   * areas the bmap leaves unmapped, so DST ends up equal to the image there too. Without a
   * bmap it returns `sink` itself.
   */
  wrapFileSink(sink: Sink, fh: FileHandle, path: string): Sink;
  /**
   * For an existing regular-file DST: the bytes of data (not holes) it holds in the areas the
   * bmap leaves unmapped, which the copy punches to holes (wrapFileSink). Undefined without a
   * bmap, or when the file system does not tell its holes.
   */
  unmappedData(fh: FileHandle, path: string): number | undefined;
  /**
   * For an existing regular-file DST whose copy finished (wrapFileSink): how its unmapped
   * areas were made zeros. Undefined before, or without a bmap.
   */
  unmappedCleared(fh: FileHandle): UnmappedCleared | undefined;
  /**
   * With bmap checksums read from a file: called before the pipeline starts (also in a dry
   * run), it lets SRC be read once, compared and hashed together; every sink fed from
   * `source` must then be wrapped in what it returns, which holds the writes into a range
   * until its checksum passed (engine/held-writes.ts). Undefined otherwise.
   */
  holdWrites?: (() => (sink: Sink) => Sink) | undefined;
  /**
   * Called with DST's stats once it is opened (undefined: missing), before anything is read
   * or written: a published SRC's plan was made from DST's hashes and throws EDEST_CHANGED
   * when DST is no longer the file hashed.
   */
  checkTarget?:
    | ((
        stats: { dev: number; ino: number; ctimeMs: number; rdev: number } | undefined,
      ) => Promise<void>)
    | undefined;
  /** Called with DST's descriptor before DST is read: a bmap plan turns readahead off. */
  adviseTarget(fd: number): void;
  /** For a published SRC fetched by ranges: requests and bytes fetched (`http` in the result). */
  delta?: () => DeltaReport;
  close(): Promise<void>;
}
