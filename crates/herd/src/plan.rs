//! A [`Spec`] resolved against this machine: the program found, its kind decided, the
//! listening sockets bound. After this nothing about the app can fail for a reason the user
//! could have fixed on the command line, so every error here names the fix.

use std::cell::RefCell;
use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use socket2::{Domain, Socket, Type};

use crate::inherit::Inherited;
use crate::node::sockfile::{self, SocketFile};
use crate::reuseport::{self, Group, GroupError};
use crate::spawn::resolve_program;
use crate::spec::{self, Balance, ListenAddr, Ready, Spec, SpecError, WorkerKind};

/// Backlog for every listening socket herd creates (Node's default).
pub const BACKLOG: i32 = 511;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("cannot run {program}: {problem}")]
    Program { program: String, problem: String },
    #[error("cannot listen on {addr}: {problem}")]
    Listen { addr: String, problem: String },
    #[error("--cwd {}: {problem}", dir.display())]
    Cwd { dir: PathBuf, problem: String },
    #[error("{0}")]
    Inherited(String),
}

/// One socket herd bound for the workers.
pub struct Listener {
    /// The address actually bound (port 0 resolved).
    pub addr: ListenAddr,
    /// Its name in `LISTEN_FDNAMES`.
    pub name: String,
    /// The socket (with `--balance hash|sticky` on TCP: slot 0's).
    pub socket: OwnedFd,
    /// The socket file herd made for a unix path, removed when herd stops.
    pub file: Option<SocketFile>,
    /// `--balance hash|sticky` on TCP: a socket per worker slot.
    pub group: Option<SharedGroup>,
}

/// A reuseport group, shared by the plan's listener, the Node servers that reuse it and the
/// supervisor that routes it.
pub type SharedGroup = Rc<RefCell<Group>>;

/// The routing program's policy for a balance mode that has one.
pub fn kernel_policy(balance: Balance) -> Option<reuseport::Policy> {
    match balance {
        Balance::Hash => Some(reuseport::Policy::Hash),
        Balance::Sticky => Some(reuseport::Policy::Sticky),
        Balance::RoundRobin | Balance::Shared => None,
    }
}

/// Binds a reuseport group of `slots` sockets on `addr`, routed by `policy`.
pub fn bind_group(
    policy: reuseport::Policy,
    addr: SocketAddr,
    v6only: Option<bool>,
    slots: usize,
) -> Result<SharedGroup, (Option<i32>, String)> {
    match Group::bind(policy, addr, v6only, slots, BACKLOG) {
        Ok(group) => Ok(Rc::new(RefCell::new(group))),
        Err(GroupError::Bind(e)) => {
            Err((e.raw_os_error(), describe_bind_error(&e, &addr.to_string())))
        }
        Err(GroupError::Route(e)) => Err((e.source.raw_os_error(), e.to_string())),
    }
}

/// Everything needed to start workers.
pub struct Plan {
    pub spec: Spec,
    pub kind: WorkerKind,
    /// Absolute path of what is exec'd (the interpreter, for scripts).
    pub program: PathBuf,
    /// argv including argv[0].
    pub argv: Vec<OsString>,
    pub instances: usize,
    pub balance: Balance,
    pub ready: Ready,
    /// Shared with the plan of a reload onto a new spec (`herd apply`), which keeps them.
    pub listeners: Rc<Vec<Listener>>,
    pub cwd: Option<PathBuf>,
    /// `--user`: who the workers run as.
    pub user: Option<User>,
}

/// A user the workers drop to.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub uid: u32,
    /// The primary group: `--group`'s, else the user's.
    pub gid: u32,
    pub home: PathBuf,
    /// Supplementary groups, as `initgroups(name, gid)` would set them.
    pub groups: Vec<u32>,
}

/// Looks a user up in the password database (however long its entry: the buffer grows).
pub fn lookup_user(name: &str) -> Result<User, String> {
    if name.contains('\0') {
        return Err(format!("`{}` is not a user name", name.escape_debug()));
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(user)) => Ok(User {
            name: name.to_string(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
            groups: Vec::new(),
        }),
        Ok(None) => Err(format!("no user named `{name}` on this machine")),
        Err(e) => Err(format!("cannot look up user `{name}`: {e}")),
    }
}

