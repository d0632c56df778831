//! The supervisor's logic against a fake OS ([`FakeOs`]) under paused tokio time: no
//! process, no real waiting. Each test starts a supervisor of socket-activation workers
//! (`--ready notify`), drives its fake workers (exit, `READY=1`, `WATCHDOG=1`, memory,
//! ignoring signals), lets virtual time pass, and checks what the supervisor did through
//! the fake's records (spawns, signals, /proc reads, each with its time) and its public
//! answers (`herd status`, the control responses, `finished()`).
//!
//! Socket-activation workers take their connections from the kernel, so herd routes none:
//! "during traffic" here means workers that are ready and serving while the operation runs,
//! one of them still busy (it ignores SIGTERM while it finishes its requests).

use std::time::Duration;

use herd_proto::control::{Reason, Request};
use rustix::process::Signal;
use tokio::time::Instant;

use crate::os::fake::FakeOs;

mod restart_worker;
mod rig;
use rig::*;

#[tokio::test(start_paused = true)]
async fn crash_restarts_back_off_by_half_and_reset_after_min_uptime() {
    local(async {
        let mut rig = Rig::ready(spec(1)).await;
        // Four quick crashes: waits of 100, 150, 225 and 337.5ms before each next spawn.
        for expected in [100.0, 150.0, 225.0, 337.5] {
            let id = rig.os.newest(0);
            rig.os.exit(id, 1);
            let died = rig.os.exited_at(id).expect("exited");
            rig.advance(ms(400)).await;
            let next = rig.os.spawned(rig.os.newest(0));
            assert_ne!(next.id, id, "a new worker replaced {id}");
            assert_about(
                next.at - died,
                Duration::from_secs_f64(expected / 1000.0),
                "restart delay",
            );
        }
        // A worker that stays up past --min-uptime resets the backoff: 100ms again.
        let stable = rig.os.newest(0);
        rig.os.ready(stable);
        rig.advance(ms(1500)).await;
        rig.os.exit(stable, 1);
        rig.advance(ms(400)).await;
        let next = rig.os.spawned(rig.os.newest(0));
        assert_about(
            next.at - rig.os.exited_at(stable).expect("exited"),
            ms(100),
            "restart delay after a stable run",
        );
        let status = rig.status().await;
        assert_eq!(status.workers[0].restarts, 5);
        assert_eq!(
            status.workers[0].restarts_by_reason.get(&Reason::Crash),
            Some(&5)
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_crash_loop_errors_its_slot_and_herd_exits_1_once_every_slot_is_errored() {
    local(async {
        let mut s = spec(2);
        s.policy.max_restarts = 2;
        let mut rig = Rig::ready(s).await;
        let crash_loop = |rig: &mut Rig, instance: usize| {
            let id = rig.os.newest(instance);
            rig.os.exit(id, 3);
        };
        // Slot 0: a first crash and two restarts that die at once; the third is refused.
        for _ in 0..3 {
            crash_loop(&mut rig, 0);
            rig.advance(ms(500)).await;
        }
        let in_slot =
            |rig: &Rig, i: usize| rig.os.spawns().iter().filter(|s| s.instance == i).count();
        assert_eq!(in_slot(&rig, 0), 3, "first worker and two restarts");
        let status = rig.status().await;
        let row0 = &status.workers[0];
        assert_eq!((row0.instance, state(row0).as_str()), (0, "errored"));
        assert!(
            row0.last_exit
                .as_deref()
                .is_some_and(|e| e.contains("code 3")),
            "{row0:?}"
        );
        assert_eq!(app_state(&status), "running", "slot 1 still serves");
        assert_eq!(rig.sup.finished(), None);
        // Nothing more is started for slot 0, however long we wait.
        rig.advance(ms(20_000)).await;
        assert_eq!(in_slot(&rig, 0), 3);

        // Slot 1 goes the same way: its first worker ran long enough to count as stable,
        // so three quick deaths come after it. Every slot errored: herd exits with 1.
        for _ in 0..4 {
            assert_eq!(rig.sup.finished(), None);
            crash_loop(&mut rig, 1);
            rig.advance(ms(500)).await;
        }
        assert_eq!(in_slot(&rig, 1), 4);
        assert_eq!(app_state(&rig.status().await), "stopping");
        assert_eq!(rig.sup.finished(), Some(1));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn restart_revives_an_errored_slot_respawns_a_live_one_and_leaves_a_backoff_to_its_timer() {
    local(async {
        let mut s = spec(3);
        s.policy.max_restarts = 2;
        let mut rig = Rig::ready(s).await;
        // Slot 0 crash-loops until it is errored.
        for _ in 0..3 {
            rig.os.exit(rig.os.newest(0), 3);
            rig.advance(ms(500)).await;
        }
        assert_eq!(state(&rig.status().await.workers[0]), "errored");
        // Slot 1 crashes once and waits out its first backoff (100ms).
        let crashed = rig.os.newest(1);
        rig.os.exit(crashed, 1);
        rig.settle().await;
        let died = rig.os.exited_at(crashed).expect("exited");
        let live = rig.os.newest(2);
        let before = rig.os.spawns().len();

        let mut restart = rig.control(Request::Restart).await;
        // Errored slot 0 starts at once; slot 2's worker is stopped first and its successor
        // starts once it is gone; slot 1 is left to its timer.
        assert_eq!(rig.os.sent(live), [Signal::TERM]);
        let started: Vec<usize> = rig.os.spawns()[before..]
            .iter()
            .map(|s| s.instance)
            .collect();
        assert_eq!(started, [0, 2]);
        assert_eq!(app_state(&rig.status().await), "restarting");
        rig.advance(ms(200)).await;
        let next = rig.os.spawned(rig.os.newest(1));
        assert_ne!(next.id, crashed);
        assert_about(next.at - died, ms(100), "slot 1 kept its backoff");
        assert_eq!(rig.os.spawns().len(), before + 3, "one worker per slot");

        for i in 0..3 {
            rig.os.ready(rig.os.newest(i));
        }
        rig.settle().await;
        let response = answered(&mut restart).expect("answered");
        assert!(
            response.ok && response.message.contains("restarted 3 workers"),
            "{response:?}"
        );
        let status = rig.status().await;
        assert_eq!(status.ready, 3);
        assert!(status.workers.iter().all(|w| state(w) == "ready"));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn reload_promotes_each_ready_replacement_and_then_stops_the_old_worker() {
    local(async {
        let mut rig = Rig::ready(spec(2)).await;
        let old = [rig.os.newest(0), rig.os.newest(1)];
        let mut answer = rig.control(Request::Reload { parallel: 1 }).await;

        // One slot at a time: slot 0's replacement starts beside the old worker.
        let new0 = rig.os.newest(0);
        assert_ne!(new0, old[0]);
        assert_eq!(rig.os.newest(1), old[1], "slot 1 waits its turn");
        rig.advance(ms(300)).await;
        assert!(
            rig.os.sent(old[0]).is_empty(),
            "not stopped before its successor is ready"
        );
        let status = rig.status().await;
        assert_eq!(app_state(&status), "reloading");
        assert!(rows(&status).contains(&(0, new0, "starting".into())));

        rig.os.ready(new0);
        rig.settle().await;
        assert_eq!(
            rig.os.sent(old[0]),
            [Signal::TERM],
            "old worker stopped gracefully"
        );
        assert!(!rig.os.running(old[0]));
        let new1 = rig.os.newest(1);
        assert_ne!(
            new1, old[1],
            "slot 1's replacement starts once slot 0 is done"
        );
        assert!(rig.os.sent(old[1]).is_empty());
        assert!(
            answered(&mut answer).is_none(),
            "the reload is not finished yet"
        );

        rig.os.ready(new1);
        rig.settle().await;
        assert_eq!(rig.os.sent(old[1]), [Signal::TERM]);
        let response = answered(&mut answer).expect("answered once every old worker exited");
        assert!(response.ok, "{response:?}");
        assert!(
            response.message.contains("reloaded 2 workers"),
            "{response:?}"
        );
        let status = rig.status().await;
        assert_eq!(
            rows(&status),
            [(0, new0, "ready".into()), (1, new1, "ready".into())]
        );
        assert_eq!(
            status.workers[0].restarts_by_reason.get(&Reason::Reload),
            Some(&1)
        );
        assert!(rig.os.sent(new0).is_empty() && rig.os.sent(new1).is_empty());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn reload_keeps_the_old_worker_when_its_replacement_exits() {
    local(async {
        let mut rig = Rig::ready(spec(2)).await;
        let old = [rig.os.newest(0), rig.os.newest(1)];
        let mut answer = rig.control(Request::Reload { parallel: 1 }).await;
        let new0 = rig.os.newest(0);
        rig.advance(ms(50)).await;
        rig.os.exit(new0, 1);
        rig.settle().await;

        let response = answered(&mut answer).expect("a failed reload is answered at once");
        assert!(!response.ok, "{response:?}");
        assert!(
            response
                .message
                .contains("failed to become ready: exited (code 1)"),
            "{response:?}"
        );
        assert!(
            response.message.contains("after replacing 0 of 2"),
            "{response:?}"
        );
        // The old workers were never touched, and no other slot was tried.
        assert!(rig.os.sent(old[0]).is_empty() && rig.os.sent(old[1]).is_empty());
        assert_eq!(rig.os.spawns().len(), 3);
        rig.advance(ms(20_000)).await;
        assert_eq!(
            rig.os.spawns().len(),
            3,
            "a failed replacement is not restarted"
        );
        let status = rig.status().await;
        assert_eq!(app_state(&status), "running");
        assert_eq!(
            rows(&status),
            [(0, old[0], "ready".into()), (1, old[1], "ready".into())]
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn reload_keeps_the_old_worker_when_its_replacement_misses_the_listen_timeout() {
    local(async {
        let mut s = spec(1);
        s.policy.listen_timeout = ms(2000);
        let mut rig = Rig::ready(s).await;
        let old = rig.os.newest(0);
        let mut answer = rig.control(Request::Reload { parallel: 1 }).await;
        let started = Instant::now();
        let new = rig.os.newest(0);
        // Up, but never ready.
        rig.advance(ms(1990)).await;
        assert!(answered(&mut answer).is_none());
        assert!(rig.os.signals(new).is_empty());
        rig.advance(ms(20)).await;

        let response = answered(&mut answer).expect("answered at the timeout");
        assert!(!response.ok, "{response:?}");
        assert!(
            response.message.contains("--listen-timeout 2.0s"),
            "{response:?}"
        );
        let stop = rig.os.signals(new);
        assert_eq!(stop.len(), 1, "{stop:?}");
        assert_eq!(stop[0].signal, Signal::TERM);
        assert!(stop[0].group);
        assert_about(
            stop[0].at - started,
            ms(2000),
            "stopped at --listen-timeout",
        );
        assert!(rig.os.sent(old).is_empty());
        let status = rig.status().await;
        assert_eq!(rows(&status), [(0, old, "ready".into())]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_reload_is_not_rolled_back_replaced_slots_keep_their_new_workers() {
    local(async {
        let mut rig = Rig::ready(spec(3)).await;
        let old: Vec<_> = (0..3).map(|i| rig.os.newest(i)).collect();
        let mut answer = rig.control(Request::Reload { parallel: 1 }).await;
        let new0 = rig.os.newest(0);
        rig.os.ready(new0);
        rig.settle().await;
        let new1 = rig.os.newest(1);
        rig.os.exit(new1, 2);
        rig.settle().await;

        let response = answered(&mut answer).expect("answered");
        assert!(!response.ok);
        assert!(
            response.message.contains("after replacing 1 of 3"),
            "{response:?}"
        );
        // Slot 0 keeps its new worker (no rollback); slots 1 and 2 keep the old ones.
        let status = rig.status().await;
        assert_eq!(
            rows(&status),
            [
                (0, new0, "ready".into()),
                (1, old[1], "ready".into()),
                (2, old[2], "ready".into())
            ]
        );
        assert_eq!(rig.os.sent(old[0]), [Signal::TERM]);
        assert!(rig.os.sent(new0).is_empty());
        assert!(rig.os.sent(old[1]).is_empty() && rig.os.sent(old[2]).is_empty());
        assert_eq!(rig.os.spawns().len(), 5, "slot 2 was never tried");
        // A second reload may run: the failed one left nothing behind.
        let mut again = rig.control(Request::Reload { parallel: 3 }).await;
        for i in 0..3 {
            rig.os.ready(rig.os.newest(i));
        }
        rig.settle().await;
        let response = answered(&mut again).expect("answered");
        assert!(response.ok, "{response:?}");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn scale_up_and_down_while_workers_serve() {
    local(async {
        let mut rig = Rig::ready(spec(2)).await;
        let serving = [rig.os.newest(0), rig.os.newest(1)];

        let mut up = rig.control(Request::Scale { to: "4".into() }).await;
        let added: Vec<_> = (2..4).map(|i| rig.os.newest(i)).collect();
        assert_eq!(rig.os.spawns().len(), 4);
        assert!(
            answered(&mut up).is_none(),
            "answered once the new workers are ready"
        );
        assert_eq!(app_state(&rig.status().await), "scaling");
        rig.os.ready(added[0]);
        rig.os.ready(added[1]);
        rig.settle().await;
        let response = answered(&mut up).expect("answered");
        assert!(
            response.ok && response.message.contains("scaled to 4"),
            "{response:?}"
        );
        let status = rig.status().await;
        assert_eq!((status.desired, status.ready), (4, 4));

        // Down to 1: the highest slots go, gracefully; slot 2's worker is still busy with
        // its requests (it ignores SIGTERM) and is killed after --kill-timeout.
        rig.os.ignore_signals(added[0]);
        let started = Instant::now();
        let mut down = rig.control(Request::Scale { to: "-3".into() }).await;
        for id in [serving[1], added[1]] {
            assert_eq!(rig.os.sent(id), [Signal::TERM]);
            assert!(!rig.os.running(id));
        }
        assert_eq!(rig.os.sent(added[0]), [Signal::TERM]);
        assert!(rig.os.running(added[0]));
        rig.advance(ms(4900)).await;
        assert!(
            answered(&mut down).is_none(),
            "not before the busy worker is gone"
        );
        assert_eq!(rig.status().await.desired, 1);
        rig.advance(ms(200)).await;
        let kill = rig.os.signals(added[0]);
        assert_eq!(
            kill.iter().map(|s| s.signal).collect::<Vec<_>>(),
            [Signal::TERM, Signal::KILL]
        );
        assert_about(kill[1].at - started, ms(5000), "SIGKILL at --kill-timeout");
        let response = answered(&mut down).expect("answered");
        assert!(
            response.ok && response.message.contains("scaled to 1"),
            "{response:?}"
        );
        // The worker that kept serving throughout was never touched or replaced.
        assert!(rig.os.signals(serving[0]).is_empty());
        let status = rig.status().await;
        assert_eq!(rows(&status), [(0, serving[0], "ready".into())]);
        assert_eq!(rig.os.spawns().len(), 4, "nothing was restarted");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn workers_over_max_memory_are_replaced_one_at_a_time() {
    local(async {
        let mut s = spec(3);
        s.health.max_memory = Some(100 << 20);
        let mut rig = Rig::ready(s).await;
        let old: Vec<_> = (0..3).map(|i| rig.os.newest(i)).collect();
        rig.os.set_rss(old[0], 200 << 20);
        rig.os.set_rss(old[1], 300 << 20);
        rig.os.set_rss(old[2], 50 << 20);
        rig.advance(ms(1100)).await;

        // /proc was read for each worker; only slot 0's replacement has started.
        for &id in &old {
            let pid = rig.os.spawned(id).pid;
            assert!(!rig.os.reads(pid).is_empty(), "worker {id} was measured");
        }
        assert_eq!(rig.os.spawns().len(), 4);
        let new0 = rig.os.newest(0);
        assert_eq!(rig.os.newest(1), old[1], "slot 1 waits for slot 0");
        assert_eq!(app_state(&rig.status().await), "replacing");
        // More ticks do not start a second replacement while the first runs.
        rig.advance(ms(3000)).await;
        assert_eq!(rig.os.spawns().len(), 4);

        rig.os.ready(new0);
        rig.settle().await;
        assert_eq!(rig.os.sent(old[0]), [Signal::TERM]);
        let new1 = rig.os.newest(1);
        assert_ne!(
            new1, old[1],
            "slot 1's turn once slot 0's old worker is gone"
        );
        assert!(
            rig.os.spawned(new1).at >= rig.os.exited_at(old[0]).expect("exited"),
            "one at a time"
        );
        rig.os.ready(new1);
        rig.advance(ms(3000)).await;
        assert_eq!(rig.os.sent(old[1]), [Signal::TERM]);
        assert!(rig.os.signals(old[2]).is_empty(), "under the limit: kept");
        assert_eq!(rig.os.spawns().len(), 5);
        let status = rig.status().await;
        assert_eq!(app_state(&status), "running");
        assert_eq!(
            rows(&status),
            [
                (0, new0, "ready".into()),
                (1, new1, "ready".into()),
                (2, old[2], "ready".into())
            ]
        );
        assert_eq!(
            status.workers[0].restarts_by_reason.get(&Reason::Memory),
            Some(&1)
        );
        assert_eq!(
            status.workers[1].restarts_by_reason.get(&Reason::Memory),
            Some(&1)
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_silent_past_the_watchdog_is_aborted_killed_and_replaced() {
    local(async {
        let mut s = spec(2);
        s.health.watchdog = Some(ms(1000));
        let mut rig = Rig::ready(s).await;
        let [quiet, alive] = [rig.os.newest(0), rig.os.newest(1)];
        let env = rig.os.spawned(quiet).env;
        assert!(
            env.contains(&("WATCHDOG_USEC".into(), "1000000".into())),
            "{env:?}"
        );
        // Both pet the watchdog for 2s; then `quiet` hangs (and ignores SIGABRT).
        for _ in 0..8 {
            rig.os.watchdog(quiet);
            rig.os.watchdog(alive);
            rig.advance(ms(250)).await;
        }
        rig.os.watchdog(quiet);
        rig.settle().await;
        let silent_since = Instant::now();
        rig.os.ignore_signals(quiet);
        for _ in 0..12 {
            rig.os.watchdog(alive);
            rig.advance(ms(250)).await;
        }

        let signals = rig.os.signals(quiet);
        assert_eq!(
            signals.iter().map(|s| s.signal).collect::<Vec<_>>(),
            [Signal::ABORT, Signal::KILL],
            "{signals:?}"
        );
        assert!(signals.iter().all(|s| s.sent && s.group));
        // Found on the first tick past 1s of silence (ticks every 250ms), killed 1s later.
        let found = signals[0].at - silent_since;
        assert!(found > ms(1000) && found <= ms(1250) + MS, "{found:?}");
        assert_about(
            signals[1].at - signals[0].at,
            ms(1000),
            "SIGKILL after SIGABRT",
        );
        let replacement = rig.os.spawned(rig.os.newest(0));
        assert_ne!(replacement.id, quiet);
        assert_about(
            replacement.at - signals[1].at,
            ms(100),
            "restarted after the backoff delay",
        );
        assert!(
            rig.os.signals(alive).is_empty(),
            "the worker that kept talking"
        );
        let status = rig.status().await;
        assert_eq!(
            status.workers[0].restarts_by_reason.get(&Reason::Hung),
            Some(&1)
        );
        assert_eq!(rig.os.spawns().len(), 3);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_program_that_cannot_be_started_errors_its_slot_without_retrying() {
    local(async {
        let rig_os = FakeOs::new();
        rig_os.fail_next_spawn(std::io::ErrorKind::PermissionDenied);
        let mut rig = Rig::start_with(spec(2), rig_os);
        rig.settle().await;
        // Slot 0 could not be started: errored at once (retrying cannot fix permissions).
        assert_eq!(
            rig.os
                .spawns()
                .iter()
                .map(|s| s.instance)
                .collect::<Vec<_>>(),
            [1]
        );
        let status = rig.status().await;
        assert_eq!(state(&status.workers[0]), "errored");
        assert!(
            status.workers[0]
                .last_exit
                .as_deref()
                .is_some_and(|e| e.contains("could not start")),
            "{status:?}"
        );
        rig.advance(ms(20_000)).await;
        assert_eq!(rig.os.spawns().len(), 1);
        assert_eq!(rig.sup.finished(), None, "slot 1 still runs");
    })
    .await;
}

/// Issue #11 item 3: a worker not ready by `--listen-timeout` is not counted as ready (it was
/// "counted as started anyway"), and `herd restart` answers with an error at the timeout
/// instead of waiting for it forever.
#[tokio::test(start_paused = true)]
async fn a_worker_not_ready_by_the_listen_timeout_stays_not_ready_and_fails_a_restart() {
    local(async {
        let mut s = spec(1);
        s.policy.listen_timeout = ms(2000);
        let mut rig = Rig::start(s);
        rig.settle().await;
        let first = rig.os.newest(0);
        rig.advance(ms(2100)).await;
        let status = rig.status().await;
        assert_eq!(status.ready, 0, "{status:?}");
        assert_eq!(rows(&status), [(0, first, "starting".into())]);
        assert!(rig.os.sent(first).is_empty(), "left running");
        // It may still become ready later.
        rig.os.ready(first);
        rig.settle().await;
        assert_eq!(rig.status().await.ready, 1);

        let mut restart = rig.control(Request::Restart).await;
        rig.os.exit(first, 0);
        rig.settle().await;
        // Not answered before the new worker's --listen-timeout, answered just after.
        rig.advance(ms(1990)).await;
        assert!(answered(&mut restart).is_none());
        rig.advance(ms(100)).await;
        let response = answered(&mut restart).expect("answered at the timeout");
        assert!(!response.ok, "{response:?}");
        assert!(
            response
                .message
                .contains("not ready within --listen-timeout"),
            "{response:?}"
        );
        assert_eq!(rig.status().await.ready, 0);
    })
    .await;
}

/// Scaling down over slots that have no worker (one errored, one waiting out its backoff)
/// finishes at once: there is nothing to wait for, and an unfinished scale would refuse
/// every later operation.
#[tokio::test(start_paused = true)]
async fn scaling_down_over_slots_without_a_worker_finishes() {
    local(async {
        let mut s = spec(3);
        s.policy.autorestart = false;
        let mut rig = Rig::ready(s).await;
        // Slot 2 dies for good (no autorestart): errored, no worker.
        rig.os.exit(rig.os.newest(2), 1);
        rig.settle().await;
        assert_eq!(rig.status().await.workers[2].state.as_str(), "errored");

        let mut down = rig.control(Request::Scale { to: "2".into() }).await;
        rig.settle().await;
        let response = answered(&mut down).expect("answered without waiting for anything");
        assert!(
            response.ok && response.message.contains("scaled to 2"),
            "{response:?}"
        );
        assert_eq!(app_state(&rig.status().await), "running");
        // And the app takes the next operation.
        let mut up = rig.control(Request::Scale { to: "3".into() }).await;
        rig.os.ready(rig.os.newest(2));
        rig.settle().await;
        let response = answered(&mut up).expect("the next scale is answered");
        assert!(response.ok, "{response:?}");
    })
    .await;
}
