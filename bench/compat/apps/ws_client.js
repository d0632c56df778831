// bench/compat.py's websocket client: node ws_client.js PORT WAIT_SECONDS
// Opens one websocket, prints {"event":"open","pid":…} once the server's hello arrives, then
// waits (at most WAIT_SECONDS) for the server to close it and prints {"event":"close","code":…};
// then opens a new one and prints {"event":"reopen","pid":…,"echo":true|false}.
const WebSocket = require('ws');
const [port, wait] = process.argv.slice(2).map(Number);
const out = (o) => console.log(JSON.stringify(o));
function open(cb) {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/`);
  let hello = null;
  ws.on('message', (m) => {
    const s = String(m);
    if (!hello) { hello = JSON.parse(s); cb(ws, hello); ws.send('echo-check'); }
    else if (s === 'echo-check') ws.emit('echoed');
  });
  ws.on('error', (e) => out({ event: 'error', message: e.message }));
  return ws;
}
const t0 = Date.now();
open((ws, hello) => {
  out({ event: 'open', pid: hello.pid });
  const giveUp = setTimeout(() => { out({ event: 'close', code: null, after_s: wait }); process.exit(0); }, wait * 1000);
  ws.on('close', (code, reason) => {
    clearTimeout(giveUp);
    out({ event: 'close', code, reason: String(reason), at_ms: Date.now() });
    const again = open((ws2, hello2) => {
      const t = setTimeout(() => { out({ event: 'reopen', pid: hello2.pid, echo: false }); process.exit(0); }, 3000);
      ws2.on('echoed', () => { clearTimeout(t); out({ event: 'reopen', pid: hello2.pid, echo: true }); process.exit(0); });
    });
    again.on('error', () => { out({ event: 'reopen', pid: null, echo: false }); process.exit(0); });
  });
});