impl Plan {
    /// The first TCP port herd listens on, for `PORT`.
    pub fn first_port(&self) -> Option<u16> {
        self.listeners.iter().find_map(|l| match &l.addr {
            ListenAddr::Tcp(addr) => Some(addr.port()),
            ListenAddr::Unix(_) => None,
        })
    }

    /// Removes the unix socket files herd created, each only if it is still the socket herd
    /// made, in the directory herd made it in.
    pub fn remove_socket_files(&self) {
        for file in self.listeners.iter().filter_map(|l| l.file.as_ref()) {
            let _ = file.remove_here();
        }
    }
}

/// What the APP argument means: the interpreter (if any) and whether it is Node.
fn interpreter_for(spec: &Spec) -> (Option<String>, bool) {
    let ext = Path::new(&spec.program)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("");
    let is_js = matches!(ext, "js" | "mjs" | "cjs");
    if let Some(interpreter) = &spec.interpreter {
        let node = is_js
            || Path::new(interpreter)
                .file_stem()
                .is_some_and(|s| s == "node");
        return (Some(interpreter.clone()), node);
    }
    let by_ext = match ext {
        "js" | "mjs" | "cjs" => Some("node"),
        "py" => Some("python3"),
        "rb" => Some("ruby"),
        "sh" => Some("sh"),
        _ => None,
    };
    match by_ext {
        Some(interpreter) => (Some(interpreter.to_string()), is_js),
        None => {
            let node = Path::new(&spec.program)
                .file_name()
                .is_some_and(|s| s == "node");
            (None, node)
        }
    }
}

/// Resolves `spec` against this machine: the working directory, the program and its kind,
/// the defaults that depend on the kind, the `--user`, and the sockets — those herd
/// inherited (inherit.rs) for the `--listen` addresses they are bound to, the rest bound.
pub fn plan(spec: Spec, inherited: Vec<Inherited>) -> Result<Plan, PlanError> {
    resolve(spec, None, inherited)
}

/// Resolves a new `spec` for a running app (a reload onto a new spec): everything as
/// [`plan`] does except the sockets and the worker count, which stay `current`'s (a scale
/// changes the count; a change of sockets or balance is refused before this, see
/// supervisor/reconfigure.rs).
pub fn replan(spec: Spec, current: &Plan) -> Result<Plan, PlanError> {
    resolve(spec, Some(current), Vec::new())
}

fn resolve(
    spec: Spec,
    current: Option<&Plan>,
    inherited: Vec<Inherited>,
) -> Result<Plan, PlanError> {
    let cwd = resolve_cwd(&spec)?;
    let (program, argv, kind) = resolve_command(&spec, cwd.as_deref())?;
    spec::validate(&spec, kind)?;
    let balance = spec.balance.unwrap_or(match kind {
        WorkerKind::Node => Balance::RoundRobin,
        WorkerKind::SocketActivation => Balance::Shared,
    });
    let ready = spec.ready.clone().unwrap_or(match kind {
        WorkerKind::Node => Ready::Listening,
        WorkerKind::SocketActivation => Ready::Delay(std::time::Duration::from_secs(1)),
    });
    check_health(&spec, balance)?;
    let user = resolve_user(spec.user.as_deref(), spec.group.as_deref())?;
    let (instances, listeners) = match current {
        Some(current) => (current.instances, Rc::clone(&current.listeners)),
        None => {
            let instances = spec.instances.resolve();
            let inherited = match_inherited(&spec.listen, inherited, kernel_policy(balance))?;
            let listeners = bind_all(&spec.listen, kernel_policy(balance), instances, inherited)?;
            (instances, Rc::new(listeners))
        }
    };
    Ok(Plan {
        instances,
        spec,
        kind,
        program,
        argv,
        balance,
        ready,
        listeners,
        cwd,
        user,
    })
}

/// `--cwd`, made absolute; it must be a directory.
fn resolve_cwd(spec: &Spec) -> Result<Option<PathBuf>, PlanError> {
    let Some(dir) = &spec.cwd else {
        return Ok(None);
    };
    let abs = std::path::absolute(dir).map_err(|e| PlanError::Cwd {
        dir: dir.clone(),
        problem: e.to_string(),
    })?;
    if !abs.is_dir() {
        return Err(PlanError::Cwd {
            dir: dir.clone(),
            problem: "not a directory".into(),
        });
    }
    Ok(Some(abs))
}

