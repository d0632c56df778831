const http = require('http');
http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ pid: process.pid, instance: process.env.HERD_INSTANCE, server: 'cluster-fork' }));
}).listen(Number(process.env.PORT || 3000));
