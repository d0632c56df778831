#!/usr/bin/env python3
"""Reload under load (PM2 vs herd), and the speed of `pm2 ls` vs `herd ls`.

What it measures
    1. Reload under load. For each target (pm2: `pm2 start app.js -i N` then `pm2 reload
       bench-app`; herd: `herd run -i N --balance MODE app.js` then `herd reload bench-app`)
       and for keep-alive and `Connection: close` connections: start the app fresh on N workers
       (--workers, default 2), warm up, start wrk for --duration seconds (default 10), fire ONE
       reload at --reload-at of the way through (default 0.5 = the middle), let wrk finish.
       Reported: requests, req/s, errors by kind as wrk counts them (connect, read, write,
       timeout, HTTP status > 399), p99 and max latency, how long the reload command took, and
       whether the workers really were replaced (the pids answering GET / before and after).
       A zero-downtime reload shows 0 errors. The app (bench/apps/app.js) drains politely when
       stopped (closes idle keep-alive sockets, answers in-flight requests with
       `Connection: close`, exits within 1.5 s), so errors are the supervisor's doing.
       --app-drain node makes it stop like a typical app instead (Node's stock server.close(),
       which destroys idle keep-alive sockets at once and so races with requests in flight).
    2. `pm2 ls` vs `herd ls` wall time with the app running (hyperfine if installed, else a
       Python loop of --ls-runs runs): what a user waits for each time they look.

    The herd side is pluggable while herd grows: --herd-reload-cmd and --herd-ls-cmd are
    command templates ({herd} = binary, {name} = app name, {pid} = herd's pid; e.g.
    --herd-reload-cmd 'kill -HUP {pid}'). If the binary is missing or the command fails, the
    herd rows are skipped with a note; PM2's rows still run.

How to run (from the repository root)
    apt-get install -y wrk hyperfine && npm install --prefix bench   # once
    cargo build --release                                            # for herd (else skipped)
    python3 bench/reload.py                                          # ~1.5 min
    python3 bench/reload.py --duration 5 --only pm2 --conn close
    python3 bench/reload.py --herd-reload-cmd 'kill -HUP {pid}'
    python3 bench/reload.py --app-drain node --no-ls       # with a typical app's stop

Output: markdown tables on stdout, also in bench/out/reload-<time>.md (+ .json, + logs).
Every process started is torn down, also on Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree
import benchlib as B  # noqa: E402

TARGETS = ["pm2", "herd"]


def make_target(name: str, args, logdir: Path) -> B.Target:
    if name == "pm2":
        t = B.Pm2(args.workers, logdir)
    else:
        t = B.Herd(args.workers, logdir, args.herd_balance, args.herd,
                   reload_cmd=args.herd_reload_cmd, ls_cmd=args.herd_ls_cmd)
    t.app_env = {"APP_DRAIN": args.app_drain}
    return t


def probe_pids(port: int, tries: int = 40) -> set:
    """The pids that answer GET / on fresh connections (bounded number of tries)."""
    seen = set()
    for _ in range(tries):
        try:
            status, body = B.http_get(port)
            if status == 200:
                seen.add(json.loads(body)["pid"])
        except (OSError, ValueError, KeyError, IndexError):
            pass
    return seen


def reload_run(target: B.Target, args, close: bool) -> dict:
    """wrk for args.duration seconds with one reload at args.reload_at of the way through."""
    row = {}
    before = set(target.worker_pids()) if isinstance(target, B.Pm2) else probe_pids(target.port)
    if args.warmup > 0:
        B.wrk(target.port, args.warmup, args.threads, args.connections, close, target.tag)
    p = B.wrk_start(target.port, args.duration, args.threads, args.connections, close, target.tag)
    t0 = time.monotonic()
    time.sleep(args.duration * args.reload_at)
    row["reload_at_s"] = time.monotonic() - t0
    try:
        cp = target.reload()
        row["reload_s"] = time.monotonic() - t0 - row["reload_at_s"]
        row["reload_rc"] = cp.returncode
        if cp.returncode != 0:
            row["note"] = f"reload command failed (rc {cp.returncode}): " \
                          f"{(cp.stderr or cp.stdout).strip()[-300:]}"
    except subprocess.TimeoutExpired:
        row["reload_s"] = None
        row["note"] = "reload command timed out"
    r = B.wrk_finish(p)
    r.pop("raw", None)
    row.update(r)
    time.sleep(0.5)
    after = set(target.worker_pids()) if isinstance(target, B.Pm2) else probe_pids(target.port)
    row["pids_before"], row["pids_after"] = sorted(before), sorted(after)
    row["replaced"] = bool(before) and bool(after) and not (before & after)
    return row


def run_reloads(args, logdir: Path) -> list[dict]:
    results = []
    for name in args.only:
        for conn in args.conn:
            row = dict(target=name, conn="close" if conn == "close" else "keep-alive")
            results.append(row)
            target = make_target(name, args, logdir)
            B.log(f"reload: {name} {row['conn']}: starting")
            try:
                target.start(B.free_port(), args.work_ms)
                B.wait_ready(target.port, target.expected_workers(), args.ready_timeout, target.alive)
                row.update(reload_run(target, args, conn == "close"))
                B.log(f"  {row['requests']} requests, errors {B.error_text(row)}, "
                      f"p99 {row['lat_p99_us'] / 1000:.1f} ms, reload {B.fmt_s(row.get('reload_s'))}"
                      + (f" — {row['note']}" if row.get("note") else ""))
            except B.SkipTarget as e:
                row["note"] = f"skipped: {e}"
                B.log(f"  {row['note']}")
            except B.TargetFailed as e:
                row["note"] = f"failed: {e}"
                B.log(f"  {row['note']}\n{target.describe_failure()}")
            finally:
                target.stop()
            if row.get("note", "").startswith("skipped"):
                for c in args.conn[args.conn.index(conn) + 1:]:
                    results.append(dict(target=name, conn="close" if c == "close" else "keep-alive",
                                        note=row["note"]))
                break
            time.sleep(1)
    return results


# ---------------------------------------------------------------- ls timing

def time_command(argv: list[str], env: dict, runs: int, out_json: Path) -> dict:
    """Wall time of a short command: hyperfine if installed, else a Python loop. Bounded."""
    if shutil.which("hyperfine"):
        cmd = " ".join(shlex.quote(a) for a in argv) + " >/dev/null 2>&1"
        cp = B.run_cmd(["hyperfine", "--warmup", "2", "--runs", str(runs), "--ignore-failure",
                        "--export-json", str(out_json), cmd], env, timeout=180)
        if cp.returncode == 0 and out_json.exists():
            r = json.loads(out_json.read_text())["results"][0]
            return dict(tool="hyperfine", runs=len(r["times"]), mean=r["mean"], median=r["median"],
                        min=r["min"], max=r["max"], stddev=r.get("stddev"),
                        failed=sum(1 for c in r.get("exit_codes", []) if c))
        B.log(f"hyperfine failed ({cp.stderr.strip()[-200:]}); timing in Python")
    times, failed = [], 0
    for i in range(runs + 2):
        t = time.perf_counter()
        cp = B.run_cmd(argv, env, timeout=30)
        if i >= 2:  # the first two are warm-up
            times.append(time.perf_counter() - t)
            failed += cp.returncode != 0
    return dict(tool="python loop", runs=len(times), mean=statistics.mean(times),
                median=statistics.median(times), min=min(times), max=max(times),
                stddev=statistics.stdev(times) if len(times) > 1 else None, failed=failed)


def run_ls(args, logdir: Path) -> list[dict]:
    results = []
    for name in args.only:
        label = "pm2 ls" if name == "pm2" else "herd ls"
        row = dict(command=label)
        results.append(row)
        target = make_target(name, args, logdir)
        B.log(f"ls: timing `{label}` with {args.workers} workers running")
        try:
            target.start(B.free_port(), args.work_ms)
            B.wait_ready(target.port, target.expected_workers(), args.ready_timeout, target.alive)
            if isinstance(target, B.Pm2):
                argv, env = [str(target.pm2_bin), "ls"], target.env()
            else:
                argv, env = target.ls_argv(), target.control_env()
            cp = B.run_cmd(argv, env, timeout=30)
            if cp.returncode != 0:
                row["note"] = f"skipped: `{' '.join(argv)}` failed (rc {cp.returncode}): " \
                              f"{(cp.stderr or cp.stdout).strip()[-200:]}"
                B.log(f"  {row['note']}")
                continue
            row.update(time_command(argv, env, args.ls_runs, logdir / f"ls-{name}.json"))
            B.log(f"  mean {row['mean'] * 1000:.1f} ms over {row['runs']} runs ({row['tool']})")
        except B.SkipTarget as e:
            row["note"] = f"skipped: {e}"
            B.log(f"  {row['note']}")
        except (B.TargetFailed, subprocess.TimeoutExpired) as e:
            row["note"] = f"failed: {e}"
            B.log(f"  {row['note']}")
        finally:
            target.stop()
    return results


# ---------------------------------------------------------------- tables

def render(reloads, ls, args, versions, started) -> str:
    out = [f"# herd reload benchmark — {started}", "",
           f"{args.workers} workers, WORK_MS={args.work_ms:g}; wrk -t{args.threads} -c{args.connections} "
           f"-d{args.duration:g}s with one reload at {args.reload_at:.0%}; herd --balance "
           f"{args.herd_balance}, reload = `{args.herd_reload_cmd}`; app drain: {args.app_drain}.  ",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", ""]
    notes = []
    if reloads:
        out += ["## Reload under load", "",
                "| target | conn | requests | req/s | errors | connect | read | write | timeout | "
                "http>399 | p99 ms | max ms | reload took s | workers replaced |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in reloads:
            if r.get("note"):
                notes.append(f"{r['target']} {r['conn']}: {r['note']}")
            if "requests" not in r:
                out.append(f"| {r['target']} | {r['conn']} | – | – | {r['note'].split(':')[0]} (see notes)"
                           " | | | | | | | | | |")
                continue
            out.append("| {} | {} | {} | {:.0f} | {} | {} | {} | {} | {} | {} | {:.1f} | {:.1f} | {} | {} |"
                       .format(r["target"], r["conn"], r["requests"], r["rps"], r["errors"], r["connect"],
                               r["read"], r["write"], r["timeout"], r["status"], r["lat_p99_us"] / 1000,
                               r["lat_max_us"] / 1000, B.fmt_s(r.get("reload_s")),
                               "yes" if r["replaced"] else f"no ({r['pids_before']} → {r['pids_after']})"))
        out.append("")
    if ls:
        out += ["## `pm2 ls` vs `herd ls` (wall time, app running)", "",
                "| command | mean ms | median ms | min ms | max ms | runs | failed | tool |",
                "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in ls:
            if "mean" not in r:
                notes.append(f"{r['command']}: {r.get('note', '')}")
                out.append(f"| {r['command']} | {r.get('note', '').split(':')[0]} (see notes) | | | | | | |")
                continue
            out.append("| {} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {} | {} | {} |".format(
                r["command"], r["mean"] * 1000, r["median"] * 1000, r["min"] * 1000, r["max"] * 1000,
                r["runs"], r["failed"], r["tool"]))
        timed = {r["command"]: r for r in ls if "mean" in r}
        if "pm2 ls" in timed and "herd ls" in timed:
            out += ["", f"herd ls / pm2 ls (mean): {timed['herd ls']['mean'] / timed['pm2 ls']['mean']:.2f}×"]
        out.append("")
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--duration", type=int, default=10, help="seconds of load per run (default 10)")
    p.add_argument("--reload-at", type=float, default=0.5, help="fraction of --duration (default 0.5)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load first (default 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--work-ms", type=float, default=0, help="the app's CPU per request (default 0)")
    p.add_argument("--conn", default="keepalive,close", help="keepalive,close (default both)")
    p.add_argument("--only", default="pm2,herd", help="pm2,herd (default both)")
    p.add_argument("--herd", type=Path, default=B.REPO / "target" / "release" / "herd")
    p.add_argument("--herd-balance", default="round-robin", choices=["round-robin", "shared", "sticky"])
    p.add_argument("--herd-reload-cmd", default="{herd} reload {name}",
                   help="command template: {herd} {name} {pid} (default '{herd} reload {name}')")
    p.add_argument("--herd-ls-cmd", default="{herd} ls", help="command template (default '{herd} ls')")
    p.add_argument("--ls-runs", type=int, default=20, help="timed runs of each ls (default 20)")
    p.add_argument("--app-drain", default="careful", choices=["careful", "node"],
                   help="how the app stops: careful (default; no errors of its own) or node "
                        "(Node's stock server.close(), which races with keep-alive requests)")
    p.add_argument("--no-reload", action="store_true", help="only time ls")
    p.add_argument("--no-ls", action="store_true", help="only the reload runs")
    p.add_argument("--ready-timeout", type=float, default=30)
    p.add_argument("--out", type=Path, default=B.OUT)
    a = p.parse_args(argv)
    a.conn = [c.strip().replace("keep-alive", "keepalive") for c in a.conn.split(",") if c.strip()]
    a.only = [c.strip() for c in a.only.split(",") if c.strip()]
    bad = [c for c in a.only if c not in TARGETS] + [c for c in a.conn if c not in ("keepalive", "close")]
    if bad:
        p.error(f"unknown: {', '.join(bad)}")
    if not 0 < a.reload_at < 1:
        p.error("--reload-at must be between 0 and 1")
    if not 1 <= a.duration <= 300 or a.warmup < 0:
        p.error("--duration must be 1..300 whole seconds (wrk's unit), --warmup >= 0")
    a.herd = a.herd if a.herd.is_absolute() else Path.cwd() / a.herd
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    B.install_signal_handlers()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = args.out / f"logs-reload-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)
    versions = B.versions(args.herd)
    try:
        reloads = [] if args.no_reload else run_reloads(args, logdir)
        ls = [] if args.no_ls else run_ls(args, logdir)
    except KeyboardInterrupt:
        B.log("interrupted: tearing down")
        return 130
    finally:
        B.cleanup_all()
    md = render(reloads, ls, args, versions, time.strftime("%Y-%m-%d %H:%M:%S"))
    print(md)
    (args.out / f"reload-{stamp}.md").write_text(md + "\n")
    (args.out / f"reload-{stamp}.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "versions": versions,
         "reloads": reloads, "ls": ls}, indent=1))
    B.log(f"wrote {args.out}/reload-{stamp}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
