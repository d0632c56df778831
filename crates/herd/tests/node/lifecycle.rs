//! Node workers dying, leaving, stopping and refusing connections while clients keep asking.

use std::collections::BTreeMap;
use std::time::Instant;

use super::start_node;
use crate::util::{get, kill, pid_in, poll_until, sigterm_with_a_slow_request_in_flight, WAIT};

#[test]
fn killing_a_worker_during_a_stream_of_requests_fails_at_most_the_one_in_flight() {
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
    assert!(failures.len() <= 1, "{failures:?}");
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
