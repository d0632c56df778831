#!/usr/bin/env python3
"""Reload under load (PM2 vs herd), and the speed of `pm2 ls` vs `herd ls`.

What it measures
    1. Reload under load. For each target (pm2: `pm2 start app.js -i N` then `pm2 reload
       bench-app`; herd: `herd run -i N --balance MODE app.js` then `herd reload bench-app`)
       and for keep-alive and `Connection: close` connections: start the app fresh on N workers
       (--workers, default 2), time the CLI's no-op (see 3), warm up, start wrk for --duration
       seconds (default 10), fire ONE reload at --reload-at of the way through (default 0.5 =
       the middle), let wrk finish.
       Reported: requests, req/s, errors by kind as wrk counts them (connect, read, write,
       timeout, HTTP status > 399), p99 and max latency, how long the reload command took (and
       that net of the CLI's start-up), and whether the workers really were replaced. That
       check is the same for both: the worker pids the supervisor itself reports (`herd status
       bench-app --json`, `pm2 jlist`) before the load and after the reload must be N and
       disjoint. A zero-downtime reload shows 0 errors. The app (bench/apps/app.js) drains
       politely when stopped (closes idle keep-alive sockets, answers in-flight requests with
       `Connection: close`, exits within 1.5 s), so errors are the supervisor's doing.
       --app-drain node makes it stop like a typical app instead (Node's stock server.close(),
       which destroys idle keep-alive sockets at once and so races with requests in flight).
    2. `pm2 ls` vs `herd ls` wall time with the app running (hyperfine if installed, else a
       Python loop of --ls-runs runs): what a user waits for each time they look.
    3. CLI start-up, separately: `pm2 --version` (Node starts, loads PM2's CLI, connects to the
       daemon, exits) and `herd --version`, timed the same way. Every `pm2 ls`/`pm2 reload`
       pays PM2's; the tables show it beside the ls and reload times and the times net of it.

    Everything --rounds times (default 3); in round r the targets run in the --only order
    started at offset r. Every figure is the median over the rounds (min–max); herd/pm2 ratios
    are per round, then summarised; a figure from runs with errors (or a reload that did not
    replace every worker) is marked ⚠ with the errors beside it.

    The herd side is pluggable while herd grows: --herd-reload-cmd and --herd-ls-cmd are
    command templates ({herd} = binary, {name} = app name, {pid} = herd's pid; e.g.
    --herd-reload-cmd 'kill -HUP {pid}'). If the binary is missing or the command fails, the
    herd rows are skipped with a note; PM2's rows still run.

How to run (from the repository root)
    apt-get install -y wrk hyperfine && npm install --prefix bench   # once
    cargo build --release -p herd                                    # for herd (else skipped)
    python3 bench/reload.py                                          # 3 rounds, ~6 min
    python3 bench/reload.py --quick --conn close                     # smoke, ~40 s
    python3 bench/reload.py --duration 5 --only pm2 --conn close
    python3 bench/reload.py --herd-reload-cmd 'kill -HUP {pid}'
    python3 bench/reload.py --app-drain node --no-ls       # with a typical app's stop

Output: markdown tables on stdout, also in bench/out/reload-<time>.md (+ .json, + logs).
Every process started is torn down, also on Ctrl-C or error.
"""

from __future__ import annotations

import argparse
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


def settled_pids(target: B.Target, want: int, timeout: float = 10.0) -> list[int]:
    """The worker pids as the supervisor reports them, polled (bounded) until `want` are up."""
    deadline = time.monotonic() + timeout
    while True:
        pids = target.worker_pids()
        if len(pids) >= want or time.monotonic() > deadline:
            return pids
        time.sleep(0.2)


def cli_startup(target: B.Target, runs: int, out_json: Path) -> dict | None:
    """The contender's CLI doing nothing (`pm2 --version`, `herd --version`), timed: what every
    `ls` and `reload` pays before it does any work."""
    noop = target.cli_noop_argv()
    if noop is None or runs <= 0:
        return None
    argv, env = noop
    return B.time_command(argv, env, runs, out_json, warmup=1)


