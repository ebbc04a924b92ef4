/** src/formats/bmap.ts and bmap-write.ts: bmaptool's fixtures, hostile files, exact output. */

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';
import { BlksyncError } from '../src/errors.js';
import { bmapPlan, mappedBytes, parseBmap } from '../src/formats/bmap.js';
import { humanSize, pyFixed1, serializeBmap } from '../src/formats/bmap-write.js';

const FIXTURES = fileURLToPath(new URL('./fixtures/bmaptool-compat/', import.meta.url));
const VERSIONS = ['1.2', '1.3', '1.4', '2.0'];

function fixture(version: string): Buffer {
  return readFileSync(`${FIXTURES}test.image.bmap.v${version}`);
}

function rejects(bytes: Buffer | string, code: string, pattern?: RegExp): void {
  assert.throws(
    () => parseBmap(Buffer.from(bytes)),
    (err: unknown) => {
      assert.ok(err instanceof BlksyncError, String(err));
      assert.equal(err.code, code, err.message);
      if (pattern) assert.match(err.message, pattern);
      return true;
    },
  );
}

/** A small valid 2.0 bmap made by the writer. */
function validBmap(): string {
  return serializeBmap({
    imageSize: 10_000,
    blockSize: 4096,
    checksumType: 'sha256',
    ranges: [
      { first: 0, last: 0 },
      { first: 2, last: 2 },
    ],
  });
}

/** Replaces the self-checksum so that an edited bmap passes it again. */
function resign(text: string): string {
  const zeroed = text.replace(/<BmapFileChecksum> \w+ </, `<BmapFileChecksum> ${'0'.repeat(64)} <`);
  const sum = createHash('sha256').update(zeroed).digest('hex');
  return zeroed.replace('0'.repeat(64), sum);
}

