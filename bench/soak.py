#!/usr/bin/env python3
"""Soak test: N minutes of bounded HTTP load on a herd cluster while a chaos loop attacks it,
then a report with a verdict. Python 3 standard library only; reuses benchlib (tags, process
groups, cleanup, /proc readings). See bench/README.md, section "soak.py".

    cargo build --release -p herd
    python3 bench/soak.py --minutes 1          # CI size
    python3 bench/soak.py                      # 30 minutes
    python3 bench/soak.py --seed 1234 --no-python --herd /path/to/herd

Targets (each its own supervisor, one private HERD_HOME in a temp dir):
  soak     herd run -i 4 --balance round-robin --watchdog 2s apps/soak_app.js   (Node)
  soak-py  herd run -i 2 --balance shared -l 127.0.0.1:PORT examples/python/server.py
           (socket activation; --no-python leaves it out)

Load: client threads, each at a fixed rate (the total is --rate, default 150 req/s), GET / on
127.0.0.1 with a 5 s timeout: keep-alive and `Connection: close` clients on the Node app,
close clients on the Python one (HTTP/1.0). Every request is recorded (start, end, outcome,
whether it reused a connection and which worker pid answered on it last).

Chaos (one event at a time, each round in a new seeded random order, jittered gaps):
  soak:    kill9, stop (SIGSTOP past the watchdog, then SIGCONT), reload, scale 4->6->4, flood
  soak-py: kill9, reload, scale 2->3->2
Each event's window runs from its start until 2 s after herd has settled again (every slot
ready, the victim gone); a failed request that overlaps a window of an event on its own
target is charged to that event, else to "none".

Samples every --sample-every s: each supervisor's VmRSS, VmHWM, open fds, and zombies (state Z
with the supervisor or one of its descendants as parent). Baseline and final readings are taken
with the load paused and the cluster settled.

Exit status: 0 when every expectation holds, 1 when one fails (each is printed), 2 on a usage
or setup error.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing benchlib
import benchlib as bl  # noqa: E402

SOAK_APP = bl.BENCH / "apps" / "soak_app.js"
PY_APP = bl.REPO / "examples" / "python" / "server.py"
WINDOW_TAIL = 2.0       # an event's window lasts this long after herd has settled again
SETTLE_TIMEOUT = 30.0   # bound on every "wait until herd is back to N ready workers"
REQ_TIMEOUT = 5.0       # per request (connect, send, response)
T0 = time.monotonic()


def now() -> float:
    return time.monotonic() - T0


def say(msg: str) -> None:
    print(f"[soak {now():7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- /proc helpers

def proc_status(pid: int) -> dict:
    """VmRSS and VmHWM in KiB (None when the process is gone)."""
    out = {"rss": None, "hwm": None}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss"] = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    out["hwm"] = int(line.split()[1])
    except OSError:
        pass
    return out


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def stat_of(pid: int):
    """(state, ppid, starttime) from /proc/PID/stat, or None."""
    f = bl._stat_fields(pid)
    if not f:
        return None
    return f[0], int(f[1]), int(f[19])


def process_table() -> dict:
    """pid -> (state, ppid, comm) for every process."""
    table = {}
    for pid in bl._all_pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                data = fh.read().decode(errors="replace")
        except OSError:
            continue
        comm = data[data.index("(") + 1:data.rindex(")")]
        rest = data[data.rindex(")") + 2:].split()
        table[pid] = (rest[0], int(rest[1]), comm)
    return table


def zombies_under(roots: list[int], table: dict | None = None) -> list[dict]:
    """Zombies whose parent is one of `roots` or a descendant of one."""
    table = table if table is not None else process_table()
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = set(), [r for r in roots if r]
    while todo:
        p = todo.pop()
        if p in tree:
            continue
        tree.add(p)
        todo.extend(children.get(p, []))
    return [{"pid": pid, "ppid": ppid, "comm": comm}
            for pid, (state, ppid, comm) in table.items() if state == "Z" and ppid in tree]


# ---------------------------------------------------------------- one herd supervisor

class SoakHerd:
    """One `herd run --log-format json` in a session of its own. Its output is read by a pump
    thread: herd's events are kept (with this script's clock), flood lines only counted (a flood
    is ~100k lines), everything else goes to the log file."""

    def __init__(self, name: str, herd_bin: Path, home: str, argv_tail: list, port: int,
                 workers: int, logdir: Path):
        self.name, self.herd_bin, self.home, self.port = name, herd_bin, home, port
        self.workers = workers          # the normal worker count
        self.tag = bl.new_tag(name)
        self.events: list[tuple[float, dict]] = []
        self.flood_lines = 0
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        argv = [str(herd_bin), "run", "--log-format", "json", "-n", name, *map(str, argv_tail)]
        self._log.write((" ".join(argv) + "\n").encode())
        self.p = subprocess.Popen(argv, env=self.env(PORT=port), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0,
                                  start_new_session=True)
        self.pid = self.p.pid
        self._pump = threading.Thread(target=self._read, daemon=True, name=f"pump-{name}")
        self._pump.start()
        bl.at_cleanup(self.stop)

    def env(self, **extra) -> dict:
        return bl.tagged_env(self.tag, HERD_HOME=self.home, **extra)

    def _read(self):
        buf = b""
        while True:
            try:
                chunk = self.p.stdout.read(65536)
            except (OSError, ValueError):
                break
            if not chunk:
                break
            buf += chunk
            lines = buf.split(b"\n")
            buf = lines.pop()
            keep = []
            for line in lines:
                if b"soak-flood " in line:
                    self.flood_lines += 1
                    continue
                keep.append(line)
                if b'"event"' in line and b'"stream"' not in line:
                    try:
                        self.events.append((now(), json.loads(line)))
                    except ValueError:
                        pass
            if keep:
                try:
                    self._log.write(b"\n".join(keep) + b"\n")
                    self._log.flush()
                except (OSError, ValueError):
                    pass

    def alive(self) -> bool:
        return self.p.poll() is None

    def cli(self, *args, timeout: float = 30) -> subprocess.CompletedProcess:
        return bl.run_cmd([str(self.herd_bin), *map(str, args)], self.env(), timeout)

    def status(self) -> dict | None:
        try:
            cp = self.cli("status", self.name, "--json", timeout=10)
            return json.loads(cp.stdout) if cp.returncode == 0 else None
        except (subprocess.TimeoutExpired, ValueError):
            return None

    def worker_pids(self, st: dict | None = None) -> list[int]:
        st = st or self.status() or {}
        return [w["pid"] for w in st.get("workers", []) if w.get("pid") and w.get("state") == "ready"]

    def settled(self, desired: int, exclude=()) -> tuple[bool, dict | None]:
        st = self.status()
        if not st:
            return False, None
        ws = st.get("workers", [])
        ok = (st.get("state") == "running" and st.get("desired") == desired
              and st.get("ready") == desired and len(ws) == desired
              and all(w.get("state") == "ready" and w.get("pid") for w in ws)
              and not any(w.get("pid") in exclude for w in ws))
        return ok, st

    def wait_settled(self, desired: int, exclude=(), timeout: float = SETTLE_TIMEOUT):
        """Poll `herd status` until every one of `desired` slots has a ready worker and none of
        `exclude` is among them. Returns (ok, last status)."""
        deadline = time.monotonic() + timeout
        st = None
        while time.monotonic() < deadline:
            ok, st = self.settled(desired, exclude)
            if ok:
                return True, st
            if not self.alive():
                return False, st
            time.sleep(0.2)
        return False, st

    def events_since(self, t: float, name: str | None = None) -> list[dict]:
        return [e for (te, e) in list(self.events) if te >= t and (name is None or e.get("event") == name)]

    def stop(self):
        if self.p.poll() is None:
            try:
                self.p.send_signal(signal.SIGTERM)
                self.p.wait(timeout=12)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                bl.log(f"{self.name}: supervisor {self.pid} still up after 12 s: SIGKILL")
        bl._killpg(self.pid, signal.SIGKILL)
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        left = bl.kill_tagged(self.tag)
        if left:
            bl.log(f"{self.name}: killed {len(left)} process(es) left by herd: {left}")
        self._pump.join(timeout=5)
        self._log.close()


# ---------------------------------------------------------------- load

class Client(threading.Thread):
    """GET / at a fixed rate. keepalive=False sends `Connection: close` on a new connection per
    request. Records (t0, t1, target, mode, reused, last_pid, ok, error) per request."""

    def __init__(self, target: SoakHerd, keepalive: bool, rate: float, stop_ev, pause_ev):
        super().__init__(daemon=True, name=f"client-{target.name}-{'ka' if keepalive else 'close'}")
        self.target, self.keepalive, self.interval = target, keepalive, 1.0 / rate
        self.stop_ev, self.pause_ev = stop_ev, pause_ev
        self.records: list[tuple] = []
        self.idle = threading.Event()   # set while paused with no connection open

    def run(self):
        conn, last_pid = None, None
        next_t = time.monotonic()
        while not self.stop_ev.is_set():
            if self.pause_ev.is_set():
                if conn is not None:
                    conn.close()
                    conn, last_pid = None, None
                self.idle.set()
                time.sleep(0.05)
                continue
            self.idle.clear()
            t = time.monotonic()
            if t < next_t:
                self.stop_ev.wait(next_t - t)
                continue
            next_t = max(next_t + self.interval, t)  # no catch-up bursts after a stall
            reused = conn is not None and conn.sock is not None
            if not reused:
                if conn is not None:
                    conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.target.port, timeout=REQ_TIMEOUT)
                last_pid = None
            t0 = now()
            ok, err, pid = False, None, None
            try:
                conn.request("GET", "/", headers={} if self.keepalive else {"Connection": "close"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 200:
                    pid = json.loads(body)["pid"]
                    ok = True
                else:
                    err = f"http {resp.status}"
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                err = type(e).__name__
            t1 = now()
            self.records.append((t0, t1, self.target.name, "ka" if self.keepalive else "close",
                                 reused, last_pid, ok, err))
            if not ok or not self.keepalive:
                conn.close()
                conn, last_pid = None, None
            else:
                last_pid = pid


# ---------------------------------------------------------------- chaos

class Event:
    def __init__(self, target: str, kind: str):
        self.target, self.kind = target, kind
        self.start = now()
        self.end = None
        self.victim = None
        self.detail = ""
        self.problem = None   # set when herd did not do what the event expects

    @property
    def window(self):
        return self.start, (self.end if self.end is not None else self.start) + WINDOW_TAIL

    def as_dict(self):
        return {"target": self.target, "kind": self.kind, "start": round(self.start, 3),
                "end": round(self.end, 3) if self.end is not None else None, "victim": self.victim,
                "detail": self.detail, "problem": self.problem}


def pick_victim(h: SoakHerd, rng: random.Random):
    """A random ready worker that really is the supervisor's child, with its starttime (so a
    later signal never reaches a recycled pid)."""
    pids = h.worker_pids()
    rng.shuffle(pids)
    for pid in pids:
        s = stat_of(pid)
        if s and s[1] == h.pid and s[0] != "Z":
            return pid, s[2]
    return None, None


def same_process(pid: int, starttime: int) -> bool:
    s = stat_of(pid)
    return bool(s) and s[2] == starttime and s[0] != "Z"


def identities(pids) -> dict:
    """pid -> starttime, for the given pids that exist now."""
    out = {}
    for pid in pids:
        s = stat_of(pid)
        if s:
            out[pid] = s[2]
    return out


GONE_TIMEOUT = 15.0  # herd's --kill-timeout (5 s) + the app's drain (1.5 s) + slack


def wait_gone(ids: dict, ev, what: str) -> None:
    """Wait (bounded) until every process in `ids` (pid -> starttime) has exited and been
    reaped; else note a problem on the event. An event ends only when its old workers are gone,
    so their drain is inside the event's window."""
    deadline = time.monotonic() + GONE_TIMEOUT
    while time.monotonic() < deadline:
        left = [p for p, st in ids.items() if (stat_of(p) or (None, None, None))[2] == st]
        if not left:
            return
        time.sleep(0.1)
    states = {p: (stat_of(p) or ("gone",))[0] for p in left}
    if not ev.problem:
        ev.problem = f"{what} still there {GONE_TIMEOUT:.0f}s after the event (pid: state): {states}"


