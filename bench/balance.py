#!/usr/bin/env python3
"""Balancing modes side by side: herd's every --balance mode versus Node's cluster and PM2.

What it measures
    The benchmark app (bench/apps/app.js) on --workers workers (default 2), run by each of

        node-rr       Node's cluster primary, NODE_CLUSTER_SCHED_POLICY=rr (primary accepts)
        node-none     Node's cluster primary, NODE_CLUSTER_SCHED_POLICY=none (shared handle: the
                      ceiling, nothing between client and worker)
        pm2           PM2 cluster mode (Node's rr inside PM2's daemon)
        herd-rr       herd --balance round-robin (herd accepts, hands each connection on)
        herd-shared   herd --balance shared (one socket, the kernel wakes a worker)
        herd-sticky   herd --balance sticky (a client address keeps its worker)
        herd-hash     herd --balance hash (a socket per worker, the kernel picks by flow hash)

    in four scenarios (--scenarios, default all):

    close, keepalive   WORK_MS 0, wrk with `Connection: close` / keep-alive: req/s, p99, the
                       primary's CPU seconds per 10,000 connections (close) or requests
                       (keep-alive) and its peak RSS (as in cluster.py).
    mixed              a mixed load: 95 % of requests burn 1 ms of CPU, 5 % burn 50 ms (the app's
                       WORK_SLOW_PCT / WORK_SLOW_MS), wrk with `Connection: close` (every request
                       is a new balancing decision; --mixed-conn keepalive for the other case):
                       p50, p99, max latency, req/s.
    even               evenness: 1,000 sequential connections (--even-conns) from one client
                       address (127.0.0.1), then 1,000 from 8 addresses in turn (127.0.0.2–9,
                       bound before connect): each worker's share (from the pid in the answer),
                       and the largest deviation from an even share in %.
    kill               a sequential `Connection: close` client (one request at a time, 5 s
                       timeout); after --kill-before s the worker that served the last request is
                       killed with SIGKILL; the client runs --kill-after s more: requests that
                       failed, and those that took more than 1 s (stalled).

    Every contender is started fresh for each round (and once more for the mixed load, which
    needs other app settings), in an order rotated per round (see bench/README.md). Figures are
    medians over the rounds with min–max; ratios are per round; counts of failures are sums over
    the rounds. A figure from runs with errors carries them beside it (⚠).

How to run (from the repository root)
    cargo build --release -p herd && npm install --prefix bench   # pm2 optional (row skipped)
    python3 bench/balance.py                        # 3 rounds, everything, ~15 min on 2 cores
    python3 bench/balance.py --quick                # smoke test: proves the code paths only
    python3 bench/balance.py --only node-rr,node-none,herd-hash --scenarios close,even
    python3 bench/balance.py --workers 4 --connections 100

Output: markdown on stdout and in bench/out/balance-<time>.md, raw numbers in .json, the
processes' logs in bench/out/logs-<time>/. Everything started is torn down, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree
import benchlib as B  # noqa: E402
import cluster as C  # noqa: E402  (measure(): one wrk run with the primary's CPU and RSS)

ALL_CONFIGS = ["node-rr", "node-none", "pm2", "herd-rr", "herd-shared", "herd-sticky", "herd-hash"]
ALL_SCENARIOS = ["close", "keepalive", "mixed", "even", "kill"]
BASELINE, CEILING = "node-rr", "node-none"
HERD_BALANCE = {"herd-rr": "round-robin", "herd-shared": "shared", "herd-sticky": "sticky",
                "herd-hash": "hash"}
EIGHT = [f"127.0.0.{i}" for i in range(2, 10)]


def make_target(name: str, args, logdir: Path) -> B.Target:
    w = args.workers
    if name in ("node-rr", "node-none"):
        return B.NodeCluster(w, logdir, name.split("-")[1])
    if name == "pm2":
        return B.Pm2(w, logdir)
    return B.Herd(w, logdir, HERD_BALANCE[name], args.herd)


# ---------------------------------------------------------------- clients

def get_from(port: int, src: str | None, timeout: float) -> dict:
    """One GET / on a fresh connection from source address `src` (Connection: close); the
    answer's JSON. Raises OSError/ValueError on any failure."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        if src:
            s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if int(head.split(b" ", 2)[1]) != 200:
        raise ValueError(head[:60])
    return json.loads(body)


