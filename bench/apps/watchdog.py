#!/usr/bin/env python3
"""A socket-activation worker that stops feeding herd's watchdog on demand (bench/restart.py).

    herd run -l 127.0.0.1:PORT --watchdog 1s bench/apps/watchdog.py

Serves the listening socket at fd 3 (LISTEN_FDS=1, LISTEN_PID = this pid), sends READY=1 on
NOTIFY_SOCKET once serving, then WATCHDOG=1 every 200 ms until it receives GET /stop; after
that it keeps serving but is silent, so herd must declare it hung.

    GET /      200 {"pid":…,"watchdog":true|false}
    GET /stop  200 {"pid":…,"watchdog":false}: no WATCHDOG=1 from now on
    other      404

SIGTERM / SIGINT: stop accepting, exit. Standard library only.
"""

import http.server
import json
import os
import signal
import socket
import socketserver
import sys
import threading

PID = os.getpid()
INTERVAL = 0.2
feeding = threading.Event()  # set: WATCHDOG=1 goes out every INTERVAL
feeding.set()
stopping = threading.Event()


def notify(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), path)
        except OSError as e:
            print(f"watchdog.py: notify {message!r}: {e}", file=sys.stderr, flush=True)


def feeder() -> None:
    while feeding.is_set() and not stopping.is_set():
        notify("WATCHDOG=1")
        stopping.wait(INTERVAL)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


class Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/stop":
            feeding.clear()
            print(f"watchdog.py: pid {PID} stops sending WATCHDOG=1", flush=True)
            return self.reply(200, {"pid": PID, "watchdog": False})
        if path == "/":
            return self.reply(200, {"pid": PID, "watchdog": feeding.is_set()})
        return self.reply(404, {"error": "not found"})

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass


def main() -> None:
    if os.environ.get("LISTEN_PID") != str(PID) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        sys.exit("watchdog.py: needs a socket at fd 3 (run it under herd with --listen)")
    for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    sock = socket.socket(fileno=3)
    sock.setblocking(False)  # shared with the other workers: leave it non-blocking
    server = Server(sock.getsockname(), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock

    def stop(_signum, _frame):
        stopping.set()
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    notify("READY=1")
    threading.Thread(target=feeder, daemon=True).start()
    server.serve_forever(poll_interval=0.1)
    server.server_close()


if __name__ == "__main__":
    main()