def reload_run(target: B.Target, args, close: bool, logdir: Path, key: str) -> dict:
    """wrk for args.duration seconds with one reload at args.reload_at of the way through.
    Replacement is judged the same way for every contender: the worker pids its supervisor
    reports (herd status --json / pm2 jlist) before the load and after the reload."""
    row = {}
    cli = cli_startup(target, args.cli_runs, logdir / f"cli-{key}.json")
    row["cli_s"] = cli and cli["median"]
    if args.warmup > 0:
        B.wrk(target.port, args.warmup, args.threads, args.connections, close, target.tag)
    before = settled_pids(target, target.expected_workers())
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
    after = settled_pids(target, target.expected_workers())
    row["pids_before"], row["pids_after"] = before, after
    row["replaced"] = (len(before) == target.expected_workers() and
                       len(after) == target.expected_workers() and not set(before) & set(after))
    if row.get("reload_s") is not None and row["cli_s"] is not None:
        row["reload_net_s"] = row["reload_s"] - row["cli_s"]
    return row


def run_reloads(args, logdir: Path) -> list[dict]:
    """args.rounds rounds; in round r the targets run in the --only order started at offset r."""
    results = []
    skipped = {}
    for rnd in range(args.rounds):
        order = B.rotated(args.only, rnd)
        B.log(f"reload round {rnd + 1}/{args.rounds}: order {', '.join(order)}")
        for conn in args.conn:
            for name in order:
                row = dict(target=name, conn="close" if conn == "close" else "keep-alive", round=rnd)
                results.append(row)
                if name in skipped:
                    row["note"] = skipped[name]
                    continue
                target = make_target(name, args, logdir)
                B.log(f"reload: round {rnd + 1} {name} {row['conn']}: starting")
                try:
                    target.start(B.free_port(), args.work_ms)
                    B.wait_ready(target.port, target.expected_workers(), args.ready_timeout,
                                 target.alive)
                    row.update(reload_run(target, args, conn == "close", logdir,
                                          f"{name}-{conn}-r{rnd}"))
                    B.log(f"  {row['requests']} requests, errors {B.error_text(row)}, "
                          f"p99 {row['lat_p99_us'] / 1000:.1f} ms, reload {B.fmt_s(row.get('reload_s'))} s"
                          f" (CLI start-up {B.fmt_s(row.get('cli_s'))} s), replaced "
                          f"{'yes' if row['replaced'] else 'NO'}"
                          + (f" — {row['note']}" if row.get("note") else ""))
                except B.SkipTarget as e:
                    row["note"] = skipped[name] = f"skipped: {e}"
                    B.log(f"  {row['note']}")
                except B.TargetFailed as e:
                    row["note"] = f"failed: {e}"
                    B.log(f"  {row['note']}\n{target.describe_failure()}")
                finally:
                    target.stop()
                time.sleep(1)
    return results


# ---------------------------------------------------------------- ls timing

def ls_argv(target: B.Target) -> tuple[list[str], dict]:
    if isinstance(target, B.Pm2):
        return [str(target.pm2_bin), "ls"], target.env()
    return target.ls_argv(), target.control_env()


