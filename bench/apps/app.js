'use strict';
/**
 * The benchmark app: plain node:http, nothing else.
 *
 *   GET /  -> busy-loops WORK_MS milliseconds of CPU (env, default 0), then answers
 *             {"pid":..., "instance":..., "work_ms":..., "n":...} (small JSON, 200).
 *             WORK_SLOW_PCT=P with WORK_SLOW_MS=S (env, default 0: off): P % of requests,
 *             at random, burn S ms instead (a mixed load; balance.py).
 *   other  -> 404.
 *   stop   -> SIGINT / SIGTERM / cluster disconnect: drain (see shutdown()), exit within 1.5 s;
 *             APP_DRAIN=node: Node's stock server.close() instead (the common, racy way).
 *
 * Listens on process.env.PORT (default 3000) on all interfaces, like a typical app, so
 * the same file runs alone, under Node's cluster primary (node-cluster.js), under PM2
 * cluster mode and under herd (all of which make server.listen(PORT) share the port).
 * Keep this file stable: benchmark numbers are only comparable for the same app.
 */
const http = require('node:http');
const cluster = require('node:cluster');

const PORT = Number(process.env.PORT || 3000);
const WORK_MS = Number(process.env.WORK_MS || 0);
const WORK_SLOW_MS = Number(process.env.WORK_SLOW_MS || 0);
const WORK_SLOW_PCT = Number(process.env.WORK_SLOW_PCT || 0);
const INSTANCE = process.env.HERD_INSTANCE ?? process.env.NODE_APP_INSTANCE ?? null;
const DRAIN_MS = 1500; // below PM2's default kill_timeout (1600 ms) and herd's (5 s)
const IDLE_GRACE_MS = 250; // while draining, a keep-alive socket idle this long is closed
// APP_DRAIN=node: stop the way a typical app does, with Node's stock server.close() (see below).
const CAREFUL = process.env.APP_DRAIN !== 'node';

let served = 0;
let draining = false;
const idleSince = new Map(); // socket -> ms since epoch it went idle; 0 while a request is in flight

function burn(ms) {
  if (ms <= 0) return;
  const end = process.hrtime.bigint() + BigInt(Math.round(ms * 1e6));
  while (process.hrtime.bigint() < end) { /* spin: simulated CPU-bound work */ }
}

const server = http.createServer((req, res) => {
  const socket = req.socket;
  idleSince.set(socket, 0);
  res.once('finish', () => { if (idleSince.has(socket)) idleSince.set(socket, Date.now()); });
  if (draining && CAREFUL) res.setHeader('connection', 'close'); // keep-alive clients go elsewhere
  if (req.method === 'GET' && (req.url === '/' || req.url.startsWith('/?'))) {
    const work = WORK_SLOW_PCT > 0 && Math.random() * 100 < WORK_SLOW_PCT ? WORK_SLOW_MS : WORK_MS;
    burn(work);
    served += 1;
    const body = JSON.stringify({ pid: process.pid, instance: INSTANCE, work_ms: work, n: served });
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  } else {
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found\n');
  }
});
server.on('connection', (socket) => {
  idleSince.set(socket, Date.now());
  socket.once('close', () => idleSince.delete(socket));
});

server.listen(PORT, () => {
  if (process.send) process.send('ready'); // for PM2 --wait-ready / herd --wait-ready; harmless otherwise
});

// Graceful stop, whoever asks: SIGINT (PM2), SIGTERM, or the cluster `disconnect` that Node's
// primary and herd send (the cluster module then calls server.close() by itself).
// Node's server.close() destroys every idle keep-alive socket at once (closeIdleConnections),
// racing with requests already on the wire: the client sees a reset (wrk: read errors) that is
// the app's fault, not the supervisor's. So this app drains the careful way instead: stop
// accepting; answer requests on open sockets with `Connection: close`; close a socket only once
// it has been idle IDLE_GRACE_MS; exit when the last one is gone, or after DRAIN_MS at the latest.
const nodeCloseIdle = server.closeIdleConnections.bind(server);
function startDraining() {
  if (!CAREFUL) nodeCloseIdle(); // stock behaviour: every idle socket, now
  if (draining) return;
  draining = true;
  setTimeout(() => process.exit(0), DRAIN_MS).unref();
  if (!CAREFUL) return;
  setInterval(() => {
    const now = Date.now();
    for (const [socket, since] of idleSince) {
      if (since && now - since >= IDLE_GRACE_MS) socket.destroy();
    }
  }, 50).unref();
}
server.closeIdleConnections = startDraining; // what server.close() calls, also the cluster module's

function shutdown() {
  startDraining();
  if (server.listening) server.close(() => process.exit(0));
}
process.on('SIGINT', shutdown);
process.on('SIGTERM', shutdown);
if (cluster.isWorker) cluster.worker.on('disconnect', shutdown);
