/**
 * A container SRC (see detect.ts) turned into the pipeline's Source of the image it holds:
 *
 *   read by offset (a file)              streamed (stdin, a URL, a decompressor's output)
 *   simg   chunk map, don't-care left    simg   decoded in order, don't-care as zeros
 *          out of the plan
 *   tar    headers walked, entry read    tar    walked to the entry, its bytes streamed,
 *          by offset                            the rest walked before its last piece
 *   zip    central directory; stored:    zip    local headers walked to the entry,
 *          by offset, deflate: inflated;          inflated or passed through; the rest
 *          CRC-32 checked at the end              read to the central directory, checked
 *   vhd    fixed: the data before its    -      (its footer is at the end: a raw stream
 *          footer                                 ending with one is refused there)
 *   qcow2, vhd, vmdk, vdi, vhdx, qed      spooled to a temporary file, then as a file
 *          qemu-img convert (qemu.ts)
 *
 * Entries of archives: chosen by entries.ts from all of a file's (of a name given twice, the
 * last); from a stream, the one named with --entry, else the first file named like an image
 * (its size known from its header before anything is written), refused at the stream's end
 * when a later entry has its name or, without --entry, another file is named like an image. Checks made at a stream's end hold its last piece back
 * (stream-end.ts): a copy never ends with exit 0 on what they refuse.
 */

import type { FileHandle } from 'node:fs/promises';
import { BlksyncError, type BlksyncWarning } from '../errors.js';
import { readFully } from '../io/read-fully.js';
import { SequentialSource } from '../io/sequential-source.js';
import type { Range } from '../ranges.js';
import type { Source } from '../types.js';
import { ByteReader, peekBytes } from './byte-reader.js';
import { detectCompression } from '../io/compression-magic.js';
import {
  CONTAINER_HEAD_BYTES,
  detectContainer,
  QEMU_FORMATS,
  type ContainerFormat,
  type Detected,
} from './detect.js';
import {
  chooseEntry,
  checkStreamChoice,
  looksLikeImage,
  sameEntryName,
  sameNamed,
  type ArchiveEntry,
} from './entries.js';
import { CheckedSliceSource, FileCursor, SliceSource } from './file-parts.js';
import { qemuDecode } from './qemu.js';
import { openSimgFile, readSimgHeader, simgStream } from './simg.js';
import { checkTarEntry, tarEntries, type TarEntry } from './tar.js';
import { SparseEntrySource, sparseEntryStream } from './tar-sparse.js';
import { holdBack } from './stream-end.js';
import {
  checkZipEntry,
  inflateFileEntry,
  zipCrcMismatch,
  zipDataAt,
  zipDirectory,
  type ZipEntry,
} from './zip.js';
import { openZipStream } from './zip-stream.js';

export { CONTAINER_HEAD_BYTES, CONTAINER_TAIL_BYTES, detectContainer } from './detect.js';
export type { Detected } from './detect.js';

/** What a copy reports about the container it decoded. */
export interface ContainerReport {
  format: ContainerFormat;
  /** The format's name for people ("zip archive", "qcow2"). */
  name: string;
  /** The archive entry decoded. */
  entry?: string;
  decoder: 'native' | 'qemu-img';
  /** Where qemu-img's raw image (and a spooled SRC) was kept while copying. */
  temporary?: string;
  /** A qcow2/VHD/VMDK overlay's backing file, read through. */
  backing?: string;
  /** The overlay's backing file is DST: only the overlay's own clusters were compared. */
  overlayOfDestination?: boolean;
}

export interface OpenedContainer {
  /** The image's size; undefined when a streamed zip gives it only after the data. */
  size: number | undefined;
  /** The image's bytes (size must be set, from --size if need be, before reading). */
  source(size: number): Source;
  /** The ranges the image defines (Android sparse without its don't-care chunks). */
  defined: Range[] | undefined;
  /** The only ranges to copy: an overlay of DST, which holds the rest already. */
  only?: Range[] | undefined;
  report: ContainerReport;
  close(): Promise<void>;
}

export interface ContainerOptions {
  /** The archive entry holding the image (zip, tar). */
  entry?: string | undefined;
  /** DST, when an overlay backed by DST itself may copy only its own clusters. */
  destination?: string | undefined;
  onWarning?: ((warning: BlksyncWarning) => void) | undefined;
}

/** Refuses a format that is recognised but not decoded. */
export function refuseUnsupported(detected: Detected, name: string): void {
  if (detected.supported) return;
  throw new BlksyncError(
    'ESRC_CONTAINER',
    `${name} is a ${detected.name}, not a disk image; blksync does not unpack it: extract the image and copy that (or --raw to write the file as it is)`,
    { path: name },
  );
}

function fixed(
  report: ContainerReport,
  size: number,
  source: Source,
  defined?: Range[],
): OpenedContainer {
  return { size, source: () => source, defined, report, close: () => source.close() };
}

/**
 * An archive's image that is itself compressed or a container (a zip holding os.img.xz) would
 * be written as those bytes: refused. One layer is decoded, not a chain.
 */
