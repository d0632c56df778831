//! An Express-style app, unmodified: `app.listen(port, '127.0.0.1', cb)` through herd's
//! cluster protocol. herd binds that host, the callback fires in every worker with the
//! address herd bound, and the app serves. Fixture: `fixtures/tests15_app.js`.

use std::collections::BTreeSet;

use crate::util::{get, pid_in, poll_until, port_of, start_named_node};

#[test]
fn listen_with_a_host_and_a_callback_serves_and_fires_the_callback() {
    let name = "listen-host";
    let herd = start_named_node("tests15_app.js", name, 2, &[]);
    herd.wait_ready();
    let bound = herd.wait_named("bound");
    let address = bound["address"].as_str().expect("address");
    let port = port_of(&bound);
    assert_eq!(
        address,
        format!("127.0.0.1:{port}"),
        "herd bound the host the app asked for: {bound}"
    );
    let pids = herd.worker_pids();
    for &pid in &pids {
        herd.wait_event(&format!("worker {pid}'s listen callback"), |e| {
            e["pid"] == pid && e["line"] == format!("listen callback: 127.0.0.1:{port}")
        });
    }
    // Both workers serve, and see the address they asked for.
    let mut served = BTreeSet::new();
    poll_until("both workers to answer", || {
        let r = get(port, "/").expect("the app serves");
        assert_eq!(r.status, 200, "{r:?}");
        let body = r.json();
        assert_eq!(body["address"]["address"], "127.0.0.1", "{body}");
        assert_eq!(body["address"]["port"], port, "{body}");
        served.insert(pid_in(&r));
        (served.len() == 2).then_some(())
    });
    assert_eq!(
        served,
        pids.iter().copied().collect::<BTreeSet<_>>(),
        "the answers came from herd's workers"
    );
}
