/**
 * Which file of an archive (zip, tar) is the image: the one named with --entry, the only file,
 * or the only one named like an image; otherwise a refusal that lists the files. A name given
 * to several entries (tar -r / tar -u append a newer copy; a zip can hold a name twice) is the
 * last of them, as extracting gives (tar x, unzip -o, python's zipfile): the earlier ones are
 * stale. A stream cannot go back to the last, so it is refused there (`duplicateInStream`).
 */

import { BlksyncError } from '../errors.js';
import { formatBytes } from '../size.js';

export interface ArchiveEntry {
  name: string;
  /** Bytes of the file; undefined when only its data tells (a streamed zip's descriptor). */
  size: number | undefined;
  /** A regular file (not a directory, link or device). */
  file: boolean;
}

/** Names an image goes by inside archives (Raspberry Pi, Armbian, Yocto, OpenWrt). */
const IMAGE_NAME =
  /\.(img|raw|iso|wic|hddimg|sdimg|sdcard|dd|ext[234]|vfat|bin|simg|qcow2|vhd|vmdk)(\.(gz|xz|zst|bz2|lz4))?$/i;
/** True when a file's name is an image's (how a stream's entry is picked without --entry). */
export function looksLikeImage(name: string): boolean {
  return IMAGE_NAME.test(name);
}

/** Files listed in a refusal. */
const LISTED = 20;

/** True when an archive's entry name is the name given (leading ./ and trailing / aside). */
export function sameEntryName(a: string, b: string): boolean {
  return normalName(a) === normalName(b);
}

function normalName(s: string): string {
  return s.replace(/^(\.\/)+/, '').replace(/\/+$/, '');
}

/** The entry to decode, among all of an archive's (see the file header). */
export function chooseEntry<E extends ArchiveEntry>(
  entries: readonly E[],
  wanted: string | undefined,
  archive: string,
  format: string,
): E {
  const files = extracted(entries.filter((e) => e.file));
  const chosen = (e: E): E => {
    refuseReplaced(entries, e.name, archive, format);
    return e;
  };
  if (wanted !== undefined) {
    const hit = files.find((e) => sameEntryName(e.name, wanted));
    if (hit !== undefined) return chosen(hit);
    throw new BlksyncError(
      'ESRC_ENTRY',
      `${archive} (${format}) holds no file named ${wanted}; its files: ${listing(files)}`,
      { path: archive },
    );
  }
  if (files.length === 1) return chosen(files[0]!);
  if (files.length === 0) {
    throw new BlksyncError('ESRC_ENTRY', `${archive} (${format}) holds no file to write`, {
      path: archive,
    });
  }
  const images = files.filter((e) => IMAGE_NAME.test(e.name));
  if (images.length === 1) return chosen(images[0]!);
  throw new BlksyncError(
    'ESRC_ENTRY',
    `${archive} (${format}) holds ${files.length} files and blksync cannot tell which is the image; ` +
      `name it with --entry NAME: ${listing(files)}`,
    { path: archive },
  );
}

/** The files extraction leaves: of entries with one name, the last (in the order they come). */
function extracted<E extends ArchiveEntry>(files: readonly E[]): E[] {
  const last = new Map<string, E>();
  for (const e of files) {
    const key = normalName(e.name);
    last.delete(key);
    last.set(key, e);
  }
  return [...last.values()];
}

/**
 * The last entry named `name` is not a file (`tar -r` of a link or a directory of that name):
 * extracting replaces the image with it, so which bytes are meant is unclear, and refused.
 */
function refuseReplaced(
  entries: readonly ArchiveEntry[],
  name: string,
  archive: string,
  format: string,
): void {
  const named = entries.filter((e) => sameEntryName(e.name, name));
  if (named.length === 0 || named[named.length - 1]!.file) return;
  throw new BlksyncError(
    'ESRC_ENTRY',
    `${archive} (${format}) holds ${name} and, after it, a link or directory of that name, which extracting leaves in its place; extract the archive and copy the file you mean`,
    { path: archive },
  );
}

/** How many files of `entries` are named `name` (more than 1: later ones replace it). */
export function sameNamed(entries: readonly ArchiveEntry[], name: string): number {
  return entries.filter((e) => e.file && sameEntryName(e.name, name)).length;
}

/**
 * At a stream's end, all its entries seen: the entry taken (`entry`, the first named like an
 * image when none was `wanted`) is the one a file's choice (chooseEntry) would give, or the
 * copy is refused before its last piece: no later entry of its name, and without --entry no
 * other file named like an image.
 */
export function checkStreamChoice(
  entries: readonly ArchiveEntry[],
  entry: string,
  wanted: string | undefined,
  archive: string,
  format: string,
): void {
  const twins = sameNamed(entries, entry);
  if (twins > 1) throw duplicateInStream(archive, format, entry, twins);
  refuseReplaced(entries, entry, archive, format);
  if (wanted !== undefined) return;
  const images = extracted(entries.filter((e) => e.file && IMAGE_NAME.test(e.name)));
  if (images.length < 2) return;
  throw new BlksyncError(
    'ESRC_ENTRY',
    `${archive} (${format}, streamed) holds ${images.length} files named like an image and blksync cannot tell which is the image (it stopped before the end of ${entry}, the first); name it with --entry NAME: ${listing(images)}`,
    { path: archive },
  );
}

/** A stream's chosen entry is followed by another of its name, which extraction would give. */
function duplicateInStream(
  archive: string,
  format: string,
  entry: string,
  count: number,
): BlksyncError {
  return new BlksyncError(
    'ESRC_ENTRY',
    `${archive} (${format}, streamed) holds ${entry} ${count} times; extracting gives the last one${format === 'tar' ? ' (tar -r and tar -u append a newer copy)' : ''}, and a stream cannot go back to it: save the archive (decompressed) to a file and copy from that (blksync takes the last ${entry} there)`,
    { path: archive },
  );
}

function listing(files: readonly ArchiveEntry[]): string {
  const shown = files
    .slice(0, LISTED)
    .map((e) => (e.size === undefined ? e.name : `${e.name} (${formatBytes(e.size)})`));
  if (files.length > LISTED) shown.push(`and ${files.length - LISTED} more`);
  return shown.length === 0 ? 'none' : shown.join(', ');
}