/// What is exec'd (the interpreter for a script, which must exist), its argv, and the kind
/// of worker that makes.
fn resolve_command(
    spec: &Spec,
    cwd: Option<&Path>,
) -> Result<(PathBuf, Vec<OsString>, WorkerKind), PlanError> {
    let program_error = |problem: String| PlanError::Program {
        program: spec.program.clone(),
        problem,
    };
    let (interpreter, node) = interpreter_for(spec);
    let (program, mut argv) = match &interpreter {
        Some(interpreter) => {
            let script = match cwd {
                Some(cwd) => cwd.join(&spec.program),
                None => PathBuf::from(&spec.program),
            };
            if !script.is_file() {
                return Err(program_error(format!(
                    "{} does not exist",
                    script.display()
                )));
            }
            let program = resolve_program(interpreter, cwd)
                .map_err(|e| program_error(format!("its interpreter: {e}")))?;
            let argv = vec![OsString::from(interpreter), OsString::from(&spec.program)];
            (program, argv)
        }
        None => {
            let program = resolve_program(&spec.program, cwd).map_err(program_error)?;
            (program, vec![OsString::from(&spec.program)])
        }
    };
    argv.extend(spec.args.iter().map(OsString::from));
    let kind = if node {
        WorkerKind::Node
    } else {
        WorkerKind::SocketActivation
    };
    Ok((program, argv, kind))
}

/// The health flags that depend on the balance mode or need a well-formed path.
fn check_health(spec: &Spec, balance: Balance) -> Result<(), PlanError> {
    if spec.health.max_requests.is_some() && balance != Balance::RoundRobin {
        return Err(SpecError::Invalid {
            flag: "--max-requests",
            problem: "herd counts the connections it hands out, which needs --balance round-robin (Node workers)".into(),
        }
        .into());
    }
    if let Some(check) = &spec.health.check {
        if !check.path.starts_with('/') {
            return Err(SpecError::Invalid {
                flag: "--health-check",
                problem: format!(
                    "`{}` must be a path starting with /, like /health",
                    check.path
                ),
            }
            .into());
        }
    }
    Ok(())
}

/// Looks a group up by name or number.
pub fn lookup_group(name: &str) -> Result<u32, String> {
    if name.contains('\0') {
        return Err(format!("`{}` is not a group name", name.escape_debug()));
    }
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!(
            "no group named `{name}` on this machine (see `getent group`)"
        )),
        Err(e) => Err(format!("cannot look up group `{name}`: {e}")),
    }
}

/// The supplementary groups `initgroups(name, gid)` would give: `gid` and every group that
/// lists `name` as a member. Resolved here, before any fork (the lookup allocates and may
/// read files or ask NSS).
fn group_list(name: &str, gid: u32) -> Result<Vec<u32>, String> {
    let cname = std::ffi::CString::new(name).map_err(|_| format!("`{name}` has a NUL"))?;
    nix::unistd::getgrouplist(&cname, nix::unistd::Gid::from_raw(gid))
        .map(|gids| gids.into_iter().map(|g| g.as_raw()).collect())
        .map_err(|e| format!("cannot list the groups of `{name}`: {e}"))
}

/// `--user NAME` and `--group GROUP`: whom herd can only become as root (or, for a user
/// alone, as that user already). `--group` without `--user` keeps herd's user and sets
/// only the group (and no supplementary groups).
fn resolve_user(name: Option<&str>, group: Option<&str>) -> Result<Option<User>, PlanError> {
    let me = rustix::process::geteuid().as_raw();
    let gid = match group {
        Some(group) => {
            let gid = lookup_group(group).map_err(|problem| SpecError::Invalid {
                flag: "--group",
                problem,
            })?;
            if me != 0 {
                return Err(SpecError::Invalid {
                    flag: "--group",
                    problem: format!(
                        "running workers with group `{group}` needs herd to run as root"
                    ),
                }
                .into());
            }
            Some(gid)
        }
        None => None,
    };
    let Some(name) = name else {
        return Ok(gid.map(|gid| {
            let me = lookup_user_by_uid(me);
            User {
                name: me.0,
                uid: rustix::process::geteuid().as_raw(),
                gid,
                home: me.1,
                groups: vec![gid],
            }
        }));
    };
    let mut user = lookup_user(name).map_err(|problem| SpecError::Invalid {
        flag: "--user",
        problem,
    })?;
    if me != 0 && me != user.uid {
        return Err(SpecError::Invalid {
            flag: "--user",
            problem: format!("running workers as `{name}` needs herd to run as root"),
        }
        .into());
    }
    if let Some(gid) = gid {
        user.gid = gid;
    }
    user.groups = group_list(name, user.gid).map_err(|problem| SpecError::Invalid {
        flag: "--user",
        problem,
    })?;
    Ok(Some(user))
}

