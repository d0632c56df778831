'use strict';
/**
 * Node's own cluster primary, for comparison with herd and PM2.
 *
 *   NODE_CLUSTER_SCHED_POLICY=rr|none WORKERS=N PORT=... WORK_MS=... node node-cluster.js
 *
 * Forks N workers running app.js (cluster.setupPrimary({exec: app.js})). Scheduling is read
 * by Node itself from NODE_CLUSTER_SCHED_POLICY: `rr` = the primary accepts and hands each
 * connection to a worker in turn (Node's default on Linux); `none` = the workers share the
 * listening handle and the kernel picks who accepts. Crashed workers are restarted (with a
 * small delay, so a broken app does not fork-loop). SIGTERM/SIGINT: disconnect every worker
 * (graceful), then exit; SIGKILL the rest after 3 s.
 */
const cluster = require('node:cluster');
const path = require('node:path');

const N = Math.max(1, Number(process.env.WORKERS || 2));
const policy = process.env.NODE_CLUSTER_SCHED_POLICY || 'rr';
let stopping = false;

cluster.setupPrimary({ exec: path.join(__dirname, 'app.js') });

function fork() {
  const w = cluster.fork();
  w.on('exit', (code, signal) => {
    if (stopping) return;
    console.error(`node-cluster: worker ${w.process.pid} died (${signal || code}); restarting`);
    setTimeout(fork, 100);
  });
}
for (let i = 0; i < N; i++) fork();

let listening = 0;
cluster.on('listening', (w, addr) => {
  listening += 1;
  if (listening === N) {
    console.log(`node-cluster: ${N} workers listening on port ${addr.port} (sched ${policy})`);
  }
});

function stop() {
  if (stopping) return;
  stopping = true;
  cluster.disconnect(() => process.exit(0));
  setTimeout(() => {
    for (const w of Object.values(cluster.workers)) w.process.kill('SIGKILL');
    process.exit(0);
  }, 3000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