describe('bmap parsing', () => {
  const image = gunzipSync(readFileSync(`${FIXTURES}test.image.gz`));

  for (const v of VERSIONS) {
    it(`reads bmaptool's ${v} fixture and its range checksums match the image`, () => {
      const bmap = parseBmap(fixture(v), { path: `v${v}` });
      assert.equal(bmap.version, v);
      assert.equal(bmap.imageSize, 821752);
      assert.equal(bmap.blockSize, 4096);
      assert.equal(bmap.blocksCount, 201);
      assert.equal(bmap.mappedBlocksCount, 117);
      assert.equal(bmap.ranges.length, 48);
      assert.equal(bmap.checksumType, v < '1.4' ? 'sha1' : 'sha256');
      const plan = bmapPlan(bmap);
      assert.equal(mappedBytes(bmap), 117 * 4096);
      bmap.ranges.forEach((r, i) => {
        const p = plan.ranges[i]!;
        const digest = createHash(bmap.checksumType!).update(image.subarray(p.start, p.end));
        assert.equal(digest.digest('hex'), r.checksum, `range ${r.first}-${r.last}`);
      });
    });
  }

  it('verifies the self-checksum (one changed byte in a comment is caught)', () => {
    for (const v of ['1.3', '2.0']) {
      const bytes = Buffer.from(fixture(v));
      const at = bytes.indexOf('useful');
      bytes[at] = 0x55;
      rejects(bytes, 'EBMAP_CHECKSUM', /checksum does not match/);
    }
  });

  it('refuses entities: billion laughs and XXE', () => {
    const laughs =
      '<?xml version="1.0"?><!DOCTYPE bmap [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>' +
      '<bmap version="1.2"><ImageSize>&lol2;</ImageSize></bmap>';
    rejects(laughs, 'EBMAP_FORMAT', /DOCTYPE/);
    const xxe =
      '<?xml version="1.0"?><!DOCTYPE bmap [<!ENTITY x SYSTEM "file:///etc/passwd">]><bmap version="1.2">&x;</bmap>';
    rejects(xxe, 'EBMAP_FORMAT');
    rejects('<bmap version="1.2"><ImageSize>&x;</ImageSize></bmap>', 'EBMAP_FORMAT', /XML/);
  });

  it('refuses ranges past the image, overlapping or unsorted ones, absurd block sizes', () => {
    const base = validBmap();
    const edit = (from: string, to: string): string => resign(base.replace(from, to));
    rejects(edit('> 2 </Range>', '> 3 </Range>'), 'EBMAP_FORMAT', /passes the image's end/);
    rejects(edit('> 2 </Range>', '> 0 </Range>'), 'EBMAP_FORMAT', /overlaps/);
    rejects(edit('> 0 </Range>', '> 2 </Range>'), 'EBMAP_FORMAT', /overlaps/);
    rejects(edit('> 2 </Range>', '> 2-1 </Range>'), 'EBMAP_FORMAT', /ends before/);
    rejects(edit('> 2 </Range>', '> x </Range>'), 'EBMAP_FORMAT', /not "first-last"/);
    rejects(edit('<BlockSize> 4096 ', '<BlockSize> 3 '), 'EBMAP_FORMAT', /block size/);
    rejects(edit('<BlockSize> 4096 ', '<BlockSize> 4294967296 '), 'EBMAP_FORMAT', /block size/);
    rejects(edit('<BlocksCount> 3 ', '<BlocksCount> 99999999999 '), 'EBMAP_FORMAT', /inconsistent/);
    rejects(
      edit('<MappedBlocksCount> 2 ', '<MappedBlocksCount> 3 '),
      'EBMAP_FORMAT',
      /ranges hold/,
    );
    rejects(edit('version="2.0"', 'version="3.0"'), 'EBMAP_FORMAT', /not supported/);
    rejects(edit('sha256 </ChecksumType>', 'whirlpool </ChecksumType>'), 'EBMAP_FORMAT');
    rejects(
      edit('<ImageSize> 10000 ', `<ImageSize> ${'9'.repeat(2000)} `),
      'EBMAP_FORMAT',
      /too long/,
    );
    rejects(base.replace('<BlockMap>', '<BlockMap><Range>1</Range>'), 'EBMAP_CHECKSUM');
    rejects('not xml at all', 'EBMAP_FORMAT');
    rejects('<other/>', 'EBMAP_FORMAT', /root element/);
  });

  it('accepts a valid file and maps the short last block to the image end', () => {
    const bmap = parseBmap(Buffer.from(validBmap()));
    assert.deepEqual(bmapPlan(bmap).ranges, [
      { start: 0, end: 4096 },
      { start: 8192, end: 10_000 },
    ]);
  });
});

describe('bmap writing', () => {
  it("formats numbers as Python's %.1f (ties to even) and human_size", () => {
    assert.equal(pyFixed1(1.25), '1.2');
    assert.equal(pyFixed1(0.75), '0.8');
    assert.equal(pyFixed1(9.96), '10.0');
    assert.equal(pyFixed1(58.2089552238806), '58.2');
    assert.equal(humanSize(1), '1 byte');
    assert.equal(humanSize(511), '511 bytes');
    assert.equal(humanSize(1280), '1.2 KiB');
    assert.equal(humanSize(821752), '802.5 KiB');
    assert.equal(humanSize(2 ** 31), '2.0 GiB');
  });

  it('round-trips: what it writes parses to the same ranges and checksums', () => {
    const fx = parseBmap(fixture('2.0'));
    const text = serializeBmap({
      imageSize: fx.imageSize,
      blockSize: fx.blockSize,
      checksumType: 'sha256',
      ranges: fx.ranges,
    });
    const again = parseBmap(Buffer.from(text));
    assert.deepEqual(again.ranges, fx.ranges);
    assert.equal(again.mappedBlocksCount, 117);
    // bmaptool 3.6 pads MappedBlocksCount by BlocksCount's width; the fixture predates that
    assert.match(text, /<MappedBlocksCount> 117 <\/MappedBlocksCount>/);
    assert.match(text, /Count of mapped blocks: 468\.0 KiB or 58\.2% {4}-->/);
  });
});