def run_ls(args, logdir: Path) -> list[dict]:
    """Per round (order rotated), per target: start it, time `ls` and the CLI's no-op
    (`--version`) the same way, stop it. One row per target per round."""
    results = []
    skipped = {}
    for rnd in range(args.rounds):
        for name in B.rotated(args.only, rnd):
            row = dict(target=name, command="pm2 ls" if name == "pm2" else "herd ls", round=rnd)
            results.append(row)
            if name in skipped:
                row["note"] = skipped[name]
                continue
            target = make_target(name, args, logdir)
            B.log(f"ls: round {rnd + 1} timing `{row['command']}` with {args.workers} workers running")
            try:
                target.start(B.free_port(), args.work_ms)
                B.wait_ready(target.port, target.expected_workers(), args.ready_timeout, target.alive)
                argv, env = ls_argv(target)
                cp = B.run_cmd(argv, env, timeout=30)
                if cp.returncode != 0:
                    row["note"] = f"skipped: `{' '.join(argv)}` failed (rc {cp.returncode}): " \
                                  f"{(cp.stderr or cp.stdout).strip()[-200:]}"
                    B.log(f"  {row['note']}")
                    continue
                row["ls"] = B.time_command(argv, env, args.ls_runs, logdir / f"ls-{name}-r{rnd}.json")
                noop_argv, noop_env = target.cli_noop_argv()
                row["noop_command"] = " ".join(Path(noop_argv[0]).name if i == 0 else a
                                               for i, a in enumerate(noop_argv))
                row["noop"] = B.time_command(noop_argv, noop_env, args.ls_runs,
                                             logdir / f"noop-{name}-r{rnd}.json")
                row["ls_net"] = row["ls"]["median"] - row["noop"]["median"]
                B.log(f"  ls median {row['ls']['median'] * 1000:.1f} ms, start-up "
                      f"({row['noop_command']}) {row['noop']['median'] * 1000:.1f} ms "
                      f"({row['ls']['tool']})")
            except B.SkipTarget as e:
                row["note"] = skipped[name] = f"skipped: {e}"
                B.log(f"  {row['note']}")
            except (B.TargetFailed, subprocess.TimeoutExpired) as e:
                row["note"] = f"failed: {e}"
                B.log(f"  {row['note']}")
            finally:
                target.stop()
    return results


# ---------------------------------------------------------------- tables

def ms_stat(values, spec: str = "{:.0f}") -> str:
    return B.fmt_stat(B.stat(values), spec, 1000)


def reload_marks(name: str, runs: list[dict]) -> str:
    """⚠ mark for a target's reload runs: wrk errors, and reloads that replaced no worker."""
    m = B.error_mark(B.error_counts(runs), name)
    not_replaced = sum(1 for r in runs if not r.get("replaced"))
    if not_replaced:
        extra = f"{not_replaced} reload(s) did not replace every worker"
        m = f"{m}, {extra}" if m else f"⚠ {name}: {extra}"
    return m


