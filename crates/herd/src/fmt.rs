//! Formatting for people: durations as the CLI shows them.

/// An uptime for the status tables: `-` (not started), `42s`, `2m5s`, `3h4m`, `1d2h`.
pub fn duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 if ms == 0 => "-".into(),
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes_keep_two_units() {
        let shown: Vec<String> = [0, 999, 42_000, 125_000, 11_040_000, 93_600_000]
            .into_iter()
            .map(duration_ms)
            .collect();
        assert_eq!(shown, ["-", "0s", "42s", "2m5s", "3h4m", "1d2h"]);
    }
}
