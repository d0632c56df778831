#!/usr/bin/env python3
"""Compatibility harness: real third-party servers under herd, run with the command lines a user
would type, and what each does on a reload and a kill -9.

For each server (Express 4, Fastify 5, Koa 3, socket.io 4, ws 8, a worker_threads app, an app
that forks its own cluster, gunicorn, uvicorn `--fd 3` and `sockets=`, Go net/http, Puma, Rust
`hello`, a naive blocking accept loop; the wrong lines gunicorn `--bind fd://3` and Puma with its
own `-b`; and the fixes: Go / uvicorn answering `Connection: close` for a moment before their
shutdown, a worker_threads app that ends its thread on 'disconnect') it starts `herd run` with the server's command line on a free port and checks:

- works: every worker (HERD_INSTANCE 0..N-1) answers GET /;
- keep-alive latency: ms per request, sequential, on one keep-alive connection (Nagle shows as
  ~40 ms);
- reload loss: failed requests of a bounded load (keep-alive clients, then `Connection: close`
  clients) across one `herd reload`, and how long the reload took;
- kill -9: failed requests while one worker is SIGKILLed and replaced;
- server-specific: socket.io over long-polling from several source addresses (127.0.0.2..) with
  `--balance sticky` (must pass) and without it (must fail); a websocket across a reload (the
  close code the client sees); an app that only forks its own cluster.

Every check has an expectation. Today's known herd bugs (issue #11) are encoded as "known (#11
item N)": they are reported, marked, and do not fail the run; a known bug that did not show is
reported as "not seen" (some are races). Anything else that fails makes the exit status 1.
A server whose toolchain is missing is SKIPPED with a loud line (Go: `apt-get install -y
golang-go`, Puma: `apt-get install -y puma`); the npm and PyPI packages are required.

Private install, nothing at run time: `npm install --prefix bench/compat` (package.json pins
the Node packages) and `python3 -m venv bench/compat/venv && bench/compat/venv/bin/pip install
-r bench/compat/requirements.txt`. The Go app is built by this script into bench/compat/bin/
(`go build`, standard library only, no module downloads). All three are git-ignored.

docs/compat.md is the user-facing page: its command lines are this file's SERVERS.

Output: the markdown table on stdout and in bench/out/compat-<time>.md, every number in
compat-<time>.json, herd's output per server in out/logs-compat-<time>/.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

COMPAT = bl.BENCH / "compat"
APPS = COMPAT / "apps"
NODE_MODULES = COMPAT / "node_modules"
VENV_BIN = COMPAT / "venv" / "bin"
GO_SRC = APPS / "gohttp"
GO_BIN = COMPAT / "bin" / "gohttp"
HELLO_BIN = bl.REPO / "target" / "release" / "hello"

NPM_HINT = "npm install --prefix bench/compat"
PIP_HINT = ("python3 -m venv bench/compat/venv && "
            "bench/compat/venv/bin/pip install -r bench/compat/requirements.txt")

# Known herd bugs, issue #11 (the item numbers of its "Why" list).
KNOWN = {
    1: "sticky + kill -9: a keep-alive polling client of the killed worker may never notice it "
       "(no transport error, only ack timeouts; 1 of 6 trials). The split across two workers "
       "(Session ID unknown) is gone with kernel sticky's --sticky-wait: 0 of 6 trials",
    2: "requests lost on reload for non-Node servers (keep-alive; uvicorn rarely with close too)",
    3: "a worker that serves its own port (Puma with its own -b) is counted ready; herd reports "
       "it (a warning naming the port, after 3 s of connections nobody accepts) but cannot "
       "know it never will serve herd's socket",
}


# ---------------------------------------------------------------- servers

class Server:
    """One server: the user's herd command line (PORT stands for the port) and its checks.

    `line` is what a user types from the repository root (shown in the table and docs/compat.md);
    the script runs exactly that, on a free port, adding only `-n NAME --log-format json` and a
    private HERD_HOME. `expect` maps a check to the issue #11 item that is known to break it.
    """

    def __init__(self, key, label, line, *, node_port=False, checks=(), expect=None, needs=None,
                 kill_timeout=5.0, ci=True, notes="", not_ready_wait=14.0):
        self.key, self.label, self.line = key, label, line
        self.node_port = node_port      # a Node app: the port goes in PORT=, not -l
        self.checks = list(checks)
        self.expect = expect or {}
        self.needs = needs or (lambda: None)
        self.kill_timeout = kill_timeout
        self.ci = ci
        self.notes = notes
        self.not_ready_wait = not_ready_wait  # not_ready: how long to give herd to decide

    def argv(self, herd: Path, port: int) -> tuple[list[str], dict]:
        # 3000 is herd's port; 3001 (if any) a second one the server binds by itself
        words = shlex.split(self.line.replace("3000", str(port)).replace("3001", str(bl.free_port())))
        env = {}
        while words and "=" in words[0] and words[0] != "herd":
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        assert words[:2] == ["herd", "run"], self.line
        return [str(herd), "run", "--log-format", "json", "-n", f"c-{self.key}", *words[2:]], env


def need_node():
    if not shutil.which("node"):
        return "node is not installed"
    if not NODE_MODULES.is_dir():
        return f"bench/compat/node_modules is missing: {NPM_HINT}"
    return None


def need_venv(prog):
    def check():
        if not (VENV_BIN / prog).exists():
            return f"bench/compat/venv/bin/{prog} is missing: {PIP_HINT}"
        return None
    return check


def need_go():
    if GO_BIN.exists() and GO_BIN.stat().st_mtime >= (GO_SRC / "main.go").stat().st_mtime:
        return None
    if not shutil.which("go"):
        return "SKIP-LOUD: Go is not installed (apt-get install -y golang-go)"
    GO_BIN.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GOFLAGS="-mod=mod", GOPROXY="off", CGO_ENABLED="0")
    cp = subprocess.run(["go", "build", "-o", str(GO_BIN), "."], cwd=GO_SRC, env=env,
                        capture_output=True, text=True, timeout=300)
    if cp.returncode != 0:
        return f"go build failed: {cp.stderr.strip()[-300:]}"
    return None


def need_puma():
    if not shutil.which("puma"):
        return "SKIP-LOUD: Puma is not installed (apt-get install -y puma)"
    return None


def need_hello():
    if not HELLO_BIN.exists():
        return "SKIP-LOUD: target/release/hello is not built (cargo build --release -p hello)"
    return None


NODE_FULL = ["works", "latency", "reload_ka", "reload_close", "kill9"]
SA_FULL = ["works", "latency", "reload_ka", "reload_close", "kill9"]

SERVERS = [
    Server("express", "Express 4", "PORT=3000 herd run -i 2 bench/compat/apps/express.js",
           node_port=True, checks=NODE_FULL, needs=need_node),
    Server("fastify", "Fastify 5", "PORT=3000 herd run -i 2 bench/compat/apps/fastify.js",
           node_port=True, checks=NODE_FULL, needs=need_node),
    Server("koa", "Koa 3", "PORT=3000 herd run -i 2 bench/compat/apps/koa.js",
           node_port=True, checks=NODE_FULL, ci=False, needs=need_node),
    Server("socketio", "socket.io 4 (sticky)",
           "PORT=3000 herd run -i 2 --balance sticky bench/compat/apps/socketio.js",
           node_port=True, checks=["works", "sio_sticky", "sio_kill"],
           expect={"sio_kill": 1}, needs=need_node),
    Server("socketio-rr", "socket.io 4 (no sticky)",
           "PORT=3000 herd run -i 2 bench/compat/apps/socketio.js",
           node_port=True, checks=["works", "sio_no_sticky"], needs=need_node),
    Server("ws", "ws 8", "PORT=3000 herd run -i 2 --kill-timeout 3s bench/compat/apps/ws.js",
           node_port=True, checks=["works", "ws_reload"], kill_timeout=3.0, needs=need_node),
    Server("worker_threads", "worker_threads",
           "PORT=3000 herd run -i 2 --kill-timeout 3s bench/compat/apps/worker_threads.js",
           node_port=True, checks=["works", "reload_ka", "reload_time"], kill_timeout=3.0,
           needs=need_node),
    Server("worker_threads-exit", "worker_threads, THREAD_EXIT",
           "PORT=3000 herd run -i 2 --kill-timeout 3s -e THREAD_EXIT=1 bench/compat/apps/worker_threads.js",
           node_port=True, checks=["works", "reload_ka", "reload_time"], kill_timeout=3.0, needs=need_node,
           notes="ends its thread on 'disconnect'"),
    Server("cluster_fork", "app that forks its own cluster",
           "PORT=3000 herd run -i 2 bench/compat/apps/cluster_fork.js",
           node_port=True, checks=["not_ready"], needs=need_node),
    Server("cluster_child", "the same app's worker file, run by herd",
           "PORT=3000 herd run -i 2 bench/compat/apps/cluster_fork_child.js",
           node_port=True, checks=["works"], needs=need_node,
           notes="the fix for the row above: herd is the primary"),
    Server("gunicorn-fd3", "gunicorn --bind fd://3 (wrong line)",
           "herd run -l 127.0.0.1:3000 -i 1 --cwd bench/compat/apps -- gunicorn --bind fd://3 wsgi_app:app",
           checks=["not_ready"], not_ready_wait=4.0, needs=need_venv("gunicorn"),
           notes="gunicorn takes LISTEN_FDS itself, then fd://3 fails: EBADF, crash loop; "
                 "herd gives up after 3 runs (nothing was ever ready) and exits 1"),
    Server("gunicorn", "gunicorn",
           "herd run -l 127.0.0.1:3000 -i 2 --cwd bench/compat/apps -- gunicorn wsgi_app:app",
           checks=SA_FULL, needs=need_venv("gunicorn")),
    Server("uvicorn", "uvicorn --fd 3",
           "herd run -l 127.0.0.1:3000 -i 2 --cwd bench/compat/apps -- uvicorn --fd 3 asgi_app:app",
           checks=SA_FULL, expect={"reload_ka": 2, "reload_close": 2}, needs=need_venv("uvicorn")),
    Server("uvicorn-sockets", "uvicorn sockets=",
           "herd run -l 127.0.0.1:3000 -i 2 bench/compat/apps/uvicorn_sockets.py",
           checks=SA_FULL, expect={"reload_ka": 2, "reload_close": 2}, ci=False, needs=need_venv("uvicorn")),
    Server("uvicorn-drain", "uvicorn sockets=, DRAIN_MS",
           "herd run -l 127.0.0.1:3000 -i 2 -e DRAIN_MS=1000 bench/compat/apps/uvicorn_sockets.py",
           checks=["works", "reload_ka"], needs=need_venv("uvicorn"),
           notes="answers Connection: close for 1 s after SIGTERM, then uvicorn's shutdown"),
    Server("go", "Go net/http", "herd run -l 127.0.0.1:3000 -i 2 bench/compat/bin/gohttp",
           checks=SA_FULL, expect={"reload_ka": 2}, needs=need_go),
    Server("go-drain", "Go net/http, DRAIN_MS",
           "herd run -l 127.0.0.1:3000 -i 2 -e DRAIN_MS=1000 bench/compat/bin/gohttp",
           checks=["works", "reload_ka"], needs=need_go,
           notes="answers Connection: close for 1 s after SIGTERM, then Shutdown"),
    Server("puma", "Puma 5",
           "herd run -l 127.0.0.1:3000 -i 2 --cwd bench/compat/apps -- "
           "puma --bind-to-activated-sockets only config.ru",
           checks=SA_FULL, expect={"reload_ka": 2}, needs=need_puma),
    Server("puma-own-port", "Puma with its own -b (wrong line)",
           "herd run -l 127.0.0.1:3000 -i 1 --cwd bench/compat/apps -- puma -b tcp://127.0.0.1:3001 config.ru",
           checks=["not_ready"], expect={"not_ready": 3}, not_ready_wait=4.0, ci=False, needs=need_puma,
           notes="Puma serves its own port; nothing serves herd's"),
    Server("naive-accept", "naive blocking accept() loop (Python)",
           "herd run -l 127.0.0.1:3000 -i 2 bench/compat/apps/naive_accept.py",
           checks=["stays_up"],
           notes="fd 3 is blocking, as systemd passes it"),
    Server("hello", "Rust herd-worker (examples/hello)",
           "herd run -l 127.0.0.1:3000 -i 2 target/release/hello",
           checks=SA_FULL, needs=need_hello,
           notes="DRAIN_MS (default 1000): answers with Connection: close before closing"),
]


def doc_command_lines(path: Path) -> list[str]:
    """Every `herd run` command line in docs/compat.md (fenced sh blocks and inline code)."""
    import re
    text = path.read_text()
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for ln in block.splitlines():
            ln = ln.split("  #")[0].strip()
            if re.match(r"(PORT=\d+ )?herd run ", ln):
                found.append(ln)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if re.match(r"(PORT=\d+ )?herd run ", span):
            found.append(span)
    return found


def check_doc_lines() -> list[str]:
    """docs/compat.md may only show command lines that this script runs."""
    doc = bl.REPO / "docs" / "compat.md"
    if not doc.exists():
        return [f"{doc} is missing"]
    ours = {s.line for s in SERVERS}
    return [f"docs/compat.md shows a command line compat.py does not run: {ln}"
            for ln in doc_command_lines(doc) if ln not in ours]


# ---------------------------------------------------------------- load

class Load:
    """Bounded HTTP load: `ka` keep-alive client threads and `close` Connection: close threads,
    each at most `rate` requests/s, one request in flight per thread, 5 s timeout. Every
    failed request is kept (time, mode, error class)."""

    def __init__(self, port: int, ka: int, close: int, rate: float):
        self.port, self.rate = port, rate
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.ok = Counter()
        self.failed: list[dict] = []
        self.pids = Counter()
        self.t0 = time.monotonic()
        self.threads = [threading.Thread(target=self._run, args=(m,), daemon=True)
                        for m in ["keep-alive"] * ka + ["close"] * close]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_ev.set()
        for t in self.threads:
            t.join(timeout=10)

    def _run(self, mode):
        conn = None
        period = 1.0 / self.rate
        nxt = time.monotonic()
        while not self.stop_ev.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            t = time.monotonic()
            try:
                hdrs = {"Connection": "close"} if mode == "close" else {}
                conn.request("GET", "/", headers=hdrs)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"http {resp.status}")
                with self.lock:
                    self.ok[mode] += 1
                    try:
                        self.pids[json.loads(body)["pid"]] += 1
                    except (ValueError, KeyError, TypeError):
                        pass
                if mode == "close":
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001 — every failure is a data point
                with self.lock:
                    self.failed.append(dict(t=round(t - self.t0, 3), mode=mode, error=type(e).__name__
                                            if not isinstance(e, RuntimeError) else str(e)))
                conn.close()
                conn = None
            nxt = max(nxt + period, time.monotonic() - period)
            d = nxt - time.monotonic()
            if d > 0:
                self.stop_ev.wait(d)
        if conn is not None:
            conn.close()

    def summary(self) -> dict:
        with self.lock:
            by_mode = {}
            for m in ("keep-alive", "close"):
                f = [x for x in self.failed if x["mode"] == m]
                by_mode[m] = dict(ok=self.ok[m], failed=len(f),
                                  errors=dict(Counter(x["error"] for x in f)))
            return dict(by_mode=by_mode, failed=list(self.failed), pids=len(self.pids))


def get_json(port: int, timeout: float = 2.0, source: str | None = None) -> dict | None:
    """One GET / (Connection: close), from `source` (a 127.x address) if given; its JSON or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                      source_address=(source, 0) if source else None) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if int(head.split(b" ", 2)[1]) != 200:
            return None
        if b"chunked" in head.lower():  # one chunk: SIZE\r\nDATA\r\n0\r\n\r\n
            body = body.split(b"\r\n")[1]
        return json.loads(body)
    except (OSError, ValueError, IndexError):
        return None


