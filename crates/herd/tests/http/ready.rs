//! `/ready`, `/live` and `--drain-delay`.

use std::time::{Duration, Instant};

use super::{get, start_with_http};
use crate::util::{self, poll_until, WAIT};

#[test]
fn ready_follows_ready_min() {
    let (herd, addr) = start_with_http("app.js", "http-min", 2, &["--ready-min", "3"]);
    herd.wait_ready();
    let r = get(addr, "/ready");
    assert_eq!(r.status, 503, "2 ready workers < --ready-min 3: {r:?}");
    assert!(r.body.contains("2 of 2"), "{r:?}");
    assert_eq!(get(addr, "/live").status, 200);
    drop(herd);

    let (herd, addr) = start_with_http("app.js", "http-min2", 2, &["--ready-min", "2"]);
    herd.wait_ready();
    let r = get(addr, "/ready");
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn ready_answers_503_during_the_drain_while_the_app_still_serves() {
    let (mut herd, addr) = start_with_http("app.js", "http-drain", 2, &["--drain-delay", "4s"]);
    herd.wait_ready();
    let port = herd.port();
    assert_eq!(get(addr, "/ready").status, 200);
    let mark = herd.mark();
    herd.signal(libc::SIGTERM);
    let draining = herd.wait_event_after("the drain", mark, |e| {
        e["event"] == "stopping"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("draining"))
    });
    let began = Instant::now();
    let r = get(addr, "/ready");
    assert_eq!(r.status, 503, "/ready during the drain: {r:?}");
    assert!(r.body.contains("draining"), "{r:?}");
    // The workers keep serving, and the supervisor still answers.
    for _ in 0..5 {
        let answer = util::get(port, "/").expect("the app answers during the drain");
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    assert_eq!(get(addr, "/live").status, 200, "/live during the drain");
    let status = get(addr, "/status");
    assert_eq!(status.status, 200);
    assert!(
        status.body.contains("\"state\": \"stopping\""),
        "{}",
        status.body
    );
    assert!(
        !herd
            .events()
            .iter()
            .skip(mark)
            .any(|e| e["event"] == "exited"),
        "no worker stopped during the drain ({:?} in)\n{}",
        began.elapsed(),
        herd.dump()
    );
    // Then the graceful stop: every worker exits, herd exits 0, not before the delay.
    let code = herd.expect_exit();
    assert!(code.success(), "{code:?}\n{}", herd.dump());
    let stopped = herd.wait_named_after("stopped", mark);
    let ms = util::ts_ms(&stopped) - util::ts_ms(&draining);
    assert!(
        ms >= 3_900,
        "stopped {ms} ms after the drain began (--drain-delay 4s)"
    );
    herd.assert_no_worker_left();
}

#[test]
fn a_second_sigint_cuts_the_drain_short() {
    let (mut herd, addr) = start_with_http("app.js", "http-drain2", 1, &["--drain-delay", "10m"]);
    herd.wait_ready();
    herd.signal(libc::SIGINT);
    poll_until("/ready to say 503", || {
        (get(addr, "/ready").status == 503).then_some(())
    });
    let asked = Instant::now();
    herd.signal(libc::SIGINT);
    let code = herd
        .wait_exit(WAIT)
        .expect("herd exits after the second SIGINT");
    assert!(code.success(), "{code:?}");
    assert!(asked.elapsed() < Duration::from_secs(20));
}
