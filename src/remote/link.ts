/**
 * The local end of a remote copy: starts the agent over ssh, speaks the protocol with it and
 * counts the bytes that cross the ssh channel. Requests are pipelined: every HASH_REQ and
 * DATA_REQ goes out at once and its reply is matched by order (the agent answers in order),
 * so many chunks are refined concurrently and no step waits a round trip per block.
 *
 * The agent is not trusted. Every frame it sends must answer something this end is waiting
 * for, within the window it opened; anything else is EREMOTE_PROTOCOL at once, so memory
 * stays bounded whatever the peer sends:
 *
 *   READY       while the handshake waits for it (validated, messages.ts)
 *   TOP_HASHES  only the stream HELLO asked for and READY announced: in order, of the unit
 *               asked, inside the image, at most TOP_WINDOW_UNITS ahead of the copy
 *   HASHES      the oldest HASH_REQ, exactly (offset, unit, count)
 *   DATA        the oldest DATA_REQ, next in order, not empty, not past its end
 *   WRITTEN     one per DATA frame sent, counting up to the bytes sent
 *   PROGRESS    only from a --direct source agent (validated)
 *   READ_BACK   only with --verify, after DONE, no more records than segments written
 *   SUMMARY     once, after DONE (validated)
 *   KEEPALIVE   any time: the agent is alive
 *   ERROR       any time (validated): the agent's failure
 *
 * Silence is bounded too: while something is outstanding, `timeout` seconds with nothing
 * received end the session with ETIMEOUT (the agent sends KEEPALIVE while it works).
 */

import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { createHash } from 'node:crypto';
import { BlksyncError, type ErrorCode } from '../errors.js';
import type { Progress } from '../types.js';
import { compareWritten, WrittenDigests, type WrittenDigest } from '../engine/written-log.js';
import { formatBytes } from '../size.js';
import { timeoutMs } from '../limits.js';
import { relayTrace, trace, TRACE_PREFIX, traceOnce, tracing } from '../trace.js';
import { BOOTSTRAP, EXIT_NODE_TOO_OLD } from './bootstrap.js';
import { Compressor, decode } from './compress.js';
import {
  dataHeader,
  frame,
  FrameDecoder,
  FrameType,
  helloFrame,
  MAX_DATA_BYTES,
  parseReadBack,
  rangeHeader,
  readU64,
  WIRE_HASH_BYTES,
  type Frame,
  type Hello,
  type Ready,
  type Summary,
  ProtocolError,
} from './protocol.js';
import { parseProgress, parseReady, parseSummary, parseWireError } from './messages.js';
import { TOP_WINDOW_UNITS, TopStream, type Deferred } from './top-stream.js';
import { shellQuote, splitCommand, type RemoteSpec } from './spec.js';

/** How blksync reaches a remote: the ssh command, the remote node, sudo. */
export interface RemoteOptions {
  /** The ssh command line, split as a shell would (like rsync -e); default `ssh`. */
  ssh?: string;
  /** The node binary on the remote; default `node` (from the remote PATH). */
  remoteNode?: string;
  /** Run the agent with `sudo -n` (no password prompt). */
  sudo?: boolean;
  /**
   * Seconds with nothing received from the agent while a reply is awaited before the session
   * ends with ETIMEOUT (not the total time: a slow but live agent sends KEEPALIVE). Default
   * DEFAULT_TIMEOUT_S (limits.ts).
   */
  timeout?: number;
}

/** The agent is asked for a KEEPALIVE this often, as a fraction of the timeout. */
const KEEPALIVE_PER_TIMEOUT = 4;

/** Bytes of ssh's stderr kept for error messages. */
const STDERR_KEEP_BYTES = 4096;
/** How long close() waits for ssh to exit before killing it. */
const CLOSE_TIMEOUT_MS = 5000;

type Pending =
  | ({ kind: 'hashes'; offset: number; unit: number; count: number } & Deferred<Buffer>)
  | ({ kind: 'data'; next: number; end: number; into: Buffer; at: number } & Deferred<void>);

/** The remote command ssh runs: the bootstrap under the chosen node, maybe with sudo. */
export function remoteCommand(options: RemoteOptions): string {
  const node = shellQuote(options.remoteNode ?? 'node');
  return `exec ${options.sudo === true ? 'sudo -n ' : ''}${node} -e ${shellQuote(BOOTSTRAP)}`;
}