def keepalive_latency(port: int, n: int) -> dict:
    """n sequential GET / on one keep-alive connection: median and max ms per request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    times = []
    closes = False
    try:
        conn.request("GET", "/")
        r = conn.getresponse()
        r.read()  # connect + first request not timed
        closes = r.will_close
        for _ in range(n):
            t = time.perf_counter()
            conn.request("GET", "/")
            r = conn.getresponse()
            r.read()
            times.append((time.perf_counter() - t) * 1000)
            if r.will_close:
                break
    finally:
        conn.close()
    return dict(n=len(times), median_ms=round(statistics.median(times), 2) if times else None,
                max_ms=round(max(times), 2) if times else None, no_keepalive=closes)


# ---------------------------------------------------------------- one herd

class HerdRun:
    def __init__(self, srv: Server, herd: Path, port: int, logdir: Path, line=None):
        self.srv, self.herd, self.port = srv, herd, port
        self.home = tempfile.mkdtemp(prefix="hc-herd-")
        bl.at_cleanup(lambda d=self.home: shutil.rmtree(d, ignore_errors=True))
        self.tag = bl.new_tag(srv.key)
        self.name = f"c-{srv.key}"
        argv, env = srv.argv(herd, port)
        path = f"{VENV_BIN}:{os.environ.get('PATH', '')}"
        self.env = bl.tagged_env(self.tag, HERD_HOME=self.home, XDG_RUNTIME_DIR=self.home,
                                 PATH=path, **env)
        self.log_path = logdir / f"{srv.key}.log"
        self.proc = bl.Proc(argv, self.env, self.log_path)
        bl.at_cleanup(self.stop)
        self.t0 = time.monotonic()

    def stop(self):
        if self.proc:
            self.proc.stop(grace=self.srv.kill_timeout * 2 + 5)
            self.proc = None
        bl.kill_tagged(self.tag)

    def ctl(self, *args, timeout=60) -> subprocess.CompletedProcess:
        return bl.run_cmd([str(self.herd), *args], bl.tagged_env(self.tag, HERD_HOME=self.home,
                                                                 XDG_RUNTIME_DIR=self.home), timeout)

    def status(self) -> dict | None:
        try:
            cp = self.ctl("status", self.name, "--json", timeout=10)
            return json.loads(cp.stdout) if cp.returncode == 0 else None
        except (subprocess.TimeoutExpired, ValueError):
            return None

    def ready_pids(self) -> list[int]:
        st = self.status() or {}
        return sorted(w["pid"] for w in st.get("workers", []) if w.get("state") == "ready" and w.get("pid"))

    def events(self) -> list[dict]:
        out = []
        try:
            for line in self.log_path.read_text(errors="replace").splitlines():
                try:
                    o = json.loads(line)
                except ValueError:
                    continue
                if isinstance(o, dict) and "event" in o:
                    out.append(o)
        except OSError:
            pass
        return out

    def wait_all_ready(self, n: int, timeout: float, exclude=()) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.ready_pids()
            if len(pids) >= n and not set(pids) & set(exclude):
                return pids
            if self.proc and not self.proc.alive():
                break
            time.sleep(0.2)
        return []

    def wait_serving(self, n: int, timeout: float) -> dict:
        """GET / until it answers (bounded), then until every instance 0..n-1 has answered."""
        deadline = time.monotonic() + timeout
        first = None
        while time.monotonic() < deadline and first is None:
            if self.proc and not self.proc.alive():
                return dict(ok=False, why="herd exited: " + self.proc.log_tail(5))
            first = get_json(self.port)
            if first is None:
                time.sleep(0.1)
        if first is None:
            return dict(ok=False, why=f"GET / never answered in {timeout:.0f}s")
        seen = {str(first.get("instance"))}
        spread = time.monotonic() + 10
        i = 0
        while len(seen) < n and time.monotonic() < spread:
            # from 127.0.0.1..127.0.0.32 in turn: --balance sticky sends one address to one worker
            i += 1
            j = get_json(self.port, source=f"127.0.0.{1 + i % 32}")
            if j:
                seen.add(str(j.get("instance")))
            time.sleep(0.01)
        want = {str(i) for i in range(n)}
        return dict(ok=want <= seen, instances=sorted(seen),
                    why="" if want <= seen else f"instances answering: {sorted(seen)}")


# ---------------------------------------------------------------- checks

def chk(ok, value, detail=""):
    return dict(ok=bool(ok), value=value, detail=detail)


def do_reload(h: HerdRun, args, mode: str) -> dict:
    ka, close = (args.threads, 0) if mode == "keep-alive" else (0, args.threads)
    before = h.ready_pids()
    with Load(h.port, ka, close, args.rate) as load:
        time.sleep(args.settle)
        t = time.monotonic()
        cp = h.ctl("reload", h.name, timeout=120)
        took = time.monotonic() - t
        time.sleep(args.settle)
    after = h.wait_all_ready(len(before) or 2, 15, exclude=before)
    s = load.summary()
    m = s["by_mode"][mode]
    return dict(rc=cp.returncode, stderr=cp.stderr.strip()[-300:], reload_s=round(took, 2),
                replaced=bool(after) and not set(after) & set(before), ok=m["ok"],
                failed=m["failed"], errors=m["errors"])


def check_reload(h, args, mode):
    r = do_reload(h, args, mode)
    good = r["rc"] == 0 and r["replaced"] and r["failed"] == 0
    detail = f"{r['failed']} of {r['ok'] + r['failed']} failed {r['errors'] or ''}; reload {r['reload_s']}s"
    if r["rc"] != 0 or not r["replaced"]:
        detail += f"; reload rc {r['rc']}, workers replaced: {r['replaced']} {r['stderr']}"
    return chk(good, r, detail)


def check_kill9(h, args):
    before = h.ready_pids()
    if not before:
        return chk(False, None, "no ready worker to kill")
    victim = before[0]
    kids = descendants(victim)  # gunicorn's own worker, for one
    threads = args.threads
    with Load(h.port, threads // 2 or 1, threads - threads // 2, args.rate) as load:
        time.sleep(args.settle)
        t = time.monotonic()
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
        back = h.wait_all_ready(len(before), 30, exclude=[victim])
        back_s = time.monotonic() - t
        time.sleep(args.settle)
    orphans = [p for p in kids if bl.pid_alive(p)]
    s = load.summary()
    failed = sum(m["failed"] for m in s["by_mode"].values())
    total = failed + sum(m["ok"] for m in s["by_mode"].values())
    errs = Counter()
    for m in s["by_mode"].values():
        errs.update(m["errors"])
    # Each client thread has at most one request in flight, and a keep-alive connection to the
    # victim fails once: more failures than threads are requests lost after the kill.
    good = bool(back) and failed <= threads
    return chk(good, dict(failed=failed, total=total, errors=dict(errs), replaced_in_s=round(back_s, 2),
                          back=bool(back), victim_children=len(kids), orphans_left=len(orphans)),
               f"{failed} of {total} failed {dict(errs) or ''}; replaced in {back_s:.1f}s"
               + ("" if back else "; NOT replaced within 30s")
               + (f"; {len(orphans)} of the victim's {len(kids)} child process(es) still alive "
                  f"{args.settle:g}s after" if kids else ""))


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for k in bl.children_of(todo.pop()):
            out.append(k)
            todo.append(k)
    return out


def check_latency(h, args):
    r = keepalive_latency(h.port, args.latency_requests)
    good = r["median_ms"] is not None and r["median_ms"] < 20
    return chk(good, r, f"{r['median_ms']} ms/request (max {r['max_ms']}, n={r['n']})"
               + (" — the server closes after each response: no keep-alive" if r["no_keepalive"] else ""))


def sio_clients(h, args, seconds, kill_at=None, quiet=(), clients=None):
    """Run sio_client.js; optionally SIGKILL a ready worker kill_at s in. Returns its JSON."""
    p = subprocess.Popen(["node", "sio_client.js", str(h.port), str(clients or args.sio_clients), str(seconds),
                          *map(str, quiet)], cwd=APPS,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=bl.tagged_env(bl.new_tag("sio")), start_new_session=True)
    victim = None
    try:
        if kill_at is not None:
            time.sleep(kill_at)
            # the worker that serves client 0's address (sticky: the same one for GET /)
            j = get_json(h.port, source="127.0.0.2")
            if j and j.get("pid") in h.ready_pids():
                victim = j["pid"]
                os.kill(victim, signal.SIGKILL)
        out, err = p.communicate(timeout=seconds + 20)
    except BaseException:
        bl._killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    try:
        r = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return dict(error=f"sio_client: rc {p.returncode}: {err.strip()[-300:]}"), victim
    return r, victim


def sio_summary(r):
    cs = r.get("clients", [])
    errs = Counter()
    for c in cs:
        errs.update(c["connect_errors"])
    return dict(clients=len(cs), connected=sum(1 for c in cs if c["connects"] > 0),
                acks=sum(c["acks"] for c in cs), timeouts=sum(c["ack_timeouts"] for c in cs),
                workers=len({p for c in cs for p in c["pids"]}), connect_errors=dict(errs))


def check_sio_sticky(h, args):
    r, _ = sio_clients(h, args, args.sio_seconds)
    if "error" in r:
        return chk(False, r, r["error"])
    s = sio_summary(r)
    per = [c["acks"] for c in r["clients"]]
    want = args.sio_seconds * 10 * 0.5  # emits every 100 ms; half of them acked at least
    good = s["connected"] == s["clients"] and min(per) >= want and not s["connect_errors"]
    return chk(good, s, f"{s['connected']}/{s['clients']} clients connected over polling, acks per "
                        f"client {min(per)}–{max(per)}, on {s['workers']} worker(s), connect errors "
                        f"{s['connect_errors'] or 0}")


def check_sio_no_sticky(h, args):
    r, _ = sio_clients(h, args, args.sio_seconds, clients=10)
    if "error" in r:
        return chk(False, r, r["error"])
    s = sio_summary(r)
    want = args.sio_seconds * 10 * 0.5
    healthy = sum(1 for c in r["clients"] if c["acks"] >= want and not c["connect_errors"])
    # Expected to FAIL for the clients: round-robin spreads one session's polls over workers.
    good = healthy < s["clients"]
    return chk(good, s, f"as expected without sticky, {s['clients'] - healthy}/{s['clients']} clients broken "
                        f"(connect errors {s['connect_errors'] or 0}, acks {s['acks']}, timeouts {s['timeouts']})"
               if good else f"all {s['clients']} clients worked without --balance sticky: the check "
                            "cannot tell sticky from not")


def check_sio_kill(h, args):
    seconds = args.sio_kill_seconds
    # kill at 2 s; clients reconnect within ~150 ms, while the slot may still be empty; then
    # 6.5 s without emits (the servers close idle keep-alive sockets after 5 s), then emits again.
    r, victim = sio_clients(h, args, seconds, kill_at=2.0, quiet=(2.5, 9.0))
    if "error" in r:
        return chk(False, r, r["error"])
    s = sio_summary(r)
    stuck = [c["localAddress"] for c in r["clients"]
             if c["last_ack"] is None or c["last_ack"] < seconds - 3]
    # A client of the killed worker loses its transport once and reconnects. If it is split
    # (its reconnect lands on another worker while the slot is empty, a later connection goes
    # home: "Session ID unknown"), it loses the transport again: 2+ transport errors.
    split = [c["localAddress"] for c in r["clients"] if c["disconnects"].get("transport error", 0) > 1]
    good = not stuck and not split
    per_client = [{k: c[k] for k in ("localAddress", "keepAlive", "connects", "acks", "ack_timeouts", "pids",
                                     "last_ack", "disconnects", "connect_errors") if k in c}
                  for c in r["clients"]]
    return chk(good, dict(s, stuck=stuck, split=split, victim=victim, per_client=per_client),
               f"kill -9 of client 127.0.0.2's worker (pid {victim}) at 2s: {len(split)}/{s['clients']} "
               f"clients split across two workers (disconnected 2+ times), {len(stuck)} still without "
               f"acks in the last 3 of {seconds}s (quiet 2.5–9 s); connect errors "
               f"{s['connect_errors'] or 0}")


def check_ws_reload(h, args):
    p = subprocess.Popen(["node", "ws_client.js", str(h.port), "30"], cwd=APPS, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env=bl.tagged_env(bl.new_tag("wscl")), start_new_session=True)
    lines = []
    try:
        first = p.stdout.readline()
        lines.append(first)
        t = time.monotonic()
        t_wall = time.time()
        cp = h.ctl("reload", h.name, timeout=120)
        took = time.monotonic() - t
        out, err = p.communicate(timeout=40)
        lines += out.splitlines()
    except BaseException:
        bl._killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    ev = {}
    for ln in lines:
        try:
            o = json.loads(ln)
            ev[o["event"]] = o
        except (ValueError, KeyError):
            pass
    code = ev.get("close", {}).get("code")
    at = ev.get("close", {}).get("at_ms")
    closed_after = round(at / 1000 - t_wall, 2) if at else None
    reopen = ev.get("reopen", {}).get("echo")
    # Expected: the app learns it is being drained and closes with 1001 at once (it does on
    # SIGTERM and on 'disconnect' / {herd: 'stopping'}), and the reload does not wait for
    # --kill-timeout.
    good = (cp.returncode == 0 and code == 1001 and reopen and took < h.srv.kill_timeout
            and closed_after is not None and closed_after < 1.5)
    return chk(good, dict(close_code=code, closed_after_s=closed_after, reopened=reopen,
                          reload_s=round(took, 2), rc=cp.returncode),
               f"client saw close code {code} {closed_after}s after the reload began, reconnect "
               f"{'works' if reopen else 'FAILED'}, reload took {took:.1f}s (kill-timeout "
               f"{h.srv.kill_timeout:g}s)")


def check_reload_time(h, args, prev):
    took = prev.get("reload_ka", {}).get("value", {}).get("reload_s")
    if took is None:
        r = do_reload(h, args, "keep-alive")
        took = r["reload_s"]
    good = took < h.srv.kill_timeout
    return chk(good, dict(reload_s=took), f"reload of 2 workers took {took}s (kill-timeout "
                                          f"{h.srv.kill_timeout:g}s)")


def check_stays_up(h, args):
    """A worker that is idle must not die: no crash exits in the first 3 s of an idle cluster."""
    time.sleep(3.0)
    crashes = [e for e in h.events() if e.get("event") == "exited" and e.get("reason") == "crash"]
    answer = get_json(h.port, timeout=3)
    tail = [ln for ln in h.proc.log_tail(40).splitlines() if "Error" in ln][-1:] if h.proc else []
    good = not crashes
    return chk(good, dict(crash_exits=len(crashes), answered=bool(answer)),
               f"{len(crashes)} crash exit(s) in 3 s idle; GET / {'answered' if answer else 'got no answer'}"
               + (f"; last error: {json.loads(tail[0]).get('line', '')[:80]}" if tail else ""))


def check_not_ready(h, args):
    """An app that serves nothing: herd should not call it ready (issue #11 item 3)."""
    deadline = time.monotonic() + h.srv.not_ready_wait
    while True:  # until herd calls every slot ready (the bug) or past --listen-timeout (10 s)
        st = h.status() or {}
        if (st and st.get("ready") == st.get("desired")) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ready = st.get("ready")
    evs = h.events()
    vias = Counter(e.get("via") for e in evs if e.get("event") == "ready")
    serving = get_json(h.port, timeout=2)
    try:
        with socket.create_connection(("127.0.0.1", h.port), timeout=2) as s:
            port_state = "accepts connections"
            s.settimeout(2)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            try:
                port_state += ", answers" if s.recv(1) else ", closes them"
            except socket.timeout:
                port_state += ", never answers"
    except OSError as e:
        port_state = f"refuses ({type(e).__name__})"
    # Expected (issue #11 item 3): not called ready, and herd's port does not leave clients
    # hanging (refused, or an error answer) while nothing serves it.
    good = not serving and not ready and "never answers" not in port_state
    return chk(good, dict(ready=ready, desired=st.get("desired"), ready_via=dict(vias), port=port_state),
               f"serves nothing; herd status says {ready}/{st.get('desired')} ready "
               f"(ready events via {dict(vias) or 'none'}); the port {port_state}")


# ---------------------------------------------------------------- driver

def run_server(srv: Server, args, logdir: Path) -> dict:
    res = dict(key=srv.key, label=srv.label, line=srv.line, checks={})
    why = srv.needs()
    if why:
        res["skipped"] = why.replace("SKIP-LOUD: ", "")
        res["loud"] = why.startswith("SKIP-LOUD")
        return res
    port = bl.free_port()
    bl.log(f"== {srv.key}: {srv.line}  (port {port})")
    h = HerdRun(srv, args.herd, port, logdir)
    try:
        checks = list(srv.checks)
        if "not_ready" in checks:
            res["checks"]["not_ready"] = check_not_ready(h, args)
            return res
        if "stays_up" in checks:
            res["checks"]["stays_up"] = check_stays_up(h, args)
            return res
        w = h.wait_serving(2, args.ready_timeout)
        res["checks"]["works"] = chk(w["ok"], w, w["why"] or "every worker answers")
        if not w["ok"]:
            return res
        h.wait_all_ready(2, 10)
        for c in checks:
            if c == "works":
                continue
            t = time.monotonic()
            if c == "latency":
                r = check_latency(h, args)
            elif c in ("reload_ka", "reload_close"):
                r = check_reload(h, args, "keep-alive" if c == "reload_ka" else "close")
            elif c == "kill9":
                r = check_kill9(h, args)
            elif c == "sio_sticky":
                r = check_sio_sticky(h, args)
            elif c == "sio_no_sticky":
                r = check_sio_no_sticky(h, args)
            elif c == "sio_kill":
                r = check_sio_kill(h, args)
            elif c == "ws_reload":
                r = check_ws_reload(h, args)
            elif c == "reload_time":
                r = check_reload_time(h, args, res["checks"])
            else:
                raise ValueError(c)
            r["s"] = round(time.monotonic() - t, 1)
            res["checks"][c] = r
            bl.log(f"   {c}: {'ok' if r['ok'] else 'NOT ok'} — {r['detail']}")
            # let the cluster settle before the next check
            h.wait_all_ready(2, 15)
    except Exception as e:  # noqa: BLE001 — a broken check is a failed check, the rest go on
        res["checks"]["harness"] = chk(False, None, f"{type(e).__name__}: {e}")
        bl.log(f"   harness error: {e!r}")
    finally:
        res["herd_log_tail"] = h.proc.log_tail(8) if h.proc else ""
        h.stop()
    return res


def verdicts(res: dict) -> list[tuple[str, str, str]]:
    """(check, status, detail) with status PASS / FAIL / KNOWN #11.N / NOT SEEN #11.N."""
    srv = next(s for s in SERVERS if s.key == res["key"])
    out = []
    for c, r in res["checks"].items():
        item = srv.expect.get(c)
        if r["ok"]:
            status = f"not seen (#11 item {item})" if item else "pass"
        else:
            status = f"known (#11 item {item})" if item else "FAIL"
        out.append((c, status, r["detail"]))
    return out


def srv_of(res) -> Server:
    return next(s for s in SERVERS if s.key == res["key"])


def cell(res, c, fmt):
    r = res["checks"].get(c)
    if r is None:
        return "–"
    srv = next(s for s in SERVERS if s.key == res["key"])
    mark = ""
    if not r["ok"]:
        item = srv.expect.get(c)
        mark = f" ⚠ known #11.{item}" if item else " ✗ FAIL"
    return fmt(r) + mark


def loss(r):
    v = r["value"]
    if not isinstance(v, dict) or "failed" not in v:
        return r["detail"]
    tot = v.get("total", v.get("ok", 0) + v["failed"])
    return f"{v['failed']}/{tot}"


def table(results) -> str:
    rows = ["| server | herd command line | works | reload loss keep-alive / close | kill -9 | notes |",
            "|---|---|---|---|---|---|"]
    for res in results:
        line = f"`{res['line']}`"
        if "skipped" in res:
            rows.append(f"| {res['label']} | {line} | SKIPPED | – | – | {res['skipped']} |")
            continue
        works = cell(res, "works", lambda r: "yes (every worker answers)" if r["ok"] else r["detail"])
        if "not_ready" in res["checks"]:
            works = cell(res, "not_ready", lambda r: "no")
        if "stays_up" in res["checks"]:
            works = cell(res, "stays_up", lambda r: "yes" if r["ok"] else "no")
        rl = f"{cell(res, 'reload_ka', loss)} / {cell(res, 'reload_close', loss)}"
        k9 = cell(res, "kill9", loss)
        notes = []
        for c, fmt in (("latency", lambda r: "no keep-alive (closes after each response)"
                        if r["value"].get("no_keepalive") else f"keep-alive {r['value']['median_ms']} ms/req"),
                       ("reload_ka", None),
                       ("reload_time", lambda r: f"reload {r['value']['reload_s']}s"),
                       ("sio_sticky", lambda r: r["detail"]),
                       ("sio_no_sticky", lambda r: r["detail"]),
                       ("sio_kill", lambda r: r["detail"]),
                       ("ws_reload", lambda r: r["detail"]),
                       ("not_ready", lambda r: r["detail"]),
                       ("stays_up", lambda r: r["detail"]),
                       ("harness", lambda r: r["detail"])):
            if c == "reload_ka" and c in res["checks"] and "reload_time" not in res["checks"]:
                # the loss is in its column: only the time here, without a mark
                v = res["checks"][c]["value"]
                notes.append(f"reload took {v['reload_s']}s" if isinstance(v, dict) else "")
            elif c in res["checks"] and fmt:
                notes.append(cell(res, c, fmt))
        if srv_of(res).notes:
            notes.append(srv_of(res).notes)
        rows.append(f"| {res['label']} | {line} | {works} | {rl} | {k9} | {'; '.join(notes)} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--ci", action="store_true", help="quick mode: the main rows, shorter loads (~2.5 min on 2 shared cores)")
    ap.add_argument("--herd", type=Path, default=bl.REPO / "target" / "release" / "herd",
                    help="herd binary (target/release/herd)")
    ap.add_argument("--only", default="", help="comma-separated server keys: " + ",".join(s.key for s in SERVERS))
    ap.add_argument("--out", type=Path, default=bl.OUT, help="where the report goes (bench/out)")
    args = ap.parse_args()
    args.mode = "ci" if args.ci else "full"
    # Load: light and bounded (2 shared cores): `threads` clients at `rate` req/s each.
    args.threads = 4
    args.rate = 60 if args.ci else 100
    args.settle = 1.0 if args.ci else 1.5
    args.latency_requests = 20 if args.ci else 50
    args.sio_clients = 6
    args.sio_seconds = 3 if args.ci else 5
    args.sio_kill_seconds = 14
    args.ready_timeout = 30
    args.not_ready_wait = 14.0
    if not (args.herd.is_file() and os.access(args.herd, os.X_OK)):
        print(f"error: no herd binary at {args.herd} (cargo build --release -p herd, or --herd PATH)",
              file=sys.stderr)
        return 2
    servers = SERVERS
    if args.only:
        keys = args.only.split(",")
        unknown = set(keys) - {s.key for s in SERVERS}
        if unknown:
            print(f"error: unknown server(s) {sorted(unknown)}", file=sys.stderr)
            return 2
        servers = [s for s in SERVERS if s.key in keys]
    elif args.ci:
        servers = [s for s in SERVERS if s.ci]

    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = args.out / f"logs-compat-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)
    bl.install_signal_handlers()
    t0 = time.monotonic()
    results = []
    try:
        for srv in servers:
            res = run_server(srv, args, logdir)
            if "skipped" in res:
                loud = "!" * 70
                bl.log(f"{loud}\nSKIPPED {srv.label}: {res['skipped']}\n{loud}")
            results.append(res)
    finally:
        bl.cleanup_all()
    took = time.monotonic() - t0

    fails, known, unseen, skipped = check_doc_lines(), [], [], []
    for res in results:
        if "skipped" in res:
            skipped.append(f"{res['label']}: {res['skipped']}")
            # npm / PyPI packages are part of this harness: missing is a failure, not a skip.
            if not res.get("loud"):
                fails.append(f"{res['label']}: not installed — {res['skipped']}")
            continue
        for c, status, detail in verdicts(res):
            line = f"{res['label']} / {c}: {detail}"
            if status == "FAIL":
                fails.append(line)
            elif status.startswith("known"):
                known.append(f"{status}: {line}")
            elif status.startswith("not seen"):
                unseen.append(f"{status}: {line}")

    load = os.getloadavg()
    md = [f"# herd compatibility ({args.mode} mode), {time.strftime('%Y-%m-%d %H:%M:%S')}", "",
          f"herd: `{args.herd}` ({bl.run_cmd([str(args.herd), '--version'], os.environ, 10).stdout.strip()}); "
          f"node {subprocess.run(['node', '--version'], capture_output=True, text=True).stdout.strip()}; "
          f"load average at the end {load[0]:.1f}; took {took:.0f}s. "
          f"Load: {args.threads} client threads at ≤{args.rate:g} req/s each; 2 workers each.", "",
          table(results), "",
          "Reload/kill columns: failed/total requests of the clients running across the event. "
          "`⚠ known #11.N`: a known herd bug (issue #11, item N), reported without failing the run:", ""]
    md += [f"{n}. {KNOWN[n]}" for n in sorted(KNOWN)] + [""]
    if known:
        md += ["## Known bugs seen (issue #11)", ""] + [f"- {x}" for x in known] + [""]
    if unseen:
        md += ["## Known bugs not seen this run (a race, or fixed: check before editing EXPECT)", ""] + \
              [f"- {x}" for x in unseen] + [""]
    if skipped:
        md += ["## Skipped", ""] + [f"- {x}" for x in skipped] + [""]
    md += ["## Verdict", "", f"FAIL: {len(fails)} unexpected failure(s)" if fails else "PASS", ""] + \
          [f"- {x}" for x in fails]
    text = "\n".join(md) + "\n"
    print(text)
    (args.out / f"compat-{stamp}.md").write_text(text)
    (args.out / f"compat-{stamp}.json").write_text(json.dumps(
        dict(mode=args.mode, took_s=round(took, 1), results=results, fails=fails, known=known,
             unseen=unseen, skipped=skipped), indent=1, default=str))
    bl.log(f"report: {args.out / f'compat-{stamp}.md'}")
    return 1 if fails else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        bl.cleanup_all()
        sys.exit(130)
