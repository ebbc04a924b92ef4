/**
 * The index policy (engine/index-policy.ts) as a pure function: every combination of what is
 * known gives the decision the README promises, and `unvouchedSince` says why an index no
 * longer vouches for DST.
 */

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BlksyncError } from '../src/errors.js';
import {
  decideIndex,
  indexFacts,
  unvouchedSince,
  type IndexDecision,
  type IndexFacts,
} from '../src/engine/index-policy.js';
import type { TargetIdentity } from '../src/io/identity.js';
import { OwnWrites } from '../src/io/write-counter.js';

const unreadable = new BlksyncError('EINDEX_FORMAT', 'x is not a usable blksync index');

function facts(over: Partial<IndexFacts> = {}): IndexFacts {
  return {
    path: '/idx',
    named: 'file',
    dst: '/dev/sdz',
    found: 'present',
    dstFresh: false,
    full: false,
    rebuild: false,
    trust: false,
    inProgress: false,
    blockSize: { index: 65536, chunk: 4 << 20 },
    ...over,
  };
}

function code(d: IndexDecision): string {
  return d.action === 'refuse' ? `refuse:${d.error.code}` : d.action;
}

test('every combination of the facts gives the documented decision', () => {
  const founds: IndexFacts['found'][] = ['absent', 'present', { unreadable }];
  let cases = 0;
  for (const found of founds)
    for (const named of ['auto', 'file'] as const)
      for (const rebuild of [false, true])
        for (const trust of [false, true])
          for (const dstFresh of [false, true])
            for (const full of [false, true])
              for (const otherTarget of [undefined, 'made for another disk'])
                for (const unvouched of [undefined, '8 sectors were written'])
                  for (const inProgress of [false, true])
                    for (const sampleMismatchAt of [undefined, 4096]) {
                      const f = facts({
                        found,
                        named,
                        rebuild,
                        trust,
                        dstFresh,
                        full,
                        otherTarget,
                        unvouched,
                        inProgress,
                        sampleMismatchAt,
                      });
                      const d = decideIndex(f);
                      cases++;
                      let want: string;
                      if (found === 'absent') want = 'create';
                      else if (rebuild) want = 'rebuild';
                      else if (typeof found === 'object')
                        want = named === 'auto' ? 'rebuild' : 'refuse:EINDEX_FORMAT';
                      else if (full || dstFresh) want = 'rebuild';
                      else if (otherTarget !== undefined)
                        want = named === 'auto' ? 'rebuild' : 'refuse:EINDEX_MISMATCH';
                      else if (unvouched !== undefined && !trust)
                        want = inProgress || named === 'auto' ? 'rebuild' : 'refuse:EINDEX_STALE';
                      else if (sampleMismatchAt !== undefined)
                        want = named === 'auto' ? 'rebuild' : 'refuse:EINDEX_STALE';
                      else want = 'use';
                      assert.equal(code(d), want, JSON.stringify(f));
                      if (d.action === 'use') {
                        assert.equal(
                          d.onWord,
                          unvouched !== undefined,
                          'on the word only when nothing else vouches',
                        );
                      }
                    }
  assert.equal(cases, 3 * 2 * 2 * 2 * 2 * 2 * 2 * 2 * 2 * 2);
});

test('a refusal names the index and what to do', () => {
  const d = decideIndex(facts({ unvouched: '8 sectors were written to /dev/sdz' }));
  assert.equal(d.action, 'refuse');
  if (d.action !== 'refuse') return;
  assert.equal(d.error.code, 'EINDEX_STALE');
  assert.match(d.error.message, /^index \/idx cannot be trusted: 8 sectors/);
  assert.match(d.error.message, /nothing was written/);
  assert.match(d.error.message, /--rebuild-index/);
  assert.match(d.error.message, /--trust-index/);
});

