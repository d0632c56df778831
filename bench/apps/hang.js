'use strict';
/**
 * A misbehaving app for bench/restart.py's health section: it can hang, grow, and fail its
 * health check on demand. Plain node:http, listens on PORT (default 3000).
 *
 *   GET /        200 {"pid":…,"instance":…,"n":…}
 *   GET /hang    200 {"pid":…,"hanging":true}, then (20 ms later, once the answer is out)
 *                `while (true) {}` forever: the event loop never comes back.
 *   GET /grow    allocates 50 MB more (touched, so it is resident) and keeps it;
 *                200 {"pid":…,"held_mb":…,"rss_mb":…}
 *   GET /health  500 while the file named by HEALTH_FAIL_FILE exists, else 200
 *   other        404
 *
 * Stop: SIGTERM / SIGINT / the cluster `disconnect` close the server and exit (at most 1 s).
 * Note: server.listen(PORT, cb), not listen(PORT, host, cb) — see bench/README.md (restart.py).
 */
const http = require('node:http');
const fs = require('node:fs');
const cluster = require('node:cluster');

const PORT = Number(process.env.PORT || 3000);
const FAIL_FILE = process.env.HEALTH_FAIL_FILE || '';
const INSTANCE = process.env.HERD_INSTANCE ?? process.env.NODE_APP_INSTANCE ?? null;
const hoard = [];
let served = 0;

function json(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) });
  res.end(data);
}

const server = http.createServer((req, res) => {
  if (req.method !== 'GET') return json(res, 404, { error: 'not found' });
  const path = req.url.split('?')[0];
  switch (path) {
    case '/':
      served += 1;
      return json(res, 200, { pid: process.pid, instance: INSTANCE, n: served });
    case '/hang':
      json(res, 200, { pid: process.pid, hanging: true });
      setTimeout(() => { while (true) { /* hung for good */ } }, 20);
      return undefined;
    case '/grow': {
      hoard.push(Buffer.alloc(50 * 1024 * 1024, 1)); // filled: every page is touched
      return json(res, 200, {
        pid: process.pid,
        held_mb: hoard.length * 50,
        rss_mb: Math.round(process.memoryUsage().rss / 1048576),
      });
    }
    case '/health':
      if (FAIL_FILE && fs.existsSync(FAIL_FILE)) return json(res, 500, { status: 'failing', pid: process.pid });
      return json(res, 200, { status: 'ok', pid: process.pid });
    default:
      return json(res, 404, { error: 'not found' });
  }
});

server.listen(PORT, () => {});

function stop() {
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (cluster.isWorker) cluster.worker.on('disconnect', stop);
