//! Node workers dying, leaving, stopping and refusing connections while clients keep asking.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::start_node;
use crate::util::{
    get, home_of, kill, pid_in, poll_until, sigterm_with_a_slow_request_in_flight, status, workers,
    TempDir, WAIT,
};

/// The `connections` count `herd status` shows for worker `pid` (hand-offs so far).
fn handed_to(home: &Path, name: &str, pid: u32) -> u64 {
    let s = status(home, name);
    workers(&s)
        .iter()
        .find(|w| w["pid"] == pid)
        .and_then(|w| w["connections"].as_u64())
        .unwrap_or_else(|| panic!("worker {pid} not in status: {s:#}"))
}

#[test]
fn connections_handed_to_a_worker_that_is_killed_are_rerouted_and_none_fails() {
    // The victim is frozen (SIGSTOP) so that connections herd hands it stay unanswered: its
    // JS never accepts them. Then it is SIGKILLed with those hand-offs in flight. herd
    // promises to re-route every connection a worker had not accepted, so no request fails.
    let name = "handoff";
    let herd = start_node(2, &["--name", name]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    let pids = herd.worker_pids();
    let victim = pids[0];
    let before = handed_to(&home, name, victim);
    kill(victim, libc::SIGSTOP);
    let _thaw = Thaw(victim);

    const N: usize = 16;
    let answered = Arc::new(AtomicUsize::new(0));
    let requests: Vec<_> = (0..N)
        .map(|_| {
            let answered = Arc::clone(&answered);
            std::thread::spawn(move || {
                let r = get(port, "/");
                answered.fetch_add(1, Ordering::SeqCst);
                r
            })
        })
        .collect();
    // Round-robin hands the frozen victim some (at most 8 unanswered), the rest go to the
    // other worker and are answered. Wait until every request is either answered or held
    // by the victim.
    let held = poll_until(
        "every request answered or held by the frozen victim",
        || {
            let held = handed_to(&home, name, victim) - before;
            let done = answered.load(Ordering::SeqCst) as u64;
            (held > 0 && done + held == N as u64).then_some(held)
        },
    );
    let mark = herd.mark();
    kill(victim, libc::SIGKILL);
    let mut failures = Vec::new();
    let mut by_pid: BTreeMap<u32, usize> = BTreeMap::new();
    for (i, h) in requests.into_iter().enumerate() {
        match h.join().expect("request thread") {
            Ok(r) if r.status == 200 => *by_pid.entry(pid_in(&r)).or_default() += 1,
            Ok(r) => failures.push(format!("request {i}: status {}", r.status)),
            Err(e) => failures.push(format!("request {i}: {e}")),
        }
    }
    eprintln!(
        "{held} connections held by the frozen victim when it was killed: answers {by_pid:?}, \
         failures {failures:?}"
    );
    assert!(failures.is_empty(), "{failures:?}\n{}", herd.dump());
    assert!(!by_pid.contains_key(&victim), "{by_pid:?}");
    assert_eq!(by_pid.values().sum::<usize>(), N, "{by_pid:?}");
    herd.wait_event_after("the victim's exit", mark, |e| {
        e["event"] == "exited" && e["pid"] == victim
    });
}

#[test]
fn killing_a_worker_during_a_stream_of_requests_fails_none() {
    let herd = start_node(2, &[]);
    herd.wait_ready();
    let port = herd.port();
    let victim = pid_in(&get(port, "/").expect("request"));
    let mark = herd.mark();
    let mut killed_at = None;
    let mut replacement: Option<u32> = None;
    let mut failures = Vec::new();
    let mut answers: BTreeMap<u32, usize> = BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    let mut sent = 0;
    // Sequential requests: kill after 30, go on until the replacement answered 3 times.
    // No request is in the worker's hands when the kill lands, so a connection herd hands
    // the dying worker afterwards must be re-routed: none may fail.
    loop {
        if sent == 30 {
            kill(victim, libc::SIGKILL);
            killed_at = Some(Instant::now());
        }
        sent += 1;
        match get(port, "/") {
            Ok(r) if r.status == 200 => *answers.entry(pid_in(&r)).or_default() += 1,
            Ok(r) => failures.push(format!("request {sent}: status {}", r.status)),
            Err(e) => failures.push(format!("request {sent}: {e}")),
        }
        if replacement.is_none() && killed_at.is_some() {
            replacement = herd
                .events()
                .iter()
                .skip(mark)
                .find(|e| e["event"] == "spawned")
                .and_then(|e| e["pid"].as_u64())
                .map(|p| p as u32);
        }
        if replacement.is_some_and(|p| answers.get(&p).copied().unwrap_or(0) >= 3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: answers {answers:?} failures {failures:?}\n{}",
            match replacement {
                None => "no replacement was ever spawned for the killed worker's slot",
                Some(_) => "the replacement never answered 3 times",
            },
            herd.dump()
        );
    }
    eprintln!(
        "kill -9 during {sent} sequential requests: answers {answers:?}, failures {failures:?}, \
         replacement answering {:?} after the kill",
        killed_at.map(|t| t.elapsed())
    );
    assert!(failures.is_empty(), "{failures:?}");
}

/// SIGCONTs a frozen worker if the test ends early (a stopped process ignores SIGTERM).
struct Thaw(u32);

impl Drop for Thaw {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a pid this test froze.
        unsafe {
            libc::kill(self.0 as i32, libc::SIGCONT);
        }
    }
}