test('block sizes that do not fit are refused, unless the index is rebuilt', () => {
  const tooBig = facts({ blockSize: { index: 8 << 20, chunk: 4 << 20 } });
  assert.equal(code(decideIndex(tooBig)), 'refuse:EUSAGE');
  assert.equal(code(decideIndex({ ...tooBig, rebuild: true })), 'rebuild');
  const asked = facts({ blockSize: { index: 65536, chunk: 4 << 20, asked: 4096 } });
  const d = decideIndex(asked);
  assert.equal(code(d), 'refuse:EUSAGE');
  assert.match(d.action === 'refuse' ? d.error.message : '', /-b asks for 4096; omit -b/);
  assert.equal(code(decideIndex({ ...asked, rebuild: true })), 'rebuild');
});

const dev = (over: Partial<TargetIdentity> = {}): TargetIdentity => ({
  kind: 'block-device',
  size: 1 << 30,
  key: 'serial:X',
  weak: false,
  bootId: 'boot-a',
  sectorsWritten: '1000',
  ...over,
});
const file = (over: Partial<TargetIdentity> = {}): TargetIdentity => ({
  kind: 'file',
  size: 1 << 20,
  key: 'file:1:2',
  weak: false,
  mtimeNs: '100',
  ctimeNs: '200',
  ...over,
});
const v12 = (identity: TargetIdentity) => ({ versionMajor: 1, versionMinor: 2, identity });

test('a device: the same boot and write count vouch; anything else does not', () => {
  assert.equal(unvouchedSince(v12(dev()), dev(), 'D'), undefined);
  assert.match(
    unvouchedSince(v12(dev()), dev({ sectorsWritten: '1008' }), 'D') ?? '',
    /^8 sectors were written to D since the index was written, unaccounted for \(a killed run, or another program\)/,
  );
  assert.match(
    unvouchedSince(v12(dev()), dev({ sectorsWritten: '10' }), 'D') ?? '',
    /counter of D started again/,
  );
  assert.match(unvouchedSince(v12(dev()), dev({ bootId: 'boot-b' }), 'D') ?? '', /another boot/);
  const bare = dev();
  delete bare.bootId;
  delete bare.sectorsWritten;
  assert.match(unvouchedSince(v12(dev()), bare, 'D') ?? '', /cannot be read here/);
  assert.match(unvouchedSince(v12(bare), dev(), 'D') ?? '', /does not record/);
  // 1.1 did not record discards, a partition's disk, a loop device's backing file
  assert.match(
    unvouchedSince({ versionMajor: 1, versionMinor: 1, identity: dev() }, dev(), 'D') ?? '',
    /older blksync/,
  );
  assert.match(
    unvouchedSince({ versionMajor: 1, versionMinor: 0, identity: dev() }, dev(), 'D') ?? '',
    /older blksync/,
  );
});

test('a file: the same mtime and ctime vouch; touch -r is caught by the ctime', () => {
  assert.equal(unvouchedSince(v12(file()), file(), 'F'), undefined);
  assert.match(unvouchedSince(v12(file()), file({ mtimeNs: '101' }), 'F') ?? '', /modified/);
  assert.match(unvouchedSince(v12(file()), file({ ctimeNs: '201' }), 'F') ?? '', /ctime moved/);
  const old = file();
  delete old.ctimeNs;
  assert.match(unvouchedSince(v12(old), file(), 'F') ?? '', /older blksync/);
});

test('a disk detached or re-plugged (another diskseq) is not vouched for, even when its counter came back to the count recorded', () => {
  const was = dev({ diskSeq: '41', sectorsWritten: '0' });
  const replugged = dev({ diskSeq: '57', sectorsWritten: '0' });
  assert.equal(
    unvouchedSince(v12(was), dev({ diskSeq: '41', sectorsWritten: '0' }), 'D'),
    undefined,
  );
  assert.match(unvouchedSince(v12(was), replugged, 'D') ?? '', /D was detached or re-plugged/);
  // an index written before diskseq was recorded: the counter alone, as before
  assert.equal(unvouchedSince(v12(dev({ sectorsWritten: '0' })), replugged, 'D'), undefined);
  // a loop device: its backing file's stamp vouches across a re-attach
  const loop = (diskSeq: string) => dev({ diskSeq, backingFile: '2049:12:4096:1:1 0:0' });
  assert.equal(unvouchedSince(v12(loop('41')), loop('57'), 'D'), undefined);
});

