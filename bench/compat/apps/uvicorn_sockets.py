"""uvicorn on herd's socket through `sockets=` instead of `--fd 3`:

    herd run -l 127.0.0.1:3000 -i 2 bench/compat/apps/uvicorn_sockets.py       # venv active
    herd run -l 127.0.0.1:3000 -i 2 -e DRAIN_MS=1000 bench/compat/apps/uvicorn_sockets.py

`uvicorn --fd 3` wraps fd 3 as an AF_UNIX socket, so asyncio never sets TCP_NODELAY on the
connections it accepts and every keep-alive response waits for Nagle (~40 ms). socket.socket(
fileno=3) asks the kernel for the real family (AF_INET), and asyncio sets TCP_NODELAY.

On SIGTERM uvicorn closes idle keep-alive connections at once, racing with a client that is
sending its next request on one: that request fails. With DRAIN_MS=N the first SIGTERM only
starts a drain: for N ms every response carries "Connection: close" (clients move to new
connections, i.e. the new workers), then uvicorn's own shutdown runs.
"""
import os
import socket
import sys
import threading

import uvicorn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from asgi_app import app  # noqa: E402

if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
    sys.exit("uvicorn_sockets.py: run me under herd (or systemd) with a socket at fd 3")
DRAIN = int(os.environ.get("DRAIN_MS", "0")) / 1000
draining = False


async def draining_app(scope, receive, send):
    async def send_closing(msg):
        if draining and msg["type"] == "http.response.start":
            msg = dict(msg, headers=[*msg.get("headers", []), (b"connection", b"close")])
        await send(msg)

    await app(scope, receive, send_closing)


class DrainingServer(uvicorn.Server):
    def handle_exit(self, sig, frame):
        global draining
        if DRAIN > 0 and not draining:
            draining = True
            threading.Timer(DRAIN, super().handle_exit, (sig, frame)).start()
            return
        super().handle_exit(sig, frame)


sock = socket.socket(fileno=3)
config = uvicorn.Config(draining_app, log_level="warning")
DrainingServer(config).run(sockets=[sock])