def evenness(target: B.Target, sources: list, n: int) -> dict:
    """n sequential connections, source addresses taken in turn; each worker's count."""
    counts, failed = Counter(), 0
    for i in range(n):
        try:
            counts[get_from(target.port, sources[i % len(sources)], 5.0)["pid"]] += 1
        except (OSError, ValueError, KeyError, IndexError):
            failed += 1
    # Workers that got nothing count too: ask the supervisor which there are.
    pids = target.worker_pids()
    shares = sorted([counts.get(p, 0) for p in pids] +
                    [c for p, c in counts.items() if p not in pids], reverse=True)
    shares += [0] * max(0, target.expected_workers() - len(shares))
    served = sum(shares)
    even = served / max(1, target.expected_workers())
    dev = max(abs(s - even) for s in shares) / even * 100 if served else None
    return {"shares": shares, "failed": failed, "max_dev_pct": dev}


class SeqClient(threading.Thread):
    """One request at a time until stopped: (start, seconds, ok, pid) per request."""

    def __init__(self, port: int, timeout: float = 5.0):
        super().__init__(daemon=True)
        self.port, self.timeout = port, timeout
        self.log: list[tuple] = []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            t = time.monotonic()
            try:
                pid = get_from(self.port, None, self.timeout)["pid"]
                self.log.append((t, time.monotonic() - t, True, pid))
            except (OSError, ValueError, KeyError, IndexError):
                self.log.append((t, time.monotonic() - t, False, None))
                time.sleep(0.005)  # a refused connect returns at once: do not spin

    def stop(self):
        self.halt.set()
        self.join(timeout=self.timeout + 5)


def kill_one(target: B.Target, args) -> dict:
    """SIGKILL the worker serving a sequential client; failed and stalled (> 1 s) requests."""
    pids = target.worker_pids()
    client = SeqClient(target.port)
    client.start()
    time.sleep(args.kill_before)
    served = [e[3] for e in client.log if e[2]]
    victim = served[-1] if served and served[-1] in pids else (pids[0] if pids else None)
    t_kill = time.monotonic()
    if victim:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            victim = None
    time.sleep(args.kill_after)
    client.stop()
    after = [e for e in client.log if e[0] + e[1] >= t_kill]
    return {
        "victim": victim,
        "requests": len(client.log),
        "failed": sum(1 for e in client.log if not e[2]),
        "stalled": sum(1 for e in client.log if e[2] and e[1] > 1.0),
        "max_ms": max((e[1] for e in client.log), default=0) * 1000,
        "max_after_kill_ms": max((e[1] for e in after), default=0) * 1000,
    }


# ---------------------------------------------------------------- one contender, one round

def start(target: B.Target, args, work_ms: float) -> None:
    target.start(B.free_port(), work_ms)
    seen = B.wait_ready(target.port, target.expected_workers(), args.ready_timeout, target.alive)
    if len(seen) < target.expected_workers():
        B.log(f"{target.name}: {len(seen)} of {target.expected_workers()} workers answered the "
              f"readiness probes (normal for kernel balancing); going on")


def run_one(name: str, rnd: int, args, logdir: Path, skipped: dict) -> dict:
    """Every selected scenario for one contender in one round: {scenario: result or note}."""
    out = {}
    if name in skipped:
        return {s: {"note": skipped[name]} for s in args.scenarios}
    main = [s for s in args.scenarios if s != "mixed"]
    plan = ([("main", main, 0.0, {})] if main else []) + (
        [("mixed", ["mixed"], args.mixed_fast_ms,
          {"WORK_SLOW_MS": args.mixed_slow_ms, "WORK_SLOW_PCT": args.mixed_slow_pct})]
        if "mixed" in args.scenarios else [])
    for label, scenarios, work_ms, env in plan:
        target = make_target(name, args, logdir)
        target.app_env = env
        B.log(f"round {rnd + 1}/{args.rounds} {name} ({label}): starting")
        try:
            start(target, args, work_ms)
            for s in scenarios:
                B.log(f"  {name} {s}")
                try:
                    if s in ("close", "keepalive"):
                        r = C.measure(target, args, s == "close")
                    elif s == "mixed":
                        r = C.measure(target, args, args.mixed_conn == "close")
                    elif s == "even":
                        r = {"one": evenness(target, [None], args.even_conns),
                             "eight": evenness(target, EIGHT, args.even_conns)}
                    else:
                        r = kill_one(target, args)
                    out[s] = r
                except B.TargetFailed as e:
                    out[s] = {"note": f"failed: {e}"}
                    B.log(f"  {name} {s}: {e}\n{target.describe_failure()}")
                    break
        except B.SkipTarget as e:
            skipped[name] = f"skipped: {e}"
            B.log(f"{name}: {skipped[name]}")
            return {s: {"note": skipped[name]} for s in args.scenarios}
        except B.TargetFailed as e:
            B.log(f"{name}: did not start: {e}\n{target.describe_failure()}")
            for s in scenarios:
                out.setdefault(s, {"note": f"failed to start: {e}"})
        finally:
            target.stop()
        time.sleep(args.settle)
    return out


