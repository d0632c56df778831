"""Shared pieces of herd's benchmarks (cluster.py, reload.py). Python 3 standard library only.

- Targets: one way of running bench/apps/app.js on N workers behind one port — a single node
  process, Node's cluster primary (rr / none), PM2 cluster mode, herd (round-robin / shared /
  sticky). Each can start on a given port, name its "primary" (the process that is not a
  worker: Node's primary, PM2's God daemon, herd's supervisor) and stop everything it started.
- /proc readings: CPU seconds (utime+stime) and RSS (VmRSS) of a set of pids, sampled in a
  background thread for the peak.
- wrk: run one bounded load (`-d`, plus a hard subprocess timeout) and parse the one JSON line
  that wrk-report.lua prints.
- Cleanup: every process a benchmark starts carries HERD_BENCH_TAG=<unique tag> in its
  environment, and is started in a session of its own. Stopping a target signals its process
  group, then kills whatever still carries the target's tag (PM2's daemon detaches itself and
  herd's workers have their own process groups, so the group alone is not enough). cleanup_all()
  runs every registered stop and a last sweep of the run's tag; the scripts call it in a
  `finally`, and SIGTERM/SIGHUP are turned into KeyboardInterrupt so Ctrl-C, kill and errors
  all end up there. Nothing is killed by name: only pids found by our own tag or group.
- Rounds: rotated() gives round r's contender order (the list started at offset r, so nobody is
  always first or last); stat()/fmt_stat() give "median (min–max)" over the rounds.
- Errors beside ratios: error_counts()/error_mark() turn wrk's error counts into a "⚠ 50
  timeouts" mark, and fmt_ratio() puts it next to every ratio computed from runs with errors.
- Worker pids, one check for every contender: Target.worker_pids() asks the supervisor itself
  (herd: `herd status NAME --json`; PM2: `pm2 jlist`; Node's cluster primary: its child
  processes, from /proc) — never HTTP probes, which only see the workers that happen to answer.
- CLI start-up: time_command() times a short command (hyperfine if installed, else a loop);
  Target.cli_noop_argv() is the no-op (`herd --version`, `pm2 --version`) whose time is what any
  command of that CLI pays before doing its work.
"""

from __future__ import annotations

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
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
APP_JS = BENCH / "apps" / "app.js"
NODE_CLUSTER_JS = BENCH / "apps" / "node-cluster.js"
WRK_LUA = BENCH / "wrk-report.lua"
OUT = BENCH / "out"
PM2_BIN = BENCH / "node_modules" / ".bin" / "pm2"
APP_NAME = "bench-app"

CLK_TCK = os.sysconf("SC_CLK_TCK")
TAG_VAR = "HERD_BENCH_TAG"
RUN_TAG = f"hb{os.getpid()}x{uuid.uuid4().hex[:8]}"
_tag_counter = 0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def new_tag(what: str) -> str:
    global _tag_counter
    _tag_counter += 1
    return f"{RUN_TAG}-{what}-{_tag_counter}"


class SkipTarget(Exception):
    """The target cannot run on this machine (tool missing); the row is skipped with a note."""


class TargetFailed(Exception):
    """The target was tried and did not come up (or died)."""


# ---------------------------------------------------------------- rounds and statistics

def rotated(items, r: int) -> list:
    """Round r's order: the list started at offset r (round 0 as given, round 1 from the second
    item, ...), so every contender runs first, in the middle and last equally often."""
    items = list(items)
    if not items:
        return items
    k = r % len(items)
    return items[k:] + items[:k]


