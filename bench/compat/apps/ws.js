// ws 8 under herd: PORT=3000 herd run -i 2 --kill-timeout 3s bench/compat/apps/ws.js
// Echoes every message; GET / answers {pid, instance}. When herd stops the worker it tries to
// close its websockets with 1001 (going away) — on SIGTERM, and on the IPC channel's
// 'disconnect' (what a Node cluster worker sees when its primary drains it).
const http = require('http');
const { WebSocketServer } = require('ws');
const me = { pid: process.pid, instance: process.env.HERD_INSTANCE, server: 'ws' };
const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify(me));
});
const wss = new WebSocketServer({ server });
wss.on('connection', (ws) => {
  ws.send(JSON.stringify(me));
  ws.on('message', (m) => ws.send(m));
});
let closing = false;
function goingAway() {
  if (closing) return;
  closing = true;
  for (const ws of wss.clients) ws.close(1001, 'server going away');
  server.close();
}
process.on('SIGTERM', () => { goingAway(); setTimeout(() => process.exit(0), 500).unref(); });
process.on('disconnect', goingAway);
process.on('message', (m) => { if (m && m.herd === 'stopping') goingAway(); });
server.listen(Number(process.env.PORT || 3000));
