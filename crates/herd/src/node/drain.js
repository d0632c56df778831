// Loaded by herd into Node workers (node --require) so that a stopping worker drains its
// keep-alive connections instead of cutting them.
//
// Node >= 19's server.close() destroys idle keep-alive sockets at once. A client that has
// just sent its next request on such a socket then sees a reset: every reload under
// keep-alive load loses requests that way, whatever the supervisor does. Here, once a server
// is closing: it stops accepting as usual; every response it sends from then on says
// `Connection: close`, so busy clients reconnect (to a new worker) at a clean boundary; and
// sockets still idle after HERD_DRAIN_MS (default 1000) are closed. Nothing else changes.
// herd passes --no-keepalive-drain to leave this out.
'use strict';
const http = require('http');
const https = require('https');
const net = require('net');
const tls = require('tls');

const grace = Number(process.env.HERD_DRAIN_MS) || 1000;
delete process.env.HERD_DRAIN_MS;
const draining = Symbol('herd.draining');

function drainingClose(base) {
  return function close(...args) {
    if (!this[draining]) {
      this[draining] = true;
      const sweep = () => {
        if (typeof this.closeIdleConnections === 'function') this.closeIdleConnections();
      };
      setTimeout(() => {
        sweep();
        setInterval(sweep, 250).unref();
      }, grace).unref();
    }
    return base.prototype.close.apply(this, args);
  };
}

http.Server.prototype.close = drainingClose(net.Server);
https.Server.prototype.close = drainingClose(tls.Server);

const writeHead = http.ServerResponse.prototype.writeHead;
http.ServerResponse.prototype.writeHead = function (...args) {
  const server = this.socket && this.socket.server;
  if (server && server[draining]) this.shouldKeepAlive = false;
  return writeHead.apply(this, args);
};
