/**
 * A real nginx serving a directory on 127.0.0.1, started unprivileged-style: one process
 * (`master_process off`, `daemon off`), its pid, logs and temporary paths in a temp dir, so it
 * runs as whoever runs the tests without touching /var. The access log records every request
 * with the bytes nginx sent for it ($bytes_sent: headers, multipart boundaries and body).
 */

import { spawn, spawnSync } from 'node:child_process';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';

export const NGINX = ['/usr/sbin/nginx', '/usr/bin/nginx'].find(
  (p) => spawnSync(p, ['-v']).status === 0,
);

export interface LoggedRequest {
  request: string;
  status: number;
  bytesSent: number;
}

export interface Nginx {
  url: string;
  /** The requests logged so far. */
  log(): Promise<LoggedRequest[]>;
}

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

/** Serves `root` with nginx until the test ends. */
export async function startNginx(
  t: { after(fn: () => Promise<void>): void },
  root: string,
  work: string,
): Promise<Nginx> {
  if (NGINX === undefined) throw new Error('nginx is not installed');
  await mkdir(work, { recursive: true });
  const port = await freePort();
  const logPath = join(work, 'access.log');
  const conf = join(work, 'nginx.conf');
  await writeFile(
    conf,
    `daemon off;
master_process off;
pid ${join(work, 'nginx.pid')};
error_log ${join(work, 'error.log')} warn;
events { worker_connections 64; }
http {
  log_format counted '$status $bytes_sent "$request"';
  access_log ${logPath} counted;
  client_body_temp_path ${join(work, 'body')};
  proxy_temp_path ${join(work, 'proxy')};
  fastcgi_temp_path ${join(work, 'fastcgi')};
  uwsgi_temp_path ${join(work, 'uwsgi')};
  scgi_temp_path ${join(work, 'scgi')};
  server {
    listen 127.0.0.1:${port};
    root ${root};
  }
}
`,
  );
  const child = spawn(NGINX, ['-c', conf, '-p', work], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  t.after(async () => {
    if (child.exitCode === null) {
      child.kill('SIGTERM');
      await new Promise((resolve) => child.on('exit', resolve));
    }
  });
  // up when it answers
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; ; i++) {
    if (child.exitCode !== null) throw new Error(`nginx exited: ${stderr}`);
    const ok = await fetch(`${url}/`).then(
      () => true,
      () => false,
    );
    if (ok) break;
    if (i > 200) throw new Error(`nginx did not start: ${stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  return {
    url,
    log: async () => {
      const text = await readFile(logPath, 'utf8').catch(() => '');
      // the first line is the readiness probe above
      return text
        .split('\n')
        .filter((l) => l !== '')
        .slice(1)
        .map((l) => {
          const m = /^(\d+) (\d+) "(.*)"$/.exec(l)!;
          return { status: Number(m[1]), bytesSent: Number(m[2]), request: m[3]! };
        });
    },
  };
}
