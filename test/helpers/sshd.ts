/**
 * A private OpenSSH server on 127.0.0.1 for remote-copy tests: its own host key, user key,
 * authorized_keys and configs in a temp directory, on a free port, stopped (and the
 * directory removed) after the tests. Clients reach it with `ssh -F <config> blksync-test`.
 */

import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir, userInfo } from 'node:os';
import { join } from 'node:path';
import { after, before, type TestContext } from 'node:test';
import { promisify } from 'node:util';
import { IS_ROOT, need } from './resources.js';

const run = promisify(execFile);
export const SSHD = '/usr/sbin/sshd';
/** The Host name the client config defines. */
export const TEST_HOST = 'blksync-test';
/** A Host the client config points at a port nothing listens on (ssh fails, status 255). */
export const UNREACHABLE_HOST = 'blksync-unreachable';

export interface Sshd {
  /** ssh command to pass as --ssh. */
  ssh: string;
  /** The client config file. */
  config: string;
  host: string;
  /** A host that refuses connections, for failure tests. */
  unreachable: string;
  port: number;
  dir: string;
  stop(): Promise<void>;
}

/** Whether sshd is there; as root it is installed when missing (as .ci/run does). */
export async function sshdAvailable(): Promise<boolean> {
  if (existsSync(SSHD)) return true;
  if (!IS_ROOT) return false;
  await run('apt-get', ['install', '-y', '-qq', 'openssh-server'], {
    env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
  }).catch(() => undefined);
  return existsSync(SSHD);
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr !== null ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

/** How long sshd may take to say it listens. */
const LISTEN_TIMEOUT_MS = 20_000;

/**
 * Waits for sshd to say it listens on `port`. The port was free a moment before sshd started,
 * but test files run concurrently and another one may have bound it since: then this sshd
 * exits, and a connection to the port would reach the other's server, so only sshd's own
 * word counts.
 */
function listening(child: ChildProcess, port: number, log: () => string): Promise<void> {
  return new Promise((resolve, reject) => {
    const done = (err?: Error): void => {
      clearTimeout(timer);
      child.stderr?.off('data', onData);
      child.off('exit', onExit);
      if (err === undefined) resolve();
      else reject(err);
    };
    const onData = (): void => {
      if (log().includes(`Server listening on 127.0.0.1 port ${port}.`)) done();
    };
    const onExit = (code: number | null): void =>
      done(new Error(`sshd exited (${code}): ${log()}`));
    const timer = setTimeout(
      () => done(new Error(`sshd did not listen on ${port}: ${log()}`)),
      LISTEN_TIMEOUT_MS,
    );
    child.stderr?.on('data', onData);
    child.once('exit', onExit);
  });
}

/**
 * Starts the server; the caller stops it (after()). A port taken by another test process
 * between being picked and being bound costs a retry on another port.
 */
export async function startSshd(): Promise<Sshd> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startOnce();
    } catch (err) {
      if (attempt >= 3) throw err;
    }
  }
}

async function startOnce(): Promise<Sshd> {
  const dir = await mkdtemp(join(tmpdir(), 'blksync-sshd-'));
  const hostKey = join(dir, 'host_ed25519');
  const userKey = join(dir, 'user_ed25519');
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', hostKey]);
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', userKey]);
  await writeFile(join(dir, 'authorized_keys'), await readFile(`${userKey}.pub`));
  const port = await freePort();
  // free a moment ago and not listened on by anyone here: connections are refused
  const closedPort = await freePort();
  const user = userInfo().username;
  await writeFile(
    join(dir, 'sshd_config'),
    [
      `Port ${port}`,
      'ListenAddress 127.0.0.1',
      `HostKey ${hostKey}`,
      `AuthorizedKeysFile ${join(dir, 'authorized_keys')}`,
      `PidFile ${join(dir, 'sshd.pid')}`,
      'UsePAM no',
      'StrictModes no',
      'PasswordAuthentication no',
      'KbdInteractiveAuthentication no',
      'PubkeyAuthentication yes',
      'PermitRootLogin yes',
      `AllowUsers ${user}`,
      // tests point the agent's cache (--index auto) into their temp dir: ssh -o SetEnv=...
      'AcceptEnv XDG_CACHE_HOME',
      // sessions start in a home of their own: the login shell does not run the machine's
      // ~/.bashrc (a slow one cost ~0.1 s of CPU per session), nor write to the user's home
      `SetEnv HOME=${dir}`,
      // a fan-out opens one session per host:path destination at once (up to 16): the
      // default (10 unauthenticated, then random drops) refused some of them
      'MaxStartups 64',
      // INFO: the "Server listening on" line tells when it is ready
      'LogLevel INFO',
      '',
    ].join('\n'),
  );
  const hostPub = (await readFile(`${hostKey}.pub`, 'utf8')).trim();
  await writeFile(join(dir, 'known_hosts'), `[127.0.0.1]:${port} ${hostPub}\n`);
  const config = join(dir, 'ssh_config');
  await writeFile(
    config,
    [
      `Host ${TEST_HOST}`,
      '  HostName 127.0.0.1',
      `  Port ${port}`,
      `  User ${user}`,
      `  IdentityFile ${userKey}`,
      '  IdentitiesOnly yes',
      `  UserKnownHostsFile ${join(dir, 'known_hosts')}`,
      '  StrictHostKeyChecking yes',
      '  BatchMode yes',
      '  LogLevel ERROR',
      // the default post-quantum key exchange costs the client ~50 ms of CPU per session
      // (hundreds of sessions in the suite); the keys are throwaway and the link is loopback
      '  KexAlgorithms curve25519-sha256',
      `Host ${UNREACHABLE_HOST}`,
      '  HostName 127.0.0.1',
      `  Port ${closedPort}`,
      '  BatchMode yes',
      '  ConnectTimeout 5',
      '',
    ].join('\n'),
  );
  // the privilege separation directory sshd insists on
  await mkdir('/run/sshd', { recursive: true, mode: 0o755 }).catch(() => {});
  const child = spawn(SSHD, ['-D', '-e', '-f', join(dir, 'sshd_config')], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let log = '';
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (log = (log + d).slice(-4000)));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  try {
    await listening(child, port, () => log);
  } catch (err) {
    child.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
  return {
    ssh: `ssh -F ${config}`,
    config,
    host: TEST_HOST,
    unreachable: UNREACHABLE_HOST,
    port,
    dir,
    stop: async () => {
      if (child.exitCode === null) child.kill('SIGTERM');
      await exited;
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/**
 * For a describe block (or a file's top level): one sshd for its tests, started before them
 * and stopped after. Returns what a test calls to get the server; without sshd that skips
 * the test (a failure under BLKSYNC_TEST_STRICT) and returns undefined.
 */
export function sharedSshd(): (t: TestContext) => Sshd | undefined {
  let sshd: Sshd | undefined;
  let available = false;
  before(async () => {
    available = await sshdAvailable();
    if (available) sshd = await startSshd();
  });
  after(async () => {
    await sshd?.stop();
  });
  return (t) =>
    need(
      t,
      available && sshd !== undefined,
      'sshd is not installed (apt-get install openssh-server)',
    )
      ? sshd
      : undefined;
}