def stat(xs) -> dict | None:
    """Median, min, max and count of the values that are not None (None if there are none)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt_stat(s: dict | None, spec: str = "{:.0f}", scale: float = 1.0, unit: str = "") -> str:
    """"median (min–max)" — just the value when there was one round; "–" when there was none."""
    if not s:
        return "–"
    m = spec.format(s["median"] * scale) + unit
    if s["n"] == 1:
        return m
    return f"{m} ({spec.format(s['min'] * scale)}–{spec.format(s['max'] * scale)})"


# wrk's error kinds, as named in the marks
ERROR_KINDS = (("connect", "connect"), ("read", "read"), ("write", "write"),
               ("timeout", "timeouts"), ("status", "http>399"))


def error_counts(runs) -> dict:
    """Sum of wrk's error counts over runs (dicts from wrk_finish); kinds with 0 left out."""
    total = {}
    for r in runs:
        for k, _ in ERROR_KINDS:
            if r.get(k):
                total[k] = total.get(k, 0) + r[k]
    return total


def error_mark(counts: dict, who: str = "") -> str:
    """"⚠ 50 timeouts, 3 read" (with "who: " in front when given); "" when there were none."""
    parts = [f"{counts[k]} {label}" for k, label in ERROR_KINDS if counts.get(k)]
    if not parts:
        return ""
    return "⚠ " + (f"{who}: " if who else "") + ", ".join(parts)


def fmt_ratio(s: dict | None, marks=(), spec: str = "{:.2f}") -> str:
    """A ratio "median× (min–max)" with every non-empty mark beside it:
    `1.18× (1.10–1.25; ⚠ herd-rr: 50 timeouts)`. A ratio from runs with errors is never bare."""
    if not s:
        return "–"
    m = spec.format(s["median"]) + "×"
    inside = []
    if s["n"] > 1:
        inside.append(f"{spec.format(s['min'])}–{spec.format(s['max'])}")
    inside += [m_ for m_ in marks if m_]
    return f"{m} ({'; '.join(inside)})" if inside else m


def paired_ratios(a_runs: dict, b_runs: dict, field: str) -> list[float]:
    """Per-round ratios a/b of `field`, only for rounds where both sides have a value
    (a_runs, b_runs: round -> result dict). Paired, so a slow round affects both sides."""
    out = []
    for rnd, a in a_runs.items():
        b = b_runs.get(rnd)
        if b is None or a.get(field) is None or not b.get(field):
            continue
        out.append(a[field] / b[field])
    return out


# ---------------------------------------------------------------- /proc readings

def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return data[data.rindex(")") + 2:].split()


def cpu_seconds(pids) -> float:
    """utime+stime of the given pids (not their children), in seconds. Gone pids count 0."""
    total = 0
    for pid in pids:
        f = _stat_fields(pid)
        if f:
            total += int(f[11]) + int(f[12])  # fields 14 and 15 of stat(5)
    return total / CLK_TCK


def rss_kib(pids) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    f = _stat_fields(pid)
    return bool(f) and f[0] != "Z"


def children_of(ppid: int) -> list[int]:
    """Live child processes of ppid (field 4 of /proc/PID/stat), e.g. Node's cluster workers."""
    kids = []
    for pid in _all_pids():
        f = _stat_fields(pid)
        if f and f[0] != "Z" and f[1] == str(ppid):
            kids.append(pid)
    return sorted(kids)


def _all_pids():
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def tagged_pids(tag_prefix: str) -> list[int]:
    """Pids whose environment has HERD_BENCH_TAG starting with tag_prefix (ours, by construction)."""
    needle = f"{TAG_VAR}={tag_prefix}".encode()
    me = os.getpid()
    found = []
    for pid in _all_pids():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if any(item.startswith(needle) for item in env.split(b"\0")):
            found.append(pid)
    return found


def kill_tagged(tag_prefix: str, sig=signal.SIGKILL) -> list[int]:
    pids = tagged_pids(tag_prefix)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


class RssSampler:
    """Samples the summed VmRSS of pids() every `interval` s in a thread; keeps the peak (KiB)."""

    def __init__(self, pids, interval: float = 0.1):
        self._pids = pids
        self.interval = interval
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            pids = self._pids()
            if pids:
                self.peak_kib = max(self.peak_kib, rss_kib(pids))
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------- cleanup registry

