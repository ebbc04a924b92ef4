/**
 * The agent's check of blksync's HELLO: the protocol version, the role and every field it
 * acts on (sizes, units, the --direct and --index requests), before anything is opened.
 */

import { BlksyncError } from '../../errors.js';
import {
  GMAC_KEY_BYTES,
  MAX_REQUEST_BYTES,
  MIN_HASH_UNIT,
  PROTOCOL_VERSION,
  ProtocolError,
  TOP_HASH_BLOCKS,
  TOP_HASH_GMAC,
  type DirectHello,
  type Hello,
  type IndexHello,
} from '../protocol.js';

function isSafeUInt(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

export function parseHello(payload: Buffer): Hello {
  if (payload.length < 2) throw new ProtocolError('HELLO too short');
  const version = payload.readUInt16BE(0);
  if (version !== PROTOCOL_VERSION) {
    throw new BlksyncError(
      'EREMOTE_PROTOCOL',
      `blksync speaks protocol ${version} but the agent speaks ${PROTOCOL_VERSION}; use the same blksync version`,
    );
  }
  let h: unknown;
  try {
    h = JSON.parse(payload.subarray(2).toString('utf8'));
  } catch {
    throw new ProtocolError('HELLO is not JSON');
  }
  const o = h as Partial<Hello> | null;
  if (
    o === null ||
    typeof o !== 'object' ||
    (o.role !== 'target' && o.role !== 'source') ||
    typeof o.path !== 'string' ||
    o.path === '' ||
    !isSafeUInt(o.topUnit) ||
    (o.topUnit !== 0 && (o.topUnit < MIN_HASH_UNIT || o.topUnit > MAX_REQUEST_BYTES)) ||
    !Array.isArray(o.encodings) ||
    (o.identity !== undefined && typeof o.identity !== 'boolean') ||
    (o.verify !== undefined && (typeof o.verify !== 'boolean' || o.role !== 'target')) ||
    (o.role === 'target' && !isSafeUInt(o.size)) ||
    (o.direct !== undefined && (o.role !== 'source' || !validDirect(o.direct))) ||
    (o.index !== undefined && (o.role !== 'target' || !validIndex(o.index))) ||
    (o.topHash !== undefined &&
      !(
        o.topHash === TOP_HASH_GMAC &&
        typeof o.key === 'string' &&
        new RegExp(`^[0-9a-f]{${2 * GMAC_KEY_BYTES}}$`).test(o.key)
      ) &&
      !(
        o.topHash === TOP_HASH_BLOCKS &&
        isSafeUInt(o.topBlock) &&
        o.topBlock >= MIN_HASH_UNIT &&
        (o.topBlock & (o.topBlock - 1)) === 0 &&
        o.topUnit % o.topBlock === 0
      ))
  ) {
    throw new ProtocolError('HELLO has missing or invalid fields');
  }
  return o as Hello;
}

/** A --direct request: a host and path to copy to, and a sane block and chunk size. */
function validDirect(d: unknown): d is DirectHello {
  if (d === null || typeof d !== 'object') return false;
  const o = d as Partial<DirectHello>;
  const optionalString = (v: unknown): boolean => v === undefined || typeof v === 'string';
  return (
    typeof o.destination === 'string' &&
    o.destination !== '' &&
    !o.destination.startsWith('-') &&
    typeof o.path === 'string' &&
    o.path !== '' &&
    optionalString(o.ssh) &&
    optionalString(o.remoteNode) &&
    (o.verify === undefined || typeof o.verify === 'boolean') &&
    (o.index === undefined || validIndex(o.index)) &&
    isSafeUInt(o.blockSize) &&
    o.blockSize >= MIN_HASH_UNIT &&
    (o.blockSize & (o.blockSize - 1)) === 0 &&
    isSafeUInt(o.chunkSize) &&
    o.chunkSize >= o.blockSize &&
    o.chunkSize <= MAX_REQUEST_BYTES &&
    o.chunkSize % o.blockSize === 0
  );
}

/** An --index request: a path and sane sizes. */
function validIndex(x: unknown): x is IndexHello {
  if (x === null || typeof x !== 'object') return false;
  const o = x as Partial<IndexHello>;
  return (
    typeof o.path === 'string' &&
    o.path !== '' &&
    isSafeUInt(o.blockSize) &&
    o.blockSize >= MIN_HASH_UNIT &&
    (o.blockSize & (o.blockSize - 1)) === 0 &&
    isSafeUInt(o.chunkSize) &&
    o.chunkSize >= o.blockSize &&
    o.chunkSize <= MAX_REQUEST_BYTES &&
    isSafeUInt(o.verifySample) &&
    typeof o.blockSizeGiven === 'boolean' &&
    typeof o.rebuild === 'boolean' &&
    (o.trust === undefined || typeof o.trust === 'boolean') &&
    typeof o.full === 'boolean'
  );
}