def run_all(args, logdir: Path) -> dict:
    """results[scenario][config][round] = result dict."""
    results = {s: {c: {} for c in args.only} for s in args.scenarios}
    skipped = {}
    for rnd in range(args.rounds):
        order = B.rotated(args.only, rnd)
        B.log(f"round {rnd + 1}/{args.rounds}: order {', '.join(order)}")
        for name in order:
            for s, r in run_one(name, rnd, args, logdir, skipped).items():
                results[s][name][rnd] = r
    return results


# ---------------------------------------------------------------- tables

def measured(runs: dict) -> dict:
    return {k: r for k, r in runs.items() if "note" not in r}


def notes_of(runs: dict) -> list[str]:
    return list(dict.fromkeys(r["note"] for r in runs.values() if "note" in r))


def wrk_mark(name: str, runs: dict) -> str:
    return B.error_mark(B.error_counts(runs.values()), name)


def ratio_cell(a: dict, b: dict, an: str, bn: str, field: str = "rps") -> str:
    st = B.stat(B.paired_ratios(a, b, field))
    both = set(a) & set(b)
    marks = [wrk_mark(an, {k: a[k] for k in both}), wrk_mark(bn, {k: b[k] for k in both})]
    return B.fmt_ratio(st, marks)


def table_wrk(res: dict, args, scenario: str) -> list[str]:
    base, ceil = measured(res.get(BASELINE, {})), measured(res.get(CEILING, {}))
    lines = ["| config | rounds | req/s | ×node-rr | ×node-none | p50 ms | p99 ms | max ms | "
             "errors | primary CPU s per 10k | primary peak RSS MiB |",
             "|---|---:|---:|---|---|---:|---:|---:|---|---:|---:|"]
    for name in args.only:
        all_runs = res.get(name, {})
        runs = measured(all_runs)
        if not runs:
            short = (notes_of(all_runs) or ["–"])[0].split(":")[0]
            lines.append(f"| {name} | 0 | – | – | – | – | – | – | {short} | – | – |")
            continue
        st = lambda f: B.stat([r.get(f) for r in runs.values()])  # noqa: E731
        mark = wrk_mark(name, runs)
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            ("⚠ " if mark else "") + name, len(runs), B.fmt_stat(st("rps")),
            "1×" if name == BASELINE else ratio_cell(runs, base, name, BASELINE),
            "1×" if name == CEILING else ratio_cell(runs, ceil, name, CEILING),
            B.fmt_stat(st("lat_p50_us"), "{:.2f}", 1e-3), B.fmt_stat(st("lat_p99_us"), "{:.2f}", 1e-3),
            B.fmt_stat(st("lat_max_us"), "{:.0f}", 1e-3),
            mark.replace("⚠ ", "").replace(f"{name}: ", "") or "0",
            B.fmt_stat(st("primary_cpu_per_10k"), "{:.3f}"),
            B.fmt_stat(st("primary_rss_peak_kib"), "{:.1f}", 1 / 1024)))
    return lines


