/**
 * The agent's requests between HELLO and DONE, one named handler per frame type: HASH_REQ
 * (hashes of a range, from the index when it knows them), DATA (write, then acknowledge with
 * WRITTEN) and DATA_REQ (read and send, compressed when negotiated).
 */

import { traceOnce } from '../../trace.js';
import { decode } from '../compress.js';
import {
  dataHeader,
  frame,
  FrameType,
  MAX_DATA_BYTES,
  MAX_HASHES_PER_REPLY,
  MIN_HASH_UNIT,
  ProtocolError,
  rangeHeader,
  readU64,
  unitHashes,
} from '../protocol.js';
import { readFully, type AgentSession, type Opened } from './session.js';

/** HASH_REQ: the hashes of [offset, offset + length) in `unit`s. */
export async function hashRequest(s: AgentSession, o: Opened, p: Buffer): Promise<void> {
  if (p.length !== 16 || o.fh === undefined) throw new ProtocolError('bad HASH_REQ');
  const length = p.readUInt32BE(8);
  const unit = p.readUInt32BE(12);
  const offset = s.checkRange(readU64(p, 0), length);
  if (unit < MIN_HASH_UNIT || Math.ceil(length / unit) > MAX_HASHES_PER_REPLY) {
    throw new ProtocolError(`bad hash unit ${unit}`);
  }
  traceOnce('first HASH_REQ');
  const known = (s.index ?? s.sourceIndex)?.hashesFor(offset, length, unit);
  if (known !== undefined) {
    await s.send(frame(FrameType.HASHES, rangeHeader(offset, unit), known));
    return;
  }
  const buf = Buffer.allocUnsafe(length);
  await readFully(o, o.fh, buf, length, offset);
  s.bytesRead += length;
  s.index?.learned(offset, buf, length);
  // bytes of SRC read where its used index answered for them: they must agree
  await s.sourceIndex?.check(offset, buf, length);
  const hashes = unitHashes(buf, length, unit, s.unitHash);
  await s.send(frame(FrameType.HASHES, rangeHeader(offset, unit), hashes));
}

/** DATA: writes the bytes at their offset and acknowledges the running total (WRITTEN). */
export async function dataWrite(s: AgentSession, o: Opened, p: Buffer): Promise<void> {
  if (o.role !== 'target' || o.sink === undefined) {
    throw new ProtocolError('DATA sent to an agent that does not write');
  }
  if (p.length < 13) throw new ProtocolError('DATA too short');
  const rawLength = p.readUInt32BE(8);
  if (rawLength > MAX_DATA_BYTES) throw new ProtocolError('DATA too long');
  const offset = s.checkRange(readU64(p, 0), rawLength);
  const enc = p[12]!;
  if (enc !== 0 && o.encoding === '') throw new ProtocolError('DATA encoding not negotiated');
  const raw = decode(enc, p.subarray(13), rawLength);
  if (raw === undefined) throw new ProtocolError('DATA does not decode to its length');
  traceOnce('first DATA');
  s.digest.update(p.subarray(0, 12)).update(raw);
  await s.index?.beforeWrite(offset);
  await o.sink.write(raw, offset);
  await s.index?.wrote(offset, raw);
  s.written?.add(offset, rawLength);
  s.bytes += rawLength;
  s.frames++;
  const ack = Buffer.allocUnsafe(8);
  ack.writeUInt32BE(Math.floor(s.bytes / 2 ** 32), 0);
  ack.writeUInt32BE(s.bytes >>> 0, 4);
  await s.send(frame(FrameType.WRITTEN, ack));
}

/** DATA_REQ: reads [offset, offset + length) and sends it as DATA frames. */
export async function dataRequest(s: AgentSession, o: Opened, p: Buffer): Promise<void> {
  if (o.role !== 'source' || p.length !== 12) throw new ProtocolError('bad DATA_REQ');
  const length = p.readUInt32BE(8);
  const offset = s.checkRange(readU64(p, 0), length);
  traceOnce('first DATA_REQ');
  const buf = Buffer.allocUnsafe(length);
  await readFully(o, o.fh!, buf, length, offset);
  s.bytesRead += length;
  await s.sourceIndex?.check(offset, buf, length);
  for (let at = 0; at < length; at += MAX_DATA_BYTES) {
    const raw = buf.subarray(at, Math.min(at + MAX_DATA_BYTES, length));
    const [enc, body] = await o.compressor.encode(raw);
    const head = dataHeader(offset + at, raw.length, enc);
    s.digest.update(head.subarray(0, 12)).update(raw);
    s.bytes += raw.length;
    s.frames++;
    await s.send(frame(FrameType.DATA, head, body));
  }
}