/** ssh started by AgentLink.start, before its HELLO. */
export interface StartedAgent {
  /** Sends the agent and `hello`; resolves with the link once the agent is READY. */
  open(hello: Hello, payload: Buffer): Promise<AgentLink>;
  /** Ends ssh unused (the caller failed before it had a HELLO to send). */
  abort(): Promise<void>;
}

export class AgentLink {
  readonly #spec: RemoteSpec;
  readonly #options: RemoteOptions;
  readonly #child: ChildProcessWithoutNullStreams;
  readonly #decoder = new FrameDecoder();
  #hello!: Hello;
  readonly #pending: Pending[] = [];
  #top: TopStream | undefined;
  readonly #digest = createHash('sha256');
  readonly #exited: Promise<void>;
  #compressor = new Compressor(false);
  #ready: Deferred<Ready> | undefined;
  #summary: Deferred<Summary> | undefined;
  #error: BlksyncError | undefined;
  #stderr = '';
  /** A line of ssh's stderr not yet ended (trace lines are taken out of it). */
  #stderrLine = '';
  #readyInfo: Ready | undefined;
  #exitCode: number | null = null;
  #exitSignal: NodeJS.Signals | null = null;
  /** --verify: digests of the DATA sent, and the agent's READ_BACK of what it wrote. */
  #sent: WrittenDigests | undefined;
  #readBack: WrittenDigest[] = [];
  /** READ_BACK records the agent may still send (set at DONE). */
  #readBackLeft = 0;
  /** DATA frames sent and not yet confirmed by a WRITTEN. */
  #writtenDue = 0;
  readonly #timeoutMs: number;
  #lastHeard = performance.now();
  #idleTimer: NodeJS.Timeout | undefined;
  /** --verify: what the agent read back and finish() found equal to what was sent. */
  verified: { bytesVerified: number; ranges: number; direct: boolean; seconds: number } | undefined;
  /** Bytes written to ssh's stdin and read from its stdout. */
  bytesSent = 0;
  bytesReceived = 0;
  /** Bytes the agent confirmed written (push). */
  bytesConfirmed = 0;
  /** Raw bytes of DATA sent (push) or received (pull). */
  dataBytes = 0;
  /** Called with each PROGRESS frame (an agent running a direct copy sends them). */
  onProgress: ((p: Progress) => void) | undefined;

