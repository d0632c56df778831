//! The keys of an app table are the long flags of `herd run`, found by asking clap
//! ([`run_command`]): `kill_timeout` is `--kill-timeout`, a key whose flag repeats
//! (`listen`, `env`) takes an array, a flag without a value (`no_autorestart`) a boolean.
//! A flag added to [`RunArgs`] is a key with no change here. The program is `command` (an
//! array) or `script` with `args`.

use clap::{ArgAction, Args, FromArgMatches};

use crate::cli::RunArgs;

/// Keys of an app table that are not flags.
pub const PROGRAM_KEYS: [&str; 3] = ["command", "script", "args"];

/// Flags of `herd run` that are not keys: the app's name is its table's name, and `--app`
/// picks an app of a file.
const NOT_KEYS: [&str; 2] = ["name", "app"];

/// `herd run`'s flags and arguments, as clap knows them.
pub fn run_command() -> clap::Command {
    RunArgs::augment_args(clap::Command::new("herd run").no_binary_name(true))
}

/// Parses a `herd run` argv (what follows `run`) as the command line would be.
pub fn parse_run(argv: &[String]) -> Result<RunArgs, clap::Error> {
    let matches = run_command().try_get_matches_from(argv)?;
    RunArgs::from_arg_matches(&matches)
}

/// One flag of `herd run` usable as a key.
#[derive(Debug, Clone)]
pub struct Key {
    /// `kill_timeout`.
    pub key: String,
    /// `kill-timeout`.
    pub long: String,
    /// `--no-autorestart`: a boolean, present or not.
    pub flag: bool,
    /// `--listen`: may be given several times.
    pub repeats: bool,
}

/// Every flag of `herd run` that is a key, in clap's order.
pub fn flag_keys() -> Vec<Key> {
    run_command()
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let key = long.replace('-', "_");
            if NOT_KEYS.contains(&key.as_str()) {
                return None;
            }
            let action = arg.get_action();
            Some(Key {
                key,
                long: long.to_string(),
                flag: matches!(action, ArgAction::SetTrue | ArgAction::SetFalse),
                repeats: matches!(action, ArgAction::Append | ArgAction::Count),
            })
        })
        .collect()
}

/// Every valid key of an app table, from the flag keys (building those builds clap's `herd run`).
pub fn all_keys(flags: &[Key]) -> Vec<String> {
    let mut keys: Vec<String> = flags.iter().map(|k| k.key.clone()).collect();
    keys.extend(PROGRAM_KEYS.iter().map(|k| k.to_string()));
    keys
}

/// The known key nearest to `unknown`, if it is near enough to be a typo.
pub fn nearest<'a>(unknown: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let (best, distance) = known
        .into_iter()
        .map(|k| (k, edit_distance(unknown, k)))
        .min_by_key(|&(_, d)| d)?;
    let limit = (unknown.chars().count() / 3).max(2);
    (distance <= limit).then_some(best)
}

/// Levenshtein distance, by characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// clap's error without its `error: ` prefix and usage lines: the custom message of a
/// value parser when there is one (`must be at least 1 (…)`), else clap's first line.
pub fn clap_message(e: &clap::Error) -> String {
    if let Some(source) = std::error::Error::source(e) {
        return source.to_string();
    }
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("invalid value");
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// Which changed between two `herd run` argvs, as keys (`instances`, `env`, `command`).
pub fn changed_keys(old: &[String], new: &[String]) -> Result<Vec<String>, clap::Error> {
    let cmd = run_command();
    let a = cmd.clone().try_get_matches_from(old)?;
    let b = cmd.clone().try_get_matches_from(new)?;
    let mut changed = Vec::new();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        let values = |m: &clap::ArgMatches| -> Vec<std::ffi::OsString> {
            match m.try_get_raw(id) {
                Ok(Some(raw)) => raw.map(|v| v.to_os_string()).collect(),
                _ => Vec::new(),
            }
        };
        if values(&a) != values(&b) {
            let key = match arg.get_long() {
                Some(long) => long.replace('-', "_"),
                None => "command".to_string(),
            };
            if !changed.contains(&key) {
                changed.push(key);
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_their_key() {
        let keys = all_keys(&flag_keys());
        let known = || keys.iter().map(String::as_str);
        assert_eq!(nearest("instaces", known()), Some("instances"));
        assert_eq!(nearest("kill-timeout", known()), Some("kill_timeout"));
        assert_eq!(nearest("comand", known()), Some("command"));
        assert_eq!(nearest("zzzzzzzzzzzz", known()), None);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn flags_are_classified() {
        let keys = flag_keys();
        let get = |k: &str| keys.iter().find(|x| x.key == k).expect(k).clone();
        assert!(get("listen").repeats && !get("listen").flag);
        assert!(get("no_autorestart").flag);
        assert!(!get("instances").repeats && !get("instances").flag);
        assert!(keys.iter().all(|k| k.key != "name" && k.key != "app"));
    }

    #[test]
    fn every_flag_is_documented_in_docs_config_md() {
        let docs = include_str!("../../../../docs/config.md");
        for key in all_keys(&flag_keys()) {
            assert!(
                docs.contains(&format!("`{key}`")),
                "docs/config.md does not document the key `{key}`: add it to its table of keys"
            );
        }
    }

    #[test]
    fn changes_are_named_by_key() {
        let v = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let old = v("-i 2 --env A=1 --name web -- node app.js");
        assert_eq!(
            changed_keys(&old, &old).expect("parses"),
            Vec::<String>::new()
        );
        let new = v("-i 4 --env A=2 --name web -- node app.js x");
        assert_eq!(
            changed_keys(&old, &new).expect("parses"),
            ["instances", "env", "command"]
        );
    }
}
