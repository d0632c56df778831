//! Worker output: a huge line and a flood of lines cost herd bounded memory.

use std::time::{Duration, Instant};

use crate::util::{fixture, peak_rss_kb, Herd, WAIT};

/// herd's resident memory must stay under this while a worker floods it.
const RSS_LIMIT_KB: u64 = 30 * 1024;
const FLOOD_LINES: usize = 200_000;

#[test]
fn a_huge_line_and_a_flood_of_lines_keep_herd_memory_bounded() {
    let app = fixture("noisy.py");
    let flood = format!("FLOOD_LINES={FLOOD_LINES}");
    let herd = Herd::start(&["-i", "1", "-e", &flood, &app]);
    let pid = herd.pid();
    // 1 huge line + the flood + "noisy done".
    let expected_lines = FLOOD_LINES + 2;
    let deadline = Instant::now() + WAIT * 2;
    loop {
        let done = herd.last_line().is_some_and(|l| l["line"] == "noisy done");
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the flood did not finish: {} of {expected_lines} lines seen\n{}",
            herd.lines_seen(),
            herd.dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The kernel's high-water mark: no spike between two samples can hide from it.
    let peak = peak_rss_kb(pid).expect("herd's VmHWM");
    eprintln!("herd RSS peak (VmHWM) after the flood: {peak} kB");
    assert!(peak > 0, "could not read herd's RSS");
    assert!(peak < RSS_LIMIT_KB, "herd's RSS reached {peak} kB");
    assert_eq!(herd.lines_seen(), expected_lines, "{}", herd.dump());

    assert!(
        herd.not_json().is_empty(),
        "every stdout line is a JSON object: {:?}",
        herd.not_json()
    );
    let events = herd.events();
    let huge = events
        .iter()
        .filter_map(|e| e["line"].as_str())
        .find(|l| l.starts_with("xxxx"))
        .expect("the huge line");
    assert!(
        huge.contains("[line cut:"),
        "no cut marker: …{}",
        tail(huge)
    );
    assert!(
        huge.len() < 64 * 1024,
        "the cut line is {} bytes",
        huge.len()
    );
    let first_flood = events
        .iter()
        .filter_map(|e| e["line"].as_str())
        .find(|l| l.starts_with("flood"));
    assert_eq!(
        first_flood,
        Some("flood line 0"),
        "the line after the huge one is whole"
    );
}

fn tail(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    chars[chars.len().saturating_sub(120)..].iter().collect()
}
