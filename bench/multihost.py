#!/usr/bin/env python3
"""Several herd hosts behind HAProxy, state in Redis, in network namespaces (issue #14).

What it builds (root only; everything inside network namespaces this script makes)
    A switch namespace with a bridge, and four namespaces on it, each with one veth:
        herd-mh-<pid>-lb     10.231.0.2   HAProxy (Debian's haproxy) on :8080, and the clients
        herd-mh-<pid>-h1     10.231.0.11  herd run -i 2 examples/counter/app.js on :3000
        herd-mh-<pid>-h2     10.231.0.12  the same, a second "host"
        herd-mh-<pid>-redis  10.231.0.20  redis-server (AOF, fsync always) on :6379
    Each host's herd has its own HERD_HOME (a temp dir), so the hosts do not see each other's
    apps. No address is added outside the namespaces; the namespaces (and with them the veths
    and the bridge) are deleted on every exit path: normal end, error, Ctrl-C, SIGTERM/SIGHUP.
    Every process is started in a session of its own and ended by its pid / process group; the
    teardown then SIGKILLs what `ip netns pids` still lists in our namespaces.

    HAProxy: roundrobin, sticky sessions with an inserted cookie (`cookie SRV insert`),
    `option redispatch`, `retries 3` (connection failures only: a request that reached a
    server is never sent twice), a fresh server connection per request (http-server-close),
    and a health check: herd's `GET /ready` on its `--http` port where this herd has `--http`,
    else the app's own `GET /health` on the app port (said in the output). The config is
    generated into the run's temp dir and printed with --show-config; docs/deploy.md shows it.

What it does
    Bounded load through HAProxy: --clients (6) Python threads, each a keep-alive
    http.client connection with its own cookie jar (the session cookie and HAProxy's), each
    POSTing /count at --rate per second in all, 5 s timeout. Every request is recorded (start,
    end, outcome). While it runs, one event at a time, with --gap seconds between them:
      (a) reload   `herd reload counter` on host 1
      (b) stop     `herd stop counter` on host 2 (with --drain-delay when this herd has it),
                   wait --down seconds, start it again and wait until it answers
      (c) kill9    SIGKILL every worker of host 1 at once (pids from `herd status --json`),
                   wait until host 1 answers again
      (d) redis    SIGKILL redis-server, wait 2 s, start it again (same AOF)
    --rounds (1) times in all. Then the load stops and the Redis counter is read.

The table and the verdict (exit 1 when an expectation fails)
    requests, failed, failed per event (a failure whose [start, end] overlaps an event's window
    [start, end + 2 s] is that event's, else `none`), requests > 2 s (hangs), sessions lost (a
    client whose session count went backwards or whose session cookie was replaced), and the
    Redis counter against the increments the clients saw succeed.
    Expected: 0 failed in reload, stop and `none`; in kill9 only requests in flight at the kill
    (started before it); in redis only 503s (from the app or from HAProxy), and none slower
    than 2 s; 0 sessions lost; counter >= successes (no lost increment) and counter - successes
    <= the failures whose fate is unknown (in flight when a worker or Redis died: the INCR may
    have run and the answer been lost; with none such, counter == successes exactly).

Exit codes: 0 all expectations met, 1 an expectation failed, 2 usage or a missing tool,
77 network namespaces cannot be made here (not root, no CAP_SYS_ADMIN, no `ip`): loud, and
a failure under CI (.ci/run).

How to run (from the repository root, as root)
    apt-get install -y haproxy redis-server && npm ci --prefix examples/counter
    cargo build --release -p herd
    python3 bench/multihost.py --quick        # 1 round, short gaps: ~1 min (CI)
    python3 bench/multihost.py                # 3 rounds: ~3 min
    python3 bench/multihost.py --herd /path/to/herd --show-config

Output: the table on stdout and in bench/out/multihost-<time>.md (+ .json with every failed
request), logs of every process in bench/out/logs-multihost-<time>/.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import os
import shutil
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
APP = REPO / "examples" / "counter" / "app.js"
HAPROXY_TEMPLATE = BENCH / "multihost-haproxy.cfg"

SUBNET = "10.231.0"
ADDR = {"lb": f"{SUBNET}.2", "h1": f"{SUBNET}.11", "h2": f"{SUBNET}.12", "redis": f"{SUBNET}.20"}
APP_PORT = 3000
READY_PORT = 9001
# The --http token of every host (a fresh one per run).
HTTP_TOKEN = secrets.token_hex(16)
LB_PORT = 8080
REDIS_PORT = 6379
HANG_S = 2.0  # a request slower than this is a hang
TAIL_S = 2.0  # an event's window goes on this long after it ends
CLONE_NEWNET = 0x40000000
SKIP = 77


def log(msg: str) -> None:
    print(f"[multihost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Fatal(Exception):
    """Setup failed: message, exit code."""

    def __init__(self, msg: str, code: int = 2):
        super().__init__(msg)
        self.code = code


# ---------------------------------------------------------------- namespaces

_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(ns: str) -> None:
    """Moves the calling thread (only it) into network namespace `ns`."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(ns: str, fn, *args):
    """Runs fn(*args) in a thread inside `ns` and returns its result (or raises its error)."""
    box = {}

    def run():
        try:
            enter_netns(ns)
            box["value"] = fn(*args)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise Fatal(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


class Net:
    """The namespaces: lb, h1, h2, redis, each with eth0 on a bridge in the `sw` namespace."""

    ROLES = ("lb", "h1", "h2", "redis")

    def __init__(self, run_id: str):
        self.prefix = f"herd-mh-{run_id}-"
        self.made: list[str] = []

    def ns(self, role: str) -> str:
        return self.prefix + role

    def build(self) -> None:
        try:
            self._build()
        except Fatal as e:
            # Namespaces, veths or the bridge cannot be made here: nothing can be tested.
            raise Fatal(str(e), SKIP) from None

    def _build(self) -> None:
        sw = self.ns("sw")
        self._add(sw)
        sh("ip", "-n", sw, "link", "set", "lo", "up")
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        for role in self.ROLES:
            ns = self.ns(role)
            self._add(ns)
            port = f"p-{role}"
            sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
               "netns", sw)
            sh("ip", "-n", sw, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ADDR[role]}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _add(self, ns: str) -> None:
        p = sh("ip", "netns", "add", ns, check=False)
        if p.returncode != 0:
            raise Fatal(f"cannot make network namespace {ns}: {p.stderr.strip()}", SKIP)
        self.made.append(ns)

    def pids(self, ns: str) -> list[int]:
        p = sh("ip", "netns", "pids", ns, check=False)
        return [int(x) for x in p.stdout.split() if x.isdigit()]

    def teardown(self) -> None:
        for ns in reversed(self.made):
            for _ in range(3):
                pids = self.pids(ns)
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            sh("ip", "netns", "del", ns, check=False)
        self.made.clear()


