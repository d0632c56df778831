//! Signals to the supervisor: SIGHUP reloads, SIGTTIN and SIGTTOU scale by one.

use super::support::{home_of, ready_pids, settled, start_node, status, wait_status};

#[test]
fn sighup_reloads_and_sigttin_sigttou_scale_by_one() {
    let name = "ctl-signals";
    let herd = start_node(name, 2, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    let before = ready_pids(&wait_status(&home, name, "every worker ready", |s| {
        settled(s, 2)
    }));

    let mark = herd.mark();
    herd.signal(libc::SIGHUP);
    let done = herd.wait_named_after("reload", mark);
    assert!(
        done["message"]
            .as_str()
            .is_some_and(|m| m.contains("reloaded 2")),
        "{done}"
    );
    let s = status(&home, name);
    assert!(settled(&s, 2), "{s:#}");
    let after = ready_pids(&s);
    assert!(
        after.is_disjoint(&before),
        "SIGHUP replaced every worker: {before:?} → {after:?}"
    );

    let mark = herd.mark();
    herd.signal(libc::SIGTTIN);
    herd.wait_named_after("scale", mark);
    let s = status(&home, name);
    assert!(settled(&s, 3), "SIGTTIN: one more worker: {s:#}");
    assert!(after.is_subset(&ready_pids(&s)), "{s:#}");

    let mark = herd.mark();
    herd.signal(libc::SIGTTOU);
    herd.wait_named_after("scale", mark);
    let s = status(&home, name);
    assert!(settled(&s, 2), "SIGTTOU: one fewer worker: {s:#}");
    assert_eq!(ready_pids(&s), after, "{s:#}");
}