/// herd's own user name and home, for `--group` alone.
fn lookup_user_by_uid(uid: u32) -> (String, PathBuf) {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => (u.name, u.dir),
        _ => (uid.to_string(), PathBuf::from("/")),
    }
}

/// Binds every `--listen` address, named `http`, `http1`, …; on a failure the socket files
/// already made are removed. With a kernel `policy` (`--balance hash|sticky`) a TCP address
/// gets a socket per slot; a unix path keeps one socket (SO_REUSEPORT is for TCP).
fn bind_all(
    addrs: &[ListenAddr],
    policy: Option<reuseport::Policy>,
    slots: usize,
    mut inherited: Vec<Option<Inherited>>,
) -> Result<Vec<Listener>, PlanError> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for (i, addr) in addrs.iter().enumerate() {
        let name = if i == 0 {
            "http".to_string()
        } else {
            format!("http{i}")
        };
        if let Some(given) = inherited.get_mut(i).and_then(Option::take) {
            // The manager's socket: herd neither binds nor, for a path, removes it.
            listeners.push(Listener {
                addr: given.addr,
                name,
                socket: given.socket,
                file: None,
                group: None,
            });
            continue;
        }
        let bound = match (addr, policy) {
            (ListenAddr::Tcp(sa), Some(policy)) => bind_group(policy, *sa, None, slots)
                .and_then(|group| {
                    let g = group.borrow();
                    let first = g.socket(0).ok_or((None, "no socket".to_string()))?;
                    let socket = first
                        .try_clone_to_owned()
                        .map_err(|e| (e.raw_os_error(), e.to_string()))?;
                    let local = ListenAddr::Tcp(g.local_addr());
                    drop(g);
                    Ok((socket, local, None, Some(group)))
                })
                .map_err(|(_, problem)| PlanError::Listen {
                    addr: addr.to_string(),
                    problem,
                }),
            _ => bind(addr).map(|(socket, addr, file)| (socket, addr, file, None)),
        };
        match bound {
            Ok((socket, addr, file, group)) => listeners.push(Listener {
                addr,
                name,
                socket,
                file,
                group,
            }),
            Err(e) => {
                for file in listeners.iter().filter_map(|l| l.file.as_ref()) {
                    let _ = file.remove_here();
                }
                return Err(e);
            }
        }
    }
    Ok(listeners)
}

/// Pairs each inherited socket with the `--listen` address it is bound to (the result is
/// indexed like `addrs`). An inherited socket that no `--listen` names is an error, as is
/// one for `--balance hash|sticky`, whose socket per worker herd must bind itself.
fn match_inherited(
    addrs: &[ListenAddr],
    inherited: Vec<Inherited>,
    policy: Option<reuseport::Policy>,
) -> Result<Vec<Option<Inherited>>, PlanError> {
    let mut slots: Vec<Option<Inherited>> = addrs.iter().map(|_| None).collect();
    let mut unmatched = Vec::new();
    for given in inherited {
        match (0..addrs.len())
            .find(|&i| slots[i].is_none() && crate::inherit::matches(&addrs[i], &given.addr))
        {
            Some(i) => {
                if policy.is_some() && matches!(given.addr, ListenAddr::Tcp(_)) {
                    return Err(PlanError::Inherited(format!(
                        "herd was passed {} but --balance hash|sticky needs a socket per worker, which herd binds itself — use --balance round-robin or shared with socket activation",
                        given.describe()
                    )));
                }
                slots[i] = Some(given);
            }
            None => unmatched.push(given),
        }
    }
    if !unmatched.is_empty() {
        let names: Vec<String> = unmatched.iter().map(Inherited::describe).collect();
        let flags: Vec<String> = unmatched
            .iter()
            .map(|u| match &u.addr {
                ListenAddr::Unix(p) => format!("--listen unix:{}", p.display()),
                ListenAddr::Tcp(a) => format!("--listen {a}"),
            })
            .collect();
        return Err(PlanError::Inherited(format!(
            "herd was passed {} by its service manager (LISTEN_FDS), which no --listen names — add {} or remove the socket from the .socket unit",
            names.join(", "),
            flags.join(" ")
        )));
    }
    Ok(slots)
}

