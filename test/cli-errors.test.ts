/**
 * Every error has the project's form (issue 12 §2): the first stderr line is
 * `blksync: message [CODE]`, usage errors (commander's own included) are `[EUSAGE]` with exit
 * status 2, contradictory options are refused; text from outside is printed with its control
 * characters escaped, so no ESC or BEL reaches the terminal (issue 13 item 4).
 */

import assert from 'node:assert/strict';
import { open, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { escapeControl } from '../src/cli/common.js';
import { createBmap } from '../src/engine/bmap-create.js';
import { absent } from './helpers/assert-error.js';
import { runCli } from './helpers/cli.js';
import { tempDir } from './helpers/tmp.js';

const MiB = 1024 * 1024;

const FIRST_LINE = /^blksync: [^\n]+ \[E[A-Z_]+\]$/;

function firstLine(stderr: string): string {
  return stderr.split('\n')[0] ?? '';
}

test("commander's own errors have the project's form: blksync: message [EUSAGE], exit 2", async () => {
  for (const args of [
    ['copy'], // missing argument
    ['copy', 'a'], // missing argument
    ['copy', '--bogus', 'a', 'b'], // unknown option
    ['compare', 'a', 'b', 'c'], // too many arguments (copy takes several destinations)
    ['frob'], // unknown command
    [], // no command
    ['bmap'], // no subcommand
    ['diff', 'a', 'b'], // a required option missing
    ['copy', '--ssh'], // an option without its value
    ['copy', '--jsn', 'a', 'b'], // a suggestion follows on commander's second line
  ]) {
    const r = await runCli(args);
    assert.equal(r.code, 2, `${args.join(' ')}: exit ${r.code}\n${r.stderr}`);
    const line = firstLine(r.stderr);
    assert.match(line, FIRST_LINE, `${args.join(' ')}: ${r.stderr}`);
    assert.match(line, /\[EUSAGE\]$/, args.join(' '));
    assert.doesNotMatch(line, /error: /, 'no commander prefix inside the message');
    assert.doesNotMatch(line, /\\x0a/, 'one line, no escaped newline');
  }
});

test('help and version still print and exit 0', async () => {
  const help = await runCli(['copy', '--help']);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /Usage: blksync copy/);
  const version = await runCli(['--version']);
  assert.equal(version.code, 0);
  assert.match(version.stdout, /^\d+\.\d+\.\d+/);
});

test('contradictory options are refused as EUSAGE, in either order, before anything is read', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  await writeFile(src, Buffer.alloc(4096, 1));
  const dst = join(dir, 'dst.img');
  for (const args of [
    ['--no-bmap', '--bmap', join(dir, 'x.bmap')],
    ['--bmap', join(dir, 'x.bmap'), '--no-bmap'],
    ['--index', join(dir, 'i'), '--src-index', join(dir, 's'), '--no-src-index'],
  ]) {
    const r = await runCli(['copy', ...args, src, dst]);
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.match(firstLine(r.stderr), /contradict each other.*\[EUSAGE\]$/, args.join(' '));
  }
});

test('a file name with ESC and BEL is printed escaped: nothing reaches the terminal', async (t) => {
  const dir = await tempDir(t);
  const hostile = join(dir, 'evil\x1b]0;pwned\x07\x1b[2J.img');
  const r = await runCli(['copy', hostile, join(dir, 'dst.img')]);
  assert.equal(r.code, 1);
  assert.ok(!r.stderr.includes('\x1b') && !r.stderr.includes('\x07'), 'no raw ESC or BEL');
  assert.match(firstLine(r.stderr), FIRST_LINE);
  assert.ok(r.stderr.includes('evil\\x1b]0;pwned\\x07\\x1b[2J.img'), r.stderr);
  // the stack (--debug) repeats the message: escaped too
  const debug = await runCli(['copy', '--debug', hostile, join(dir, 'dst.img')]);
  assert.ok(!debug.stderr.includes('\x1b') && !debug.stderr.includes('\x07'), 'no raw ESC or BEL');
  assert.match(debug.stderr, /\n\s+at /, 'the stack is there');
  // in JSON the string is escaped by JSON itself, and keeps the name exactly
  const j = await runCli(['copy', '--json', hostile, join(dir, 'dst.img')]);
  assert.ok(!j.stdout.includes('\x1b') && !j.stdout.includes('\x07'));
  const parsed = JSON.parse(j.stdout) as { error: { message: string } };
  assert.ok(parsed.error.message.includes(hostile));
});