  private constructor(spec: RemoteSpec, options: RemoteOptions) {
    this.#spec = spec;
    this.#options = options;
    this.#timeoutMs = timeoutMs(options.timeout);
    const argv = splitCommand(options.ssh ?? 'ssh');
    const [cmd, ...args] = argv;
    if (cmd === undefined) throw new BlksyncError('EUSAGE', '--ssh: empty command');
    this.#child = spawn(cmd, [...args, spec.destination, remoteCommand(options)], {
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    this.#exited = new Promise((resolve) => {
      this.#child.on('close', (code, signal) => {
        this.#exitCode = code;
        this.#exitSignal = signal;
        // an unfinished last line (no newline) is part of ssh's message too
        this.#stderr = (this.#stderr + this.#stderrLine).slice(-STDERR_KEEP_BYTES);
        this.#stderrLine = '';
        this.#fail(this.#exitError());
        resolve();
      });
    });
    this.#child.on('error', (err) => {
      this.#fail(
        new BlksyncError('ESSH', `cannot run ssh (${cmd}): ${err.message}; check --ssh`, {
          cause: err,
        }),
      );
    });
    this.#child.stdin.on('error', () => {});
    trace(`ssh spawned (${spec.destination})`);
    this.#child.stderr.setEncoding('utf8').on('data', (d: string) => this.#onStderr(d));
    this.#idleTimer = setInterval(
      () => this.#checkIdle(),
      Math.max(20, Math.min(1000, this.#timeoutMs / 4)),
    );
    this.#idleTimer.unref();
    this.#child.stdout.on('data', (d: Buffer) => {
      this.bytesReceived += d.length;
      this.#lastHeard = performance.now();
      if (this.#error !== undefined) return;
      let frames: Frame[];
      try {
        frames = this.#decoder.push(d);
      } catch (err) {
        this.#protocolError(String(err));
        return;
      }
      for (const f of frames) {
        if (this.#error !== undefined) return;
        this.#onFrame(f);
      }
    });
  }

  /**
   * Starts the agent on `spec` and completes the handshake. `payload` is the agent bundle as
   * agent-payload.ts makes it (an agent starting another one for --direct sends its own).
   */
  static async open(
    spec: RemoteSpec,
    options: RemoteOptions,
    hello: Hello,
    payload: Buffer,
  ): Promise<AgentLink> {
    return AgentLink.start(spec, options).open(hello, payload);
  }

  /**
   * Starts ssh to `spec` now, its HELLO to follow (`open`): the login (the longest step of a
   * short run) overlaps what the caller does before it knows the HELLO. `abort` ends it unused.
   */
  static start(spec: RemoteSpec, options: RemoteOptions): StartedAgent {
    if (spec.destination.startsWith('-')) {
      throw new BlksyncError('EUSAGE', `invalid remote host "${spec.destination}"`);
    }
    // EUSAGE for a bad --timeout, before ssh starts (the constructor takes it too)
    timeoutMs(options.timeout);
    const link = new AgentLink(spec, options);
    return {
      open: (hello, payload) => link.#handshake(hello, payload),
      abort: async () => {
        clearInterval(link.#idleTimer);
        link.#child.kill('SIGTERM');
        await link.#exited;
      },
    };
  }

  /** Sends the agent and the HELLO, and waits for READY. */
  async #handshake(hello: Hello, payload: Buffer): Promise<AgentLink> {
    hello = { ...hello, keepalive: this.#timeoutMs / 1000 / KEEPALIVE_PER_TIMEOUT };
    this.#hello = hello;
    if (hello.verify === true) this.#sent = new WrittenDigests();
    try {
      // ssh may have ended while the caller got the HELLO ready
      if (this.#error !== undefined) throw this.#error;
      const ready = new Promise<Ready>((resolve, reject) => {
        this.#ready = { resolve, reject };
      });
      // the agent code and the HELLO go out together: no round trip before the handshake
      this.#write(
        Buffer.concat([payload, helloFrame(tracing() ? { ...hello, trace: true } : hello)]),
      );
      this.#readyInfo = await ready;
      trace(`READY from ${this.#spec.destination} (agent started, ${hello.role} opened)`);
      this.#compressor = new Compressor(this.#readyInfo.encoding !== '');
      return this;
    } catch (err) {
      await this.close();
      throw err;
    }
  }

  get ready(): Ready {
    return this.#readyInfo!;
  }

  /** `host:path` for messages. */
  get name(): string {
    return `${this.#spec.destination}:${this.#spec.path}`;
  }

  /** The agent's TOP_HASHES entry for the unit at `offset`. */
  topHash(offset: number): Promise<Buffer> {
    if (this.#error !== undefined) return Promise.reject(this.#error);
    if (this.#top === undefined) return Promise.reject(new Error('no TOP_HASHES were asked for'));
    return this.#top.get(offset);
  }

  /** Hashes of each `unit` of the remote range [offset, offset + length). */
  hashes(offset: number, length: number, unit: number): Promise<Buffer> {
    if (this.#error !== undefined) return Promise.reject(this.#error);
    return new Promise((resolve, reject) => {
      this.#pending.push({
        kind: 'hashes',
        offset,
        unit,
        count: Math.ceil(length / unit),
        resolve,
        reject,
      });
      this.#write(frame(FrameType.HASH_REQ, rangeHeader(offset, length, unit)));
    });
  }

  /** Reads the remote range [offset, offset + length) into `into` at `at` (pull). */
  fetch(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    if (this.#error !== undefined) return Promise.reject(this.#error);
    return new Promise((resolve, reject) => {
      this.#pending.push({
        kind: 'data',
        next: offset,
        end: offset + length,
        into,
        at,
        resolve,
        reject,
      });
      this.#write(frame(FrameType.DATA_REQ, rangeHeader(offset, length)));
    });
  }

  /** Sends `raw` to be written at `offset` (push); resolves once ssh has taken it. */
  async sendData(raw: Buffer, offset: number): Promise<void> {
    for (let s = 0; s < raw.length; s += MAX_DATA_BYTES) {
      const piece = raw.subarray(s, Math.min(s + MAX_DATA_BYTES, raw.length));
      const [encoding, body] = await this.#compressor.encode(piece);
      if (this.#error !== undefined) throw this.#error;
      const head = dataHeader(offset + s, piece.length, encoding);
      this.#digest.update(head.subarray(0, 12)).update(piece);
      this.#sent?.add(offset + s, piece);
      this.dataBytes += piece.length;
      this.#writtenDue++;
      if (!this.#write(frame(FrameType.DATA, head, body))) await this.#drained();
    }
  }

  /**
   * Sends DONE, waits for the agent's SUMMARY and checks its digest against ours; with
   * --verify, also the digests of what it read back against those of what was sent (EVERIFY).
   */
  async finish(): Promise<Summary> {
    if (this.#error !== undefined) throw this.#error;
    const summary = new Promise<Summary>((resolve, reject) => {
      this.#summary = { resolve, reject };
    });
    this.#readBackLeft = this.#sent?.digests().length ?? 0;
    this.#write(frame(FrameType.DONE));
    trace('DONE sent');
    const s = await summary;
    trace('SUMMARY received');
    const mine = this.#digest.digest('hex');
    if (s.digest !== mine || s.bytes !== this.dataBytes) {
      throw new BlksyncError(
        'EVERIFY',
        `${this.name}: the data written (${s.bytes} bytes, sha256 ${s.digest.slice(0, 16)}) does not match ` +
          `the data sent (${this.dataBytes} bytes, sha256 ${mine.slice(0, 16)}); rerun the command`,
      );
    }
    if (this.#sent !== undefined) {
      if (s.verify === undefined) {
        throw new BlksyncError('EREMOTE_PROTOCOL', `${this.name}: SUMMARY lacks the read-back`);
      }
      const r = compareWritten(this.#sent.digests(), this.#readBack, this.name, s.verify.direct);
      this.verified = { ...r, direct: s.verify.direct, seconds: s.verify.seconds };
    }
    return s;
  }

  /** Ends the session: closes ssh's stdin and waits for it to exit (killing it if it hangs). */
  async close(): Promise<void> {
    clearInterval(this.#idleTimer);
    this.#child.stdin.end();
    const timer = setTimeout(() => this.#child.kill('SIGTERM'), CLOSE_TIMEOUT_MS);
    await this.#exited;
    clearTimeout(timer);
    traceOnce(`ssh exited (${this.#spec.destination})`);
  }

  /**
   * ssh's stderr: kept (the tail) for error messages, except an agent's trace lines, which
   * go on this end's timeline.
   */
  #onStderr(d: string): void {
    // only an agent asked for a trace writes trace lines
    if (!tracing()) {
      this.#stderr = (this.#stderr + d).slice(-STDERR_KEEP_BYTES);
      return;
    }
    const lines = (this.#stderrLine + d).split('\n');
    this.#stderrLine = lines.pop() ?? '';
    for (const l of lines) {
      if (l.startsWith(`${TRACE_PREFIX} `)) relayTrace(l);
      else this.#stderr = (this.#stderr + l + '\n').slice(-STDERR_KEEP_BYTES);
    }
  }

  #write(buf: Buffer): boolean {
    this.bytesSent += buf.length;
    return this.#child.stdin.write(buf);
  }

  #drained(): Promise<void> {
    return new Promise((resolve, reject) => {
      const done = (): void => {
        this.#child.stdin.off('drain', done);
        this.#child.off('close', done);
        if (this.#error !== undefined) reject(this.#error);
        else resolve();
      };
      this.#child.stdin.on('drain', done);
      this.#child.on('close', done);
    });
  }

  #onFrame(f: Frame): void {
    try {
      this.#take(f);
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw err;
      this.#protocolError(err.message);
    }
  }

  /** Takes one frame from the agent; throws ProtocolError for anything not awaited. */
  #take(f: Frame): void {
    const p = f.payload;
    switch (f.type) {
      case FrameType.READY: {
        const r = this.#ready;
        if (r === undefined) throw new ProtocolError('unexpected READY');
        const h = this.#hello;
        const ready = parseReady(p, {
          role: h.role,
          size: h.size,
          encodings: h.encodings,
          identity: h.identity,
          direct: h.direct,
          index: h.index,
          sourceIndex: h.sourceIndex,
        });
        this.#ready = undefined;
        // frames after READY in the same read are taken before open() resumes
        this.#readyInfo = ready;
        if (h.topUnit > 0) {
          // the stream HELLO asked for, over the image: a target's size as sent, a source's
          // as READY says
          const limit = h.role === 'target' ? h.size! : ready.size;
          this.#top = new TopStream(h.topUnit, limit, TOP_WINDOW_UNITS);
        }
        r.resolve(ready);
        return;
      }
      case FrameType.ERROR: {
        const e = parseWireError(p);
        const where = this.#spec.destination;
        this.#fail(
          new BlksyncError(e.code as ErrorCode, `${where}: ${e.message}`, {
            ...(e.path !== undefined ? { path: `${where}:${e.path}` } : {}),
          }),
        );
        return;
      }
      case FrameType.KEEPALIVE:
        if (p.length !== 0) throw new ProtocolError('bad KEEPALIVE');
        return;
      case FrameType.TOP_HASHES:
      case FrameType.HASHES: {
        if (this.#readyInfo === undefined) throw new ProtocolError('hashes before READY');
        if (p.length < 12 || (p.length - 12) % WIRE_HASH_BYTES !== 0) {
          throw new ProtocolError('bad hashes frame');
        }
        const offset = readU64(p, 0);
        const unit = p.readUInt32BE(8);
        const hashes = p.subarray(12);
        const count = hashes.length / WIRE_HASH_BYTES;
        if (offset === undefined) throw new ProtocolError('bad hashes offset');
        if (f.type === FrameType.TOP_HASHES) {
          if (this.#top === undefined) throw new ProtocolError('TOP_HASHES not asked for');
          const wrong = this.#top.accept(offset, unit, hashes);
          if (wrong !== undefined) throw new ProtocolError(wrong);
          traceOnce('first TOP_HASHES received');
          if (this.#top.complete) trace('last TOP_HASHES received');
          return;
        }
        const head = this.#pending[0];
        if (
          head?.kind !== 'hashes' ||
          head.offset !== offset ||
          head.unit !== unit ||
          head.count !== count
        ) {
          throw new ProtocolError('HASHES does not answer the oldest request');
        }
        this.#pending.shift();
        head.resolve(hashes);
        return;
      }
      case FrameType.DATA: {
        const head = this.#pending[0];
        if (p.length < 13 || head?.kind !== 'data') throw new ProtocolError('unexpected DATA');
        const offset = readU64(p, 0);
        const rawLength = p.readUInt32BE(8);
        // an empty DATA is no progress: it would keep a request open for ever
        if (rawLength === 0 || rawLength > MAX_DATA_BYTES) {
          throw new ProtocolError(`DATA of ${rawLength} bytes`);
        }
        if (offset !== head.next || offset + rawLength > head.end) {
          throw new ProtocolError('DATA does not answer the oldest request');
        }
        const raw = decode(p[12]!, p.subarray(13), rawLength);
        if (raw === undefined) throw new ProtocolError('DATA does not decode');
        this.#digest.update(p.subarray(0, 12)).update(raw);
        this.dataBytes += rawLength;
        raw.copy(head.into, head.at);
        head.at += rawLength;
        head.next += rawLength;
        if (head.next === head.end) {
          this.#pending.shift();
          head.resolve();
        }
        return;
      }
      case FrameType.WRITTEN: {
        const n = p.length === 8 ? readU64(p, 0) : undefined;
        if (n === undefined || this.#writtenDue === 0) {
          throw new ProtocolError('WRITTEN for no DATA sent');
        }
        if (n < this.bytesConfirmed || n > this.dataBytes) {
          throw new ProtocolError(`WRITTEN ${n} bytes, ${this.dataBytes} sent`);
        }
        this.#writtenDue--;
        this.bytesConfirmed = n;
        return;
      }
      case FrameType.PROGRESS: {
        if (this.#hello.direct === undefined || this.#readyInfo === undefined) {
          throw new ProtocolError('PROGRESS not asked for');
        }
        this.onProgress?.(parseProgress(p));
        return;
      }
      case FrameType.READ_BACK: {
        const records = this.#summary !== undefined ? parseReadBack(p) : undefined;
        if (records === undefined || records.length > this.#readBackLeft) {
          throw new ProtocolError('unexpected READ_BACK');
        }
        this.#readBackLeft -= records.length;
        this.#readBack.push(...records);
        return;
      }
      case FrameType.SUMMARY: {
        const s = this.#summary;
        if (s === undefined) throw new ProtocolError('unexpected SUMMARY');
        const summary = parseSummary(p);
        this.#summary = undefined;
        s.resolve(summary);
        return;
      }
      default:
        throw new ProtocolError(`unknown frame type ${f.type}`);
    }
  }

  /** Something is awaited from the agent: the idle clock runs. */
  #outstanding(): boolean {
    return (
      this.#ready !== undefined ||
      this.#summary !== undefined ||
      this.#pending.length > 0 ||
      this.#writtenDue > 0 ||
      this.#top?.waiting === true
    );
  }

  #checkIdle(): void {
    if (this.#error !== undefined) return clearInterval(this.#idleTimer);
    if (!this.#outstanding()) {
      this.#lastHeard = performance.now();
      return;
    }
    if (performance.now() - this.#lastHeard < this.#timeoutMs) return;
    // this process may have been busy while bytes waited in the pipe: let them be read first
    setImmediate(() => {
      if (this.#error !== undefined || !this.#outstanding()) return;
      if (performance.now() - this.#lastHeard < this.#timeoutMs) return;
      const dest = this.#spec.destination;
      const waited = this.#ready !== undefined ? 'the agent to start' : 'its reply';
      this.#fail(
        new BlksyncError(
          'ETIMEOUT',
          `${dest}: nothing received for ${this.#timeoutMs / 1000} s while waiting for ${waited}; ` +
            `the agent or the link is stuck (give a larger --timeout if it is only slow)`,
        ),
      );
      this.#child.kill('SIGTERM');
    });
  }

  #protocolError(what: string): void {
    this.#fail(
      new BlksyncError('EREMOTE_PROTOCOL', `${this.#spec.destination}: protocol error: ${what}`),
    );
    this.#child.kill('SIGTERM');
  }

  /** The error for ssh having exited: before READY it explains why; after, the link dropped. */
  #exitError(): BlksyncError {
    const dest = this.#spec.destination;
    const lines = this.#stderr.trim().split('\n');
    const last = lines[lines.length - 1] ?? '';
    const said = last === '' ? '' : `: ${last}`;
    const status =
      this.#exitSignal !== null ? `signal ${this.#exitSignal}` : `status ${this.#exitCode}`;
    if (this.#readyInfo === undefined) {
      const node = this.#options.remoteNode ?? 'node';
      if (
        this.#exitCode === 127 ||
        (/(not found|No such file or directory)/.test(this.#stderr) && this.#stderr.includes(node))
      ) {
        return new BlksyncError(
          'ENODE_MISSING',
          `no node at "${node}" on ${dest}${said}; install Node.js >= 18 there, or name it with --remote-node PATH`,
        );
      }
      if (this.#exitCode === EXIT_NODE_TOO_OLD) {
        return new BlksyncError(
          'ENODE_TOO_OLD',
          `${dest}${said}; install a newer Node.js there, or name one with --remote-node PATH`,
        );
      }
      if (this.#options.sudo === true && /sudo:/.test(this.#stderr)) {
        return new BlksyncError(
          'EREMOTE',
          `sudo -n failed on ${dest}${said}; allow it without a password (NOPASSWD) or log in as root`,
        );
      }
      if (this.#exitCode === 255) {
        return new BlksyncError('ESSH', `ssh to ${dest} failed${said}; check the host and --ssh`);
      }
      return new BlksyncError(
        'EREMOTE',
        `the remote command on ${dest} ended (${status}) before the agent started${said}`,
      );
    }
    return new BlksyncError(
      'ECONNECTION_LOST',
      `connection to ${dest} lost (ssh ended with ${status}${said}) after ${formatBytes(this.bytesConfirmed)} confirmed written there`,
    );
  }

  #fail(err: BlksyncError): void {
    if (this.#error !== undefined) return;
    this.#error = err;
    clearInterval(this.#idleTimer);
    for (const p of this.#pending.splice(0)) p.reject(err);
    this.#top?.fail(err);
    this.#ready?.reject(err);
    this.#summary?.reject(err);
  }

  /** The error that ended the link, if any. */
  get error(): BlksyncError | undefined {
    return this.#error;
  }
}
