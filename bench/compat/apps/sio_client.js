// bench/compat.py's socket.io client: node sio_client.js PORT CLIENTS SECONDS [QUIET_FROM QUIET_TO]
// CLIENTS socket.io-client sockets over long-polling only, client i from source address
// 127.0.0.(2+i) (an http.Agent with localAddress; even clients keep their connections alive
// as a browser does, odd ones open one per request), each started after a random 0–300 ms, each emitting 'hello' with an ack every 100 ms for SECONDS.
// No emits between QUIET_FROM and QUIET_TO s (longer than Node's 5 s keepAliveTimeout: the
// server closes the idle POST connection, and the next POST opens a new one).
// Prints one JSON line: per client, connects, connect errors (by message), acks, ack
// timeouts, the pids that acknowledged, and the time of the last ack (s from start).
const http = require('http');
const { io } = require('socket.io-client');
const [port, clients, seconds, quietFrom = -1, quietTo = -1] = process.argv.slice(2).map(Number);
const t0 = Date.now();
const now = () => (Date.now() - t0) / 1000;
const results = [];
for (let i = 0; i < clients; i++) setTimeout(() => start(i), Math.random() * 300);
function start(i) {
  const localAddress = `127.0.0.${2 + i}`;
  const r = { localAddress, keepAlive: i % 2 === 0, connects: 0, connect_errors: {}, acks: 0, ack_timeouts: 0, pids: {}, last_ack: null, disconnects: {} };
  results.push(r);
  const socket = io(`http://127.0.0.1:${port}`, {
    transports: ['polling'], agent: new http.Agent({ localAddress, keepAlive: i % 2 === 0 }), forceNew: true,
    reconnectionDelay: 100, reconnectionDelayMax: 500, timeout: 3000,
  });
  r.socket = socket;
  socket.on('connect', () => { r.connects++; });
  socket.on('connect_error', (e) => { const k = String(e && (e.description?.message || e.message) || e); r.connect_errors[k] = (r.connect_errors[k] || 0) + 1; });
  socket.on('disconnect', (why) => { r.disconnects[why] = (r.disconnects[why] || 0) + 1; });
  let n = 0;
  r.timer = setInterval(() => {
    if (!socket.connected || (now() >= quietFrom && now() < quietTo)) return;
    socket.timeout(2000).emit('hello', ++n, (err, ans) => {
      if (err) { r.ack_timeouts++; return; }
      r.acks++; r.last_ack = now(); r.pids[ans.pid] = (r.pids[ans.pid] || 0) + 1;
    });
  }, 100);
}
setTimeout(() => {
  for (const r of results) { clearInterval(r.timer); r.socket.close(); delete r.timer; delete r.socket; }
  console.log(JSON.stringify({ seconds, clients: results }));
  process.exit(0);
}, seconds * 1000);