function refuseNested(head: Buffer, name: string, entry: string): void {
  const compression = detectCompression(head);
  const inner = compression === undefined ? detectContainer(head) : undefined;
  if (compression === undefined && inner === undefined) return;
  throw new BlksyncError(
    'ESRC_CONTAINER',
    `${name}: ${entry} is itself ${compression !== undefined ? `${compression}-compressed` : `a ${inner!.name}`}, and blksync decodes one layer: extract ${entry} and copy that file`,
    { path: name },
  );
}

async function headAt(fh: FileHandle, at: number, size: number): Promise<Buffer> {
  const head = Buffer.alloc(Math.min(CONTAINER_HEAD_BYTES, size));
  const got = await readFully(fh, head, 0, head.length, at);
  return head.subarray(0, got);
}

async function nestedChecked(
  bytes: AsyncIterable<Buffer>,
  name: string,
  entry: string,
): Promise<AsyncIterable<Buffer>> {
  const { head, all } = await peekBytes(bytes, CONTAINER_HEAD_BYTES);
  refuseNested(head, name, entry);
  return all;
}

/** An archive file holding its image's name more than once: the last is taken, and said. */
function warnDuplicates(
  entries: readonly ArchiveEntry[],
  entry: string,
  name: string,
  format: string,
  options: ContainerOptions,
): void {
  const count = sameNamed(entries, entry);
  if (count < 2) return;
  options.onWarning?.({
    code: 'WSRC_DUPLICATE_ENTRY',
    message: `${name} (${format}) holds ${entry} ${count} times: the last one is decoded, as extracting gives${format === 'tar' ? ' (tar -r and tar -u append a newer copy)' : ''}`,
    path: name,
  });
}

/** A stream's archive without the entry wanted: all its entries were seen, so say which. */
function noEntry(
  name: string,
  format: string,
  wanted: string | undefined,
  seen: ArchiveEntry[],
): BlksyncError {
  try {
    const e = chooseEntry(seen, wanted, name, format);
    return new BlksyncError(
      'ESRC_ENTRY',
      `${name} (${format}, streamed) holds ${e.name}, not named like an image, and a stream cannot go back to it; add --entry ${e.name}`,
      { path: name },
    );
  } catch (err) {
    if (err instanceof BlksyncError) return err;
    throw err;
  }
}

/** A container read by offset: `path` opens it again (a spawned or streamed reader). */
export async function openContainerFile(
  fh: FileHandle,
  path: string,
  name: string,
  fileSize: number,
  detected: Detected,
  options: ContainerOptions,
): Promise<OpenedContainer> {
  refuseUnsupported(detected, name);
  const format = detected.format as ContainerFormat;
  const report: ContainerReport = { format, name: detected.name, decoder: 'native' };
  switch (format) {
    case 'simg': {
      const s = await openSimgFile(fh, name, fileSize);
      return fixed(report, s.size, s.source, s.defined);
    }
    case 'tar': {
      const entries: TarEntry[] = [];
      for await (const e of tarEntries(new FileCursor(fh, fileSize, name), name)) entries.push(e);
      const e = chooseEntry(entries, options.entry, name, 'tar');
      warnDuplicates(entries, e.name, name, 'tar', options);
      checkTarEntry(e, name);
      report.entry = e.name;
      const source =
        e.sparse !== undefined
          ? new SparseEntrySource(fh, e.dataAt, e.sparse, e.size, name)
          : new SliceSource(fh, e.dataAt, e.size, name);
      const head = Buffer.alloc(Math.min(CONTAINER_HEAD_BYTES, e.size));
      await source.read(head, 0, head.length);
      refuseNested(head, name, e.name);
      return fixed(report, e.size, source);
    }
    case 'zip': {
      const entries = await zipDirectory(fh, fileSize, name);
      const e = chooseEntry(entries, options.entry, name, 'zip');
      warnDuplicates(entries, e.name, name, 'zip', options);
      checkZipEntry(e, name);
      report.entry = e.name;
      const dataAt = await zipDataAt(fh, e, fileSize, name);
      const size = e.size!;
      if (e.method === 0 && e.compressedSize !== size) {
        throw new BlksyncError(
          'ESRC_CORRUPT',
          `${name}: ${e.name} is stored in the zip but its sizes disagree (${e.compressedSize} and ${size}); get a good copy of it`,
          { path: name },
        );
      }
      if (e.method === 0) {
        refuseNested(await headAt(fh, dataAt, size), name, e.name);
        const slice = new SliceSource(fh, dataAt, size, name);
        const source = new CheckedSliceSource(slice, (crc) => {
          if (e.crc !== undefined && crc !== e.crc >>> 0) throw zipCrcMismatch(name, e.name);
        });
        return fixed(report, size, source);
      }
      const bytes = await nestedChecked(inflateFileEntry(path, dataAt, e, name), name, e.name);
      return fixed(report, size, new SequentialSource(bytes, size, name));
    }
    case 'vhd-fixed': {
      const footer = Buffer.alloc(512);
      await readFully(fh, footer, 0, 512, fileSize - 512);
      const size = Number(footer.readBigUInt64BE(48));
      if (!Number.isSafeInteger(size) || size > fileSize - 512) {
        throw new BlksyncError(
          'ESRC_CORRUPT',
          `${name}: the fixed VHD's footer says ${size} bytes but ${fileSize - 512} are there; get a good copy of it`,
          { path: name },
        );
      }
      return fixed(report, size, new SliceSource(fh, 0, size, name));
    }
    default: {
      const q = await qemuDecode(
        { path },
        QEMU_FORMATS[format]!,
        detected.name,
        name,
        options.destination,
      );
      if (q.backing !== undefined && q.only === undefined) {
        // the file SRC names decides what else is read: say so (a downloaded image could
        // name a device of this machine)
        options.onWarning?.({
          code: 'WSRC_BACKING',
          message: `${name} is a ${detected.name} overlay: its backing file ${q.backing} is read too`,
          path: name,
        });
      }
      if (q.others.length > 0) {
        options.onWarning?.({
          code: 'WSRC_BACKING',
          message: `${name} is a ${detected.name} image whose data is read from ${q.others.join(', ')}`,
          path: name,
        });
      }
      return fromQemu(report, q);
    }
  }
}