def remove_stale_namespaces() -> None:
    """Namespaces `herd-mh-<pid>-*` left by a run whose process is gone (killed too hard to
    clean up): ours by name, and their owner is dead."""
    p = sh("ip", "netns", "list", check=False)
    for line in p.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith("herd-mh-"):
            continue
        owner = name[len("herd-mh-"):].split("-")[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            log(f"removing {name}, left by a run (pid {owner}) that is gone")
            sh("ip", "netns", "del", name, check=False)


# ---------------------------------------------------------------- processes

class Proc:
    """A process started in a namespace (`ip netns exec`), in a session of its own, output to
    a log file; stopped by its process group."""

    def __init__(self, name: str, ns: str, argv: list[str], logdir: Path, env: dict | None = None):
        self.name = name
        self.logpath = logdir / f"{name}.log"
        self.logfile = open(self.logpath, "ab")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                  stdout=self.logfile, stderr=subprocess.STDOUT, env=full_env,
                                  start_new_session=True, cwd=REPO)
        self.pid = self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def signal_group(self, sig) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 10) -> None:
        if self.alive():
            self.signal_group(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.signal_group(signal.SIGKILL)
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.logfile.close()


def herd_supports(herd: str, flag: str) -> bool:
    p = subprocess.run([herd, "run", "--help"], capture_output=True, text=True, timeout=10)
    return flag in p.stdout


class Host:
    """One herd "host": `herd run -i 2 examples/counter/app.js` in its namespace."""

    def __init__(self, role: str, net: Net, herd: str, tmp: Path, logdir: Path, opts):
        self.role = role
        self.ns = net.ns(role)
        self.herd = herd
        self.home = tmp / f"home-{role}"
        self.home.mkdir(mode=0o700)
        self.logdir = logdir
        self.opts = opts
        self.proc: Proc | None = None
        self.starts = 0

    def env(self) -> dict:
        # --http on the host's own address (not loopback) needs a token for its data;
        # /ready, which HAProxy checks, stays open. From the environment: `ps` won't show it.
        return {"HERD_HOME": str(self.home), "HERD_HTTP_TOKEN": HTTP_TOKEN}

    def start(self) -> None:
        self.starts += 1
        argv = [self.herd, "run", "-i", "2", "-n", "counter", "--log-format", "json",
                "-e", f"PORT={APP_PORT}",
                "-e", f"REDIS_URL=redis://{ADDR['redis']}:{REDIS_PORT}",
                "-e", "SESSION_SECRET=multihost-bench-shared-secret",
                "-e", "RATE_LIMIT=100000",
                "-e", "REDIS_TIMEOUT_MS=1000"]
        if self.opts.http:
            argv += ["--http", f"{ADDR[self.role]}:{READY_PORT}"]
        if self.opts.drain_delay:
            argv += ["--drain-delay", self.opts.drain_delay]
        argv.append(str(APP))
        self.proc = Proc(f"{self.role}-herd-{self.starts}", self.ns, argv, self.logdir, self.env())

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        # herd's control socket is a unix path in HERD_HOME: reachable from any namespace.
        env = dict(os.environ)
        env.update(self.env())
        return subprocess.run([self.herd, *args], capture_output=True, text=True, env=env,
                              timeout=timeout)

    def status(self) -> dict | None:
        p = self.cli("status", "counter", "--json", timeout=10)
        if p.returncode != 0:
            return None
        try:
            return json.loads(p.stdout)
        except ValueError:
            return None

    def worker_pids(self) -> list[int]:
        s = self.status() or {}
        return [w["pid"] for w in s.get("workers", []) if w.get("pid")]

    def wait_ready(self, timeout: float = 60, exclude: set | None = None) -> None:
        """Until herd reports 2 ready workers (none of them in `exclude`) and the app answers
        /health with 200 from the balancer's namespace."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            if s:
                ready = [w["pid"] for w in s.get("workers", []) if w.get("state") == "ready"]
                if len(ready) >= 2 and not (set(ready) & (exclude or set())):
                    if probe(self.opts.lb_ns, ADDR[self.role], APP_PORT, "/health") == 200:
                        return
            if self.proc and not self.proc.alive():
                raise Fatal(f"herd on {self.role} exited; see {self.proc.logpath}", 1)
            time.sleep(0.1)
        raise Fatal(f"herd on {self.role} not ready within {timeout:.0f} s; see logs", 1)

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


def probe(ns: str, host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    """GET from inside `ns`: the status, or None."""

    def get():
        try:
            c = http.client.HTTPConnection(host, port, timeout=timeout)
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            c.close()
            return r.status
        except (OSError, http.client.HTTPException):
            return None

    return in_netns(ns, get)


class Redis:
    def __init__(self, net: Net, tmp: Path, logdir: Path):
        self.ns = net.ns("redis")
        self.dir = tmp / "redis"
        self.dir.mkdir()
        self.logdir = logdir
        self.proc: Proc | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        # AOF with fsync on every write: an increment Redis acknowledged survives its SIGKILL.
        argv = ["redis-server", "--bind", ADDR["redis"], "--port", str(REDIS_PORT),
                "--protected-mode", "no", "--dir", str(self.dir), "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no"]
        self.proc = Proc(f"redis-{self.starts}", self.ns, argv, self.logdir)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.command("PING") == "+PONG":
                return
            if not self.proc.alive():
                raise Fatal(f"redis-server exited; see {self.proc.logpath}", 1)
            time.sleep(0.05)
        raise Fatal("redis-server did not answer PING within 20 s", 1)

    def kill9(self) -> None:
        if self.proc:
            self.proc.signal_group(signal.SIGKILL)
            self.proc.p.wait(10)
            self.proc.logfile.close()
            self.proc = None

    def command(self, *words: str) -> str | None:
        """One inline command from the hosts' side of the bridge; the first reply line."""

        def talk():
            import socket
            try:
                with socket.create_connection((ADDR["redis"], REDIS_PORT), timeout=1) as s:
                    s.sendall((" ".join(words) + "\r\n").encode())
                    data = b""
                    while not data.endswith(b"\r\n"):
                        chunk = s.recv(4096)
                        if not chunk:
                            return None
                        data += chunk
                    return data.decode().strip()
            except OSError:
                return None

        return in_netns(self.ns, talk)

    def counter(self) -> int | None:
        # INCRBY 0 answers the value as one integer line (":N"), 0 when the key is missing.
        reply = self.command("INCRBY", "counter:total", "0")
        return int(reply[1:]) if reply and reply.startswith(":") else None

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


class HAProxy:
    def __init__(self, net: Net, tmp: Path, logdir: Path, opts):
        self.ns = net.ns("lb")
        self.cfg = tmp / "haproxy.cfg"
        self.sock = opts.stats_socket
        self.cfg.write_text(haproxy_config(opts))
        self.logdir = logdir
        self.proc: Proc | None = None

    def start(self) -> None:
        p = subprocess.run(["haproxy", "-c", "-f", str(self.cfg)], capture_output=True, text=True)
        if p.returncode != 0:
            raise Fatal(f"haproxy rejects the generated config:\n{p.stdout}{p.stderr}", 1)
        self.proc = Proc("haproxy", self.ns, ["haproxy", "-db", "-f", str(self.cfg)], self.logdir)

    def admin(self, command: str) -> str:
        """One command on HAProxy's admin socket (a unix path: reachable from any namespace)."""
        import socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.sock))
            s.sendall(command.encode() + b"\n")
            out = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        return out.decode(errors="replace")

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


