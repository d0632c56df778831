//! Only the user that runs herd (or root) may use an app's control socket. Three layers
//! keep others out: `HERD_HOME` is 0700, the socket is 0600, and the supervisor checks each
//! client's uid with `SO_PEERCRED`. The test takes them away one at a time, so each is shown
//! to refuse on its own.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::support::{
    cli, home_of, settled, socket_of, spawn_command, start_node, status, wait_status, CliOutput,
};
use crate::util::{herd_bin, prerequisite_missing, TempDir, WAIT};

const NOBODY: u32 = 65534;

fn setpriv() -> Option<PathBuf> {
    ["/usr/bin/setpriv", "/bin/setpriv", "/usr/sbin/setpriv"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// `herd ARGS…` as uid/gid 65534 with no supplementary groups.
fn as_nobody(setpriv: &Path, herd: &Path, home: &Path, args: &[&str]) -> CliOutput {
    let mut cmd = Command::new(setpriv);
    cmd.args([
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
    ])
    .arg(herd)
    .args(args)
    .env_clear()
    .env("PATH", "/usr/bin:/bin")
    .env("HERD_HOME", home)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    spawn_command(cmd, args).finish(WAIT)
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Refused: non-zero exit, no status printed.
fn assert_refused(out: &CliOutput, why: &str, says: &str) {
    assert_ne!(out.code, Some(0), "{why}\n{out}");
    assert!(
        out.stdout.is_empty(),
        "{why}: no status for another uid\n{out}"
    );
    assert!(
        out.stderr.to_lowercase().contains(says),
        "{why}: stderr says {says:?}\n{out}"
    );
}

/// An app, and what it takes to knock on its socket as uid 65534.
struct Setup {
    herd: crate::util::Herd,
    name: &'static str,
    home: PathBuf,
    socket: PathBuf,
    /// `None` when the other-uid part cannot run here (not root, no setpriv).
    nobody: Option<Nobody>,
}

struct Nobody {
    setpriv: PathBuf,
    bin: PathBuf,
    /// A HERD_HOME of nobody's own whose `NAME.sock` links to the app's socket: herd's
    /// client-side check passes, and the connect meets the layers of the socket itself.
    alt_home: PathBuf,
    _dirs: (TempDir, TempDir),
}

impl Nobody {
    fn herd(&self, home: &Path, args: &[&str]) -> CliOutput {
        as_nobody(&self.setpriv, &self.bin, home, args)
    }

    fn status(&self, name: &str) -> CliOutput {
        self.herd(&self.alt_home, &["status", name, "--json"])
    }
}

fn setup(name: &'static str) -> Setup {
    let herd = start_node(name, 1, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    wait_status(&home, name, "ready", |s| settled(s, 1));
    let socket = socket_of(&home, name);
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let nobody = match setpriv() {
        None => {
            prerequisite_missing("the other-uid part needs setpriv");
            None
        }
        Some(_) if me != 0 => {
            prerequisite_missing("the other-uid part needs root");
            None
        }
        Some(setpriv) => Some(nobody(setpriv, &home, &socket, name)),
    };
    Setup {
        herd,
        name,
        home,
        socket,
        nobody,
    }
}

fn nobody(setpriv: PathBuf, home: &Path, socket: &Path, name: &str) -> Nobody {
    // The herd binary must be runnable by uid 65534, or every refusal would be an exec
    // failure. Copy it somewhere world-readable if it is not.
    let bin_dir = TempDir::new();
    let mut herd = PathBuf::from(herd_bin());
    if as_nobody(&setpriv, &herd, home, &["--version"]).code != Some(0) {
        let copy = bin_dir.join("herd");
        std::fs::copy(&herd, &copy).expect("copy herd");
        chmod(bin_dir.path(), 0o755);
        chmod(&copy, 0o755);
        herd = copy;
        as_nobody(&setpriv, &herd, home, &["--version"]).assert_ok();
    }
    let alt = TempDir::new();
    let alt_home = alt.join("home");
    std::fs::create_dir(&alt_home).expect("mkdir");
    chmod(&alt_home, 0o700);
    std::os::unix::fs::chown(&alt_home, Some(NOBODY), Some(NOBODY)).expect("chown");
    std::os::unix::fs::symlink(socket, socket_of(&alt_home, name)).expect("symlink");
    Nobody {
        setpriv,
        bin: herd,
        alt_home,
        _dirs: (bin_dir, alt),
    }
}

#[test]
fn the_control_socket_is_private() {
    let Setup {
        herd,
        name,
        home,
        socket,
        nobody,
    } = setup("ctl-private");
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    assert_eq!(mode(&home), 0o700, "HERD_HOME {}", home.display());
    assert_eq!(mode(&socket), 0o600, "control socket {}", socket.display());
    assert_eq!(std::fs::metadata(&socket).expect("socket").uid(), me);
    for entry in std::fs::read_dir(&home).expect("read HERD_HOME").flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            assert_eq!(mode(&entry.path()), 0o700, "{}", entry.path().display());
        }
    }
    let Some(nobody) = nobody else { return };

    // 1. herd itself refuses a HERD_HOME that belongs to someone else.
    let out = nobody.herd(&home, &["status", name, "--json"]);
    assert_refused(&out, "another user's HERD_HOME", "another user");
    // 2. The 0700 directory.
    assert_refused(
        &nobody.status(name),
        "HERD_HOME is 0700",
        "permission denied",
    );
    // 3. The 0600 socket, with the directory opened up.
    chmod(&home, 0o711);
    assert_refused(
        &nobody.status(name),
        "the socket is 0600",
        "permission denied",
    );
    // 4. SO_PEERCRED, with the socket opened up too.
    chmod(&socket, 0o666);
    for args in [
        &["status", name, "--json"][..],
        &["reload", name],
        &["scale", name, "+1"],
        &["send", name, "1"],
        &["stop", name],
    ] {
        let out = nobody.herd(&nobody.alt_home, args);
        assert_refused(&out, &format!("{args:?} past SO_PEERCRED"), "error: ");
    }

    chmod(&socket, 0o600);
    chmod(&home, 0o700);
    // Nothing happened to the app; its owner still controls it.
    let s = status(&home, name);
    assert!(settled(&s, 1), "{s:#}");
    assert_eq!(s["pid"], herd.pid());
    assert!(
        herd.events().iter().all(|e| e["event"] != "reloading"
            && e["event"] != "scaling"
            && e["event"] != "stopping"
            && e["event"] != "message"),
        "{}",
        herd.dump()
    );
    cli(&home, &["ls"]).assert_ok();
}

/// The supervisor answers a client of another uid with "permission denied: this app belongs
/// to another user", and the CLI should print that answer.
#[test]
fn another_uid_is_told_why_it_is_refused() {
    let Setup {
        herd: _herd,
        name,
        home,
        socket,
        nobody,
    } = setup("ctl-told");
    let Some(nobody) = nobody else { return };
    chmod(&home, 0o711);
    chmod(&socket, 0o666);
    let outs: Vec<CliOutput> = (0..10).map(|_| nobody.status(name)).collect();
    chmod(&socket, 0o600);
    chmod(&home, 0o700);
    let told = outs
        .iter()
        .filter(|o| o.stderr.contains("belongs to another user"))
        .count();
    for out in &outs {
        assert_refused(out, "SO_PEERCRED", "error: ");
    }
    let other: Vec<&str> = outs
        .iter()
        .filter(|o| !o.stderr.contains("belongs to another user"))
        .map(|o| o.stderr.trim())
        .collect();
    assert_eq!(
        told,
        outs.len(),
        "each refused client is told why; {} of {} were told something else: {other:?}",
        outs.len() - told,
        outs.len()
    );
}
