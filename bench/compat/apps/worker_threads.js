// An HTTP server whose work runs on a worker_threads pool:
//   PORT=3000 herd run -i 2 --kill-timeout 3s bench/compat/apps/worker_threads.js
// GET / asks the thread for a number and answers {pid, instance, thread, n}. The thread keeps
// the event loop alive after the server closes, as real pools do: when herd drains the worker
// (the server closes, then the IPC channel: 'disconnect'), the process does not exit and herd
// waits --kill-timeout. THREAD_EXIT=1 (herd run -e THREAD_EXIT=1 ...) ends the thread on
// 'disconnect', and the process exits as soon as its server is drained.
const http = require('http');
const { Worker } = require('worker_threads');
const thread = new Worker(`
  const { parentPort } = require('worker_threads');
  let n = 0;
  parentPort.on('message', () => parentPort.postMessage(++n));
`, { eval: true });
if (process.env.THREAD_EXIT === '1') process.on('disconnect', () => thread.terminate());
const waiting = [];
thread.on('message', (n) => { const res = waiting.shift(); if (res) res(n); });
const server = http.createServer(async (req, res) => {
  const n = await new Promise((r) => { waiting.push(r); thread.postMessage(1); });
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ pid: process.pid, instance: process.env.HERD_INSTANCE, server: 'worker_threads', thread: thread.threadId, n }));
});
server.listen(Number(process.env.PORT || 3000));
