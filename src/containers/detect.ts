/**
 * Containers recognised by their magic bytes (never by their names): archives and virtual
 * disk formats that hold an image rather than being one. Writing one verbatim onto a device
 * leaves it unbootable without a word, so each is decoded or refused (see open.ts).
 *
 *   format       where                       decoded by
 *   zip          "PK\3\4" at 0                native (zip.ts)
 *   tar          "ustar" at 257 (or v7) +     native (tar.ts)
 *                checksum
 *   simg         0xED26FF3A (LE) at 0         native (simg.ts), Android sparse
 *   vhd fixed    "conectix" footer at the end native: the data before the footer
 *   qcow2, vhd (dynamic), vmdk, vdi, vhdx      qemu-img (qemu.ts)
 *   7z, rar, xar, cpio, ar, dmg, lzip, .Z...   refused, named
 *
 * A raw image (MBR, GPT, ext4, FAT, ISO 9660, squashfs) starts with none of these: the
 * checks that could match by chance (zip, tar) validate the header that follows the magic.
 */

/** Bytes of the head needed to recognise every container (a tar header). */
export const CONTAINER_HEAD_BYTES = 512;
/** Bytes of the tail a fixed VHD's footer takes. */
export const CONTAINER_TAIL_BYTES = 512;

export type ContainerFormat =
  'zip' | 'tar' | 'simg' | 'vhd-fixed' | 'qcow2' | 'vhd' | 'vmdk' | 'vdi' | 'vhdx' | 'qcow' | 'qed';

/** What a head (and tail) of bytes says the data is. */
export type Detected =
  | { format: ContainerFormat; name: string; supported: true }
  | { format: string; name: string; supported: false };

/** Formats qemu-img decodes (its name for each). */
export const QEMU_FORMATS: Partial<Record<ContainerFormat, string>> = {
  qcow2: 'qcow2',
  qcow: 'qcow',
  qed: 'qed',
  vhd: 'vpc',
  vmdk: 'vmdk',
  vdi: 'vdi',
  vhdx: 'vhdx',
};

function at(buf: Buffer, offset: number, magic: string | readonly number[]): boolean {
  const bytes = typeof magic === 'string' ? Buffer.from(magic, 'latin1') : Buffer.from(magic);
  return (
    buf.length >= offset + bytes.length && buf.subarray(offset, offset + bytes.length).equals(bytes)
  );
}

/**
 * A tar header: "ustar" at 257, or an old v7 header (no magic: a name, octal mode, size and
 * mtime, a file or link type, and zeros from 257 on but for the device numbers GNU tar
 * writes), and a header checksum that adds up.
 */
export function isTarHeader(h: Buffer): boolean {
  if (h.length < 512 || !(at(h, 257, 'ustar') || isV7Header(h))) return false;
  const stored = parseInt(h.toString('latin1', 148, 156).replace(/[\0 ]+$/, ''), 8);
  if (!Number.isFinite(stored)) return false;
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 0x20 : h[i]!;
  return sum === stored;
}

function isV7Header(h: Buffer): boolean {
  const octal = (from: number, to: number): boolean =>
    /^ *[0-7]+[ \0]*$/.test(h.toString('latin1', from, to));
  return (
    h[0] !== 0 &&
    (h[156] === 0 || (h[156]! >= 0x30 && h[156]! <= 0x37)) &&
    octal(100, 108) &&
    octal(124, 136) &&
    octal(136, 148) &&
    zeros(h, 257, 329) &&
    // GNU tar fills devmajor and devminor in even there
    (zeros(h, 329, 345) || (octal(329, 337) && octal(337, 345))) &&
    zeros(h, 345, 512)
  );
}

function zeros(h: Buffer, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (h[i] !== 0) return false;
  return true;
}

