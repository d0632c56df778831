// socket.io 4 under herd, long-polling needs every request of a session on one worker:
//   PORT=3000 herd run -i 2 --balance sticky bench/compat/apps/socketio.js
// GET / answers {pid, instance}; a socket's 'hello' event is acknowledged with the same.
const http = require('http');
const { Server } = require('socket.io');
const me = { pid: process.pid, instance: process.env.HERD_INSTANCE, server: 'socket.io' };
const server = http.createServer((req, res) => {
  if (req.url === '/') {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify(me));
  }
});
const io = new Server(server);
io.on('connection', (socket) => {
  socket.on('hello', (n, ack) => ack({ ...me, n }));
});
server.listen(Number(process.env.PORT || 3000));