def table_even(res: dict, args) -> list[str]:
    lines = ["| config | 1 address: shares (last round) | max deviation % | "
             "8 addresses: shares (last round) | max deviation % | failed |",
             "|---|---|---:|---|---:|---:|"]
    for name in args.only:
        runs = measured(res.get(name, {}))
        if not runs:
            short = (notes_of(res.get(name, {})) or ["–"])[0].split(":")[0]
            lines.append(f"| {name} | – | – | – | – | {short} |")
            continue
        last = runs[max(runs)]
        cells = []
        for key in ("one", "eight"):
            cells.append("/".join(map(str, last[key]["shares"])))
            cells.append(B.fmt_stat(B.stat([r[key]["max_dev_pct"] for r in runs.values()]), "{:.0f}"))
        failed = sum(r[k]["failed"] for r in runs.values() for k in ("one", "eight"))
        lines.append(f"| {name} | {' | '.join(cells)} | {failed} |")
    return lines


def table_kill(res: dict, args) -> list[str]:
    lines = ["| config | rounds | requests | failed | stalled > 1 s | max latency ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in args.only:
        runs = measured(res.get(name, {}))
        if not runs:
            short = (notes_of(res.get(name, {})) or ["–"])[0].split(":")[0]
            lines.append(f"| {name} | 0 | – | – | – | {short} |")
            continue
        v = list(runs.values())
        no_victim = sum(1 for r in v if not r["victim"])
        lines.append("| {}{} | {} | {} | {} | {} | {} |".format(
            name, f" (⚠ {no_victim} round(s) without a worker to kill)" if no_victim else "",
            len(v), sum(r["requests"] for r in v), sum(r["failed"] for r in v),
            sum(r["stalled"] for r in v), B.fmt_stat(B.stat([r["max_ms"] for r in v]), "{:.0f}")))
    return lines


def goals(results: dict, args) -> list[str]:
    """Issue 10's targets for herd-hash and herd-sticky, checked against this run."""
    out = []
    close = results.get("close", {})
    h, rr, none = (measured(close.get(n, {})) for n in ("herd-hash", BASELINE, CEILING))
    if h and none:
        st = B.stat(B.paired_ratios(h, none, "rps"))
        out.append(f"- herd-hash req/s ÷ node-none (close): {B.fmt_ratio(st)} — goal ≥ 0.95×")
    if h and rr:
        st = B.stat(B.paired_ratios(h, rr, "rps"))
        out.append(f"- herd-hash req/s ÷ node-rr (close): {B.fmt_ratio(st)} — goal ≥ 1.3×")
        st = B.stat(C.cpu_ratios(h, rr))
        out.append(f"- herd-hash primary CPU per 10k ÷ node-rr's: {B.fmt_ratio(st, spec='{:.3f}')} "
                   "— goal ≤ 0.02× (– when herd's CPU was below /proc's 10 ms resolution)")
    even = results.get("even", {})
    for name in ("herd-hash", "herd-sticky"):
        runs = measured(even.get(name, {}))
        if runs:
            key = "one" if name == "herd-hash" else "eight"
            worst = max(r[key]["max_dev_pct"] or 0 for r in runs.values())
            what = "1 address, goal ±15 %" if key == "one" else "8 addresses, goal: every worker some"
            zero = any(0 in r[key]["shares"] for r in runs.values())
            out.append(f"- {name} evenness ({what}): worst deviation {worst:.0f} %"
                       + (", a worker got none" if zero else ""))
    mixed = results.get("mixed", {})
    for name in ("herd-rr", "herd-hash", "herd-sticky", "herd-shared"):
        a, b = measured(mixed.get(name, {})), measured(mixed.get(BASELINE, {}))
        if a and b:
            st = B.stat(B.paired_ratios(a, b, "lat_p99_us"))
            out.append(f"- {name} mixed-load p99 ÷ node-rr's: {B.fmt_ratio(st)} (goal for the "
                       "default: ≤ 1×)")
    return ["## Issue 10 goals, from this run", ""] + out + [""] if out else []


def render(results: dict, args, versions: dict, started: str) -> str:
    out = [f"# herd balancing benchmark — {started}", "",
           f"{args.workers} workers; {args.rounds} round(s), order rotated each round; wrk "
           f"-t{args.threads} -c{args.connections} -d{args.duration}s (warm-up {args.warmup}s). "
           "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())
           + f"; load average at start {args.loadavg:.2f}.  ",
           "Figures: median over rounds (min–max); ratios per round. Primary = Node's cluster "
           "primary / PM2's daemon / herd's supervisor. ⚠ = wrk errors behind the figure.", ""]
    titles = {"close": "WORK_MS 0, Connection: close",
              "keepalive": "WORK_MS 0, keep-alive (CPU per 10k requests)",
              "mixed": f"Mixed load: {100 - args.mixed_slow_pct:g} % {args.mixed_fast_ms:g} ms, "
                       f"{args.mixed_slow_pct:g} % {args.mixed_slow_ms:g} ms of CPU "
                       f"({args.mixed_conn})"}
    notes = []
    for s in args.scenarios:
        res = results[s]
        for name in args.only:
            notes += [f"{name}: {n}" for n in notes_of(res.get(name, {}))]
        if s in titles:
            out += [f"## {titles[s]}", ""] + table_wrk(res, args, s) + [""]
        elif s == "even":
            out += [f"## Evenness: {args.even_conns} sequential connections per client set", "",
                    "Shares are per worker, largest first; the deviation is the largest distance "
                    "from an even share. Sticky sends one address to one worker by design.", ""]
            out += table_even(res, args) + [""]
        else:
            out += [f"## kill -9 of the serving worker under a sequential Connection: close client "
                    f"({args.kill_before:g} s before, {args.kill_after:g} s after; sums over rounds)",
                    ""] + table_kill(res, args) + [""]
    out += goals(results, args)
    uniq = list(dict.fromkeys(notes))
    if uniq:
        out += ["## Notes", ""] + [f"- {n}" for n in uniq] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: --rounds 1 --duration 1 --warmup 0 --settle 0.2 "
                        "--even-conns 100 --kill-before 0.5 --kill-after 1.5; numbers mean nothing")
    p.add_argument("--workers", type=int, default=2, help="workers per cluster (default 2)")
    p.add_argument("--duration", type=int, default=10, help="seconds of measured load (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load first (default 2)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--scenarios", default=",".join(ALL_SCENARIOS),
                   help=f"comma-separated (default all: {','.join(ALL_SCENARIOS)})")
    p.add_argument("--only", default=",".join(ALL_CONFIGS),
                   help=f"comma-separated configs (default all: {','.join(ALL_CONFIGS)})")
    p.add_argument("--mixed-fast-ms", type=float, default=1, help="mixed: the usual request's ms (1)")
    p.add_argument("--mixed-slow-ms", type=float, default=50, help="mixed: the slow request's ms (50)")
    p.add_argument("--mixed-slow-pct", type=float, default=5, help="mixed: %% of slow requests (5)")
    p.add_argument("--mixed-conn", choices=("close", "keepalive"), default="close")
    p.add_argument("--even-conns", type=int, default=1000, help="evenness: connections per set (1000)")
    p.add_argument("--kill-before", type=float, default=2, help="kill: seconds of load before (2)")
    p.add_argument("--kill-after", type=float, default=4, help="kill: seconds of load after (4)")
    p.add_argument("--herd", type=Path, default=B.REPO / "target" / "release" / "herd",
                   help="herd binary (default target/release/herd); missing: herd rows skipped")
    p.add_argument("--ready-timeout", type=float, default=30, help="max seconds to wait for the port")
    p.add_argument("--settle", type=float, default=1, help="pause between runs, seconds (default 1)")
    p.add_argument("--out", type=Path, default=B.OUT, help="output folder (default bench/out)")
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(rounds=1, duration=1, warmup=0, settle=0.2, even_conns=100,
                       kill_before=0.5, kill_after=1.5)
    a = p.parse_args(argv)
    a.only = [c.strip() for c in a.only.split(",") if c.strip()]
    a.scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    bad = [c for c in a.only if c not in ALL_CONFIGS] + [s for s in a.scenarios if s not in ALL_SCENARIOS]
    if bad:
        p.error(f"unknown: {', '.join(bad)}")
    a.herd = a.herd if a.herd.is_absolute() else Path.cwd() / a.herd
    if not 1 <= a.duration <= 300 or a.warmup < 0 or not 1 <= a.rounds <= 100:
        p.error("--duration must be 1..300, --warmup >= 0, --rounds 1..100")
    if not 1 <= a.even_conns <= 100_000 or a.kill_before <= 0 or a.kill_after <= 0:
        p.error("--even-conns must be 1..100000, --kill-before and --kill-after > 0")
    return a


def main(argv=None) -> int:
    return B.run_bench("balance", parse_args(argv), run_all, render)

if __name__ == "__main__":
    sys.exit(main())