def ev_kill9(h, ev, rng, args):
    pid, st = pick_victim(h, rng)
    if not pid:
        ev.problem = "no ready worker to kill"
        return
    ev.victim = pid
    os.kill(pid, signal.SIGKILL)
    ok, _ = h.wait_settled(h.workers, exclude={pid})
    if not ok:
        ev.problem = f"not back to {h.workers} ready workers within {SETTLE_TIMEOUT:.0f}s of kill -9"
    wait_gone({pid: st}, ev, "the killed worker (not reaped)")


_stopped: dict[int, int] = {}  # pid -> starttime of a worker we SIGSTOPped and not yet SIGCONTed


def _cont_all():
    for pid, st in list(_stopped.items()):
        if same_process(pid, st) or (stat_of(pid) and stat_of(pid)[0] == "T"):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        _stopped.pop(pid, None)


def ev_stop(h, ev, rng, args):
    pid, st = pick_victim(h, rng)
    if not pid:
        ev.problem = "no ready worker to stop"
        return
    ev.victim = pid
    t = now()
    _stopped[pid] = st
    os.kill(pid, signal.SIGSTOP)
    # Hold it at least watchdog + 1 s, and until herd has called it hung (bounded).
    min_hold = args.watchdog + 1.0
    deadline = time.monotonic() + 3 * args.watchdog + 5
    hung = False
    while time.monotonic() < deadline:
        hung = any(e.get("pid") == pid for e in h.events_since(t, "hung"))
        if hung and now() - t >= min_hold:
            break
        time.sleep(0.1)
    held = now() - t
    if same_process(pid, st) or (stat_of(pid) and stat_of(pid)[0] == "T"):
        os.kill(pid, signal.SIGCONT)
    _stopped.pop(pid, None)
    ev.detail = f"held {held:.1f}s"
    if not hung:
        ev.problem = f"herd did not report the stopped worker {pid} as hung within {held:.1f}s"
    ok, _ = h.wait_settled(h.workers, exclude={pid})
    if not ok and not ev.problem:
        ev.problem = f"not back to {h.workers} ready workers within {SETTLE_TIMEOUT:.0f}s of SIGCONT"
    wait_gone({pid: st}, ev, "the hung worker")


