#!/usr/bin/env python3
"""Throughput, latency and supervisor cost: herd versus Node's cluster primary and PM2.

What it measures
    The same app (bench/apps/app.js: node:http, GET / burns WORK_MS ms of CPU and answers a
    small JSON) on the same number of workers (--workers, default 2), run by each of:

        node-single   one node process, no cluster (the baseline without any balancing)
        node-rr       Node's cluster primary, NODE_CLUSTER_SCHED_POLICY=rr (primary accepts)
        node-none     Node's cluster primary, NODE_CLUSTER_SCHED_POLICY=none (shared handle)
        pm2           PM2 cluster mode, `pm2 start app.js -i N`, private PM2_HOME, `pm2 kill` after
        herd-rr       herd run -i N --balance round-robin app.js
        herd-shared   herd run -i N --balance shared app.js
        herd-sticky   herd run -i N --balance sticky app.js

    for WORK_MS 0 and 1 (--work-ms) and for keep-alive and `Connection: close` connections
    (--conn). For each: wait until the port answers (bounded poll), warm up (--warmup s of wrk),
    then one wrk run (-t --threads, -c --connections, -d --duration, --latency) and collect:

        req/s, p50 and p99 latency, errors (wrk's connect/read/write/timeout and HTTP > 399),
        the primary's CPU seconds (utime+stime from /proc/PID/stat, before/after the run) per
        10,000 connections (Connection: close: one request per connection) or per 10,000
        requests (keep-alive), and the primary's peak RSS (VmRSS sampled every 100 ms).

    "Primary" = the process that is not a worker and that clustering costs: Node's cluster
    primary, PM2's God daemon (it is the cluster primary in PM2 cluster mode), herd's supervisor.
    A single node process has none.

    The load generator runs on the same machine (2 cores here): absolute numbers are low and
    noisy; compare rows of the same run, and the ratios (column "×node-rr": this row's req/s
    divided by Node cluster rr's in the same scenario; the herd table: herd / each other).

How to run (from the repository root)
    apt-get install -y wrk && npm install --prefix bench      # once (pm2 into bench/node_modules)
    cargo build --release                                     # for the herd rows (else skipped)
    python3 bench/cluster.py                                  # full run, ~7 min
    python3 bench/cluster.py --duration 3 --warmup 1 --work-ms 0 --only node-rr,pm2
    python3 bench/cluster.py --herd /path/to/herd --workers 2 --connections 100

Output: a markdown table on stdout, also written to bench/out/cluster-<time>.md, with the raw
numbers in bench/out/cluster-<time>.json and the processes' logs in bench/out/logs-<time>/.
Every process started is torn down (by process group and by an environment tag), also on
Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree
import benchlib as B  # noqa: E402

ALL_CONFIGS = ["node-single", "node-rr", "node-none", "pm2", "herd-rr", "herd-shared", "herd-sticky"]
BASELINE = "node-rr"


def make_target(name: str, args, logdir: Path) -> B.Target:
    w = args.workers
    if name == "node-single":
        return B.NodeSingle(w, logdir)
    if name in ("node-rr", "node-none"):
        return B.NodeCluster(w, logdir, name.split("-")[1])
    if name == "pm2":
        return B.Pm2(w, logdir)
    if name.startswith("herd-"):
        balance = {"herd-rr": "round-robin", "herd-shared": "shared", "herd-sticky": "sticky"}[name]
        return B.Herd(w, logdir, balance, args.herd)
    raise ValueError(name)


def measure(target: B.Target, args, close: bool) -> dict:
    """Warm up, then one measured wrk run with CPU and RSS readings of the primary."""
    port = target.port
    if args.warmup > 0:
        B.wrk(port, args.warmup, args.threads, args.connections, close, target.tag)
    time.sleep(args.settle)
    primary = target.primary_pids()
    cpu0 = B.cpu_seconds(primary)
    with B.RssSampler(target.primary_pids) as rss:
        r = B.wrk(port, args.duration, args.threads, args.connections, close, target.tag)
    cpu1 = B.cpu_seconds(primary)
    if not target.alive():
        raise B.TargetFailed("died during the run")
    r.pop("raw", None)
    r["primary_pids"] = primary
    if primary:
        r["primary_cpu_s"] = cpu1 - cpu0
        r["primary_cpu_per_10k"] = (cpu1 - cpu0) / (r["requests"] / 10_000) if r["requests"] else None
        r["primary_rss_peak_kib"] = rss.peak_kib
    else:
        r["primary_cpu_s"] = r["primary_cpu_per_10k"] = r["primary_rss_peak_kib"] = None
    return r


def run_all(args, logdir: Path) -> list[dict]:
    results = []
    conns = [c == "close" for c in args.conn]
    skipped = {}  # config -> reason, so a missing tool is tried once
    for work_ms in args.work_ms:
        for name in args.only:
            rows = [dict(config=name, work_ms=work_ms, conn="close" if c else "keep-alive") for c in conns]
            if name in skipped:
                for row in rows:
                    row["note"] = skipped[name]
                results += rows
                continue
            target = make_target(name, args, logdir)
            B.log(f"WORK_MS={work_ms:g} {name}: starting ({target.label})")
            try:
                target.start(B.free_port(), work_ms)
                seen = B.wait_ready(target.port, target.expected_workers(), args.ready_timeout,
                                    target.alive)
                if len(seen) < target.expected_workers():
                    B.log(f"{name}: only {len(seen)} of {target.expected_workers()} workers answered "
                          f"the readiness probes (normal for kernel balancing); going on")
                for row, close in zip(rows, conns):
                    B.log(f"WORK_MS={work_ms:g} {name} {row['conn']}: wrk {args.duration:g}s")
                    try:
                        row.update(measure(target, args, close))
                        B.log(f"  {row['rps']:.0f} req/s, p99 {row['lat_p99_us'] / 1000:.2f} ms, "
                              f"errors {B.error_text(row)}")
                    except B.TargetFailed as e:
                        row["note"] = f"failed: {e}"
                        B.log(f"  {name}: {e}\n{target.describe_failure()}")
                        break
            except B.SkipTarget as e:
                skipped[name] = f"skipped: {e}"
                B.log(f"{name}: {skipped[name]}")
                for row in rows:
                    row["note"] = skipped[name]
            except B.TargetFailed as e:
                B.log(f"{name}: did not start: {e}\n{target.describe_failure()}")
                for row in rows:
                    row.setdefault("note", f"failed to start: {e}")
            finally:
                target.stop()
            for row in rows:
                if "rps" not in row:
                    row.setdefault("note", "not run: the target failed earlier (see notes)")
            results += rows
            time.sleep(args.settle)
    return results


# ---------------------------------------------------------------- tables

def fmt(v, spec="{:.2f}", none="–"):
    return none if v is None else spec.format(v)


def ratio(a, b):
    return a / b if (a is not None and b) else None


def render(results: list[dict], args, versions: dict, started: str) -> str:
    out = [f"# herd cluster benchmark — {started}", ""]
    out.append(f"{args.workers} workers; wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s "
               f"(warm-up {args.warmup:g}s); app: bench/apps/app.js.  ")
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".  ")
    out.append("Primary = Node's cluster primary / PM2's God daemon / herd's supervisor. "
               "CPU per 10k = primary CPU seconds per 10,000 connections (close) or requests "
               "(keep-alive). ×node-rr = req/s ÷ Node cluster rr's.")
    out.append("")
    notes = []
    scenarios = []
    for r in results:
        key = (r["work_ms"], r["conn"])
        if key not in scenarios:
            scenarios.append(key)
    for work_ms, conn in scenarios:
        rows = [r for r in results if (r["work_ms"], r["conn"]) == (work_ms, conn)]
        base = next((r for r in rows if r["config"] == BASELINE and "rps" in r), None)
        out += [f"## WORK_MS={work_ms:g}, {conn}", "",
                "| config | req/s | ×node-rr | p50 ms | p99 ms | errors | primary CPU s | "
                "CPU s per 10k | primary peak RSS MiB |",
                "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in rows:
            if "rps" not in r:
                if r.get("note") and not r["note"].startswith("not run"):
                    notes.append(f"{r['config']}: {r['note']}")
                short = r.get("note", "").split(":")[0]
                out.append(f"| {r['config']} | – | – | – | – | {short} | – | – | – |")
                continue
            out.append("| {} | {:.0f} | {} | {:.2f} | {:.2f} | {} | {} | {} | {} |".format(
                r["config"], r["rps"], fmt(ratio(r["rps"], base and base["rps"]), "{:.2f}×"),
                r["lat_p50_us"] / 1000, r["lat_p99_us"] / 1000, B.error_text(r),
                fmt(r["primary_cpu_s"]), fmt(r["primary_cpu_per_10k"], "{:.3f}"),
                fmt(r["primary_rss_peak_kib"] and r["primary_rss_peak_kib"] / 1024, "{:.1f}")))
        out.append("")
    out += render_herd_ratios(results)
    uniq = list(dict.fromkeys(notes))  # a skip repeats in every scenario: say it once
    if uniq:
        out += ["## Notes", ""] + [f"- {n}" for n in uniq] + [""]
    return "\n".join(out)


def cpu_ratio(a: dict, b: dict):
    """Ratio of CPU per 10k, or None when either side used < 0.05 s: /proc counts in 10 ms ticks,
    so smaller totals (keep-alive, where a primary sees each connection once) are noise."""
    if min(a["primary_cpu_s"] or 0, b["primary_cpu_s"] or 0) < 0.05:
        return None
    return ratio(a["primary_cpu_per_10k"], b["primary_cpu_per_10k"])


def render_herd_ratios(results: list[dict]) -> list[str]:
    """herd / other, per scenario: req/s (>1 = herd faster), p99, CPU per 10k, RSS (<1 = herd
    cheaper)."""
    have = {(r["config"], r["work_ms"], r["conn"]): r for r in results if "rps" in r}
    lines = []
    for (cfg, work_ms, conn), h in have.items():
        if not cfg.startswith("herd-"):
            continue
        for other in ("node-rr", "node-none", "pm2"):
            o = have.get((other, work_ms, conn))
            if not o:
                continue
            lines.append("| {:g} | {} | {} | {} | {} | {} | {} | {} |".format(
                work_ms, conn, cfg, other,
                fmt(ratio(h["rps"], o["rps"])), fmt(ratio(h["lat_p99_us"], o["lat_p99_us"])),
                fmt(cpu_ratio(h, o)),
                fmt(ratio(h["primary_rss_peak_kib"], o["primary_rss_peak_kib"]))))
    if not lines:
        return []
    return ["## herd / others", "",
            "req/s ratio > 1: herd serves more; p99, CPU and RSS ratios < 1: herd is faster/cheaper. "
            "CPU ratio –: one side used under 0.05 s (below /proc's 10 ms resolution to compare).", "",
            "| WORK_MS | conn | herd | vs | req/s | p99 | primary CPU per 10k | primary RSS |",
            "|---:|---|---|---|---:|---:|---:|---:|"] + lines + [""]


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="workers per cluster (default 2)")
    p.add_argument("--duration", type=int, default=10, help="seconds of measured load per row (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load first (default 2)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--work-ms", default="0,1", help="comma-separated WORK_MS values (default 0,1)")
    p.add_argument("--conn", default="keepalive,close", help="keepalive,close (default both)")
    p.add_argument("--only", default=",".join(ALL_CONFIGS),
                   help=f"comma-separated configs (default all: {','.join(ALL_CONFIGS)})")
    p.add_argument("--herd", type=Path, default=B.REPO / "target" / "release" / "herd",
                   help="herd binary (default target/release/herd); missing: herd rows skipped")
    p.add_argument("--ready-timeout", type=float, default=30, help="max seconds to wait for the port")
    p.add_argument("--settle", type=float, default=1, help="pause between runs, seconds (default 1)")
    p.add_argument("--out", type=Path, default=B.OUT, help="output folder (default bench/out)")
    a = p.parse_args(argv)
    a.work_ms = [float(x) for x in a.work_ms.split(",") if x]
    a.conn = [c.strip().replace("keep-alive", "keepalive") for c in a.conn.split(",") if c.strip()]
    a.only = [c.strip() for c in a.only.split(",") if c.strip()]
    bad = [c for c in a.only if c not in ALL_CONFIGS] + [c for c in a.conn if c not in ("keepalive", "close")]
    if bad:
        p.error(f"unknown: {', '.join(bad)}")
    a.herd = a.herd if a.herd.is_absolute() else Path.cwd() / a.herd
    if not 1 <= a.duration <= 300 or a.warmup < 0:
        p.error("--duration must be 1..300 whole seconds (wrk's unit), --warmup >= 0")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    B.install_signal_handlers()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    logdir = args.out / f"logs-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)
    versions = B.versions(args.herd)
    try:
        results = run_all(args, logdir)
    except KeyboardInterrupt:
        B.log("interrupted: tearing down")
        return 130
    finally:
        B.cleanup_all()
    md = render(results, args, versions, time.strftime("%Y-%m-%d %H:%M:%S"))
    print(md)
    (args.out / f"cluster-{stamp}.md").write_text(md + "\n")
    (args.out / f"cluster-{stamp}.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "versions": versions, "results": results},
        indent=1))
    B.log(f"wrote {args.out}/cluster-{stamp}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
