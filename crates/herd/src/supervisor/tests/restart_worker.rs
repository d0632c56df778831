//! `herd restart NAME --instance N` (`Request::RestartWorker`): one slot replaced like one
//! step of a reload.

use herd_proto::control::{Reason, Request};
use rustix::process::Signal;

use super::rig::*;

#[tokio::test(start_paused = true)]
async fn restart_worker_stops_the_old_worker_only_once_its_successor_is_ready() {
    local(async {
        let mut rig = Rig::ready(spec(2)).await;
        let old = [rig.os.newest(0), rig.os.newest(1)];
        let mut answer = rig.control(Request::RestartWorker { instance: 1 }).await;
        let new1 = rig.os.newest(1);
        assert_ne!(new1, old[1], "a successor starts beside the old worker");
        assert_eq!(rig.os.newest(0), old[0], "slot 0 is not touched");
        rig.advance(ms(300)).await;
        assert!(
            rig.os.sent(old[1]).is_empty(),
            "not stopped before its successor is ready"
        );
        assert_eq!(app_state(&rig.status().await), "replacing");
        // Another operation waits its turn.
        let mut reload = rig.control(Request::Reload { parallel: 1 }).await;
        let refused = answered(&mut reload).expect("refused at once");
        assert!(
            !refused.ok && refused.message.contains("in progress"),
            "{refused:?}"
        );

        rig.os.ready(new1);
        rig.settle().await;
        assert_eq!(rig.os.sent(old[1]), [Signal::TERM], "stopped gracefully");
        let response = answered(&mut answer).expect("answered once the old worker exited");
        assert!(
            response.ok && response.message.contains("restarted"),
            "{response:?}"
        );
        let status = rig.status().await;
        assert_eq!(
            rows(&status),
            [(0, old[0], "ready".into()), (1, new1, "ready".into())]
        );
        assert_eq!(
            status.workers[1].restarts_by_reason.get(&Reason::Reload),
            Some(&1)
        );
        assert!(rig.os.sent(old[0]).is_empty());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn restart_worker_refuses_a_missing_instance_and_a_slot_without_a_worker() {
    local(async {
        let mut s = spec(2);
        s.policy.max_restarts = 1;
        let mut rig = Rig::ready(s).await;
        let before = rig.os.spawns().len();
        let mut answer = rig.control(Request::RestartWorker { instance: 5 }).await;
        let response = answered(&mut answer).expect("answered");
        assert!(
            !response.ok && response.message.contains("no instance 5"),
            "{response:?}"
        );
        // Slot 0 crash-loops until it is errored: it has no worker to replace.
        for _ in 0..2 {
            rig.os.exit(rig.os.newest(0), 3);
            rig.advance(ms(500)).await;
        }
        assert_eq!(state(&rig.status().await.workers[0]), "errored");
        let spawned = rig.os.spawns().len();
        let mut answer = rig.control(Request::RestartWorker { instance: 0 }).await;
        let response = answered(&mut answer).expect("answered");
        assert!(
            !response.ok && response.message.contains("no running worker"),
            "{response:?}"
        );
        assert_eq!(rig.os.spawns().len(), spawned, "nothing started");
        assert!(spawned > before);
        assert_eq!(app_state(&rig.status().await), "running");
    })
    .await;
}
