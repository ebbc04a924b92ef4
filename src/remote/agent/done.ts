/**
 * DONE: the agent makes what it wrote durable, commits the index it keeps, reads back what it
 * wrote for --verify (READ_BACK frames), and answers with the SUMMARY; nothing else may follow.
 */

import { readBackWritten } from '../../engine/written-log.js';
import { identityOf } from '../../io/identity.js';
import { trace } from '../../trace.js';
import { FrameType, jsonFrame, ProtocolError, readBackFrames, type Summary } from '../protocol.js';
import type { AgentSession, Opened } from './session.js';

export async function done(s: AgentSession, o: Opened, p: Buffer): Promise<void> {
  if (p.length !== 0) throw new ProtocolError('bad DONE');
  trace('DONE received');
  // blksync takes every top hash before DONE; one that sends DONE sooner still gets the whole
  // stream, read before the file is synced and closed
  await s.topStream;
  await s.sourceIndex?.finish();
  const directReport = await s.directRun;
  await s.index?.beforeFinish();
  await o.sink?.finish();
  if (o.sink !== undefined) trace('synced');
  await s.index?.afterFinish();
  let identity: Summary['identity'];
  if (o.identity && o.fh !== undefined && o.sink !== undefined) {
    // an index is about to vouch for all of the file, also what an earlier, killed run
    // wrote and this one found equal: make all of it durable, then say what it is now
    await o.fh.sync();
    const st = await o.fh.stat();
    identity = await identityOf(o.path, st, o.kind === 'file' ? st.size : o.fileSize);
  }
  const index = s.index;
  if (index !== undefined && o.fh !== undefined && o.sink !== undefined) {
    // the clean index vouches for all of DST, also what a killed run wrote
    await o.fh.sync();
    await index.commit();
    s.bytesRead += index.bytesRead;
  } else if (index !== undefined) s.bytesRead += index.bytesRead;
  let verified: Summary['verify'];
  if (s.written !== undefined) {
    // after the fsync above: the read-back sees what the medium holds
    const t0 = performance.now();
    const r =
      o.fh !== undefined && !s.written.empty
        ? await readBackWritten(o.path, s.written, { fd: o.fh.fd })
        : { digests: [], direct: false, bytesRead: 0 };
    for (const f of readBackFrames(r.digests)) await s.send(f);
    verified = {
      direct: r.direct,
      bytesRead: r.bytesRead,
      seconds: (performance.now() - t0) / 1000,
    };
  }
  s.done = true;
  const notWritten = s.sourceIndex?.report().notWritten;
  const cpu = process.cpuUsage();
  const summary: Summary = {
    bytes: s.bytes,
    frames: s.frames,
    digest: s.digest.digest('hex'),
    bytesRead: s.bytesRead,
    cpuSeconds: (cpu.user + cpu.system) / 1e6,
    ...(identity !== undefined ? { identity } : {}),
    ...(directReport !== undefined ? { direct: directReport } : {}),
    ...(index !== undefined ? { index: index.report() } : {}),
    ...(verified !== undefined ? { verify: verified } : {}),
    ...(notWritten !== undefined ? { sourceIndexNotWritten: notWritten } : {}),
  };
  await s.send(jsonFrame(FrameType.SUMMARY, summary));
  trace('SUMMARY sent');
}
