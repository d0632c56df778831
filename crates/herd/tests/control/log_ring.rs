//! The ring `herd logs` reads from is bounded: at most 5000 lines and at most 2 MiB of text.
//! After a flood past either limit, `herd logs` returns the newest lines, in order, up to
//! the limit, and nothing older.

use super::support::{cli, home_of, start_node};
use crate::util::get;

/// The ring's limits (crates/herd/src/logs.rs).
const RING_LINES: usize = 5000;
const RING_BYTES: usize = 2 << 20;

/// `herd logs NAME -n 100000` (far more than the ring holds), as lines.
fn all_logs(home: &std::path::Path, name: &str) -> Vec<String> {
    let out = cli(home, &["logs", name, "-n", "100000"]);
    out.assert_ok();
    out.stdout.lines().map(str::to_string).collect()
}

/// The numbers `i` of the lines `… | TAG i` in `lines`, in order.
fn numbers(lines: &[String], tag: &str) -> Vec<usize> {
    let marker = format!("| {tag} ");
    lines
        .iter()
        .filter_map(|l| l.split_once(&marker))
        .map(|(_, n)| n.parse().expect("a line number"))
        .collect()
}

/// Panics unless `got` is `first..=last` with `last` the newest line printed.
fn assert_newest(got: &[usize], last: usize, what: &str) {
    assert_eq!(got.last(), Some(&last), "{what}: the newest line is kept");
    let first = got[0];
    assert!(
        got.iter().copied().eq(first..=last),
        "{what}: the newest lines, in order, without gaps (from {first})"
    );
}

#[test]
fn logs_keep_at_most_5000_lines_and_2_mib_newest_first() {
    let name = "ctl-ring";
    let herd = start_node(name, 1, &[]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);

    // Past the line limit: 6000 short lines.
    let mark = herd.mark();
    get(port, "/print?n=6000&tag=ring-short").expect("request");
    herd.wait_line_after(mark, "ring-short 5999");
    let lines = all_logs(&home, name);
    assert_eq!(
        lines.len(),
        RING_LINES,
        "a full ring of short lines holds {RING_LINES} lines"
    );
    let got = numbers(&lines, "ring-short");
    assert_newest(&got, 5999, "short lines");
    assert!(got.len() < 6000 && got[0] > 0, "the oldest lines are gone");

    // Past the byte limit: 3000 lines of about 1 KiB (3 MB), far fewer than 5000 lines.
    let tag = format!("ring-long-{}", "y".repeat(1000));
    let mark = herd.mark();
    get(port, &format!("/print?n=3000&tag={tag}")).expect("request");
    herd.wait_line_after(mark, &format!("{tag} 2999"));
    let lines = all_logs(&home, name);
    let bytes: usize = lines.iter().map(String::len).sum();
    let longest = lines.iter().map(String::len).max().unwrap_or(0);
    eprintln!("{name}: {} lines, {bytes} bytes", lines.len());
    assert!(
        bytes <= RING_BYTES,
        "the ring holds at most {RING_BYTES} bytes of text, `herd logs` printed {bytes}"
    );
    assert!(
        bytes + longest > RING_BYTES,
        "a full ring: {bytes} bytes printed, within one line of {RING_BYTES}"
    );
    assert!(lines.len() < RING_LINES, "bounded by bytes, not lines");
    let got = numbers(&lines, &tag);
    assert!(got.len() < 3000, "the oldest long lines are gone");
    assert_newest(&got, 2999, "long lines");
    assert!(
        numbers(&lines, "ring-short").is_empty(),
        "older short lines were pushed out by the newer long ones"
    );
}