def ev_reload(h, ev, rng, args):
    before = identities(h.worker_pids())
    try:
        cp = h.cli("reload", h.name, timeout=90)
    except subprocess.TimeoutExpired:
        ev.problem = "herd reload did not return within 90s"
        return
    if cp.returncode != 0:
        ev.problem = f"herd reload exited {cp.returncode}: {cp.stderr.strip()[-200:]}"
    ok, st = h.wait_settled(h.workers, exclude=set(before))
    if not ok and not ev.problem:
        ev.problem = f"old workers still there or not all ready {SETTLE_TIMEOUT:.0f}s after reload"
    wait_gone(before, ev, "old workers")


def ev_scale(h, ev, rng, args):
    up = h.workers + (2 if h.workers >= 4 else 1)
    at_up = {}
    for n in (up, h.workers):
        try:
            cp = h.cli("scale", h.name, n, timeout=60)
        except subprocess.TimeoutExpired:
            ev.problem = f"herd scale {n} did not return within 60s"
            return
        if cp.returncode != 0:
            ev.problem = f"herd scale {n} exited {cp.returncode}: {cp.stderr.strip()[-200:]}"
            return
        ok, st = h.wait_settled(n)
        if not ok:
            ev.problem = f"not settled at {n} workers within {SETTLE_TIMEOUT:.0f}s"
            return
        if n == up:
            at_up = identities(h.worker_pids(st))
    ev.detail = f"{h.workers}->{up}->{h.workers}"
    kept = set(h.worker_pids())
    wait_gone({p: t for p, t in at_up.items() if p not in kept}, ev, "scaled-down workers")


