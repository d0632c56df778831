"""uvicorn on herd's socket through `sockets=` instead of `--fd 3`:

    herd run -l 127.0.0.1:3000 -i 2 bench/compat/apps/uvicorn_sockets.py

`uvicorn --fd 3` wraps fd 3 as an AF_UNIX socket, so asyncio never sets TCP_NODELAY on the
connections it accepts and every keep-alive response waits for Nagle (~40 ms). socket.socket(
fileno=3) asks the kernel for the real family (AF_INET), and asyncio sets TCP_NODELAY.
"""
import os
import socket
import sys

import uvicorn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from asgi_app import app  # noqa: E402

if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
    sys.exit("uvicorn_sockets.py: run me under herd (or systemd) with a socket at fd 3")
sock = socket.socket(fileno=3)
config = uvicorn.Config(app, log_level="warning")
uvicorn.Server(config).run(sockets=[sock])
