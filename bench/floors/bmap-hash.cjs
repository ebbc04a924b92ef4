// The floor of a bmap copy's checksum work: read the bmap's mapped ranges of IMAGE and SHA-256
// each range, in one stream (this thread) or two (this thread and a worker taking the ranges
// in turn, largest first), with nothing else: no compare, no DST. Start-up included when run
// under `time`/hyperfine. docs/performance.md, "The bmap copy on 2 cores".
//
//   node bench/floors/bmap-hash.cjs IMAGE BMAP [1|2]
'use strict';

const { createHash } = require('node:crypto');
const { openSync, readFileSync, readSync } = require('node:fs');
const { Worker, isMainThread, parentPort, workerData } = require('node:worker_threads');

const PIECE = 1 << 20;

function hashRanges(image, ranges) {
  const fd = openSync(image, 'r');
  const m = new WebAssembly.Memory({ initial: PIECE / 65536, maximum: PIECE / 65536 });
  const buf = Buffer.from(m.buffer, 0, PIECE);
  const out = [];
  for (const [start, end] of ranges) {
    const h = createHash('sha256');
    for (let at = start; at < end;) {
      const n = readSync(fd, buf, 0, Math.min(PIECE, end - at), at);
      h.update(buf.subarray(0, n));
      at += n;
    }
    out.push(h.digest('hex'));
  }
  return out;
}

if (!isMainThread) {
  parentPort.postMessage(hashRanges(workerData.image, workerData.ranges));
} else {
  const [image, bmap, streams = '1'] = process.argv.slice(2);
  const xml = readFileSync(bmap, 'utf8');
  const block = Number(/<BlockSize>\s*(\d+)/.exec(xml)[1]);
  const ranges = [...xml.matchAll(/<Range[^>]*>\s*(\d+)(?:-(\d+))?\s*</g)].map((r) => [
    Number(r[1]) * block,
    (Number(r[2] ?? r[1]) + 1) * block,
  ]);
  if (streams === '1') {
    hashRanges(image, ranges);
  } else {
    // largest first, dealt in turn: the two large ranges land on different threads
    const sorted = [...ranges].sort((a, b) => b[1] - b[0] - (a[1] - a[0]));
    const mine = sorted.filter((_, i) => i % 2 === 0);
    const theirs = sorted.filter((_, i) => i % 2 === 1);
    const w = new Worker(__filename, { workerData: { image, ranges: theirs } });
    hashRanges(image, mine);
    w.once('message', () => void w.terminate());
  }
}