def haproxy_config(opts) -> str:
    if opts.http:
        check = f"option httpchk GET /ready\n    http-check expect status 200"
        check_port = f" port {READY_PORT}"
    else:
        check = f"option httpchk GET /health\n    http-check expect status 200"
        check_port = ""
    text = HAPROXY_TEMPLATE.read_text()
    return (text.replace("{LB_ADDR}", f"{ADDR['lb']}:{LB_PORT}")
                .replace("{CHECK}", check)
                .replace("{H1}", f"{ADDR['h1']}:{APP_PORT}")
                .replace("{H2}", f"{ADDR['h2']}:{APP_PORT}")
                .replace("{CHECK_PORT}", check_port)
                .replace("{STATS_SOCKET}", str(opts.stats_socket)))


# ---------------------------------------------------------------- load

class Client(threading.Thread):
    """One user: a keep-alive connection to HAProxy, a cookie jar, POST /count in a loop."""

    def __init__(self, i: int, ns: str, interval: float, stop: threading.Event, t0: float):
        super().__init__(daemon=True, name=f"client-{i}")
        self.i = i
        self.ns = ns
        self.interval = interval
        self.stop_flag = stop
        self.t0 = t0
        self.cookies: dict[str, str] = {}
        self.records: list[tuple] = []  # (start, end, outcome, in_doubt)
        self.successes = 0
        self.in_doubt = 0
        self.session_count = 0  # the session's count as the server last said
        self.sessions_lost: list[float] = []
        self.error: str | None = None

    def run(self) -> None:
        try:
            enter_netns(self.ns)
        except OSError as e:
            self.error = str(e)
            return
        conn = None
        next_at = time.monotonic()
        while not self.stop_flag.is_set():
            now = time.monotonic()
            if now < next_at:
                time.sleep(next_at - now)
            next_at += self.interval
            if conn is None:
                conn = http.client.HTTPConnection(ADDR["lb"], LB_PORT, timeout=5)
            start = time.monotonic() - self.t0
            try:
                headers = {"Content-Length": "0"}
                if self.cookies:
                    headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
                conn.request("POST", "/count", headers=headers)
                r = conn.getresponse()
                body = r.read()
                end = time.monotonic() - self.t0
                self.answer(start, end, r, body)
                if r.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                end = time.monotonic() - self.t0
                # The request may have reached a server: its fate is unknown.
                self.in_doubt += 1
                self.records.append((start, end, type(e).__name__, True))
                conn.close()
                conn = None
        if conn:
            conn.close()

    def answer(self, start: float, end: float, r, body: bytes) -> None:
        sid_before = self.cookies.get("counter.sid")
        for name, value in r.getheaders():
            if name.lower() == "set-cookie":
                k, _, v = value.split(";")[0].partition("=")
                self.cookies[k.strip()] = v.strip()
        sid_after = self.cookies.get("counter.sid")
        data = None
        try:
            data = json.loads(body)
        except ValueError:
            pass
        if r.status == 200 and isinstance(data, dict):
            self.successes += 1
            self.records.append((start, end, "ok", False))
            got = (data.get("session") or {}).get("count")
            lost = sid_before is not None and sid_after != sid_before
            if isinstance(got, int):
                # Every success counts one; in-doubt failures may have counted one each.
                if got < self.session_count + 1 or got > self.session_count + 1 + self.in_doubt:
                    lost = lost or got < self.session_count + 1
                self.session_count = got
            if lost:
                self.sessions_lost.append(end)
            return
        # 503 from the app says whether the INCR ran; HAProxy's own 503 (no server) never
        # reached one; 502/504 mean a server took the request and the answer was lost.
        applied = data.get("applied") if isinstance(data, dict) else None
        if r.status == 503 and (applied is False or data is None):
            doubt = False
        else:
            doubt = True
        if doubt:
            self.in_doubt += 1
        self.records.append((start, end, f"http {r.status}", doubt))


