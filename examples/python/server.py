#!/usr/bin/env python3
"""A Python stdlib HTTP server run as a herd worker (socket activation).

    herd run -l 3000 -i 4 examples/python/server.py

herd binds port 3000 once and starts 4 copies of this script, each with the listening socket
at fd 3 and LISTEN_FDS=1, LISTEN_PID=<its pid>. All copies accept from that one socket, so
the kernel spreads connections over them. Run alone (no LISTEN_FDS), it binds
127.0.0.1:$PORT (default 3000).

herd passes the socket blocking (as systemd does); this server makes it O_NONBLOCK. That flag
lives on the socket shared by every worker, not on this process's fd, so every worker of the
app sees it (here they all want it). serve_forever() only accepts after select()
says a connection is waiting, but another worker may take it first; accept() then raises
BlockingIOError, which socketserver already ignores. A blocking accept() would instead wait
for the next connection, and this worker could not notice SIGTERM meanwhile.

On SIGTERM (or ^C) the server stops accepting, finishes the requests in flight and exits 0.
"""

import http.server
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.parse

PID = os.getpid()
INSTANCE = os.environ.get("HERD_INSTANCE")
STARTED = time.monotonic()
WORK_MS = int(os.environ.get("WORK_MS", "0"))


def inherited_socket():
    """fd 3 when herd (or systemd) passed sockets to this very process, else None."""
    fds = os.environ.pop("LISTEN_FDS", None)
    pid = os.environ.pop("LISTEN_PID", None)  # popped: not for our child processes
    os.environ.pop("LISTEN_FDNAMES", None)
    if fds is None:
        return None
    if pid != str(PID):
        print(f"server.py: ignoring LISTEN_FDS: LISTEN_PID is {pid}, not this process ({PID})",
              file=sys.stderr)
        return None
    if int(fds) < 1:
        return None
    sock = socket.socket(fileno=3)  # family and type are read from the fd
    sock.setblocking(False)  # see the module docstring
    return sock


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    # server_close() joins the request threads, so requests in flight finish before exit.
    daemon_threads = False
    block_on_close = True


def make_server():
    sock = inherited_socket()
    if sock is None:
        port = int(os.environ.get("PORT", "3000"))
        print(f"server.py: no socket from herd (LISTEN_FDS): binding 127.0.0.1:{port}",
              file=sys.stderr)
        return Server(("127.0.0.1", port), Handler)
    server = Server(sock.getsockname(), Handler, bind_and_activate=False)
    server.socket.close()  # the unbound socket the constructor made
    server.socket = sock
    return server


class Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.0 (the default): one request per connection, so a stop never waits on idle
    # keep-alive connections. A client silent for 30 s is dropped.
    timeout = 30

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/":
            until = time.monotonic() + WORK_MS / 1000
            while time.monotonic() < until:  # CPU work on purpose, not a sleep
                pass
            self.reply(200, {"message": "hello from herd", "pid": PID, "instance": INSTANCE,
                             "timestamp": int(time.time() * 1000)})
        elif url.path == "/health":
            self.reply(200, {"status": "ok", "pid": PID, "uptime": time.monotonic() - STARTED,
                             "memory": rss_bytes()})
        elif url.path == "/slow":
            query = urllib.parse.parse_qs(url.query)
            try:
                ms = int(query.get("ms", ["1000"])[0])
            except ValueError:
                return self.reply(400, {"error": "ms must be a number of milliseconds"})
            time.sleep(ms / 1000)
            self.reply(200, {"message": "slow hello from herd", "pid": PID, "ms": ms})
        else:
            self.reply(404, {"error": "not found"})

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass  # no access log: one line per request would drown the workers' output


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def notify(message):
    """Sends a datagram to NOTIFY_SOCKET (sd_notify); does nothing when it is not set."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract socket name
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), path)


def main():
    server = make_server()

    def stop(signum, _frame):
        # shutdown() waits for serve_forever() to return, which runs in this (the main)
        # thread: call it from another one.
        threading.Thread(target=server.shutdown).start()

    # Installed before READY=1, so a stop that follows at once is a drain, not a kill.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    print(f"server.py: pid {PID} listening on {server.socket.getsockname()}", flush=True)
    notify("READY=1")
    server.serve_forever()
    server.server_close()  # closes the listener, then waits for requests in flight


if __name__ == "__main__":
    main()