function fromQemu(
  report: ContainerReport,
  q: Awaited<ReturnType<typeof qemuDecode>>,
): OpenedContainer {
  report.decoder = 'qemu-img';
  if (q.temporary !== undefined) report.temporary = q.temporary;
  if (q.backing !== undefined) report.backing = q.backing;
  if (q.only !== undefined) report.overlayOfDestination = true;
  return {
    size: q.size,
    source: () => q.source,
    defined: undefined,
    only: q.only,
    report,
    close: () => q.close(),
  };
}

/** A container streamed (stdin, a URL, a decompressor's output). */
export async function openContainerStream(
  stream: AsyncIterable<Buffer>,
  name: string,
  detected: Detected,
  options: ContainerOptions,
): Promise<OpenedContainer> {
  refuseUnsupported(detected, name);
  const format = detected.format as ContainerFormat;
  const report: ContainerReport = { format, name: detected.name, decoder: 'native' };
  const QEMU = QEMU_FORMATS[format];
  if (QEMU !== undefined) {
    const spooled = (path: string): void =>
      options.onWarning?.({
        code: 'WSPOOLED',
        message: `${name} is a ${detected.name}, which qemu-img reads from a file: spooling it to ${path} (removed after the copy)`,
        path: name,
      });
    return fromQemu(
      report,
      await qemuDecode({ stream }, QEMU, detected.name, name, undefined, spooled),
    );
  }
  const reader = new ByteReader(stream, name);
  const streamed = (size: number | undefined, bytes: AsyncIterable<Buffer>): OpenedContainer => ({
    size,
    source: (s) => new SequentialSource(bytes, s, name, () => reader.close(), size === undefined),
    defined: undefined,
    report,
    close: () => reader.close(),
  });
  const pick = (entryName: string): boolean =>
    options.entry !== undefined
      ? sameEntryName(entryName, options.entry)
      : looksLikeImage(entryName);
  try {
    switch (format) {
      case 'simg': {
        const header = await readSimgHeader(reader, name);
        return streamed(header.size, simgStream(reader, header, name));
      }
      case 'tar': {
        const seen: TarEntry[] = [];
        const walk = tarEntries(reader, name);
        for (let r = await walk.next(); r.done !== true; r = await walk.next()) {
          const e = r.value;
          seen.push(e);
          if (!e.file || !pick(e.name)) continue;
          checkTarEntry(e, name);
          report.entry = e.name;
          const bytes =
            e.sparse !== undefined
              ? sparseEntryStream(reader, e.sparse, e.size, e.name)
              : reader.take(e.size, `${e.name} in the tar archive`);
          // the rest of the archive is walked (its headers must hold, no later entry may
          // have the name or, without --entry, be another image) before the entry's last
          // piece is handed on
          const rest = async (): Promise<void> => {
            for (let later = await walk.next(); later.done !== true; later = await walk.next()) {
              seen.push(later.value);
            }
            checkStreamChoice(seen, e.name, options.entry, name, 'tar');
          };
          return streamed(e.size, holdBack(await nestedChecked(bytes, name, e.name), rest));
        }
        throw noEntry(name, 'tar', options.entry, seen);
      }
      case 'zip': {
        const seen: ZipEntry[] = [];
        const found = await openZipStream(reader, name, pick, options.entry, seen);
        if (found === undefined) throw noEntry(name, 'zip', options.entry, seen);
        report.entry = found.entry.name;
        return streamed(found.entry.size, await nestedChecked(found.bytes, name, found.entry.name));
      }
      default:
        throw new BlksyncError(
          'ESRC_CONTAINER',
          `${name} is a ${detected.name}, which blksync decodes only from a file; save it to a file and copy from that`,
          { path: name },
        );
    }
  } catch (err) {
    await reader.close();
    throw err;
  }
}