/** A zip local header whose fields are plausible (a boot sector starting "PK\3\4" is not). */
function isZipLocalHeader(h: Buffer): boolean {
  if (!at(h, 0, 'PK\x03\x04') || h.length < 30) return false;
  const method = h.readUInt16LE(8);
  const nameLength = h.readUInt16LE(26);
  return h[4]! <= 63 && [0, 8, 9, 12, 14, 93, 95, 99].includes(method) && nameLength > 0;
}

/** A VHD footer ("conectix", its checksum correct): a fixed VHD ends with one. */
export function isVhdFooter(f: Buffer): boolean {
  if (f.length < 512 || !at(f, 0, 'conectix')) return false;
  let sum = 0;
  for (let i = 0; i < 512; i++) if (i < 64 || i >= 68) sum += f[i]!;
  return ~sum >>> 0 === f.readUInt32BE(64);
}

/**
 * The container `head` (the first CONTAINER_HEAD_BYTES, or fewer for a short image) starts,
 * or that `tail` (the last CONTAINER_TAIL_BYTES, when the data can be read by offset) ends;
 * undefined for a raw image.
 */
export function detectContainer(head: Buffer, tail?: Buffer): Detected | undefined {
  const ok = (format: ContainerFormat, name: string): Detected => ({
    format,
    name,
    supported: true,
  });
  const no = (format: string, name: string): Detected => ({ format, name, supported: false });
  if (at(head, 0, [0x3a, 0xff, 0x26, 0xed])) return ok('simg', 'Android sparse image');
  if (at(head, 0, 'QFI\xfb')) {
    return head.length >= 8 && head.readUInt32BE(4) === 1
      ? ok('qcow', 'qcow (version 1)')
      : ok('qcow2', 'qcow2');
  }
  if (at(head, 0, 'QED\0')) return ok('qed', 'QED');
  if (at(head, 0, 'conectix')) return ok('vhd', 'VHD (dynamic)');
  if (at(head, 0, 'KDMV')) return ok('vmdk', 'VMDK (sparse)');
  if (at(head, 0, '# Disk DescriptorFile')) return ok('vmdk', 'VMDK (descriptor)');
  if (at(head, 0, 'vhdxfile')) return ok('vhdx', 'VHDX');
  if (head.length >= 0x44 && head.readUInt32LE(0x40) === 0xbeda107f) return ok('vdi', 'VDI');
  if (isZipLocalHeader(head) || at(head, 0, 'PK\x05\x06') || at(head, 0, 'PK\x07\x08PK\x03\x04')) {
    return ok('zip', 'zip archive');
  }
  if (isTarHeader(head)) return ok('tar', 'tar archive');
  if (at(head, 0, [0x37, 0x7a, 0xbc, 0xaf, 0x27, 0x1c])) return no('7z', '7-Zip archive');
  if (at(head, 0, 'Rar!\x1a\x07')) return no('rar', 'RAR archive');
  if (at(head, 0, 'xar!')) return no('xar', 'xar archive');
  if (at(head, 0, '!<arch>\n')) return no('ar', 'ar archive (a .deb?)');
  if (at(head, 0, '070701') || at(head, 0, '070702') || at(head, 0, '070707')) {
    return no('cpio', 'cpio archive');
  }
  if (at(head, 0, 'MSCF\0\0\0\0')) return no('cab', 'Microsoft cabinet');
  if (at(head, 0, 'LZIP')) return no('lzip', 'lzip-compressed data');
  if (at(head, 0, [0x1f, 0x9d])) return no('compress', 'Unix compress (.Z) data');
  if (at(head, 0, 'COWD')) return no('vmdk-cowd', 'VMDK (ESX COWD)');
  if (at(head, 0, 'WithoutFreeSpace') || at(head, 0, 'WithouFreSpacExt')) {
    return no('parallels', 'Parallels disk image');
  }
  if (tail !== undefined) {
    if (isVhdFooter(tail)) return ok('vhd-fixed', 'VHD (fixed)');
    if (tail.length >= 512 && at(tail, tail.length - 512, 'koly'))
      return no('dmg', 'Apple disk image (dmg)');
  }
  return undefined;
}
