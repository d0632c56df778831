// The classic Node clustering demo, with no cluster code in it.
//
//   node examples/node/app.js                    one process on :3000 (PORT, HOST)
//   herd run -i max examples/node/app.js         one worker per core, all on :3000
//
// Under herd this file runs as a Node cluster worker: server.listen() asks herd for the
// port over Node's cluster IPC channel, so every worker serves the same port unchanged.
//
//   GET /            spins the CPU for WORK_MS ms (default 0), then answers with its pid
//   GET /health      status, pid, uptime (s), memory (RSS bytes)
//   GET /slow?ms=N   answers after N ms (default 1000) without blocking other requests
'use strict';

const http = require('node:http');
const cluster = require('node:cluster');

const port = Number(process.env.PORT || 3000);
const host = process.env.HOST; // unset: Node's default, every interface
const workMs = Number(process.env.WORK_MS || 0);

function json(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(data),
  });
  res.end(data);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  if (req.method !== 'GET') return json(res, 404, { error: 'not found' });

  switch (url.pathname) {
    case '/': {
      // CPU work on purpose, not a timer: this is what one core per worker buys.
      const until = Date.now() + workMs;
      while (Date.now() < until);
      return json(res, 200, {
        message: 'hello from herd',
        pid: process.pid,
        worker: cluster.worker?.id ?? null,
        instance: process.env.HERD_INSTANCE ?? null,
        timestamp: Date.now(),
      });
    }
    case '/health':
      return json(res, 200, {
        status: 'ok',
        pid: process.pid,
        uptime: process.uptime(),
        memory: process.memoryUsage().rss,
      });
    case '/slow': {
      const ms = Number(url.searchParams.get('ms') ?? 1000);
      if (!Number.isFinite(ms) || ms < 0) {
        return json(res, 400, { error: 'ms must be a number of milliseconds' });
      }
      setTimeout(() => json(res, 200, { message: 'slow hello from herd', pid: process.pid, ms }), ms);
      return;
    }
    default:
      return json(res, 404, { error: 'not found' });
  }
});

server.listen(port, host, () => {
  console.log(`listening on :${port} pid ${process.pid}`);
});

// Run alone, stop gracefully on SIGTERM: finish requests in flight, then exit.
// (Under herd, a stop arrives as the cluster 'disconnect' message, which does the same.)
process.on('SIGTERM', () => server.close(() => process.exit(0)));
