/**
 * The pipeline's buffer pools (src/io/buffer-pool.ts) carve many buffers out of one
 * WebAssembly.Memory: a buffer that overlapped another, or was shorter than asked, would
 * corrupt the chunks read into them.
 */

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { Worker } from 'node:worker_threads';
import { alignedBuffers, BufferPool, SharedBufferPool } from '../src/io/buffer-pool.js';
import { shellQuote } from '../src/remote/spec.js';
import { cliCommand } from './helpers/cli.js';

for (const size of [1, 4096, 65536 + 1, 1024 * 1024, 3 * 1024 * 1024 + 512, 32 * 1024 * 1024]) {
  test(`a pool's buffers of ${size} bytes are whole and apart`, () => {
    const pool = new BufferPool(size);
    // more than one slab's worth, so buffers of two slabs are checked too
    const count = Math.max(3, Math.ceil((40 * 1024 * 1024) / Math.max(size, 65536)));
    const bufs = Array.from({ length: Math.min(count, 40) }, () => pool.get());
    bufs.forEach((b, i) => {
      assert.equal(b.length, size);
      b.fill(i + 1);
    });
    bufs.forEach((b, i) => {
      assert.ok(
        b.every((v) => v === i + 1),
        `buffer ${i} was overwritten by another`,
      );
    });
    pool.put(bufs[0]!);
    assert.equal(pool.get(), bufs[0], 'a returned buffer is handed out again');
  });
}

test('a shared pool’s buffers are read in place by a worker thread', async () => {
  const pool = new SharedBufferPool(1024 * 1024);
  const a = pool.get();
  const b = pool.get();
  assert.ok(a.buffer instanceof SharedArrayBuffer);
  a.fill(7);
  b.fill(9);
  const worker = new Worker(
    `const { parentPort } = require('node:worker_threads');
     parentPort.on('message', (m) => {
       const view = Buffer.from(m.sab, m.byteOffset, m.length);
       let sum = 0;
       for (const v of view) sum += v;
       view.fill(1);
       parentPort.postMessage(sum);
     });`,
    { eval: true },
  );
  try {
    const sum = await new Promise<number>((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
      worker.postMessage({ sab: a.buffer, byteOffset: a.byteOffset, length: a.length });
    });
    assert.equal(sum, 7 * a.length, 'the worker saw the bytes written here');
    assert.ok(
      a.every((v) => v === 1),
      'the worker wrote into the same memory',
    );
    assert.ok(
      b.every((v) => v === 9),
      'the neighbouring buffer is untouched',
    );
  } finally {
    await worker.terminate();
  }
});

test('alignedBuffers gives as many buffers as asked, of the size asked', () => {
  const bufs = alignedBuffers(100_000, 5, true);
  assert.equal(bufs.length, 5);
  for (const b of bufs) {
    assert.equal(b.length, 100_000);
    assert.ok(b.buffer instanceof SharedArrayBuffer);
  }
});

// 1.5 GB of address space: Node runs, V8 cannot reserve a wasm memory's guard regions; 12 GB:
// one could be had, and a hashing worker started after it would find no room for its code
for (const limitKb of [1_500_000, 12_000_000]) {
  test(`under a virtual-memory limit (ulimit -v ${limitKb}) copies and indexes come out right`, () => {
    const dir = mkdtempSync(join(tmpdir(), 'blksync-vmlimit-'));
    try {
      const src = join(dir, 'src.img');
      const dst = join(dir, 'dst.img');
      const data = randomBytes(5 * 1024 * 1024 + 4096);
      writeFileSync(src, data);
      const old = Buffer.from(data);
      old.fill(0, 1024 * 1024, 3 * 1024 * 1024);
      writeFileSync(dst, old);
      const limited = (args: string[]): void => {
        const [file, argv] = cliCommand(args);
        const shell = `ulimit -v ${limitKb} && exec ${[file, ...argv].map(shellQuote).join(' ')}`;
        execFileSync('bash', ['-c', shell], { stdio: 'pipe' });
      };
      limited(['copy', '-q', src, dst]);
      assert.ok(readFileSync(dst).equals(data), 'DST equals SRC after the copy');
      // an index hashes on worker threads, in shared memory
      writeFileSync(dst, old);
      limited(['copy', '-q', '--index', join(dir, 'dst.idx'), src, dst]);
      assert.ok(readFileSync(dst).equals(data), 'DST equals SRC after the copy with --index');
      limited(['index', '-q', '-o', join(dir, 'src.idx'), src]);
      assert.ok(readFileSync(join(dir, 'src.idx')).length > 0);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}