def ev_flood(h, ev, rng, args):
    n_workers = len(h.worker_pids())
    before = h.flood_lines
    cp = h.cli("send", h.name, json.dumps({"flood": args.flood_lines}), timeout=30)
    if cp.returncode != 0:
        ev.problem = f"herd send exited {cp.returncode}: {cp.stderr.strip()[-200:]}"
        return
    want = n_workers * args.flood_lines
    # Wait until every line arrived, or no new one for 3 s (herd may drop lines by design),
    # bounded by 60 s.
    deadline, last, last_change = time.monotonic() + 60, before, time.monotonic()
    while time.monotonic() < deadline:
        got = h.flood_lines - before
        if got >= want:
            break
        if h.flood_lines != last:
            last, last_change = h.flood_lines, time.monotonic()
        elif time.monotonic() - last_change > 3:
            break
        time.sleep(0.1)
    got = h.flood_lines - before
    ev.detail = f"{got}/{want} lines in {now() - ev.start:.1f}s"
    ok, _ = h.wait_settled(h.workers)
    if not ok:
        ev.problem = f"not all {h.workers} workers ready {SETTLE_TIMEOUT:.0f}s after the flood"


ACTIONS = {"kill9": ev_kill9, "stop": ev_stop, "reload": ev_reload, "scale": ev_scale,
           "flood": ev_flood}
NODE_KINDS = ["kill9", "stop", "reload", "scale", "flood"]
PY_KINDS = ["kill9", "reload", "scale"]


def chaos_loop(herds: dict, rng: random.Random, args, deadline: float, events: list):
    plan = [("soak", k) for k in NODE_KINDS]
    if "soak-py" in herds:
        plan += [("soak-py", k) for k in PY_KINDS]
    while True:
        rnd = plan[:]
        rng.shuffle(rnd)
        for target, kind in rnd:
            if time.monotonic() >= deadline:
                return
            h = herds[target]
            if not h.alive():
                raise bl.TargetFailed(f"herd {target} (pid {h.pid}) exited: rc {h.p.returncode}")
            ev = Event(target, kind)
            events.append(ev)
            say(f"chaos: {target} {kind} ...")
            ACTIONS[kind](h, ev, rng, args)
            ev.end = now()
            say(f"chaos: {target} {kind} done in {ev.end - ev.start:.1f}s"
                + (f" victim {ev.victim}" if ev.victim else "") + (f" {ev.detail}" if ev.detail else "")
                + (f"  PROBLEM: {ev.problem}" if ev.problem else ""))
            # The window's tail, then a jittered gap: windows on one target never overlap.
            time.sleep(WINDOW_TAIL + rng.uniform(0.2, args.jitter))


