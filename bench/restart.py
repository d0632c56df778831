#!/usr/bin/env python3
"""Supervisor footprint, crash recovery and health detection: what herd's supervisor costs and
how fast it notices and replaces a dead, hung, bloated or unhealthy worker.

Sections (--only, comma separated; default all):

    rss      herd's own RSS (VmRSS of the supervisor, /proc) with 4 workers for node round-robin,
             node shared (bench/apps/app.js), python (examples/python/server.py) and hello
             (target/release/hello): idle after all_ready, peak during a --load-seconds wrk
             run, and after it; beside it the RSS of Node's cluster primary
             (bench/apps/node-cluster.js, rr / none) and PM2's God daemon for the same app, with
             herd/Node and herd/PM2 ratios (per round, then median (min–max)).
    restart  kill -9 of a worker, both after and before --min-uptime. With -i 1 (only the
             replacement can answer), each trial kills twice: a worker up 1.5 s (past
             --min-uptime 1s: backoff reset, first step 100 ms — the best case), then its
             replacement as soon as it has answered once (before --min-uptime: the next
             backoff step, 150 ms — what a crash-looping app gets). A client polls GET / every
             ~2 ms from just before each kill; kill -> first answer from the new pid, kill ->
             herd's `ready` event for it, and herd's chosen delay (`restarting` event). With
             -i 4: a sequential client (one request per connection) runs 1 s before to 2 s
             after the kill; requests that failed.
    health   detection times with bench/apps/hang.js (Node) and bench/apps/watchdog.py
             (socket activation), -i 1: (a) --watchdog 1s, GET /hang -> `hung` -> new `ready`;
             (b) --max-memory 150M, the GET /grow that crosses it -> `replacing` -> old `exited`;
             (c) --health-check /health --health-interval 1s --health-failures 3, fail file
             created -> `replacing`; (d) --watchdog 1s, socket activation, GET /stop (no more
             WATCHDOG=1) -> `hung` -> new `ready`.
    cpu      herd's CPU with 8 Node workers (hang.js) over --idle-seconds idle: no health options
             versus --watchdog 1s --max-memory 500M --health-check /health --health-interval 1s.
             CPU% of one core = (utime+stime delta) / wall; also the ns-precise figure from
             /proc/PID/task/*/schedstat, and the workers' CPU. --rounds rounds, the two
             configurations' order rotated.

Times come from herd's own event timestamps (`--log-format json`, ms resolution) against this
script's wall clock at the kill / request; "first answer" is when the response arrived here.
Every figure is a median with its min–max: restart/health over --trials trials (default 5),
RSS and CPU over --rounds rounds (default 3) of fresh starts, with the configurations' order
rotated each round (round r starts the list at offset r).

How to run (from the repository root)
    cargo build --release -p herd -p hello
    npm install --prefix bench                    # PM2, for the rss section's PM2 column
    python3 bench/restart.py                      # everything, ~12 min on 2 cores
    python3 bench/restart.py --quick --only rss,restart  # smoke, ~1.5 min
    python3 bench/restart.py --only restart,health --trials 3
    python3 bench/restart.py --only cpu --idle-seconds 10

Output: markdown tables on stdout, also in bench/out/restart-<time>.md, raw numbers in
bench/out/restart-<time>.json, process logs in bench/out/logs-restart-<time>/. Every process
started carries a benchlib tag and is torn down by it (also on Ctrl-C or error); each herd gets
its own HERD_HOME under /tmp.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree
import benchlib as B  # noqa: E402

HANG_JS = B.BENCH / "apps" / "hang.js"
WATCHDOG_PY = B.BENCH / "apps" / "watchdog.py"
PY_SERVER = B.REPO / "examples" / "python" / "server.py"
SECTIONS = ["rss", "restart", "health", "cpu"]


# ---------------------------------------------------------------- herd with JSON events

def parse_ts(s: str) -> float:
    """herd's `ts` (RFC 3339, UTC, ms) -> seconds since the epoch."""
    return datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


class Events:
    """herd's JSON event lines, read incrementally from its log file (stdout+stderr)."""

    def __init__(self, path: Path):
        self.path = path
        self.pos = 0
        self.partial = b""
        self.items: list[dict] = []

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return
        self.pos += len(data)
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        for line in lines:
            if not line.startswith(b"{"):
                continue
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if "event" in e and "ts" in e:
                e["_t"] = parse_ts(e["ts"])
                self.items.append(e)

    def mark(self) -> int:
        self.poll()
        return len(self.items)

    def wait(self, pred, timeout: float, start: int = 0, alive=lambda: True) -> dict | None:
        """The first event at index >= start matching pred, waiting at most `timeout` s."""
        deadline = time.monotonic() + timeout
        i = start
        while True:
            self.poll()
            while i < len(self.items):
                if pred(self.items[i]):
                    return self.items[i]
                i += 1
            if time.monotonic() > deadline or not alive():
                return None
            time.sleep(0.005)

    def since(self, start: int, names) -> list[dict]:
        self.poll()
        return [e for e in self.items[start:] if e["event"] in names]