# ---------------------------------------------------------------- events

class Run:
    def __init__(self, opts, net: Net, hosts: dict, redis: Redis, lb: HAProxy):
        self.opts = opts
        self.lb = lb
        self.net = net
        self.hosts = hosts
        self.redis = redis
        self.events: list[dict] = []
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, kind: str, fn) -> None:
        e = {"kind": kind, "start": self.now(), "problems": []}
        log(f"event {kind} …")
        try:
            fn(e)
        finally:
            e["end"] = self.now()
            self.events.append(e)
            log(f"event {kind} done in {e['end'] - e['start']:.1f} s")

    def reload(self, e: dict) -> None:
        h1 = self.hosts["h1"]
        old = set(h1.worker_pids())
        p = h1.cli("reload", "counter", timeout=60)
        if p.returncode != 0:
            e["problems"].append(f"herd reload exited {p.returncode}: {p.stderr.strip()}")
            return
        h1.wait_ready(exclude=old)

    def stop_start(self, e: dict) -> None:
        h2 = self.hosts["h2"]
        lb_drain = not self.opts.drain_delay and self.opts.lb_drain > 0
        if lb_drain:
            # No --drain-delay in this herd: drain at the balancer instead, the classic way
            # (take the server out, wait, stop it, start it, put it back).
            self.lb.admin("set server counter/h2 state maint")
            time.sleep(self.opts.lb_drain)
        p = h2.cli("stop", "counter", timeout=60)
        if p.returncode != 0:
            e["problems"].append(f"herd stop exited {p.returncode}: {p.stderr.strip()}")
        if h2.proc:
            try:
                h2.proc.p.wait(30)
            except subprocess.TimeoutExpired:
                e["problems"].append("herd on h2 still running 30 s after herd stop")
            h2.proc.stop()
        time.sleep(self.opts.down)
        h2.start()
        h2.wait_ready()
        if lb_drain:
            self.lb.admin("set server counter/h2 state ready")

    def kill9(self, e: dict) -> None:
        h1 = self.hosts["h1"]
        pids = h1.worker_pids()
        e["kill_at"] = self.now()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        e["victims"] = pids
        h1.wait_ready(exclude=set(pids))

    def redis_outage(self, e: dict) -> None:
        self.redis.kill9()
        e["kill_at"] = self.now()
        time.sleep(2.0)
        self.redis.start()
        for h in self.hosts.values():
            h.wait_ready()


