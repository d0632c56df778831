//! `herd scale NAME N|+K|-K` under load.

use super::support::{cli, home_of, ready_pids, settled, start_node, status, wait_status, Load};

#[test]
fn scale_up_and_down_under_load_drops_no_request() {
    let name = "ctl-scale";
    let herd = start_node(name, 2, &[]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    let mut pids = ready_pids(&wait_status(&home, name, "every worker ready", |s| {
        settled(s, 2)
    }));
    let load = Load::start(port, &["/", "/", "/", "/slow?ms=50"]);
    load.wait_for(50);
    for (to, want) in [("4", 4), ("+1", 5), ("-2", 3)] {
        let out = cli(&home, &["scale", name, to]);
        assert_eq!(out.code, Some(0), "scale {to}\n{out}\n{}", herd.dump());
        assert!(
            out.stdout.contains(&format!("scaled to {want} workers")),
            "{out}"
        );
        let s = status(&home, name);
        assert_eq!(s["desired"], want, "after scale {to}: {s:#}");
        assert_eq!(s["ready"], want, "after scale {to}: {s:#}");
        assert!(settled(&s, want), "after scale {to}: {s:#}");
        let now = ready_pids(&s);
        if want > pids.len() {
            assert!(
                pids.is_subset(&now),
                "scaling up keeps the workers: {pids:?} → {now:?}"
            );
        } else {
            assert!(
                now.is_subset(&pids),
                "scaling down keeps the rest: {pids:?} → {now:?}"
            );
        }
        let instances: Vec<u64> = s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w["instance"].as_u64().expect("instance"))
            .collect();
        assert_eq!(instances, (0..want as u64).collect::<Vec<_>>(), "{s:#}");
        pids = now;
        load.wait_for(load.done() + 100);
    }
    let report = load.finish(1_500);
    report.assert_clean("scaling 2 → 4 → 5 → 3");
    let bad = cli(&home, &["scale", name, "-3"]);
    assert_eq!(bad.code, Some(1), "{bad}");
    assert!(bad.stderr.contains("at least 1 worker"), "{bad}");
    let bad = cli(&home, &["scale", name, "lots"]);
    assert_eq!(bad.code, Some(1), "{bad}");
    assert!(bad.stderr.contains("not a worker count"), "{bad}");
    assert!(settled(&status(&home, name), 3));
}