# ---------------------------------------------------------------- sampling

class Sampler(threading.Thread):
    def __init__(self, herds: dict, every: float, stop_ev):
        super().__init__(daemon=True, name="sampler")
        self.herds, self.every, self.stop_ev = herds, every, stop_ev
        self.samples: list[dict] = []

    def sample(self) -> dict:
        table = process_table()
        s = {"t": round(now(), 2), "sup": {}}
        for name, h in self.herds.items():
            st = proc_status(h.pid)
            s["sup"][name] = {"rss": st["rss"], "hwm": st["hwm"], "fds": fd_count(h.pid)}
        s["zombies"] = zombies_under([h.pid for h in self.herds.values()], table)
        return s

    def run(self):
        while not self.stop_ev.is_set():
            self.samples.append(self.sample())
            self.stop_ev.wait(self.every)


def quiet_reading(herds: dict) -> dict:
    """Three readings 300 ms apart with no load and no control command running; the median
    fd count and the last RSS/HWM per supervisor."""
    reads = []
    for i in range(3):
        reads.append({n: (proc_status(h.pid), fd_count(h.pid)) for n, h in herds.items()})
        time.sleep(0.3)
    out = {}
    for n in herds:
        fds = sorted(r[n][1] or 0 for r in reads)
        out[n] = {"rss": reads[-1][n][0]["rss"], "hwm": reads[-1][n][0]["hwm"], "fds": fds[1]}
    return out


# ---------------------------------------------------------------- analysis

def attribute(records, events):
    """For each failed request, the event on its own target whose window overlaps it (the latest
    one that started before the request ended), else None."""
    by_target: dict[str, list[Event]] = {}
    for ev in events:
        by_target.setdefault(ev.target, []).append(ev)
    out = []
    for r in records:
        if r[6]:
            continue
        t0, t1, target = r[0], r[1], r[2]
        hit = None
        for ev in by_target.get(target, []):
            a, b = ev.window
            if t0 <= b and t1 >= a:
                hit = ev
        out.append((r, hit))
    return out


def mib(kib):
    return "–" if kib is None else f"{kib / 1024:.1f}"