def attribute(records: list, events: list, failed: bool = True) -> dict:
    """Failed requests (or, failed=False, hangs) per event window."""
    per: dict[str, list] = {}
    for rec in records:
        start, end, outcome, _doubt = rec
        if failed and outcome == "ok":
            continue
        if not failed and end - start <= HANG_S:
            continue
        owner = "none"
        for e in events:
            if start <= e["end"] + TAIL_S and end >= e["start"]:
                owner = e["kind"]
                break
        per.setdefault(owner, []).append((rec, e if owner != "none" else None))
    return per


def verdict(opts, clients: list, events: list, counter: int | None) -> tuple[dict, list]:
    records = [r for c in clients for r in c.records]
    successes = sum(c.successes for c in clients)
    in_doubt = sum(c.in_doubt for c in clients)
    failed = [r for r in records if r[2] != "ok"]
    per = attribute(records, events)
    hangs = [r for r in records if r[1] - r[0] > HANG_S]
    hangs_per = attribute(records, events, failed=False)
    lost_sessions = sum(1 for c in clients if c.sessions_lost)
    problems = []
    for e in events:
        for p in e["problems"]:
            problems.append(f"{e['kind']}: {p}")
    for kind in ("reload", "stop", "none"):
        n = len(per.get(kind, []))
        if n:
            problems.append(f"{kind}: {n} failed requests, expected 0")
    for rec, e in per.get("kill9", []):
        start, _end, outcome, _ = rec
        if start > e.get("kill_at", e["start"]):
            problems.append(f"kill9: a request started {start - e['kill_at']:.2f} s after the "
                            f"kill failed ({outcome}): only requests in flight may")
    for rec, e in per.get("redis", []):
        if not rec[2].startswith("http 503"):
            problems.append(f"redis: a request failed with {rec[2]}, expected a 503")
    # A slow answer is a hang where the expectation is a quick refusal: in the Redis outage
    # (and where nothing happens). Slow successes while host 1's workers are replaced after
    # kill -9 are shown, not judged: the expectation there is about failures.
    for kind in ("redis", "none"):
        slow = hangs_per.get(kind, [])
        if slow:
            problems.append(f"{kind}: {len(slow)} requests took over {HANG_S:.0f} s (a hang), "
                            f"the longest {max(r[1] - r[0] for r, _ in slow):.2f} s")
    if lost_sessions:
        problems.append(f"{lost_sessions} clients lost their session")
    if counter is None:
        problems.append("could not read the Redis counter")
    elif counter < successes:
        problems.append(f"lost increments: Redis counter {counter} < {successes} successes")
    elif counter - successes > in_doubt:
        problems.append(f"Redis counter {counter} exceeds {successes} successes by more than "
                        f"the {in_doubt} requests in doubt")
    if successes == 0:
        problems.append("no request succeeded")
    for c in clients:
        if c.error:
            problems.append(f"client {c.i}: {c.error}")
    summary = {
        "requests": len(records),
        "successes": successes,
        "failed": len(failed),
        "failed_per_event": {k: len(v) for k, v in per.items()},
        "failed_kinds_per_event": {
            k: sorted({r[2] for r, _ in v}) for k, v in per.items()},
        "hangs": len(hangs),
        "hangs_per_event": {k: len(v) for k, v in hangs_per.items()},
        "max_latency_s": max((r[1] - r[0] for r in records), default=0.0),
        "sessions_lost": lost_sessions,
        "counter": counter,
        "in_doubt": in_doubt,
        "events": [{k: v for k, v in e.items()} for e in events],
    }
    return summary, problems