test('no message tells a user to delete their image (an image given as --index by mistake)', async (t) => {
  const dir = await tempDir(t);
  const image = join(dir, 'disk.img');
  await writeFile(image, Buffer.alloc(64 * 1024, 7));
  const src = join(dir, 'src.img');
  await writeFile(src, Buffer.alloc(64 * 1024, 8));
  const r = await runCli(['copy', src, join(dir, 'dst.img'), '--index', image]);
  assert.equal(r.code, 1);
  assert.match(firstLine(r.stderr), /disk\.img is not a usable blksync index.*\[EINDEX_FORMAT\]$/);
  assert.doesNotMatch(r.stderr, /delete|remove it|\brm\b/i);
});

test('escapeControl keeps text and UTF-8, escapes C0, DEL and C1 (a newline too: one line)', () => {
  assert.equal(escapeControl('disk é.img'), 'disk é.img');
  assert.equal(escapeControl('a\x1b[31mb\x07c'), 'a\\x1b[31mb\\x07c');
  assert.equal(escapeControl('x\ny\tz\x7f\x9b'), 'x\\x0ay\\x09z\\x7f\\x9b');
});

test('index options without --index, or --trust-index with --rebuild-index, are EUSAGE', async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  await writeFile(src, Buffer.alloc(8192, 1));
  for (const args of [
    ['--trust-index'],
    ['--rebuild-index'],
    ['--verify-sample', '4'],
    ['--index', 'auto', '--trust-index', '--rebuild-index'],
  ]) {
    const r = await runCli(['copy', ...args, src, join(dir, 'dst.img')]);
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, /\[EUSAGE\]/);
    await absent(join(dir, 'dst.img'));
  }
});

test('a command that stops before it finished, without an error, exits 1 with EINTERNAL, never 0', async (t) => {
  // a stand-in for a bug: opening DST never settles, so the event loop runs empty mid-command
  const dir = await tempDir(t);
  const hang = join(dir, 'hang.cjs');
  await writeFile(
    hang,
    "const p = require('node:fs/promises'); const open = p.open;\n" +
      "p.open = (path, ...rest) => String(path).endsWith('dst.img') ? new Promise(() => {}) : open(path, ...rest);\n",
  );
  const src = join(dir, 'src.img');
  await writeFile(src, Buffer.alloc(65536, 7));
  const r = await runCli(['copy', '--json', src, join(dir, 'dst.img')], {
    env: { NODE_OPTIONS: `--require ${hang}` },
  });
  assert.equal(r.code, 1, r.stderr);
  assert.match(firstLine(r.stderr), /^blksync: internal error: .* \[EINTERNAL\]$/);
  assert.equal((JSON.parse(r.stdout) as { error: { code: string } }).error.code, 'EINTERNAL');
});

test("Ctrl-C in a step that checks the signal itself (a bmap's unmapped data): EINTERRUPTED, exit 130, not an internal error", async (t) => {
  const dir = await tempDir(t);
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  // mapped: the first MiB; SRC's unmapped area then gets 3 MiB of zeros that are data
  // (allocated), which the copy reads to check that they are zeros, 1 MiB at a time
  await writeFile(src, Buffer.alloc(MiB, 5));
  await truncate(src, 8 * MiB);
  await createBmap(src, { output: `${src}.bmap` });
  const fh = await open(src, 'r+');
  await fh.write(Buffer.alloc(3 * MiB), 0, 3 * MiB, 4 * MiB);
  await fh.close();
  // the stand-in for the user: SIGINT during the check's first read, seen at its next step
  const interrupt = join(dir, 'interrupt.cjs');
  await writeFile(
    interrupt,
    "const p = require('node:fs/promises'); const open = p.open; let sent = false;\n" +
      'p.open = async (path, ...rest) => {\n' +
      '  const fh = await open(path, ...rest);\n' +
      "  if (!String(path).endsWith('src.img')) return fh;\n" +
      '  const read = fh.read.bind(fh);\n' +
      '  fh.read = async (buf, off, len, pos) => {\n' +
      '    const r = await read(buf, off, len, pos);\n' +
      `    if (!sent && len === ${MiB} && pos >= ${4 * MiB}) {\n` +
      "      sent = true; process.kill(process.pid, 'SIGINT');\n" +
      '      await new Promise((resolve) => setTimeout(resolve, 100));\n' +
      '    }\n' +
      '    return r;\n' +
      '  };\n' +
      '  return fh;\n' +
      '};\n',
  );
  const r = await runCli(['copy', '--json', src, dst], {
    env: { NODE_OPTIONS: `--require ${interrupt}` },
  });
  assert.equal(r.code, 130, r.stderr);
  assert.match(firstLine(r.stderr), /^blksync: interrupted.* \[EINTERRUPTED\]$/);
  assert.doesNotMatch(r.stderr, /internal error/);
  assert.equal((JSON.parse(r.stdout) as { error: { code: string } }).error.code, 'EINTERRUPTED');
  await absent(dst);
});