def build_report(args, herds, records, events, samples, base, final, end_zombies, versions_,
                 seed, wall, loadavg):
    failures = attribute(records, events)
    problems: list[str] = []
    lines = [f"# herd soak: {args.minutes:g} min of chaos, seed {seed}", ""]
    lines.append(f"{versions_.get('herd')}, node {versions_.get('node')}, kernel "
                 f"{versions_.get('kernel')}, {versions_.get('cpus')} CPUs; load average at start "
                 f"{loadavg}; wall {wall:.0f}s; load {args.rate:g} req/s total; watchdog "
                 f"{args.watchdog:g}s; flood {args.flood_lines} lines per worker.")
    lines.append("")

    # Requests per target and mode.
    lines += ["## Requests", "", "| target | mode | requests | ok | failed |", "|---|---|---:|---:|---:|"]
    for (target, mode) in sorted({(r[2], r[3]) for r in records}):
        rs = [r for r in records if r[2] == target and r[3] == mode]
        nok = sum(1 for r in rs if r[6])
        lines.append(f"| {target} | {'keep-alive' if mode == 'ka' else 'close'} | {len(rs)} | {nok} | {len(rs) - nok} |")
    total_failed = len(failures)
    lines.append(f"| **all** | | **{len(records)}** | **{len(records) - total_failed}** | **{total_failed}** |")
    lines.append("")

    # Failures per event kind.
    lines += ["## Failed requests per chaos event", "",
              "| target | event | events | failed | on victim's keep-alive conn | other | allowed other | errors | herd problems |",
              "|---|---|---:|---:|---:|---:|---:|---|---|"]
    kinds = [(t, k) for t in herds for k in (NODE_KINDS if t == "soak" else PY_KINDS)]
    for target, kind in kinds + [(t, "none") for t in herds]:
        evs = [e for e in events if e.target == target and e.kind == kind]
        fl = [(r, e) for (r, e) in failures if r[2] == target
              and ((e is None and kind == "none") or (e is not None and e.kind == kind))]
        on_victim = [r for (r, e) in fl if r[4] and r[5] is not None and e is not None and r[5] == e.victim]
        other = len(fl) - len(on_victim)
        allowed = args.kill_allowance * len(evs) if kind in ("kill9", "stop") else 0
        errs: dict[str, int] = {}
        for (r, e) in fl:
            errs[r[7]] = errs.get(r[7], 0) + 1
        probs = [e for e in evs if e.problem]
        n_evs = "–" if kind == "none" else str(len(evs))
        lines.append(f"| {target} | {kind} | {n_evs} | {len(fl)} | {len(on_victim)} | {other} | {allowed} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(errs.items())) or '–'} | {len(probs) or '–'} |")
        if kind in ("kill9", "stop"):
            if other > allowed:
                problems.append(f"{target} {kind}: {other} failed requests besides those on the victim's "
                                f"own keep-alive connection, more than the {args.kill_allowance} in-flight "
                                f"allowed per event × {len(evs)} events")
        elif fl:
            what = "outside any chaos event" if kind == "none" else f"during {kind}"
            problems.append(f"{target}: {len(fl)} failed requests {what} (expected 0): "
                            + ", ".join(f"{k} {v}" for k, v in sorted(errs.items())))
        for e in probs:
            problems.append(f"{target} {kind} at t={e.start:.1f}s: {e.problem}")
        if kind != "none" and not evs:
            lines[-1] += " (never ran)"
    lines.append("")
    lines.append("*on victim's keep-alive conn*: a request on a reused connection whose last answer came "
                 "from the killed/stopped worker: lost with it, whatever the supervisor does.")
    lines.append("")

    # Supervisor resources.
    lines += ["## Supervisors", "",
              "| supervisor | RSS start MiB | RSS end MiB | RSS max MiB | VmHWM end MiB | fds start | fds end | fds max |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n in herds:
        rss = [s["sup"][n]["rss"] for s in samples if s["sup"][n]["rss"]]
        fds = [s["sup"][n]["fds"] for s in samples if s["sup"][n]["fds"]]
        b, f = base[n], final[n]
        lines.append(f"| {n} | {mib(b['rss'])} | {mib(f['rss'])} | {mib(max(rss + [f['rss'] or 0]))} | "
                     f"{mib(f['hwm'])} | {b['fds']} | {f['fds']} | {max(fds + [f['fds'] or 0])} |")
        if b["rss"] and f["rss"] and f["rss"] > b["rss"] + args.rss_slack_mib * 1024:
            problems.append(f"{n}: supervisor RSS grew {mib(b['rss'])} -> {mib(f['rss'])} MiB "
                            f"(allowed +{args.rss_slack_mib:g} MiB)")
        if b["fds"] is not None and f["fds"] is not None and abs(f["fds"] - b["fds"]) > args.fd_slack:
            problems.append(f"{n}: supervisor fd count {b['fds']} -> {f['fds']} (allowed ±{args.fd_slack})")
    lines.append("")
    for n in herds:
        pts = [(s["t"], s["sup"][n]["rss"]) for s in samples if s["sup"][n]["rss"]]
        if len(pts) >= 4:
            mid = pts[len(pts) // 2]
            lines.append(f"- {n}: RSS over the second half of the run (t={mid[0]:.0f}s -> "
                         f"{pts[-1][0]:.0f}s): {mib(mid[1])} -> {mib(pts[-1][1])} MiB "
                         f"(a one-off step early on is buffers warming up; growth here is the leak signal)")
    lines.append("")

    # Zombies.
    max_z = max((len(s["zombies"]) for s in samples), default=0)
    # A zombie seen in two samples in a row (≥ --sample-every apart) was not reaped promptly.
    lingering = set()
    for a, b in zip(samples, samples[1:]):
        lingering |= {z["pid"] for z in a["zombies"]} & {z["pid"] for z in b["zombies"]}
    at_end = ", ".join("%d (%s, parent %d)" % (z["pid"], z["comm"], z["ppid"]) for z in end_zombies)
    lines += ["## Zombies", "",
              f"- samples: {len(samples)} (every {args.sample_every:g}s); samples with a zombie: "
              f"{sum(1 for s in samples if s['zombies'])}; most in one sample: {max_z}",
              f"- zombies seen in two consecutive samples: {sorted(lingering) or 'none'}",
              f"- at the end (present in two readings 1 s apart, load stopped, cluster settled): "
              f"{at_end or 'none'}", ""]
    if end_zombies:
        problems.append(f"zombies at the end: {[z['pid'] for z in end_zombies]}")
    if lingering:
        problems.append(f"zombies not reaped within {args.sample_every:g}s: {sorted(lingering)}")

    # herd's own notable events.
    notable = ("hung", "errored", "op_failed", "refused", "ipc_error", "spawn_failed", "ready_timeout",
               "listen_error")
    lines += ["## herd events (from its JSON output)", "", "| supervisor | " + " | ".join(notable) + " |",
              "|---|" + "---:|" * len(notable)]
    for n, h in herds.items():
        counts = {k: 0 for k in notable}
        for _, e in h.events:
            if e.get("event") in counts:
                counts[e["event"]] += 1
        lines.append(f"| {n} | " + " | ".join(str(counts[k]) for k in notable) + " |")
        for k in ("errored", "op_failed", "ipc_error", "spawn_failed", "listen_error"):
            if counts[k]:
                msgs = sorted({e.get("message", "") for _, e in h.events if e.get("event") == k})[:3]
                problems.append(f"{n}: herd reported {counts[k]} `{k}` event(s): {'; '.join(msgs)}")
    lines.append("")

    # Timeline.
    lines += ["## Chaos events", "", "| t (s) | target | event | took (s) | victim | detail | problem |",
              "|---:|---|---|---:|---:|---|---|"]
    for e in events:
        took = f"{e.end - e.start:.1f}" if e.end is not None else "–"
        lines.append(f"| {e.start:.1f} | {e.target} | {e.kind} | {took} | {e.victim or '–'} | "
                     f"{e.detail or '–'} | {e.problem or '–'} |")
    lines.append("")

    lines += ["## Verdict", ""]
    if problems:
        lines += ["**FAIL**", ""] + [f"- {p}" for p in problems]
    else:
        lines.append("**PASS**: failures only in flight on kill -9 / stop, none on reload, scale, flood "
                     "or outside events; supervisor RSS and fds flat; no zombie.")
    lines.append("")
    return "\n".join(lines), problems, failures


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30, help="length of the chaos phase (30)")
    ap.add_argument("--herd", type=Path, default=bl.REPO / "target" / "release" / "herd",
                    help="herd binary (target/release/herd; this script builds nothing)")
    ap.add_argument("--seed", type=int, default=None, help="chaos RNG seed (default: from the clock; printed)")
    ap.add_argument("--rate", type=float, default=150, help="total request rate, req/s (150; at most 400)")
    ap.add_argument("--watchdog", type=float, default=2.0, help="herd --watchdog, seconds (2)")
    ap.add_argument("--flood-lines", type=int, default=25000, help="lines each worker prints per flood (25000)")
    ap.add_argument("--jitter", type=float, default=2.0, help="max extra gap between events, s (2)")
    ap.add_argument("--sample-every", type=float, default=2.0, help="sampling period, s (2)")
    ap.add_argument("--kill-allowance", type=int, default=2,
                    help="failed requests allowed per kill9/stop event besides the victim's own "
                         "keep-alive connections (2)")
    ap.add_argument("--rss-slack-mib", type=float, default=4.0, help="allowed supervisor RSS growth (4 MiB)")
    ap.add_argument("--fd-slack", type=int, default=2, help="allowed change of the supervisor's fd count (2)")
    ap.add_argument("--no-python", action="store_true", help="leave out the Python socket-activation target")
    ap.add_argument("--out", type=Path, default=bl.OUT, help="where the report goes (bench/out)")
    args = ap.parse_args()

    if args.minutes <= 0 or args.minutes > 24 * 60:
        ap.error("--minutes must be > 0 and at most 1440")
    if not 1 <= args.rate <= 400:
        ap.error("--rate must be between 1 and 400 req/s (the load is meant to stay light)")
    if not 0.5 <= args.watchdog <= 60:
        ap.error("--watchdog must be between 0.5 and 60 s")
    if not 1 <= args.flood_lines <= 1_000_000:
        ap.error("--flood-lines must be between 1 and 1000000")
    herd_bin = args.herd.resolve()
    if not (herd_bin.is_file() and os.access(herd_bin, os.X_OK)):
        print(f"error: no herd binary at {herd_bin}: build it with `cargo build --release -p herd` "
              f"(from the repository root), or pass --herd PATH", file=sys.stderr)
        return 2
    for tool in ["node"] + ([] if args.no_python else ["python3"]):
        if not shutil.which(tool):
            print(f"error: {tool} not found in PATH (needed for the soak apps)", file=sys.stderr)
            return 2

    seed = args.seed if args.seed is not None else int(time.time() * 1000) % 1_000_000
    rng = random.Random(seed)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    logdir = args.out / f"logs-soak-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)
    say(f"seed {seed} (rerun the same chaos order with --seed {seed}); logs in {logdir}")

    bl.install_signal_handlers()
    stop_ev, pause_ev = threading.Event(), threading.Event()
    bl.at_cleanup(stop_ev.set)
    herds: dict[str, SoakHerd] = {}
    clients: list[Client] = []
    events: list[Event] = []
    try:
        loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
        versions_ = bl.versions(herd_bin)
        home = tempfile.mkdtemp(prefix="soak-")  # short: herd's control sockets live in it
        bl.at_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
        wd = f"{int(args.watchdog * 1000)}ms"
        port = bl.free_port()
        herds["soak"] = SoakHerd("soak", herd_bin, home,
                                 ["-i", 4, "--balance", "round-robin", "--watchdog", wd, SOAK_APP],
                                 port, 4, logdir)
        if not args.no_python:
            pport = bl.free_port()
            herds["soak-py"] = SoakHerd("soak-py", herd_bin, home,
                                        ["-i", 2, "--balance", "shared", "-l", f"127.0.0.1:{pport}", PY_APP],
                                        pport, 2, logdir)
        # SIGCONT any worker we stopped before the supervisors are asked to stop (LIFO cleanups).
        bl.at_cleanup(_cont_all)
        for h in herds.values():
            bl.wait_ready(h.port, h.workers, 30, alive=h.alive)
            ok, st = h.wait_settled(h.workers)
            if not ok:
                raise bl.TargetFailed(f"herd {h.name} did not get {h.workers} ready workers: {st}")
            say(f"{h.name}: supervisor {h.pid}, port {h.port}, workers {h.worker_pids(st)}")

        # Load: the Node app gets 2 keep-alive + 2 close clients, the Python app 1 close client.
        specs = [(herds["soak"], True), (herds["soak"], True), (herds["soak"], False), (herds["soak"], False)]
        if "soak-py" in herds:
            specs.append((herds["soak-py"], False))
        per = args.rate / len(specs)
        clients = [Client(h, ka, per, stop_ev, pause_ev) for h, ka in specs]
        for c in clients:
            c.start()

        # Warm-up, then a quiet baseline (load paused, connections closed).
        time.sleep(5)
        pause_ev.set()
        for c in clients:
            c.idle.wait(timeout=REQ_TIMEOUT + 2)
        time.sleep(1)
        base = quiet_reading(herds)
        say("baseline: " + ", ".join(f"{n} RSS {mib(b['rss'])} MiB fds {b['fds']}" for n, b in base.items()))
        pause_ev.clear()

        sampler = Sampler(herds, args.sample_every, stop_ev)
        sampler.start()
        deadline = time.monotonic() + args.minutes * 60
        chaos_loop(herds, rng, args, deadline, events)

        # Settle, a little more load with no chaos, then the final quiet reading.
        for h in herds.values():
            ok, st = h.wait_settled(h.workers)
            if not ok:
                say(f"{h.name}: not settled at the end: {st}")
        time.sleep(3)
        pause_ev.set()
        for c in clients:
            c.idle.wait(timeout=REQ_TIMEOUT + 2)
        time.sleep(1)
        final = quiet_reading(herds)
        roots = [h.pid for h in herds.values()]
        z1 = zombies_under(roots)
        time.sleep(1)
        z2 = {z["pid"] for z in zombies_under(roots)}
        end_zombies = [z for z in z1 if z["pid"] in z2]
        stop_ev.set()
        sampler.join(timeout=5)
        for c in clients:
            c.join(timeout=REQ_TIMEOUT + 2)
        for h in herds.values():
            if not h.alive():
                raise bl.TargetFailed(f"herd {h.name} exited during the soak: rc {h.p.returncode}")

        records = sorted(r for c in clients for r in c.records)
        report, problems, failures = build_report(args, herds, records, events, sampler.samples, base,
                                                  final, end_zombies, versions_, seed, now(), loadavg)
        md = args.out / f"soak-{stamp}.md"
        md.write_text(report)
        (args.out / f"soak-{stamp}.json").write_text(json.dumps({
            "seed": seed, "args": {k: str(v) for k, v in vars(args).items()},
            "versions": versions_, "baseline": base, "final": final, "end_zombies": end_zombies,
            "events": [e.as_dict() for e in events], "samples": sampler.samples,
            "requests": len(records),
            "failures": [{"t0": round(r[0], 3), "t1": round(r[1], 3), "target": r[2], "mode": r[3],
                          "reused": r[4], "last_pid": r[5], "error": r[7],
                          "event": (e.kind if e else None), "event_start": (round(e.start, 3) if e else None)}
                         for (r, e) in failures],
            "problems": problems,
        }, indent=1))
        print(report)
        say(f"report: {md}")
        if problems:
            print("soak FAILED:", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            return 1
        return 0
    except bl.TargetFailed as e:
        print(f"error: {e}", file=sys.stderr)
        for h in herds.values():
            tail = h.log_path.read_text(errors="replace").splitlines()[-15:] if h.log_path.exists() else []
            print(f"--- {h.name} log tail ({h.log_path}):\n" + "\n".join(tail), file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'Ctrl-C'}): cleaning up", file=sys.stderr)
        return 130
    finally:
        stop_ev.set()
        bl.cleanup_all()


if __name__ == "__main__":
    sys.exit(main())