class HerdApp:
    """`herd run --log-format json` of one app, with a private HERD_HOME (short, under /tmp)."""

    def __init__(self, args, logdir: Path, name: str, app, instances: int, listen: bool = False,
                 balance: str | None = None, extra=(), env: dict | None = None):
        self.args, self.logdir, self.name, self.app = args, logdir, name, app
        self.instances, self.listen, self.balance = instances, listen, balance
        self.extra, self.env = list(extra), dict(env or {})
        self.proc = None
        self.home = None
        self.port = None
        self.tag = None
        self.events = None
        self._n = 0

    def start(self, timeout: float = 30) -> "HerdApp":
        herd = self.args.herd
        if not (herd.is_file() and os.access(herd, os.X_OK)):
            raise B.SkipTarget(f"no herd binary at {herd} (cargo build --release -p herd)")
        self._n += 1
        self.home = tempfile.mkdtemp(prefix="hb-", dir="/tmp")
        self.port = B.free_port()
        self.tag = B.new_tag(self.name)
        argv = [herd, "run", "-i", self.instances, "-n", "bench", "--log-format", "json"]
        if self.listen:
            argv += ["--listen", f"127.0.0.1:{self.port}"]
        if self.balance:
            argv += ["--balance", self.balance]
        argv += self.extra + [self.app]
        env = B.tagged_env(self.tag, HERD_HOME=self.home, PORT=self.port, NO_COLOR=1,
                           **{k: v.format(home=self.home) for k, v in self.env.items()})
        B.at_cleanup(self.stop)
        log_path = self.logdir / f"{self.name}-{self._n}.log"
        self.proc = B.Proc(argv, env, log_path)
        self.events = Events(log_path)
        ev = self.events.wait(lambda e: e["event"] == "all_ready", timeout, alive=self.proc.alive)
        if ev is None:
            tail = self.proc.log_tail(8)
            self.stop()
            raise B.TargetFailed(f"herd {self.name}: no all_ready within {timeout:g}s\n{tail}")
        B.wait_ready(self.port, self.instances, 15, self.proc.alive)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return bool(self.proc) and self.proc.alive()

    def workers(self) -> dict[int, dict]:
        """Live ready workers: pid -> their latest `ready` event (spawned/ready minus exited)."""
        self.events.poll()
        ready, gone = {}, set()
        for e in self.events.items:
            if e["event"] == "ready" and e.get("pid"):
                ready[e["pid"]] = e
            elif e["event"] in ("exited", "hung") and e.get("pid"):
                gone.add(e["pid"])
        return {p: e for p, e in ready.items() if p not in gone and B.pid_alive(p)}

    def worker_of(self, instance: int) -> dict:
        """The newest live ready worker of a slot (waits up to 10 s for one)."""
        deadline = time.monotonic() + 10
        while True:
            cands = [e for e in self.workers().values() if e.get("instance") == instance]
            if cands:
                return max(cands, key=lambda e: e["_t"])
            if time.monotonic() > deadline:
                raise B.TargetFailed(f"no ready worker in slot {instance}")
            time.sleep(0.02)

    def settle(self, instance: int = 0, up_for: float = 1.5) -> dict:
        """Wait until slot `instance`'s worker has been ready `up_for` s (past --min-uptime 1s,
        so a crash restarts with the first backoff step) and nothing else is pending."""
        w = self.worker_of(instance)
        left = w["_t"] + up_for - time.time()
        if left > 0:
            time.sleep(left)
        return w

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None
        if self.tag:
            B.kill_tagged(self.tag)
        if self.home:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None


# ---------------------------------------------------------------- small helpers

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def mx(xs):
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def ms_stat(xs, spec: str = "{:.0f}") -> str:
    """median (min–max) of the values that are not None."""
    return B.fmt_stat(B.stat(xs), spec)


def ms(v) -> str:
    return "–" if v is None else f"{v:.0f}"


def mib(kib) -> str:
    return "–" if kib is None else f"{kib / 1024:.1f}"


def ratio(a, b) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}"