def render(opts, summary: dict, problems: list) -> str:
    ev_counts = {}
    for e in summary["events"]:
        ev_counts[e["kind"]] = ev_counts.get(e["kind"], 0) + 1
    counter = summary["counter"]
    succ = summary["successes"]
    if counter is None:
        match = "unknown (counter unreadable)"
    elif counter == succ:
        match = f"yes ({counter} = {succ})"
    elif succ <= counter <= succ + summary["in_doubt"]:
        match = (f"yes within the in-doubt requests ({counter} = {succ} + {counter - succ}; "
                 f"{summary['in_doubt']} in doubt)")
    else:
        match = f"NO ({counter} vs {succ} successes, {summary['in_doubt']} in doubt)"
    check = ("herd's /ready (--http)" if opts.http
             else "the app's GET /health on the app port (this herd has no --http)")
    if opts.drain_delay:
        drain = f"herd --drain-delay {opts.drain_delay}"
    elif opts.lb_drain > 0:
        drain = (f"at HAProxy (h2 set to maint {opts.lb_drain:g} s before herd stop: this herd "
                 f"has no --drain-delay)")
    else:
        drain = "none (--lb-drain 0, and this herd has no --drain-delay)"
    lines = [
        f"## multihost ({'quick' if opts.quick else 'full'}: {opts.rounds} round(s), "
        f"{opts.clients} clients, {opts.rate:.0f} req/s)",
        "",
        f"HAProxy health check: {check}; drain on stop: {drain}.",
        "",
        "| figure | value | expected |",
        "|---|---|---|",
        f"| requests | {summary['requests']} | |",
        f"| failed | {summary['failed']} | |",
    ]
    expect = {"reload": "0", "stop": "0", "kill9": "in-flight only", "redis": "503s only",
              "none": "0"}
    for kind in ("reload", "stop", "kill9", "redis", "none"):
        n = summary["failed_per_event"].get(kind, 0)
        kinds = ", ".join(summary["failed_kinds_per_event"].get(kind, []))
        times = f" over {ev_counts[kind]} events" if kind in ev_counts else ""
        lines.append(f"| failed in {kind}{times} | {n}{f' ({kinds})' if kinds else ''} | "
                     f"{expect[kind]} |")
    lines += [
        f"| requests > {HANG_S:.0f} s | {summary['hangs']} ("
        + "".join(f"{k} {v}; " for k, v in sorted(summary['hangs_per_event'].items()))
        + f"max {summary['max_latency_s']:.2f} s) | 0 in redis and none |",
        f"| sessions lost | {summary['sessions_lost']} of {opts.clients} | 0 |",
        f"| Redis counter = increments seen | {match} | yes |",
        "",
        "Verdict: " + ("PASS" if not problems else "FAIL"),
    ]
    lines += [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--herd", default=str(REPO / "target" / "release" / "herd"))
    ap.add_argument("--quick", action="store_true", help="1 round, short gaps (CI, ≤ 2 min)")
    ap.add_argument("--rounds", type=int, help="event cycles (default 3, --quick 1)")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--rate", type=float, default=60.0, help="requests per second in all")
    ap.add_argument("--gap", type=float, help="seconds of plain load between events (4; quick 3)")
    ap.add_argument("--down", type=float, default=2.0, help="seconds host 2 stays stopped")
    ap.add_argument("--drain-delay", default="2s",
                    help="herd --drain-delay on the hosts, when herd has it ('' for none)")
    ap.add_argument("--lb-drain", type=float, default=2.0,
                    help="without --drain-delay in herd: seconds h2 is in maintenance at HAProxy "
                         "before herd stop (0: stop it with no drain at all)")
    ap.add_argument("--show-config", action="store_true", help="print the HAProxy config")
    opts = ap.parse_args(argv)
    opts.rounds = opts.rounds or (1 if opts.quick else 3)
    opts.gap = opts.gap if opts.gap is not None else (3.0 if opts.quick else 4.0)
    if opts.rounds < 1 or opts.clients < 1 or not (0 < opts.rate <= 500):
        ap.error("--rounds and --clients must be ≥ 1, --rate in (0, 500]")
    return opts


def preflight(opts) -> None:
    if os.geteuid() != 0:
        raise Fatal("not root: network namespaces need root (CAP_SYS_ADMIN)", SKIP)
    if not shutil.which("ip"):
        raise Fatal("no `ip` (iproute2): cannot make network namespaces", SKIP)
    missing = [t for t in ("haproxy", "redis-server", "node") if not shutil.which(t)]
    if missing:
        raise Fatal(f"missing: {', '.join(missing)} (apt-get install -y haproxy redis-server "
                    f"nodejs)")
    if not os.access(opts.herd, os.X_OK):
        raise Fatal(f"no herd binary at {opts.herd}: cargo build --release -p herd, or --herd")
    if not (APP.parent / "node_modules" / "express").is_dir():
        raise Fatal("examples/counter/node_modules is missing: npm ci --prefix examples/counter")


def main(argv=None) -> int:
    opts = parse_args(argv)

    def _raise(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)
    try:
        preflight(opts)
    except Fatal as e:
        banner(e)
        return e.code
    opts.herd = str(Path(opts.herd).resolve())
    opts.http = herd_supports(opts.herd, "--http")
    if not herd_supports(opts.herd, "--drain-delay"):
        opts.drain_delay = ""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    OUT.mkdir(exist_ok=True)
    logdir = OUT / f"logs-multihost-{stamp}"
    logdir.mkdir()
    tmp = Path(tempfile.mkdtemp(prefix="herd-mh-"))
    opts.stats_socket = tmp / "haproxy.sock"
    net = Net(str(os.getpid()))
    started: list = []
    stop_load = threading.Event()
    clients: list[Client] = []
    try:
        remove_stale_namespaces()
        net.build()
        opts.lb_ns = net.ns("lb")
        redis = Redis(net, tmp, logdir)
        started.append(redis)
        redis.start()
        hosts = {r: Host(r, net, opts.herd, tmp, logdir, opts) for r in ("h1", "h2")}
        for h in hosts.values():
            started.append(h)
            h.start()
        for h in hosts.values():
            h.wait_ready()
        lb = HAProxy(net, tmp, logdir, opts)
        if opts.show_config:
            print(lb.cfg.read_text())
        started.append(lb)
        lb.start()
        deadline = time.monotonic() + 20
        while probe(opts.lb_ns, ADDR["lb"], LB_PORT, "/count") != 200:
            if time.monotonic() > deadline:
                raise Fatal("HAProxy did not answer GET /count with 200 within 20 s", 1)
            time.sleep(0.1)
        log(f"up: haproxy {ADDR['lb']}:{LB_PORT} → h1, h2 (2 workers each) → redis; "
            f"check: {'/ready' if opts.http else 'app /health'}; drain delay: "
            f"{opts.drain_delay or 'none'}")

        run = Run(opts, net, hosts, redis, lb)
        interval = opts.clients / opts.rate
        clients = [Client(i, opts.lb_ns, interval, stop_load, run.t0) for i in range(opts.clients)]
        for c in clients:
            c.start()
        time.sleep(opts.gap)
        for r in range(opts.rounds):
            for kind, fn in (("reload", run.reload), ("stop", run.stop_start),
                             ("kill9", run.kill9), ("redis", run.redis_outage)):
                run.event(kind, fn)
                time.sleep(opts.gap)
        stop_load.set()
        for c in clients:
            c.join(10)
        counter = redis.counter()
        summary, problems = verdict(opts, clients, run.events, counter)
        text = render(opts, summary, problems)
        print(text)
        (OUT / f"multihost-{stamp}.md").write_text(text)
        failed = [{"client": c.i, "start": r[0], "end": r[1], "outcome": r[2], "in_doubt": r[3]}
                  for c in clients for r in c.records if r[2] != "ok" or r[1] - r[0] > HANG_S]
        (OUT / f"multihost-{stamp}.json").write_text(json.dumps(
            {"summary": summary, "problems": problems, "failed_or_slow": failed}, indent=1))
        log(f"written: bench/out/multihost-{stamp}.md, .json, logs in {logdir}")
        return 1 if problems else 0
    except Fatal as e:
        banner(e)
        return e.code
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}): tearing down")
        return 130
    finally:
        stop_load.set()
        for c in clients:
            c.join(6)
        for thing in reversed(started):
            try:
                thing.stop()
            except Exception as e:  # keep tearing down
                log(f"stopping {type(thing).__name__}: {e}")
        net.teardown()
        shutil.rmtree(tmp, ignore_errors=True)


def banner(e: Fatal) -> None:
    bar = "!" * 78
    print(f"{bar}\nmultihost.py: {e}\n" +
          ("network namespaces cannot be made here: NOTHING WAS TESTED (exit 77)\n"
           if e.code == SKIP else "") + bar, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