/// Binds and listens, non-blocking and close-on-exec, with the backlog set explicitly.
pub fn bind(addr: &ListenAddr) -> Result<(OwnedFd, ListenAddr, Option<SocketFile>), PlanError> {
    let fail = |problem: String| PlanError::Listen {
        addr: addr.to_string(),
        problem,
    };
    match addr {
        ListenAddr::Tcp(sa) => {
            let socket = bind_tcp(*sa, true)
                .map_err(|e| fail(describe_bind_error(&e, &addr.to_string())))?;
            let local = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| fail("no local address after bind".into()))?;
            Ok((socket.into(), ListenAddr::Tcp(local), None))
        }
        ListenAddr::Unix(path) => {
            let (socket, file) = bind_unix(path, 0o660).map_err(fail)?;
            Ok((socket, addr.clone(), Some(file)))
        }
    }
}

/// A TCP socket bound to `addr`, listening if `listen`, with `TCP_NODELAY` (which the
/// connections accepted from it inherit on Linux).
pub fn bind_tcp(addr: SocketAddr, listen: bool) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    socket.set_reuse_address(true)?;
    // A server that never sets TCP_NODELAY itself (uvicorn `--fd 3` sees an AF_UNIX socket,
    // a plain accept loop) would otherwise answer each keep-alive request in two segments
    // held apart by Nagle and the client's delayed ACK: ~40 ms a request.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    if listen {
        socket.listen(BACKLOG)?;
    }
    Ok(socket)
}

/// Explains a bind error the way a user can act on it.
pub fn describe_bind_error(e: &io::Error, addr: &str) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => format!(
            "{addr} is already in use by another process — stop it (see `ss -ltnp`) or pass another --listen"
        ),
        Some(libc::EACCES) => format!(
            "permission denied binding {addr} — ports below 1024 need root or CAP_NET_BIND_SERVICE; use a higher port"
        ),
        Some(libc::EADDRNOTAVAIL) => format!("{addr} is not an address of this machine"),
        _ => e.to_string(),
    }
}

/// Binds a unix stream socket at `path` with herd's own rights (for `--listen`, a path the
/// operator named), replacing a stale socket file left by a dead process but never a live
/// socket of any type or a file that is not a socket. Every step goes through the directory
/// fd (see [`sockfile`]), so a directory swapped for a symlink meanwhile changes nothing.
pub fn bind_unix(path: &Path, mode: u32) -> Result<(OwnedFd, SocketFile), String> {
    sockfile::bind_here(path, mode).map_err(|f| f.problem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_looked_up_or_named_missing() {
        let root = lookup_user("root").expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        let err = lookup_user("no-such-user-herd").expect_err("missing");
        assert_eq!(err, "no user named `no-such-user-herd` on this machine");
        let err = lookup_user("ro\0ot").expect_err("NUL");
        assert!(err.contains("is not a user name"), "{err}");
    }

    #[test]
    fn a_port_in_use_is_named() {
        let (_held, addr, _) = bind(&"127.0.0.1:0".parse().expect("addr")).expect("bind");
        let err = bind(&addr).expect_err("second bind fails").to_string();
        assert!(err.contains("already in use"), "{err}");
        assert!(err.contains(&addr.to_string()), "{err}");
    }

    #[test]
    fn unix_sockets_replace_stale_files_only() {
        let dir = std::env::temp_dir().join(format!("herd-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s.sock");
        let first = bind_unix(&path, 0o660).expect("bind");
        assert!(bind_unix(&path, 0o660).unwrap_err().contains("in use"));
        drop(first);
        let _second = bind_unix(&path, 0o660).expect("stale file replaced");
        let plain = dir.join("plain");
        std::fs::write(&plain, b"x").expect("write");
        assert!(bind_unix(&plain, 0o660)
            .unwrap_err()
            .contains("not a socket"));
        assert!(bind_unix(&dir.join("nope/s.sock"), 0o660)
            .unwrap_err()
            .contains("does not exist"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