_cleanups: list = []


def at_cleanup(fn):
    _cleanups.append(fn)
    return fn


def cleanup_all() -> None:
    while _cleanups:
        fn = _cleanups.pop()
        try:
            fn()
        except BaseException as e:  # keep tearing down the rest
            log(f"cleanup step failed: {e!r}")
    left = kill_tagged(RUN_TAG)
    if left:
        log(f"killed {len(left)} leftover process(es) of this run: {left}")


def install_signal_handlers() -> None:
    def _raise(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)


# ---------------------------------------------------------------- processes

def tagged_env(tag: str, **extra) -> dict:
    env = dict(os.environ)
    env[TAG_VAR] = tag
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cmd(argv, env, timeout: float) -> subprocess.CompletedProcess:
    """Run a short command (pm2 CLI, herd ls/reload) in its own session, bounded in time.
    On timeout its whole group is killed and TimeoutExpired is raised."""
    p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        _killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def time_command(argv: list[str], env: dict, runs: int, out_json: Path, warmup: int = 2) -> dict:
    """Wall time of a short command: hyperfine if installed, else a Python loop. Bounded.
    Returns tool, runs, mean, median, min, max, stddev (seconds) and failed (non-zero exits)."""
    if shutil.which("hyperfine"):
        # -N: no intermediate shell, so nothing is subtracted as "shell spawning time" (with a
        # shell, a ~1 ms command comes out at 0.0 ms); output goes to /dev/null.
        cmd = " ".join(shlex.quote(str(a)) for a in argv)
        cp = run_cmd(["hyperfine", "-N", "--output=null", "--warmup", str(warmup), "--runs",
                      str(runs), "--ignore-failure", "--export-json", str(out_json), cmd],
                     env, timeout=180)
        if cp.returncode == 0 and out_json.exists():
            r = json.loads(out_json.read_text())["results"][0]
            return dict(tool="hyperfine", runs=len(r["times"]), mean=r["mean"], median=r["median"],
                        min=r["min"], max=r["max"], stddev=r.get("stddev"),
                        failed=sum(1 for c in r.get("exit_codes", []) if c))
        log(f"hyperfine failed ({cp.stderr.strip()[-200:]}); timing in Python")
    times, failed = [], 0
    for i in range(runs + warmup):
        t = time.perf_counter()
        cp = run_cmd([str(a) for a in argv], env, timeout=30)
        if i >= warmup:
            times.append(time.perf_counter() - t)
            failed += cp.returncode != 0
    return dict(tool="python loop", runs=len(times), mean=statistics.mean(times),
                median=statistics.median(times), min=min(times), max=max(times),
                stddev=statistics.stdev(times) if len(times) > 1 else None, failed=failed)


def _killpg(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Proc:
    """A long-running process in a session of its own, output to a log file."""

    def __init__(self, argv, env, log_path: Path):
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        self.p = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, grace: float = 8.0) -> None:
        """SIGTERM the leader (a graceful stop for a supervisor), wait, then SIGKILL its group."""
        if self.p.poll() is None:
            try:
                self.p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log(f"{self.argv[0]} pid {self.pid} still up after {grace}s: SIGKILL")
        _killpg(self.pid, signal.SIGKILL)
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