def render(reloads, ls, args, versions, started) -> str:
    out = [f"# herd reload benchmark — {started}", "",
           f"{args.workers} workers, WORK_MS={args.work_ms:g}; {args.rounds} round(s), target order "
           f"rotated each round; wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s with "
           f"one reload at {args.reload_at:.0%}; herd --balance {args.herd_balance}, reload = "
           f"`{args.herd_reload_cmd}`; app drain: {args.app_drain}; load average at start "
           f"{args.loadavg:.2f}.  ",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".  ",
           "Every figure: median over the rounds (min–max); errors are summed over the rounds. "
           "Workers replaced = the pids the supervisor itself reports (herd status --json, "
           "pm2 jlist) before the load and after the reload are disjoint, all N of them. "
           "CLI start-up = the same CLI doing nothing (`pm2 --version`, `herd --version`), timed "
           "before the load; *net* = reload took − that.", ""]
    notes = []
    if reloads:
        out += ["## Reload under load", "",
                "| target | conn | rounds | requests | req/s | errors (all rounds) | p99 ms | max ms | "
                "reload took ms | CLI start-up ms | reload net of start-up ms | workers replaced |",
                "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
        groups = {}
        for r in reloads:
            g = groups.setdefault((r["target"], r["conn"]), {"runs": {}, "notes": []})
            if r.get("note"):
                g["notes"].append(r["note"])
                notes.append(f"{r['target']} {r['conn']} round {r['round'] + 1}: {r['note']}")
            if "requests" in r:
                g["runs"][r["round"]] = r
        for (name, conn), g in groups.items():
            runs = list(g["runs"].values())
            if not runs:
                short = (g["notes"][0] if g["notes"] else "not run").split(":")[0]
                out.append(f"| {name} | {conn} | 0 | – | – | {short} (see notes) | | | | | | |")
                continue
            mark = reload_marks(name, runs)
            errs = B.error_counts(runs)
            err_cell = ", ".join(f"{errs[k]} {lbl}" for k, lbl in B.ERROR_KINDS if errs.get(k)) or "0"
            st = lambda f: B.stat([r.get(f) for r in runs])  # noqa: E731
            replaced = sum(1 for r in runs if r.get("replaced"))
            rep_cell = f"{replaced}/{len(runs)}" + "".join(
                f"; round {r['round'] + 1}: {r['pids_before']} → {r['pids_after']}"
                for r in runs if not r.get("replaced"))
            out.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                ("⚠ " if mark else "") + name, conn, len(runs), B.fmt_stat(st("requests")),
                B.fmt_stat(st("rps")), err_cell, B.fmt_stat(st("lat_p99_us"), "{:.1f}", 1e-3),
                B.fmt_stat(st("lat_max_us"), "{:.1f}", 1e-3), ms_stat([r.get("reload_s") for r in runs]),
                ms_stat([r.get("cli_s") for r in runs], "{:.1f}"),
                ms_stat([r.get("reload_net_s") for r in runs]),
                rep_cell))
        out.append("")
        out += render_reload_ratios(groups)
    if ls:
        out += ["## `pm2 ls` vs `herd ls` (wall time, app running, no load)", "",
                f"Per round: {args.ls_runs} timed runs of `ls` and of the CLI's no-op "
                f"(`--version`), each summarised by its median; the table gives the median of "
                f"those over the rounds (min–max). Net = ls − no-op, per round: the part that is "
                f"the listing itself, not the CLI's start-up.", "",
                "| command | rounds | ls ms | CLI start-up (no-op) ms | ls net of start-up ms | "
                "runs per round | failed | tool |",
                "|---|---:|---:|---:|---:|---:|---:|---|"]
        by = {}
        for r in ls:
            g = by.setdefault(r["command"], {"runs": {}, "notes": []})
            if "ls" in r:
                g["runs"][r["round"]] = r
            elif r.get("note"):
                g["notes"].append(r["note"])
                notes.append(f"{r['command']} round {r['round'] + 1}: {r['note']}")
        for cmd, g in by.items():
            runs = list(g["runs"].values())
            if not runs:
                short = (g["notes"][0] if g["notes"] else "not run").split(":")[0]
                out.append(f"| {cmd} | 0 | {short} (see notes) | | | | | |")
                continue
            out.append("| {} ({}) | {} | {} | {} | {} | {} | {} | {} |".format(
                cmd, runs[0]["noop_command"], len(runs), ms_stat([r["ls"]["median"] for r in runs], "{:.1f}"),
                ms_stat([r["noop"]["median"] for r in runs], "{:.1f}"),
                ms_stat([r["ls_net"] for r in runs], "{:.1f}"),
                runs[0]["ls"]["runs"], sum(r["ls"]["failed"] + r["noop"]["failed"] for r in runs),
                runs[0]["ls"]["tool"]))
        h, p = by.get("herd ls", {}).get("runs", {}), by.get("pm2 ls", {}).get("runs", {})
        if h and p:
            both = [k for k in h if k in p]
            raw = B.stat([h[k]["ls"]["median"] / p[k]["ls"]["median"] for k in both])
            line = f"herd ls / pm2 ls, per round: {B.fmt_ratio(raw, spec='{:.3f}')} as timed; "
            # A net at or below 0 means the listing is lost in the start-up's noise: no ratio.
            if all(h[k]["ls_net"] > 0 and p[k]["ls_net"] > 0 for k in both):
                net = B.stat([h[k]["ls_net"] / p[k]["ls_net"] for k in both])
                line += f"{B.fmt_ratio(net, spec='{:.3f}')} net of each CLI's start-up."
            else:
                line += ("net of start-up: no ratio, because in some round a side's `ls` was no "
                         "slower than its no-op (the listing is within the start-up's noise).")
            out += ["", line]
        out.append("")
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def render_reload_ratios(groups: dict) -> list[str]:
    """herd / pm2 per connection mode, per round then median (min–max), with both sides' marks."""
    lines = []
    for conn in dict.fromkeys(c for _, c in groups):
        h = groups.get(("herd", conn), {}).get("runs", {})
        p = groups.get(("pm2", conn), {}).get("runs", {})
        both = set(h) & set(p)
        if not both:
            continue
        marks = [m for m in (reload_marks("herd", [h[k] for k in both]),
                             reload_marks("pm2", [p[k] for k in both])) if m]
        flag = " ⚠" if marks else ""

        def r(field):
            st = B.stat(B.paired_ratios({k: h[k] for k in both}, {k: p[k] for k in both}, field))
            return B.fmt_ratio(st) + (flag if st else "")

        errs = lambda runs: sum(x["errors"] for x in runs)  # noqa: E731
        lines.append("| {} | {} | {} vs {} | {} | {} | {} | {} | {} |".format(
            conn, len(both), errs(h[k] for k in both), errs(p[k] for k in both),
            r("rps"), r("lat_p99_us"), r("reload_s"), r("reload_net_s"), "; ".join(marks) or "none"))
    if not lines:
        return []
    return ["## herd / pm2", "",
            "Per round (both from the same round), then median (min–max). A ratio marked ⚠ comes "
            "from runs with wrk errors or a reload that did not replace every worker, named in the "
            "last column. req/s > 1: herd served more during the reload; p99 and reload time < 1: "
            "herd is faster.", "",
            "| conn | rounds | errors herd vs pm2 | req/s | p99 | reload took | reload net of CLI "
            "start-up | errors behind these ratios |",
            "|---|---:|---|---|---|---|---|---|"] + lines + [""]


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds; round r starts the --only list at offset r (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: --rounds 2 --duration 2 --warmup 0 --ls-runs 3 --cli-runs 2 "
                        "(explicit options still win); proves the code paths, not numbers")
    p.add_argument("--workers", type=int, default=2, help="workers per target (default 2)")
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
    p.add_argument("--ls-runs", type=int, default=20,
                   help="timed runs of each ls and of each CLI no-op, per round (default 20)")
    p.add_argument("--cli-runs", type=int, default=5,
                   help="timed runs of the CLI no-op (pm2 --version / herd --version) before each "
                        "reload run, for the reload time net of start-up (default 5; 0: skip)")
    p.add_argument("--app-drain", default="careful", choices=["careful", "node"],
                   help="how the app stops: careful (default; no errors of its own) or node "
                        "(Node's stock server.close(), which races with keep-alive requests)")
    p.add_argument("--no-reload", action="store_true", help="only time ls")
    p.add_argument("--no-ls", action="store_true", help="only the reload runs")
    p.add_argument("--ready-timeout", type=float, default=30)
    p.add_argument("--out", type=Path, default=B.OUT)
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(rounds=2, duration=2, warmup=0, ls_runs=3, cli_runs=2)
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
    if not 1 <= a.rounds <= 100:
        p.error("--rounds must be 1..100 (3 or more for a median that means something)")
    if a.ls_runs < 1 or a.cli_runs < 0:
        p.error("--ls-runs must be >= 1, --cli-runs >= 0")
    a.herd = a.herd if a.herd.is_absolute() else Path.cwd() / a.herd
    return a


def main(argv=None) -> int:
    def measure(args, logdir):
        return {
            "reloads": [] if args.no_reload else run_reloads(args, logdir),
            "ls": [] if args.no_ls else run_ls(args, logdir),
        }

    def render_both(results, args, versions, when):
        return render(results["reloads"], results["ls"], args, versions, when)

    return B.run_bench("reload", parse_args(argv), measure, render_both)

if __name__ == "__main__":
    sys.exit(main())