def get_json(port: int, path: str, timeout: float = 3.0):
    status, body = B.http_get(port, path, timeout=timeout)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {}


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def sched_ns(pid: int) -> int:
    """ns on CPU of every live thread of pid (/proc/PID/task/*/schedstat, first field)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


# ---------------------------------------------------------------- 1. RSS

def herd_kinds(args):
    """(row label, HerdApp kwargs) for the four app kinds."""
    return [
        ("node rr (app.js)", dict(app=B.APP_JS, balance="round-robin")),
        ("node shared (app.js)", dict(app=B.APP_JS, balance="shared")),
        ("python (server.py)", dict(app=PY_SERVER, listen=True)),
        ("hello (Rust)", dict(app=args.hello, listen=True)),
    ]


def rss_measure(pid: int, port: int, args, tag: str) -> dict:
    time.sleep(1.0)
    idle = B.rss_kib([pid])
    with B.RssSampler(lambda: [pid], 0.05) as s:
        r = B.wrk(port, args.load_seconds, 2, args.connections, args.conn == "close", tag)
    peak = max(s.peak_kib, B.rss_kib([pid]))
    time.sleep(1.0)
    after = B.rss_kib([pid])
    return {"idle": idle, "peak": peak, "after": after, "rps": r["rps"], "errors": r["errors"],
            **{k: r[k] for k, _ in B.ERROR_KINDS}}


def section_rss(args, logdir: Path) -> tuple[str, dict]:
    """--rounds rounds; in round r the seven configurations (4 herd, Node rr / none, PM2) run in
    their list order started at offset r, so none is always measured first or last."""
    W = 4
    raw: dict[str, list] = {}
    notes = []
    configs = [(f"herd {label}", "herd", label, kw) for label, kw in herd_kinds(args)]
    configs += [("node-rr", "other", None, lambda: B.NodeCluster(W, logdir, "rr")),
                ("node-none", "other", None, lambda: B.NodeCluster(W, logdir, "none")),
                ("pm2", "other", None, lambda: B.Pm2(W, logdir))]
    for rnd in range(args.rounds):
        for key, kind, label, kw in B.rotated(configs, rnd):
            if kind == "herd":
                t = HerdApp(args, logdir, "rss-" + label.split()[0] + (kw.get("balance") or ""),
                            instances=W, **kw)
            else:
                t = kw()
            try:
                if kind == "herd":
                    t.start()
                    pid = t.pid
                else:
                    t.start(B.free_port(), 0)
                    B.wait_ready(t.port, W, 20, t.alive)
                    pid = t.primary_pids()[0]
                m = rss_measure(pid, t.port, args, t.tag)
                m["round"] = rnd
                raw.setdefault(key, []).append(m)
            except (B.TargetFailed, B.SkipTarget, IndexError) as e:
                notes.append(f"{key}: {e}")
            finally:
                t.stop()
        B.log(f"rss: round {rnd + 1}/{args.rounds} done")

    def m(key, field):
        return B.fmt_stat(B.stat([r[field] for r in raw.get(key, [])]), "{:.1f}", 1 / 1024)

    def rt(a, b, field):
        """a/b per round (both measured in the same round), median (min–max)."""
        by_a = {r["round"]: r for r in raw.get(a, [])}
        by_b = {r["round"]: r for r in raw.get(b, [])}
        both = set(by_a) & set(by_b)
        marks = [B.error_mark(B.error_counts(by[k] for k in both), name)
                 for by, name in ((by_a, a), (by_b, b))]
        return B.fmt_ratio(B.stat(B.paired_ratios(by_a, by_b, field)), marks)

    def rps(key):
        mark = B.error_mark(B.error_counts(raw.get(key, [])))
        return B.fmt_stat(B.stat([r["rps"] for r in raw.get(key, [])])) + (f" {mark}" if mark else "")

    rows = []
    for label, kw in herd_kinds(args):
        k = f"herd {label}"
        other = {"round-robin": "node-rr", "shared": "node-none"}.get(kw.get("balance"))
        pm2 = "pm2" if kw.get("balance") == "round-robin" else None
        rows.append([label, m(k, "idle"), m(k, "peak"), m(k, "after"),
                     rps(k), other or "–",
                     m(other, "idle") if other else "–",
                     m(other, "after") if other else "–",
                     m(pm2, "idle") if pm2 else "–",
                     m(pm2, "after") if pm2 else "–",
                     rt(k, other, "idle") if other else "–",
                     rt(k, other, "after") if other else "–",
                     rt(k, pm2, "idle") if pm2 else "–"])
    md = [f"## 1. Supervisor RSS, 4 workers (MiB, VmRSS; median (min–max) of {args.rounds} "
          f"rounds, order rotated)",
          "",
          f"Idle = 1 s after every worker answered; peak = sampled every 50 ms during "
          f"`wrk -t2 -c{args.connections} -d{args.load_seconds}s`"
          f"{' -H Connection: close' if args.conn == 'close' else ''} on GET /; after = 1 s "
          f"after the load. Node primary = bench/apps/node-cluster.js (rr for round-robin, none "
          f"for shared); PM2 = its God daemon (cluster mode = rr). Python and hello have no "
          f"Node-cluster or PM2 equivalent. Ratios are per round, then median (min–max); ⚠ beside "
          f"a req/s or a ratio names the wrk errors of the load behind it. Each round starts "
          f"every configuration fresh.",
          "",
          table(["app", "herd idle", "herd peak (load)", "herd after", "herd req/s", "vs",
                 "Node primary idle", "Node primary after", "PM2 daemon idle", "PM2 daemon after",
                 "herd/Node idle", "herd/Node after", "herd/PM2 idle"], rows)]
    peaks = [[k, m(k, "idle"), m(k, "peak"), m(k, "after"),
              rps(k), str(sum(r["errors"] for r in raw.get(k, [])))]
             for k in ("node-rr", "node-none", "pm2") if k in raw]
    if peaks:
        md += ["", "The comparison primaries in full:", "",
               table(["primary", "idle", "peak (load)", "after", "req/s", "wrk errors (all rounds)"],
                     peaks)]
    herd_err = {k: sum(r["errors"] for r in v) for k, v in raw.items() if k.startswith("herd") and
                sum(r["errors"] for r in v)}
    if herd_err:
        md += ["", f"⚠ wrk errors under herd (all rounds): {herd_err}"]
    if notes:
        md += ["", "Failures: " + "; ".join(notes)]
    return "\n".join(md), {"raw": raw, "notes": notes}


# ---------------------------------------------------------------- 2. restart after kill -9

def error_kind(e: BaseException) -> str:
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, TimeoutError):  # socket.timeout too
        return "timeout"
    if isinstance(e, (IndexError, ValueError)):
        return "closed without a reply"
    return type(e).__name__


class Client(threading.Thread):
    """Sequential GETs (one connection each) until stop() or `until_new` answers or deadline."""

    def __init__(self, port: int, gap: float, deadline_s: float, not_pid: int | None = None,
                 req_timeout: float = 3.0):
        super().__init__(daemon=True)
        self.port, self.gap, self.not_pid, self.req_timeout = port, gap, not_pid, req_timeout
        self.deadline = time.monotonic() + deadline_s
        self.results: list[tuple] = []  # (t_send, t_recv, ok, pid or error kind)
        self.first_new: float | None = None
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set() and time.monotonic() < self.deadline:
            t0 = time.time()
            try:
                status, body = get_json(self.port, "/", self.req_timeout)
                t1 = time.time()
                pid = body.get("pid")
                ok = status == 200
                self.results.append((t0, t1, ok, pid if ok else f"HTTP {status}"))
                if ok and self.not_pid is not None and pid != self.not_pid:
                    self.first_new = t1
                    return
            except (OSError, ValueError, IndexError) as e:
                self.results.append((t0, time.time(), False, error_kind(e)))
            if self.gap:
                time.sleep(self.gap)

    def stop(self):
        self._halt.set()
        self.join(timeout=self.req_timeout + 2)


def kill_once(h: HerdApp, old: int) -> dict:
    """kill -9 `old` (slot 0's worker) with a client polling GET / every ~2 ms from 50 ms before,
    until the first answer from another pid. Reads herd's events for the old worker's `exited`
    (with its uptime) and `restarting` (the backoff delay herd chose) and the new `ready`."""
    mark = h.events.mark()
    c = Client(h.port, 0.002, 15, not_pid=old)
    c.start()
    time.sleep(0.05)
    t_kill = time.time()
    os.kill(old, signal.SIGKILL)
    c.join(timeout=20)
    c.stop()
    ready = h.events.wait(lambda e: e["event"] == "ready" and e.get("pid") != old
                          and e.get("instance") == 0, 10, mark)
    exited = h.events.wait(lambda e: e["event"] == "exited" and e.get("pid") == old, 1, mark)
    restarting = h.events.wait(lambda e: e["event"] == "restarting" and e.get("instance") == 0,
                               1, mark)
    before = [r for r in c.results if r[1] < t_kill]
    failed = [r for r in c.results if not r[2]]
    return {
        "old_pid": old,
        "new_pid": ready.get("pid") if ready else None,
        "uptime_at_kill_ms": exited.get("uptime_ms") if exited else None,
        "delay_ms": restarting.get("delay_ms") if restarting else None,
        "first_ok_ms": (c.first_new - t_kill) * 1000 if c.first_new else None,
        "ready_ms": (ready["_t"] - t_kill) * 1000 if ready else None,
        "exited_ms": (exited["_t"] - t_kill) * 1000 if exited else None,
        "answered_before_kill": sum(1 for r in before if r[2]),
        "requests": len(c.results),
        "failed": len(failed),
        "failed_kinds": sorted({str(r[3]) for r in failed}),
    }


def restart_single(h: HerdApp, trials: int) -> dict[str, list[dict]]:
    """Per trial, two kills of slot 0's worker:
    "after": the worker has been up 1.5 s, past --min-uptime (1 s): herd's backoff is reset and
             the restart waits the first step (--restart-delay, 100 ms). The best case.
    "before": its replacement, killed as soon as it has answered once (up well under
             --min-uptime): an unstable exit, so herd waits the next backoff step (×1.5,
             150 ms). What a crash-looping app sees; the gap between the two is the backoff."""
    out = {"after": [], "before": []}
    for _ in range(trials):
        old = h.settle(0)["pid"]
        first = kill_once(h, old)
        out["after"].append(first)
        new = first["new_pid"]
        if new is None or not B.pid_alive(new):
            raise B.TargetFailed(f"no replacement for {old} to kill before --min-uptime")
        out["before"].append(kill_once(h, new))
    return out


def restart_multi(h: HerdApp, trials: int, before_s: float = 1.0, after_s: float = 2.0) -> list[dict]:
    out = []
    for _ in range(trials):
        victim = h.settle(0)["pid"]
        for inst in range(1, h.instances):
            h.settle(inst, 0.5)
        mark = h.events.mark()
        c = Client(h.port, 0.0, before_s + after_s + 10)
        c.start()
        time.sleep(before_s)
        t_kill = time.time()
        os.kill(victim, signal.SIGKILL)
        time.sleep(after_s)
        c.stop()
        ready = h.events.wait(lambda e: e["event"] == "ready" and e.get("pid") != victim
                              and e.get("instance") == 0, 10, mark)
        res = [r for r in c.results if r[0] <= t_kill + after_s]
        failed = [r for r in res if not r[2]]
        out.append({
            "victim": victim,
            "requests": len(res),
            "failed": len(failed),
            "failed_kinds": sorted({str(r[3]) for r in failed}),
            "failed_at_ms": [round((r[0] - t_kill) * 1000) for r in failed],
            "ready_ms": (ready["_t"] - t_kill) * 1000 if ready else None,
            "slowest_ms": max(((r[1] - r[0]) * 1000 for r in res), default=None),
        })
    return out


PHASES = {"after": "after --min-uptime (up 1.5 s)",
          "before": "before --min-uptime (replacement killed at once)"}


def section_restart(args, logdir: Path) -> tuple[str, dict]:
    raw = {"single": {}, "multi": {}, "notes": []}
    singles = [k for k in herd_kinds(args) if k[1].get("balance") != "shared"]
    for label, kw in singles:
        h = HerdApp(args, logdir, "kill1-" + label.split()[0], instances=1, **kw)
        try:
            h.start()
            raw["single"][label] = restart_single(h, args.trials)
        except (B.TargetFailed, B.SkipTarget) as e:
            raw["notes"].append(f"-i 1 {label}: {e}")
        finally:
            h.stop()
        B.log(f"restart: -i 1 {label} done")
    for label, kw in herd_kinds(args):
        h = HerdApp(args, logdir, "kill4-" + label.split()[0] + (kw.get("balance") or ""),
                    instances=4, **kw)
        try:
            h.start()
            raw["multi"][label] = restart_multi(h, args.trials)
        except (B.TargetFailed, B.SkipTarget) as e:
            raw["notes"].append(f"-i 4 {label}: {e}")
        finally:
            h.stop()
        B.log(f"restart: -i 4 {label} done")

    rows = []
    for label, phases in raw["single"].items():
        for phase, rs in phases.items():
            fo = [r["first_ok_ms"] for r in rs]
            rows.append([label, PHASES[phase], len(rs),
                         ms_stat([r["uptime_at_kill_ms"] for r in rs]),
                         ms_stat([r["delay_ms"] for r in rs]),
                         ms_stat(fo), ms_stat([r["ready_ms"] for r in rs]),
                         ms_stat([r["exited_ms"] for r in rs]),
                         sum(r["failed"] for r in rs),
                         ", ".join(sorted({k for r in rs for k in r["failed_kinds"]})) or "–"])
    rows4 = []
    for label, rs in raw["multi"].items():
        f = [r["failed"] for r in rs]
        rows4.append([label, len(rs), ms_stat([r["requests"] for r in rs]), ms_stat(f, "{:g}"),
                      ", ".join(sorted({k for r in rs for k in r["failed_kinds"]})) or "–",
                      ms_stat([r["ready_ms"] for r in rs]), ms_stat([r["slowest_ms"] for r in rs])])
    md = [f"## 2. Recovery from kill -9 (ms; {args.trials} trials each; median (min–max))", "",
          "`-i 1`, herd's defaults (`--restart-delay 100ms`, `--min-uptime 1s`). Each trial kills "
          "twice: first a worker that has been up 1.5 s (*after* --min-uptime: backoff reset, "
          "the best case), then its replacement as soon as it has answered once (*before* "
          "--min-uptime: an unstable exit, so herd waits the next backoff step — what a "
          "crash-looping app gets). *up at kill* = the killed worker's uptime (herd's `exited` "
          "event); *backoff* = the delay herd chose (its `restarting` event). A client sends "
          "GET / (new connection each) every ~2 ms from 50 ms before the kill; *first answer* "
          "= kill → the first 200 from the new pid arriving here; *ready* = kill → herd's "
          "`ready` event for the new worker; *exited* = kill → herd's `exited` for the old one. "
          "Failed = requests that errored (the client retries at once): with round-robin herd "
          "keeps accepting and holds connections for the next worker; with a shared socket they "
          "wait in the kernel's backlog.", "",
          table(["app, -i 1", "kill", "trials", "up at kill", "backoff", "first answer", "ready",
                 "exited", "failed requests (all trials)", "failure kinds"], rows),
          "", "`-i 4`: a sequential client (one request per connection, no pause) runs 1 s before "
          "to 2 s after `kill -9` of the worker in slot 0 (up 1.5 s: after --min-uptime); "
          "failed requests per trial.", "",
          table(["app, -i 4", "trials", "requests per trial", "failed per trial", "failure kinds",
                 "replacement ready (ms)", "slowest request (ms)"], rows4)]
    if raw["notes"]:
        md += ["", "Failures: " + "; ".join(raw["notes"])]
    return "\n".join(md), raw


# ---------------------------------------------------------------- 3. health detection

def health_hang(h: HerdApp, trials: int) -> list[dict]:
    out = []
    for _ in range(trials):
        old = h.settle(0)["pid"]
        mark = h.events.mark()
        t0 = time.time()
        status, body = get_json(h.port, "/hang")
        if body.get("pid") != old:
            raise B.TargetFailed(f"/hang answered by {body.get('pid')}, expected {old}")
        hung = h.events.wait(lambda e: e["event"] == "hung" and e.get("pid") == old, 15, mark)
        ready = h.events.wait(lambda e: e["event"] == "ready" and e.get("pid") != old, 15, mark)
        exited = h.events.wait(lambda e: e["event"] == "exited" and e.get("pid") == old, 5, mark)
        out.append({"detect_ms": (hung["_t"] - t0) * 1000 if hung else None,
                    "ready_ms": (ready["_t"] - t0) * 1000 if ready else None,
                    "exited_ms": (exited["_t"] - t0) * 1000 if exited else None,
                    "detail": hung.get("detail") if hung else None,
                    "exit": (exited.get("signal") or exited.get("code")) if exited else None})
    return out


def health_memory(h: HerdApp, trials: int, limit_mib: int) -> list[dict]:
    out = []
    for _ in range(trials):
        old = h.settle(0)["pid"]
        mark = h.events.mark()
        t_cross, grows, rss = None, 0, B.rss_kib([old])
        for _ in range(10):
            t0 = time.time()
            status, body = get_json(h.port, "/grow", 5)
            grows += 1
            rss = B.rss_kib([old])
            if body.get("pid") != old:
                break
            if rss > limit_mib * 1024:
                t_cross = t0
                break
        if t_cross is None:
            raise B.TargetFailed(f"RSS {rss / 1024:.0f} MiB after {grows} /grow: limit not crossed")
        rep = h.events.wait(lambda e: e["event"] == "replacing" and e.get("pid") == old, 10, mark)
        exited = h.events.wait(lambda e: e["event"] == "exited" and e.get("pid") == old, 15, mark)
        ready = h.events.wait(lambda e: e["event"] == "ready" and e.get("pid") != old, 1, mark)
        out.append({"detect_ms": (rep["_t"] - t_cross) * 1000 if rep else None,
                    "exited_ms": (exited["_t"] - t_cross) * 1000 if exited else None,
                    "ready_ms": (ready["_t"] - t_cross) * 1000 if ready else None,
                    "grows": grows, "rss_mib": round(rss / 1024),
                    "detail": rep.get("detail") if rep else None})
    return out


def health_probe(h: HerdApp, trials: int) -> list[dict]:
    out = []
    fail_file = Path(h.home, "fail")
    for _ in range(trials):
        old = h.settle(0, 2.5)["pid"]  # a probe or two have passed
        mark = h.events.mark()
        t0 = time.time()
        fail_file.touch()
        try:
            rep = h.events.wait(lambda e: e["event"] == "replacing" and e.get("pid") == old, 20, mark)
        finally:
            fail_file.unlink(missing_ok=True)
        exited = h.events.wait(lambda e: e["event"] == "exited" and e.get("pid") == old, 15, mark)
        fails = [e for e in h.events.since(mark, {"probe_failed"}) if e.get("pid") == old]
        out.append({"detect_ms": (rep["_t"] - t0) * 1000 if rep else None,
                    "first_fail_ms": (fails[0]["_t"] - t0) * 1000 if fails else None,
                    "exited_ms": (exited["_t"] - t0) * 1000 if exited else None,
                    "probe_failures": len(fails),
                    "detail": rep.get("detail") if rep else None})
    return out


def section_health(args, logdir: Path) -> tuple[str, dict]:
    raw = {"notes": []}
    cases = [
        ("a", "Node, --watchdog 1s: GET /hang (event loop blocked)", "`hung`", "new `ready`",
         dict(app=HANG_JS, extra=["--watchdog", "1s"]), health_hang),
        ("b", f"Node, --max-memory {args.max_memory}M: GET /grow crossing it", "`replacing`",
         "old `exited`", dict(app=HANG_JS, extra=["--max-memory", f"{args.max_memory}M"]),
         lambda h, n: health_memory(h, n, args.max_memory)),
        ("c", "Node, --health-check /health --health-interval 1s --health-failures 3: fail file "
              "created", "`replacing`", "old `exited`",
         dict(app=HANG_JS, extra=["--health-check", "/health", "--health-interval", "1s",
                                  "--health-failures", "3"],
              env={"HEALTH_FAIL_FILE": "{home}/fail"}), health_probe),
        ("d", "socket activation (watchdog.py), --watchdog 1s: GET /stop (no more WATCHDOG=1)",
         "`hung`", "new `ready`",
         dict(app=WATCHDOG_PY, listen=True, extra=["--watchdog", "1s"]), lambda h, n: health_stop(h, n)),
    ]
    rows = []
    for key, what, ev1, ev2, kw, fn in cases:
        h = HerdApp(args, logdir, f"health-{key}", instances=1, **kw)
        try:
            h.start()
            rs = fn(h, args.trials)
            raw[key] = rs
            d = [r["detect_ms"] for r in rs]
            second = [r.get("ready_ms") if ev2 == "new `ready`" else r.get("exited_ms") for r in rs]
            extra = ""
            if key == "c":
                gap = [r["detect_ms"] - r["first_fail_ms"] for r in rs
                       if r["detect_ms"] is not None and r["first_fail_ms"] is not None]
                extra = (f"first failed probe {ms(med([r['first_fail_ms'] for r in rs]))} ms; "
                         f"first failed probe → `replacing` (2 intervals) median {ms(med(gap))}, "
                         f"each: {', '.join(ms(g) for g in gap)}; failed probes "
                         f"{sorted({r['probe_failures'] for r in rs})}")
            elif key == "b":
                extra = (f"/grow calls {sorted({r['grows'] for r in rs})}, RSS at crossing "
                         f"{sorted({r['rss_mib'] for r in rs})} MiB; new ready "
                         f"{ms(med([r['ready_ms'] for r in rs]))} ms")
            elif key in ("a", "d"):
                extra = (f"each: {', '.join(ms(x) for x in d)}; herd's detail: "
                         f"{', '.join(sorted({str(r['detail']) for r in rs}))}; old exited "
                         f"{ms(med([r['exited_ms'] for r in rs]))} ms (signal "
                         f"{', '.join(sorted({str(r['exit']) for r in rs}))})")
            rows.append([f"({key}) {what}", len(rs), ev1, ms_stat(d), ev2, ms_stat(second), extra])
        except (B.TargetFailed, B.SkipTarget) as e:
            raw["notes"].append(f"({key}): {e}")
            rows.append([f"({key}) {what}", 0, ev1, "–", ev2, "–", f"failed: {e}"])
        finally:
            h.stop()
        B.log(f"health: ({key}) done")
    md = [f"## 3. Health detection (ms from the trigger; {args.trials} trials each, -i 1; "
          "median (min–max))", "",
          "Trigger = the moment this script sent the request (or created the fail file); events "
          "are herd's, timestamped by herd. herd checks pings and probe schedules on a tick of "
          "a quarter of --watchdog (at most 1 s) and reads /proc once a second.", "",
          table(["case", "trials", "event", "ms: median (min–max)", "then", "ms: median (min–max)",
                 "notes"], rows)]
    if raw["notes"]:
        md += ["", "Failures: " + "; ".join(raw["notes"])]
    return "\n".join(md), raw


def health_stop(h: HerdApp, trials: int) -> list[dict]:
    """(d): like health_hang, but the trigger is GET /stop (the worker keeps serving)."""
    out = []
    for _ in range(trials):
        old = h.settle(0)["pid"]
        mark = h.events.mark()
        t0 = time.time()
        status, body = get_json(h.port, "/stop")
        if body.get("pid") != old:
            raise B.TargetFailed(f"/stop answered by {body.get('pid')}, expected {old}")
        hung = h.events.wait(lambda e: e["event"] == "hung" and e.get("pid") == old, 15, mark)
        ready = h.events.wait(lambda e: e["event"] == "ready" and e.get("pid") != old, 15, mark)
        exited = h.events.wait(lambda e: e["event"] == "exited" and e.get("pid") == old, 5, mark)
        out.append({"detect_ms": (hung["_t"] - t0) * 1000 if hung else None,
                    "ready_ms": (ready["_t"] - t0) * 1000 if ready else None,
                    "exited_ms": (exited["_t"] - t0) * 1000 if exited else None,
                    "detail": hung.get("detail") if hung else None,
                    "exit": (exited.get("signal") or exited.get("code")) if exited else None})
    return out


# ---------------------------------------------------------------- 4. sampling cost

def cpu_once(args, logdir: Path, label: str, extra: list, windows: int) -> dict:
    """One fresh herd with 8 idle Node workers, its CPU over --idle-seconds."""
    h = HerdApp(args, logdir, "cpu-" + label.split()[0], instances=8, app=HANG_JS, extra=extra)
    try:
        h.start()
        time.sleep(2.0)  # start-up work out of the window
        workers = list(h.workers())
        mark = h.events.mark()
        win = []
        c_start, s_start, w_start = (B.cpu_seconds([h.pid]), sched_ns(h.pid),
                                     B.cpu_seconds(workers))
        t_start = time.monotonic()
        for _ in range(windows):
            c0, s0, t0 = B.cpu_seconds([h.pid]), sched_ns(h.pid), time.monotonic()
            time.sleep(args.idle_seconds / windows)
            dt = time.monotonic() - t0
            win.append({"stat_pct": (B.cpu_seconds([h.pid]) - c0) / dt * 100,
                        "sched_pct": (sched_ns(h.pid) - s0) / 1e9 / dt * 100})
        wall = time.monotonic() - t_start
        res = {
            "wall_s": wall,
            "cpu_s": B.cpu_seconds([h.pid]) - c_start,
            "sched_s": (sched_ns(h.pid) - s_start) / 1e9,
            "workers_cpu_s": B.cpu_seconds(workers) - w_start,
            "windows": win,
            "threads": len(os.listdir(f"/proc/{h.pid}/task")),
            "rss_kib": B.rss_kib([h.pid]),
            "events": [e["event"] for e in h.events.since(mark, {
                "hung", "replacing", "probe_failed", "exited", "spawned"})],
        }
        res["stat_pct"] = res["cpu_s"] / wall * 100
        res["sched_pct"] = res["sched_s"] / wall * 100
        res["workers_pct"] = res["workers_cpu_s"] / wall * 100
        return res
    finally:
        h.stop()


def section_cpu(args, logdir: Path) -> tuple[str, dict]:
    """--rounds rounds, the two configurations' order rotated each round."""
    configs = [("no health options", []),
               ("all checks", ["--watchdog", "1s", "--max-memory", "500M", "--health-check",
                               "/health", "--health-interval", "1s"])]
    raw: dict[str, list] = {label: [] for label, _ in configs}
    notes = []
    windows = max(1, args.cpu_windows)
    for rnd in range(args.rounds):
        for label, extra in B.rotated(configs, rnd):
            try:
                res = cpu_once(args, logdir, label, extra, windows)
                res["round"] = rnd
                raw[label].append(res)
            except (B.TargetFailed, B.SkipTarget) as e:
                notes.append(f"round {rnd + 1} {label}: {e}")
            B.log(f"cpu: round {rnd + 1}/{args.rounds} {label} done")
    rows = []
    for label, rs in raw.items():
        if not rs:
            rows.append([label, 0] + ["–"] * 8)
            continue
        st = lambda f, spec="{:.3f}": B.fmt_stat(B.stat([r[f] for r in rs]), spec)  # noqa: E731
        rows.append([label, len(rs), st("wall_s", "{:.1f}"), st("cpu_s", "{:.2f}"), st("stat_pct"),
                     st("sched_pct"),
                     " / ".join(f"{w['sched_pct']:.3f}" for r in rs for w in r["windows"]),
                     st("workers_pct", "{:.2f}"), B.fmt_stat(B.stat([r["threads"] for r in rs])),
                     B.fmt_stat(B.stat([r["rss_kib"] for r in rs]), "{:.1f}", 1 / 1024),
                     sum(len(r["events"]) for r in rs)])
    md = [f"## 4. Supervisor CPU, 8 idle Node workers (hang.js), {args.idle_seconds:g} s; "
          f"median (min–max) of {args.rounds} rounds, order rotated", "",
          "CPU% of one core. *stat* = utime+stime delta from /proc/PID/stat (10 ms ticks) ÷ wall; "
          "*schedstat* = the same from /proc/PID/task/*/schedstat (ns). All checks = `--watchdog 1s "
          "--max-memory 500M --health-check /health --health-interval 1s` (8 pings, 8 RSS reads "
          "and 8 probes a second). Health events = hung/replacing/probe_failed/exited/spawned "
          "during the windows, all rounds (should be 0).", "",
          table(["options", "rounds", "wall s", "herd CPU s", "herd CPU % (stat)",
                 "herd CPU % (schedstat)",
                 f"every {args.idle_seconds / windows:g} s window, all rounds (schedstat %)",
                 "8 workers' CPU % (sum)", "herd threads", "herd RSS MiB", "health events"], rows)]
    if notes:
        md += ["", "Failures: " + "; ".join(notes)]
    return "\n".join(md), {"raw": raw, "notes": notes}


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections: {','.join(SECTIONS)} (default all)")
    ap.add_argument("--trials", type=int, default=5, help="trials for restart and health (5)")
    ap.add_argument("--rounds", "--rss-trials", dest="rounds", type=int, default=3,
                    help="rss and cpu: rounds, each starting every configuration fresh; round r "
                         "starts the configuration list at offset r (3)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: --rounds 2 --trials 2 --load-seconds 1 --idle-seconds 3 "
                         "--cpu-windows 1 (explicit options still win); code paths, not numbers")
    ap.add_argument("--load-seconds", type=int, default=5, help="wrk duration for rss (5)")
    ap.add_argument("--connections", type=int, default=50, help="wrk connections for rss (50)")
    ap.add_argument("--conn", choices=["close", "keepalive"], default="close",
                    help="wrk connection mode for rss (close: every request is a connection)")
    ap.add_argument("--max-memory", type=int, default=150, help="health (b) limit, MiB (150)")
    ap.add_argument("--idle-seconds", type=float, default=30, help="cpu window (30)")
    ap.add_argument("--cpu-windows", type=int, default=3, help="cpu: sub-windows reported (3)")
    ap.add_argument("--herd", type=Path, default=B.REPO / "target" / "release" / "herd")
    ap.add_argument("--hello", type=Path, default=B.REPO / "target" / "release" / "hello")
    ap.add_argument("--out", type=Path, default=B.OUT)
    if "--quick" in sys.argv[1:]:
        ap.set_defaults(rounds=2, trials=2, load_seconds=1, idle_seconds=3, cpu_windows=1)
    args = ap.parse_args()
    if args.rounds < 1 or args.trials < 1:
        ap.error("--rounds and --trials must be >= 1")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    args.herd, args.hello = args.herd.resolve(), args.hello.resolve()

    # A hung worker gets SIGABRT: no core files from our process tree.
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    B.install_signal_handlers()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = args.out / f"logs-restart-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)
    v = B.versions(args.herd)
    head = [f"# herd restart / health / footprint bench ({stamp})", "",
            "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
            f"load average at start: {os.getloadavg()[0]:.2f}", ""]
    parts, raw = [], {"versions": v, "args": {k: str(x) for k, x in vars(args).items()}}
    funcs = {"rss": section_rss, "restart": section_restart, "health": section_health,
             "cpu": section_cpu}
    try:
        for s in SECTIONS:
            if s in only:
                B.log(f"section {s} …")
                t0 = time.monotonic()
                md, r = funcs[s](args, logdir)
                raw[s] = r
                parts.append(md + f"\n\n({s}: {time.monotonic() - t0:.0f} s)")
                print(md + "\n", flush=True)
    except KeyboardInterrupt:
        B.log("interrupted")
        return 130
    finally:
        B.cleanup_all()
    text = "\n".join(head) + "\n" + "\n\n".join(parts) + "\n"
    md_path = args.out / f"restart-{stamp}.md"
    md_path.write_text(text)
    (args.out / f"restart-{stamp}.json").write_text(json.dumps(raw, indent=1, default=str))
    B.log(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