# ---------------------------------------------------------------- readiness

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str = "/", timeout: float = 1.0) -> tuple[int, bytes]:
    """One GET on a fresh connection (Connection: close). Returns (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def wait_ready(port: int, workers: int, timeout: float, alive=lambda: True) -> set:
    """Poll GET / until it answers 200 (bounded by `timeout`), then keep asking (at most ~3 s)
    until `workers` distinct pids have answered. Returns the pids seen. Raises TargetFailed if
    the port never answers or alive() turns false."""
    deadline = time.monotonic() + timeout
    last_err = None
    while True:
        if not alive():
            raise TargetFailed("exited before answering")
        try:
            status, body = http_get(port)
            if status == 200:
                break
            last_err = f"HTTP {status}"
        except (OSError, ValueError, IndexError) as e:
            last_err = repr(e)
        if time.monotonic() > deadline:
            raise TargetFailed(f"port {port} did not answer within {timeout:.0f}s ({last_err})")
        time.sleep(0.05)
    seen = set()
    spread_deadline = min(deadline, time.monotonic() + 3.0) if workers > 1 else 0
    while True:
        try:
            status, body = http_get(port)
            if status == 200:
                seen.add(json.loads(body)["pid"])
        except (OSError, ValueError, KeyError, IndexError):
            pass
        if len(seen) >= workers or time.monotonic() > spread_deadline:
            return seen
        time.sleep(0.01)


# ---------------------------------------------------------------- wrk

def wrk_start(port: int, duration: float, threads: int, connections: int, close: bool, tag: str,
              path: str = "/") -> subprocess.Popen:
    """Start one wrk run in the background (own session); finish it with wrk_finish()."""
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install -y wrk")
    duration = max(1, int(round(duration)))  # wrk takes whole seconds only
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--latency",
            "-s", str(WRK_LUA)]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}{path}")
    p = subprocess.Popen(argv, env=tagged_env(tag), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    p.duration = duration
    at_cleanup(lambda: p.poll() is None and _killpg(p.pid, signal.SIGKILL))
    return p


def wrk_finish(p: subprocess.Popen) -> dict:
    """Wait for a wrk run (bounded: its duration + 30 s, then its group is killed) and parse the
    WRKJSON line: requests, rps, connect/read/write/timeout/status errors, latency percentiles."""
    try:
        out, err = p.communicate(timeout=p.duration + 30)
    except subprocess.TimeoutExpired:
        _killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise TargetFailed(f"wrk did not finish within {p.duration + 30:g}s")
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            r = json.loads(line[len("WRKJSON "):])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
            r["errors"] = sum(r[k] for k in ("connect", "read", "write", "timeout", "status"))
            r["raw"] = out
            return r
    raise TargetFailed(f"wrk failed (rc {p.returncode}): {(err.strip() or out.strip())[:300]}")


def wrk(port: int, duration: float, threads: int, connections: int, close: bool, tag: str,
        path: str = "/") -> dict:
    """One wrk run, bounded: wrk's own -d, and a hard timeout of duration + 30 s."""
    return wrk_finish(wrk_start(port, duration, threads, connections, close, tag, path))


