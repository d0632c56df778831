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
        requests (keep-alive), the primary's peak RSS (VmRSS sampled every 100 ms), and the
        worker pids before and after (as the supervisor reports them: `herd status NAME
        --json`, `pm2 jlist`, the Node primary's child processes), so a worker that crashed
        and was replaced during the run is seen.

    All of that --rounds times (default 3). In round r the contenders run in the --only order
    started at offset r, so none is always first (cool, fresh machine) or always last. Every
    figure is the median over the rounds with its min–max; ratios are computed per round (both
    sides from the same round) and then summarised the same way.

    "Primary" = the process that is not a worker and that clustering costs: Node's cluster
    primary, PM2's God daemon (it is the cluster primary in PM2 cluster mode), herd's supervisor.
    A single node process has none.

    Errors are never hidden: a row whose runs had wrk errors or a replaced worker is marked ⚠,
    and every ratio computed from such runs carries the errors beside it, e.g.
    `1.18× (1.10–1.25; ⚠ herd-rr: 50 timeouts)`.

    The load generator runs on the same machine (2 cores here): absolute numbers are low and
    noisy; compare rows of the same run, and the ratios (column "×node-rr": this row's req/s
    divided by Node cluster rr's in the same round; the herd table: herd / each other).

How to run (from the repository root)
    apt-get install -y wrk && npm install --prefix bench      # once (pm2 into bench/node_modules)
    cargo build --release -p herd                             # for the herd rows (else skipped)
    python3 bench/cluster.py                                  # full run: 3 rounds, ~25 min
    python3 bench/cluster.py --quick --only node-rr,pm2,herd-rr --conn close   # smoke, ~20 s
    python3 bench/cluster.py --rounds 5 --duration 3 --warmup 1 --work-ms 0 --only node-rr,pm2,herd-rr
    python3 bench/cluster.py --herd /path/to/herd --workers 2 --connections 100

Output: a markdown table on stdout, also written to bench/out/cluster-<time>.md, with the raw
numbers in bench/out/cluster-<time>.json and the processes' logs in bench/out/logs-<time>/.
Every process started is torn down (by process group and by an environment tag), also on
Ctrl-C or error.
"""

from __future__ import annotations

import argparse
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
    """Warm up, then one measured wrk run with CPU and RSS readings of the primary, and the
    worker pids (as the supervisor reports them) before the warm-up and after the run."""
    port = target.port
    pids_before = target.worker_pids()
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
    pids_after = target.worker_pids()
    r.pop("raw", None)
    r["primary_pids"] = primary
    r["pids_before"], r["pids_after"] = pids_before, pids_after
    # A worker that crashed (and was replaced) during the run is a different run from one where
    # none did: count pids that vanished, as reported by the supervisor itself.
    r["workers_lost"] = len(set(pids_before) - set(pids_after))
    # Fewer workers than asked for (or a supervisor that would not say) is marked too: the
    # pid comparison above cannot see a worker that was never reported.
    r["workers_missing"] = max(0, target.expected_workers() - len(pids_after))
    if primary:
        r["primary_cpu_s"] = cpu1 - cpu0
        r["primary_cpu_per_10k"] = (cpu1 - cpu0) / (r["requests"] / 10_000) if r["requests"] else None
        r["primary_rss_peak_kib"] = rss.peak_kib
    else:
        r["primary_cpu_s"] = r["primary_cpu_per_10k"] = r["primary_rss_peak_kib"] = None
    return r


def run_one(name: str, work_ms: float, rnd: int, args, logdir: Path, conns: list, skipped: dict) -> list[dict]:
    """Start `name` fresh, measure every connection mode, stop it. One row per mode."""
    rows = [dict(config=name, work_ms=work_ms, round=rnd, conn="close" if c else "keep-alive")
            for c in conns]
    if name in skipped:
        for row in rows:
            row["note"] = skipped[name]
        return rows
    target = make_target(name, args, logdir)
    B.log(f"round {rnd + 1}/{args.rounds} WORK_MS={work_ms:g} {name}: starting ({target.label})")
    try:
        target.start(B.free_port(), work_ms)
        seen = B.wait_ready(target.port, target.expected_workers(), args.ready_timeout, target.alive)
        if len(seen) < target.expected_workers():
            B.log(f"{name}: only {len(seen)} of {target.expected_workers()} workers answered "
                  f"the readiness probes (normal for kernel balancing); going on")
        for row, close in zip(rows, conns):
            B.log(f"  {name} {row['conn']}: wrk {args.duration:g}s")
            try:
                row.update(measure(target, args, close))
                B.log(f"  {row['rps']:.0f} req/s, p99 {row['lat_p99_us'] / 1000:.2f} ms, "
                      f"errors {B.error_text(row)}"
                      + (f", {row['workers_lost']} worker(s) replaced" if row["workers_lost"] else ""))
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
    return rows


def run_all(args, logdir: Path) -> list[dict]:
    """args.rounds rounds; in round r the configurations run in the --only order started at
    offset r (B.rotated), so no contender always runs first (cool machine) or last."""
    results = []
    conns = [c == "close" for c in args.conn]
    skipped = {}  # config -> reason, so a missing tool is tried once
    for rnd in range(args.rounds):
        order = B.rotated(args.only, rnd)
        B.log(f"round {rnd + 1}/{args.rounds}: order {', '.join(order)}")
        for work_ms in args.work_ms:
            for name in order:
                results += run_one(name, work_ms, rnd, args, logdir, conns, skipped)
                time.sleep(args.settle)
    return results


# ---------------------------------------------------------------- tables

def fmt(v, spec="{:.2f}", none="–"):
    return none if v is None else spec.format(v)


def aggregate(results: list[dict]) -> dict:
    """(config, work_ms, conn) -> {"runs": {round: row}, "notes": [...]} (measured rows only in runs)."""
    agg = {}
    for r in results:
        a = agg.setdefault((r["config"], r["work_ms"], r["conn"]), {"runs": {}, "notes": []})
        if "rps" in r:
            a["runs"][r["round"]] = r
        elif r.get("note"):
            a["notes"].append(r["note"])
    return agg


def marks_of(cfg: str, a: dict, rounds=None) -> str:
    """The ⚠ mark of a configuration's runs (those of `rounds` only, if given): wrk errors and
    workers replaced during a run."""
    runs = [r for k, r in a["runs"].items() if rounds is None or k in rounds]
    m = B.error_mark(B.error_counts(runs), cfg)
    extra = []
    lost = sum(r.get("workers_lost", 0) for r in runs)
    if lost:
        extra.append(f"{lost} worker(s) replaced mid-run")
    missing = sum(r.get("workers_missing", 0) for r in runs)
    if missing:
        extra.append(f"{missing} worker(s) not reported after a run")
    if extra:
        m = (m + ", " if m else f"⚠ {cfg}: ") + ", ".join(extra)
    return m


def paired_marks(name: str, a: dict, other: str, b: dict) -> list[str]:
    """The ⚠ marks of both sides, over the rounds both ran (the rounds a paired ratio uses)."""
    both = set(a["runs"]) & set(b["runs"])
    return [m for m in (marks_of(name, a, both), marks_of(other, b, both)) if m]


def render(results: list[dict], args, versions: dict, started: str) -> str:
    out = [f"# herd cluster benchmark — {started}", ""]
    out.append(f"{args.workers} workers; {args.rounds} round(s), contender order rotated each round; "
               f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s "
               f"(warm-up {args.warmup:g}s); app: bench/apps/app.js.  ")
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; load average "
               f"at start {args.loadavg:.2f}.  ")
    out.append("Every figure: median over the rounds (min–max). Primary = Node's cluster primary / "
               "PM2's God daemon / herd's supervisor. CPU per 10k = primary CPU seconds per 10,000 "
               "connections (close) or requests (keep-alive). ×node-rr = req/s ÷ Node cluster rr's "
               "in the same round. ⚠ = the runs behind this figure had wrk errors or a worker "
               "replaced mid-run (workers as the supervisor reports them: herd status --json, "
               "pm2 jlist, the Node primary's children); such a figure is not a clean comparison.")
    out.append("")
    notes = []
    agg = aggregate(results)
    scenarios = list(dict.fromkeys((r["work_ms"], r["conn"]) for r in results))
    for work_ms, conn in scenarios:
        base = agg.get((BASELINE, work_ms, conn), {"runs": {}})
        out += [f"## WORK_MS={work_ms:g}, {conn}", "",
                "| config | rounds | req/s | ×node-rr | p50 ms | p99 ms | errors (all rounds) | "
                "primary CPU s | CPU s per 10k | primary peak RSS MiB |",
                "|---|---:|---:|---|---:|---:|---|---:|---:|---:|"]
        for name in args.only:
            a = agg.get((name, work_ms, conn))
            if a is None:
                continue
            notes += [f"{name}: {n}" for n in a["notes"] if not n.startswith("not run")]
            runs = list(a["runs"].values())
            if not runs:
                short = (a["notes"][0] if a["notes"] else "").split(":")[0]
                out.append(f"| {name} | 0 | – | – | – | – | {short} | – | – | – |")
                continue
            mark = marks_of(name, a)
            st = lambda f: B.stat([r.get(f) for r in runs])  # noqa: E731
            vs = None if name == BASELINE else B.stat(B.paired_ratios(a["runs"], base["runs"], "rps"))
            errs = B.error_counts(runs)
            lost = sum(r.get("workers_lost", 0) for r in runs)
            err_cell = ", ".join(f"{errs[k]} {lbl}" for k, lbl in B.ERROR_KINDS if errs.get(k)) or "0"
            if lost:
                err_cell += f"; {lost} worker(s) replaced"
            missing = sum(r.get("workers_missing", 0) for r in runs)
            if missing:
                err_cell += f"; {missing} worker(s) not reported"
            out.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                ("⚠ " if mark else "") + name, len(runs), B.fmt_stat(st("rps")),
                "1×" if name == BASELINE else B.fmt_ratio(vs, paired_marks(name, a, BASELINE, base)),
                B.fmt_stat(st("lat_p50_us"), "{:.2f}", 1e-3), B.fmt_stat(st("lat_p99_us"), "{:.2f}", 1e-3),
                err_cell, B.fmt_stat(st("primary_cpu_s"), "{:.2f}"),
                B.fmt_stat(st("primary_cpu_per_10k"), "{:.3f}"),
                B.fmt_stat(st("primary_rss_peak_kib"), "{:.1f}", 1 / 1024)))
        out.append("")
    out += render_herd_ratios(agg, args)
    uniq = list(dict.fromkeys(notes))  # a skip repeats in every scenario: say it once
    if uniq:
        out += ["## Notes", ""] + [f"- {n}" for n in uniq] + [""]
    return "\n".join(out)


def cpu_ratios(h_runs: dict, o_runs: dict) -> list[float]:
    """Per-round ratios of CPU per 10k, leaving out rounds where either side used < 0.05 s:
    /proc counts in 10 ms ticks, so smaller totals (keep-alive, where a primary sees each
    connection once) are noise."""
    ok = lambda runs: {k: r for k, r in runs.items() if (r.get("primary_cpu_s") or 0) >= 0.05}  # noqa: E731
    return B.paired_ratios(ok(h_runs), ok(o_runs), "primary_cpu_per_10k")


def render_herd_ratios(agg: dict, args) -> list[str]:
    """herd / other, per scenario, per round then median (min–max): req/s (>1 = herd faster),
    p99, CPU per 10k, RSS (<1 = herd cheaper). Every ratio carries both sides' ⚠ marks."""
    lines = []
    for (cfg, work_ms, conn), h in agg.items():
        if not cfg.startswith("herd-") or not h["runs"]:
            continue
        for other in ("node-rr", "node-none", "pm2"):
            o = agg.get((other, work_ms, conn))
            if not o or not o["runs"]:
                continue
            marks = paired_marks(cfg, h, other, o)
            flag = " ⚠" if marks else ""

            def r(field, ratios=None):
                st = B.stat(ratios if ratios is not None else
                            B.paired_ratios(h["runs"], o["runs"], field))
                return B.fmt_ratio(st) + (flag if st else "")

            lines.append("| {:g} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                work_ms, conn, cfg, other, r("rps"), r("lat_p99_us"),
                r(None, cpu_ratios(h["runs"], o["runs"])), r("primary_rss_peak_kib"),
                "; ".join(marks) or "none"))
    if not lines:
        return []
    return ["## herd / others", "",
            "Each ratio is computed per round (same round, so a slow moment weighs on both sides) "
            "and given as median (min–max); a ratio marked ⚠ comes from runs with wrk errors or "
            "a worker replaced mid-run, named in the last column. req/s ratio > 1: herd serves "
            "more; p99, CPU and RSS ratios < 1: herd is faster/cheaper. CPU ratio –: one side used "
            "under 0.05 s in every round (below /proc's 10 ms resolution to compare).", "",
            "| WORK_MS | conn | herd | vs | req/s | p99 | primary CPU per 10k | primary RSS | "
            "errors behind these ratios |",
            "|---:|---|---|---|---|---|---|---|---|"] + lines + [""]


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds; round r starts the --only list at offset r (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: --rounds 2 --duration 1 --warmup 0 --settle 0.2 --work-ms 0 "
                        "(explicit options still win); proves the code paths, not numbers")
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
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(rounds=2, duration=1, warmup=0, settle=0.2, work_ms="0")
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
    if not 1 <= a.rounds <= 100:
        p.error("--rounds must be 1..100 (3 or more for a median that means something)")
    return a


def main(argv=None) -> int:
    return B.run_bench("cluster", parse_args(argv), run_all, render)

if __name__ == "__main__":
    sys.exit(main())