test('indexFacts: identity, size and staleness from an index and DST now', () => {
  const stored = { ...v12(dev()), blockSize: 65536, state: { kind: 'clean' } };
  const ask = {
    path: '/idx',
    named: 'file' as const,
    dst: 'D',
    dstFresh: false,
    full: false,
    rebuild: false,
    trust: false,
    chunkSize: 4 << 20,
  };
  assert.equal(code(decideIndex(indexFacts(stored, dev(), ask))), 'use');
  assert.equal(
    code(decideIndex(indexFacts(stored, dev({ size: 5 }), ask))),
    'refuse:EINDEX_MISMATCH',
  );
  assert.equal(
    code(decideIndex(indexFacts(stored, dev({ key: 'serial:Y' }), { ...ask, named: 'auto' }))),
    'rebuild',
  );
  assert.equal(
    code(decideIndex(indexFacts(stored, dev({ sectorsWritten: '1001' }), ask))),
    'refuse:EINDEX_STALE',
  );
  const interrupted = { ...stored, state: { kind: 'in-progress' } };
  assert.equal(
    code(decideIndex(indexFacts(interrupted, dev({ sectorsWritten: '1001' }), ask))),
    'rebuild',
  );
  // DST that does not exist yet (a dry run): whatever index there is cannot describe it
  assert.equal(code(decideIndex(indexFacts(stored, undefined, ask))), 'rebuild');
  assert.equal(code(decideIndex(indexFacts('absent', undefined, ask))), 'create');
});

test("a device: discards, writes through a partition's disk and a loop device's backing file all unvouch", () => {
  const stamped = dev({
    sectorsDiscarded: '0',
    diskSectorsWritten: '5000',
    diskSectorsDiscarded: '0',
    backingFile: '1:2:1048576:300:300 0:0',
  });
  assert.equal(unvouchedSince(v12(stamped), { ...stamped }, 'D'), undefined);
  assert.match(
    unvouchedSince(v12(stamped), { ...stamped, sectorsDiscarded: '8' }, 'D') ?? '',
    /8 sectors of D were discarded/,
  );
  assert.match(
    unvouchedSince(v12(stamped), { ...stamped, diskSectorsWritten: '5008' }, 'D') ?? '',
    /the disk holding the partition D was written/,
  );
  assert.match(
    unvouchedSince(v12(stamped), { ...stamped, backingFile: '1:2:1048576:301:300 0:0' }, 'D') ?? '',
    /backing file of the loop device D was changed/,
  );
  assert.match(
    unvouchedSince(v12(stamped), { ...stamped, backingFile: 'unknown' }, 'D') ?? '',
    /cannot be examined/,
  );
  // device mapper, md: writes to the devices under it are not counted here
  assert.match(
    unvouchedSince(v12(stamped), { ...stamped, stackedOn: 'sda2' }, 'D') ?? '',
    /stacked on sda2/,
  );
});

test('own writes are a lower bound: a foreign write cannot hide in what they are over-counted by', () => {
  const own = new OwnWrites(1 << 20);
  // two sub-page writes into one page: writeback sends that page (8 sectors) once
  own.add(0, 512);
  own.add(1024, 512);
  assert.equal(own.sectors, 8n);
  const before = { bootId: 'b', sectorsWritten: '100' };
  assert.equal(own.foreign(before, { bootId: 'b', sectorsWritten: '108' }), 0n);
  // 8 sectors more than the page: another program's 4 KiB (counted 16 before: hidden)
  assert.equal(own.foreign(before, { bootId: 'b', sectorsWritten: '116' }), 8n);
  // the same page again after a sync is written back again
  own.synced();
  own.add(2048, 512);
  assert.equal(own.foreign(before, { bootId: 'b', sectorsWritten: '116' }), 0n);
  // a discard meanwhile is never the copy's own
  assert.equal(
    own.foreign(
      { ...before, sectorsDiscarded: '0' },
      { bootId: 'b', sectorsWritten: '116', sectorsDiscarded: '8' },
    ),
    8n,
  );
  // clipped at the device's end: a 512-byte device's last page is one sector
  const tiny = new OwnWrites(512);
  tiny.add(0, 512);
  assert.equal(tiny.sectors, 1n);
});