def fmt_s(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def error_text(r: dict) -> str:
    parts = [f"{k} {r[k]}" for k in ("connect", "read", "write", "timeout") if r.get(k)]
    if r.get("status"):
        parts.append(f"http>399 {r['status']}")
    return f"{r['errors']} ({', '.join(parts)})" if parts else "0"


# ---------------------------------------------------------------- targets

class Target:
    """One way of running app.js on `workers` workers behind one port."""

    name = "?"          # short id: table rows, --only
    label = "?"         # human description
    kind = "?"          # node | pm2 | herd

    def __init__(self, workers: int, logdir: Path):
        self.workers = workers
        self.logdir = logdir
        logdir.mkdir(parents=True, exist_ok=True)
        self.tag = new_tag(self.name)
        self.port = None
        self.work_ms = None
        self.app_env = {}  # extra environment for the app (e.g. APP_DRAIN)
        self._cleanup_registered = False

    def register_cleanup(self) -> None:
        """Make sure cleanup_all() stops this target (once), whatever happens later."""
        if not self._cleanup_registered:
            at_cleanup(self.stop)
            self._cleanup_registered = True

    def expected_workers(self) -> int:
        return self.workers

    def start(self, port: int, work_ms: float) -> None:
        raise NotImplementedError

    def primary_pids(self) -> list[int]:
        """The non-worker processes whose CPU and memory are the cost of clustering."""
        return []

    def alive(self) -> bool:
        return True

    def worker_pids(self) -> list[int]:
        """The worker pids as the supervisor itself knows them (see the module doc)."""
        return []

    def cli_noop_argv(self) -> tuple[list[str], dict] | None:
        """(argv, env) of this contender's CLI doing nothing (its start-up cost), or None."""
        return None

    def stop(self) -> None:
        raise NotImplementedError

    def describe_failure(self) -> str:
        return ""


class _ProcTarget(Target):
    """A target that is one foreground process (plus its children)."""

    proc: Proc | None = None

    def _argv(self) -> list:
        raise NotImplementedError

    def _env(self) -> dict:
        return {}

    def start(self, port, work_ms):
        self.port, self.work_ms = port, work_ms
        self.tag = new_tag(self.name)
        env = tagged_env(self.tag, PORT=port, WORK_MS=work_ms, **self.app_env, **self._env())
        self.register_cleanup()
        self.proc = Proc(self._argv(), env, self.logdir / f"{self.name}-w{work_ms:g}.log")

    def primary_pids(self):
        return [self.proc.pid] if self.proc else []

    def alive(self):
        return bool(self.proc) and self.proc.alive()

    def stop(self):
        if self.proc:
            self.proc.stop()
            self.proc = None
        kill_tagged(self.tag)

    def describe_failure(self):
        return self.proc.log_tail() if self.proc else ""


class NodeSingle(_ProcTarget):
    name, label, kind = "node-single", "single node process (no cluster)", "node"

    def expected_workers(self):
        return 1

    def _argv(self):
        return ["node", APP_JS]

    def primary_pids(self):
        return []  # no primary: the one process is the worker

    def worker_pids(self):
        return [self.proc.pid] if self.alive() else []


class NodeCluster(_ProcTarget):
    kind = "node"

    def __init__(self, workers, logdir, policy: str):
        self.policy = policy
        self.name = f"node-{policy}"
        self.label = {"rr": "Node cluster, round-robin (primary accepts)",
                      "none": "Node cluster, shared handle (kernel balances)"}[policy]
        super().__init__(workers, logdir)

    def _argv(self):
        return ["node", NODE_CLUSTER_JS]

    def _env(self):
        return {"WORKERS": self.workers, "NODE_CLUSTER_SCHED_POLICY": self.policy}

    def worker_pids(self):
        # Node's primary has no CLI to ask; its workers are exactly its child processes
        # (cluster.fork), which the kernel reports in /proc.
        return children_of(self.proc.pid) if self.alive() else []


class Herd(_ProcTarget):
    kind = "herd"

    def __init__(self, workers, logdir, balance: str, herd_bin: Path,
                 reload_cmd: str = "{herd} reload {name}", ls_cmd: str = "{herd} ls"):
        self.balance = balance
        self.herd_bin = herd_bin
        self.reload_cmd = reload_cmd
        self.ls_cmd = ls_cmd
        self.name = {"round-robin": "herd-rr", "shared": "herd-shared", "sticky": "herd-sticky",
                     "hash": "herd-hash"}[balance]
        self.label = f"herd --balance {balance}"
        self.runtime_dir = None
        super().__init__(workers, logdir)

    def start(self, port, work_ms):
        if not (self.herd_bin.is_file() and os.access(self.herd_bin, os.X_OK)):
            raise SkipTarget(f"no herd binary at {self.herd_bin} (cargo build --release, or --herd PATH)")
        # A private runtime dir, like PM2's private PM2_HOME: herd's control socket (if it lives
        # under XDG_RUNTIME_DIR) is then this run's own; control commands get the same env.
        self.runtime_dir = tempfile.mkdtemp(prefix="hb-herd-")
        at_cleanup(lambda d=self.runtime_dir: shutil.rmtree(d, ignore_errors=True))
        super().start(port, work_ms)

    def _env(self):
        return {"XDG_RUNTIME_DIR": self.runtime_dir, "HERD_HOME": self.runtime_dir}

    def _argv(self):
        return [self.herd_bin, "run", "-i", self.workers, "--balance", self.balance,
                "-n", APP_NAME, APP_JS]

    def control_env(self) -> dict:
        return tagged_env(self.tag, XDG_RUNTIME_DIR=self.runtime_dir, HERD_HOME=self.runtime_dir)

    def status(self, timeout: float = 30) -> dict:
        """`herd status NAME --json` (raises TargetFailed if it fails or is not JSON)."""
        cp = run_cmd([str(self.herd_bin), "status", APP_NAME, "--json"], self.control_env(), timeout)
        if cp.returncode != 0:
            raise TargetFailed(f"herd status exited {cp.returncode}: {cp.stderr.strip()[-300:]}")
        try:
            return json.loads(cp.stdout)
        except ValueError as e:
            raise TargetFailed(f"herd status --json: not JSON ({e})") from None

    def worker_pids(self):
        try:
            return sorted(w["pid"] for w in self.status().get("workers", [])
                          if w.get("pid") and w.get("state") == "ready")
        except (TargetFailed, subprocess.TimeoutExpired, KeyError, TypeError):
            return []

    def cli_noop_argv(self):
        return [str(self.herd_bin), "--version"], self.control_env()

    def control_argv(self, template: str) -> list[str]:
        return [a.format(herd=self.herd_bin, name=APP_NAME, pid=self.proc.pid if self.proc else 0)
                for a in shlex.split(template)]

    def reload(self, timeout: float = 60) -> subprocess.CompletedProcess:
        return run_cmd(self.control_argv(self.reload_cmd), self.control_env(), timeout)

    def ls_argv(self) -> list[str]:
        return self.control_argv(self.ls_cmd)


class Pm2(Target):
    name, label, kind = "pm2", "PM2 cluster mode (pm2 start -i N)", "pm2"

    def __init__(self, workers, logdir, pm2_bin: Path = PM2_BIN):
        super().__init__(workers, logdir)
        self.pm2_bin = pm2_bin
        self.home = None
        self.daemon_pid = None

    def env(self) -> dict:
        return tagged_env(self.tag, PM2_HOME=self.home, PORT=self.port, WORK_MS=self.work_ms,
                          **self.app_env)

    def pm2(self, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        return run_cmd([str(self.pm2_bin), *map(str, args)], self.env(), timeout)

    def start(self, port, work_ms):
        if not self.pm2_bin.exists():
            raise SkipTarget(f"no pm2 at {self.pm2_bin} (npm install --prefix bench)")
        self.port, self.work_ms = port, work_ms
        self.tag = new_tag(self.name)
        # Private PM2_HOME: its daemon, sockets, logs and dump are this run's only. Short path:
        # PM2 puts unix sockets in it (108-byte limit).
        self.home = tempfile.mkdtemp(prefix="hb-pm2-")
        self.register_cleanup()
        cp = self.pm2("start", APP_JS, "-i", self.workers, "--name", APP_NAME)
        (self.logdir / f"pm2-w{work_ms:g}.log").write_text(cp.stdout + cp.stderr)
        self.daemon_pid = self._read_daemon_pid()
        if cp.returncode != 0:
            raise TargetFailed(f"pm2 start exited {cp.returncode}: {cp.stderr.strip()[-500:]}")
        if not self.daemon_pid:
            raise TargetFailed("pm2 start returned but no daemon pid in PM2_HOME/pm2.pid")

    def _read_daemon_pid(self):
        try:
            return int(Path(self.home, "pm2.pid").read_text().strip())
        except (OSError, ValueError, TypeError):
            return None

    def primary_pids(self):
        # PM2's God daemon is the cluster primary (it forks the workers with node:cluster).
        return [self.daemon_pid] if self.daemon_pid else []

    def alive(self):
        return pid_alive(self.daemon_pid)

    def worker_pids(self) -> list[int]:
        try:
            cp = self.pm2("jlist", timeout=30)
            return sorted(p["pid"] for p in json.loads(cp.stdout)
                          if p.get("pid") and p.get("pm2_env", {}).get("status") == "online")
        except (ValueError, KeyError, TypeError, AttributeError, subprocess.TimeoutExpired):
            return []

    def cli_noop_argv(self):
        # With this run's daemon up, `pm2 --version` starts Node, loads PM2's CLI, connects to
        # the daemon (as every pm2 command does), prints the version and exits.
        return [str(self.pm2_bin), "--version"], self.env()

    def reload(self, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.pm2("reload", APP_NAME, timeout=timeout)

    def stop(self):
        if self.home is None:
            return
        if pid_alive(self.daemon_pid) or Path(self.home, "pm2.pid").exists():
            try:
                cp = self.pm2("kill", timeout=30)
                if cp.returncode != 0:
                    log(f"pm2 kill exited {cp.returncode}: {cp.stderr.strip()[-300:]}")
            except subprocess.TimeoutExpired:
                log("pm2 kill timed out; killing PM2's processes by tag")
        # `pm2 kill` answers before the God daemon has exited: give it up to 5 s to go.
        deadline = time.monotonic() + 5
        while tagged_pids(self.tag) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = kill_tagged(self.tag)
        if left:
            log(f"pm2: killed {len(left)} process(es) left after pm2 kill: {left}")
        shutil.rmtree(self.home, ignore_errors=True)
        self.home = None
        self.daemon_pid = None

    def describe_failure(self):
        try:
            logs = sorted(Path(self.home, "logs").glob("*")) if self.home else []
            return "\n".join(p.read_text(errors="replace")[-800:] for p in logs)
        except OSError:
            return ""


# ---------------------------------------------------------------- environment facts

def versions(herd_bin: Path | None = None) -> dict:
    def out(argv):
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=20,
                                stdin=subprocess.DEVNULL, env=tagged_env(new_tag("version")))
            return (cp.stdout or cp.stderr).strip().splitlines()[0] if (cp.stdout or cp.stderr) else "?"
        except (OSError, subprocess.TimeoutExpired, IndexError):
            return "missing"

    v = {
        "node": out(["node", "--version"]),
        "wrk": out(["wrk", "--version"]).split(" [")[0].replace("wrk ", "").replace("debian/", "")
        if shutil.which("wrk") else "missing",
        "pm2": _pm2_version(),
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
    }
    if herd_bin is not None:
        v["herd"] = out([str(herd_bin), "--version"]) if herd_bin.is_file() else "missing"
    return v


def _pm2_version() -> str:
    # Not `pm2 --version`: that starts a PM2 daemon as a side effect. Read the package instead.
    try:
        return json.loads((BENCH / "node_modules" / "pm2" / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return "missing"


def run_bench(name: str, args, measure, render) -> int:
    """The `main` every comparison script shares: measure (with cleanup on every exit path,
    Ctrl-C included), then print the markdown `render` makes and keep it with the raw results
    under `args.out` as `NAME-STAMP.md` / `.json`. `measure(args, logdir)` returns a dict of
    results; `render(results, args, versions, when)` returns markdown."""
    install_signal_handlers()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    logdir = args.out / f"logs-{name}-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)
    versions_seen = versions(args.herd)
    args.loadavg = os.getloadavg()[0]
    try:
        results = measure(args, logdir)
    except KeyboardInterrupt:
        log("interrupted: tearing down")
        return 130
    finally:
        cleanup_all()
    md = render(results, args, versions_seen, time.strftime("%Y-%m-%d %H:%M:%S"))
    print(md)
    (args.out / f"{name}-{stamp}.md").write_text(md + "\n")
    (args.out / f"{name}-{stamp}.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "versions": versions_seen,
         "results": results}, indent=1, default=str))
    log(f"wrote {args.out}/{name}-{stamp}.md and .json")
    return 0