#[test]
fn a_slow_request_in_flight_completes_when_herd_is_stopped() {
    let mut herd = start_node(2, &[]);
    sigterm_with_a_slow_request_in_flight(&mut herd);
    for e in herd.events().iter().filter(|e| e["event"] == "exited") {
        assert_eq!(e["expected"], true, "{e}");
    }
}

#[test]
fn a_worker_that_disconnects_itself_exits_and_its_slot_restarts() {
    let herd = start_node(2, &[]);
    herd.wait_ready();
    let port = herd.port();
    let mark = herd.mark();
    let r = get(port, "/disconnect").expect("request");
    assert_eq!(r.status, 200);
    let pid = pid_in(&r);
    let exited = herd.wait_event_after("the worker's exit", mark, |e| {
        e["event"] == "exited" && e["pid"] == pid
    });
    let instance = exited["instance"].clone();
    let spawned = herd.wait_event_after("its replacement", mark, |e| {
        e["event"] == "spawned" && e["instance"] == instance
    });
    herd.wait_named_after("all_ready", mark);
    let new_pid = spawned["pid"].as_u64().expect("pid") as u32;
    poll_until("the replacement answering", || {
        (pid_in(&get(port, "/").expect("request")) == new_pid).then_some(())
    });
}

#[test]
fn a_connection_refused_for_max_connections_goes_to_another_worker() {
    // Instance 0 sets server.maxConnections = 1 and holds one slow request, so it refuses
    // every further connection (`accepted: false`) and herd must hand each to instance 1.
    let herd = start_node(
        2,
        &["-e", "HOLD=1", "-e", "HOLD_MS=5000", "-e", "MAXCONN=1"],
    );
    herd.wait_ready();
    let port = herd.port();
    let mut held = None;
    for _ in 0..6 {
        let mark = herd.mark();
        let request = std::thread::spawn(move || get(port, "/hold"));
        let holding = poll_until("/hold to answer or be held", || {
            if request.is_finished() {
                Some(false)
            } else {
                let events = herd.events();
                events[mark..]
                    .iter()
                    .any(|e| e["line"] == "holding" && e["instance"] == 0)
                    .then_some(true)
            }
        });
        if holding {
            held = Some(request);
            break;
        }
        let r = request.join().expect("thread").expect("request");
        assert_eq!(r.json()["held"], false);
    }
    let held = held.expect("instance 0 never got a /hold");
    let mut by_instance: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for i in 0..10 {
        match get(port, "/") {
            Ok(r) if r.status == 200 => {
                let instance = r.json()["herd_instance"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string();
                *by_instance.entry(instance).or_default() += 1;
            }
            Ok(r) => failures.push(format!("request {i}: status {}", r.status)),
            Err(e) => failures.push(format!("request {i}: {e}")),
        }
    }
    eprintln!("with instance 0 full: answers by instance {by_instance:?}, failures {failures:?}");
    assert!(failures.is_empty(), "{failures:?}\n{}", herd.dump());
    assert_eq!(by_instance.get("1"), Some(&10), "{by_instance:?}");
    let r = held.join().expect("thread").expect("the held request");
    assert_eq!(r.json()["held"], true);
}

#[test]
fn wait_ready_holds_connections_back_until_the_worker_sends_ready() {
    // The worker listens at once but sends process.send('ready') only when the gate file
    // appears. Until then herd must not count it ready nor hand it a connection: a request
    // waits in herd, and the worker that finally answers it says it had sent 'ready'.
    let name = "waitready";
    let gate = TempDir::new();
    let go = gate.join("go");
    let herd = start_node(
        1,
        &[
            "--name",
            name,
            "--wait-ready",
            "-e",
            &format!("READY_GATE={}", go.display()),
        ],
    );
    let port = herd.port();
    herd.wait_line_after(0, "listening");
    let home = home_of(&herd);
    let request = std::thread::spawn(move || get(port, "/"));
    // A negative check needs a window: if herd routed before 'ready', the request would be
    // answered within milliseconds. A loaded machine can only make this window too short
    // to catch the bug, never fail a correct herd.
    let window_end = Instant::now() + Duration::from_millis(700);
    while Instant::now() < window_end {
        let s = status(&home, name);
        assert_eq!(s["ready"], 0, "not ready before 'ready': {s:#}");
        assert!(
            !request.is_finished(),
            "a request was answered before the worker sent 'ready'\n{}",
            herd.dump()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !herd
            .events()
            .iter()
            .any(|e| e["event"] == "ready" || e["event"] == "all_ready"),
        "counted ready before 'ready'\n{}",
        herd.dump()
    );
    let mark = herd.mark();
    std::fs::write(&go, b"").expect("open the gate");
    let ready = herd.wait_named_after("ready", mark);
    assert_eq!(ready["via"], "message", "{ready}");
    herd.wait_named_after("all_ready", mark);
    let r = request
        .join()
        .expect("request thread")
        .expect("the held request is answered once the worker is ready");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["ready_sent"],
        true,
        "the connection reached the worker only after it sent 'ready'"
    );
}
