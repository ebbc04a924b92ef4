/**
 * The agent's check of blksync's HELLO: the protocol version, then every field it acts on
 * (sizes, units, the --direct and --index requests) through the HELLO schema in
 * messages.ts, before anything is opened.
 */

import { BlksyncError } from '../../errors.js';
import { parseHello as checkHello } from '../messages.js';
import { PROTOCOL_VERSION, ProtocolError, type Hello } from '../protocol.js';

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
  return checkHello(h);
}
