//! The servers Node workers ask for with `queryServer`, one per key.
//!
//! A server is bound the first time any worker asks for its key and then kept for the life
//! of the app, so its accept queue survives every worker's restart: a crash or a reload
//! never closes the port. It is closed only when the app itself closes it (every worker
//! that held it sent `close` while staying alive) or herd stops.
//!
//! How the worker gets connections is decided by the reply (spec §5.4): with the socket
//! attached the worker accepts itself (`shared`); without, herd accepts and hands each
//! connection over (`round-robin`, `sticky`). UDP is always shared.
//!
//! What herd binds for a worker is what the worker could bind alone. A unix path is bound
//! in a helper with the worker's rights ([`sockfile`]); that takes a process, so it is
//! asynchronous: the first query for the key starts the bind, later ones for the same key
//! wait for it ([`Servers::add_waiter`]), and the result answers them all. A port below
//! `ip_unprivileged_port_start` is refused (EACCES) to workers run as a non-root `--user`,
//! unless the operator bound it with `--listen`. Without `--user` the workers have herd's
//! own uid, so herd's bind is the worker's.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::rc::Rc;

use herd_proto::node::{quote, QueryServer, QueryServerReply, ServerKind, Sockname};
use serde_json::value::RawValue;
use socket2::{Domain, Socket, Type};

use crate::balance::{AcceptGate, Pending};
use crate::node::sockfile::{self, Creds, Failure, SocketFile};
use crate::plan::{self, Listener, SharedGroup, User};
use crate::spec::{Balance, ListenAddr};
pub use crate::vocab::ServerId;
use crate::vocab::WorkerId;

pub struct Server {
    pub key: String,
    /// The key as a JSON string, shared by every `newconn` record.
    pub key_json: Rc<str>,
    /// Human form: `[::]:3000`, `unix:/run/app.sock`, `udp 127.0.0.1:41234`.
    pub display: String,
    pub mode: Balance,
    pub socket: Rc<OwnedFd>,
    /// The `data` of the first worker that asked, echoed to all (TLS ticket keys).
    pub data: Option<Box<RawValue>>,
    /// `{address, family, port}` for round-robin replies (TCP only).
    pub sockname: Option<Sockname>,
    /// Workers that hold this server, in the order they asked.
    pub workers: Vec<WorkerId>,
    /// Round-robin cursor into `workers`.
    pub cursor: usize,
    /// Connections accepted while no worker was free.
    pub pending: VecDeque<Pending>,
    pub gate: Option<Rc<AcceptGate>>,
    pub accept_task: Option<tokio::task::JoinHandle<()>>,
    /// The socket file herd made for this server (not for `--listen` ones: the plan owns
    /// those), removed when the app closes it or herd stops.
    pub unix_file: Option<SocketFile>,
    /// Bound from `--listen`: owned by the plan, never closed early.
    pub from_cli: bool,
    /// Connections closed because every worker refused them.
    pub refused: crate::node::channel::Tally,
    /// `--balance hash|sticky`: a socket per worker slot; each worker gets its slot's.
    pub group: Option<SharedGroup>,
    /// Slots whose queue herd empties itself (no ready worker there): their accept threads,
    /// kept (idle) once the slot is live again.
    pub drains: BTreeMap<usize, crate::balance::AcceptThread>,
    /// Where the accept threads of `drains` hand their connections, and the task that
    /// forwards them to the supervisor.
    pub drain_hand: Option<(
        tokio::sync::mpsc::Sender<Vec<Pending>>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl Server {
    /// The answer to a queryServer (seq `ack`) this server serves. The reply says how the
    /// worker gets connections: with the socket attached (`shared`, `hash`, `sticky`: sent
    /// with the fd, a slot's own for the last two) or from herd (`round-robin`).
    pub fn reply(&self, ack: i64) -> QueryServerReply<'_> {
        let data = self.data.as_deref();
        match self.mode {
            Balance::Shared | Balance::Hash | Balance::Sticky => {
                QueryServerReply::shared(&self.key, ack, data)
            }
            Balance::RoundRobin => {
                QueryServerReply::round_robin(&self.key, ack, data, self.sockname.as_ref())
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
        self.drains.clear();
        if let Some((_, task)) = self.drain_hand.take() {
            task.abort();
        }
    }
}

/// Most servers an app may hold (bound or being bound): each holds fds in herd, and a
/// worker must not be able to spend all of them.
pub const MAX_SERVERS: usize = 1024;
/// Most listening sockets the servers of a `--balance hash|sticky` app may hold (a socket per
/// worker slot for each server).
pub const MAX_SLOT_SOCKETS: usize = 4096;
/// Most unix binds under way at once (each is a helper process).
pub const MAX_BINDS: usize = 16;
/// Most queries waiting for one bind.
pub const MAX_WAITERS: usize = 256;

/// What a unix bind in progress yields.
type BindResult = Result<(OwnedFd, SocketFile), Failure>;

/// A bound socket, or the errno (negative) and problem to answer with.
pub type Refusable = Result<Bound, (i32, String)>;

/// Queries waiting for a bind, the first one first.
pub type Waiters = Vec<(WorkerId, QueryServer)>;

/// A unix bind under way and the queries waiting for it.
struct Binding {
    waiters: Waiters,
    path: PathBuf,
    mode: Balance,
    result: Rc<RefCell<Option<BindResult>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The servers by id. An id is never reused: events still queued for a removed server
/// (accepted connections, hand-off answers) then find nothing, instead of a new server that
/// took its number.
#[derive(Default)]
pub struct Servers {
    by_key: HashMap<String, ServerId>,
    by_id: BTreeMap<ServerId, Server>,
    next: ServerId,
    binding: HashMap<String, Binding>,
    /// Socket-file removals under way.
    removing: Vec<tokio::task::JoinHandle<()>>,
}

impl Servers {
    pub fn get(&self, id: ServerId) -> Option<&Server> {
        self.by_id.get(&id)
    }

    pub fn get_mut(&mut self, id: ServerId) -> Option<&mut Server> {
        self.by_id.get_mut(&id)
    }

    pub fn by_key(&self, key: &str) -> Option<ServerId> {
        self.by_key.get(key).copied()
    }

    pub fn ids(&self) -> impl Iterator<Item = ServerId> + '_ {
        self.by_id.keys().copied()
    }

    pub fn insert(&mut self, server: Server) -> ServerId {
        let id = self.next;
        self.next += 1;
        self.by_key.insert(server.key.clone(), id);
        self.by_id.insert(id, server);
        id
    }

    /// Closes server `id` and removes its socket file; returns how it was shown.
    pub fn close(&mut self, id: ServerId) -> Option<String> {
        let mut server = self.by_id.remove(&id)?;
        self.by_key.remove(&server.key);
        if let Some(file) = server.unix_file.take() {
            self.remove_file(file);
        }
        Some(server.display.clone())
    }

    fn remove_file(&mut self, file: SocketFile) {
        self.removing.retain(|t| !t.is_finished());
        self.removing.push(tokio::task::spawn_local(async move {
            let _ = file.remove().await;
        }));
    }

    pub fn clear(&mut self) {
        self.by_key.clear();
        self.by_id.clear();
    }

    /// Servers bound and binds under way.
    /// The listening sockets the servers hold (a group's are one per slot).
    pub fn sockets(&self) -> usize {
        self.by_id
            .values()
            .map(|s| s.group.as_ref().map_or(1, |g| g.borrow().len()))
            .sum()
    }

    pub fn len(&self) -> usize {
        self.by_key.len() + self.binding.len()
    }

    /// Whether a unix bind for `key` is under way.
    pub fn is_binding(&self, key: &str) -> bool {
        self.binding.contains_key(key)
    }

    /// Queues `query` behind the bind under way for its key; gives it back if too many wait.
    pub fn add_waiter(
        &mut self,
        key: &str,
        id: WorkerId,
        query: QueryServer,
    ) -> Result<(), Box<QueryServer>> {
        match self.binding.get_mut(key) {
            Some(b) if b.waiters.len() < MAX_WAITERS => {
                b.waiters.push((id, query));
                Ok(())
            }
            _ => Err(Box::new(query)),
        }
    }

    /// Starts binding `path` in a helper with `creds`; `done` is called once the result is
    /// in (then [`Servers::finish_bind`] takes it). Gives `query` back if too many binds are
    /// under way.
    #[allow(clippy::too_many_arguments)]
    pub fn start_bind(
        &mut self,
        key: String,
        id: WorkerId,
        query: QueryServer,
        path: PathBuf,
        mode: u32,
        balance: Balance,
        creds: Option<Creds>,
        done: impl FnOnce() + 'static,
    ) -> Result<(), Box<QueryServer>> {
        if self.binding.len() >= MAX_BINDS {
            return Err(Box::new(query));
        }
        let result: Rc<RefCell<Option<BindResult>>> = Rc::default();
        let slot = Rc::clone(&result);
        let target = path.clone();
        let task = tokio::task::spawn_local(async move {
            let bound = sockfile::bind_as(creds, &target, mode).await;
            *slot.borrow_mut() = Some(bound);
            done();
        });
        self.binding.insert(
            key,
            Binding {
                waiters: vec![(id, query)],
                path,
                mode: balance,
                result,
                task,
            },
        );
        Ok(())
    }

    /// The queries that waited for `key`'s bind, and what it gave.
    pub fn finish_bind(&mut self, key: &str) -> Option<(Waiters, Refusable)> {
        let b = self.binding.remove(key)?;
        let result = match b.result.borrow_mut().take() {
            Some(Ok((socket, file))) => Ok(Bound {
                socket,
                display: format!("unix:{}", b.path.display()),
                mode: b.mode,
                sockname: None,
                unix_file: Some(file),
                from_cli: false,
                group: None,
            }),
            Some(Err(f)) => Err((-f.errno, f.problem)),
            None => Err((-libc::EIO, "the bind was abandoned".into())),
        };
        Some((b.waiters, result))
    }

    /// Closes every server and removes the socket files made for workers, waiting (bounded)
    /// for binds under way so that their files are removed too.
    pub async fn shutdown(&mut self) {
        let deadline = tokio::time::Instant::now() + sockfile::HELPER_TIMEOUT;
        for (_, b) in std::mem::take(&mut self.binding) {
            let _ = tokio::time::timeout_at(deadline, b.task).await;
            if let Some(Ok((_, file))) = b.result.borrow_mut().take() {
                self.remove_file(file);
            }
        }
        let ids: Vec<ServerId> = self.ids().collect();
        for id in ids {
            self.close(id);
        }
        self.clear();
        let deadline = tokio::time::Instant::now() + sockfile::HELPER_TIMEOUT;
        for task in std::mem::take(&mut self.removing) {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
    }
}

/// What [`bind_for`] decided.
pub enum Step {
    /// Done now: bound, or the errno (negative) and problem to answer with.
    Now(Result<Bound, (i32, String)>),
    /// A unix path, to bind in a helper with the workers' rights ([`Servers::start_bind`]).
    Unix { path: PathBuf, mode: u32 },
}

/// A bound socket for a new key, or the negative errno to answer with.
pub struct Bound {
    pub socket: OwnedFd,
    pub display: String,
    pub mode: Balance,
    pub sockname: Option<Sockname>,
    pub unix_file: Option<SocketFile>,
    pub from_cli: bool,
    pub group: Option<SharedGroup>,
}

/// The rights a worker's unix bind runs with: `--user`'s, or herd's own.
pub fn creds_of(user: Option<&User>) -> Option<Creds> {
    user.map(|u| Creds {
        uid: u.uid,
        gid: u.gid,
        groups: u.groups.clone(),
    })
}

/// Binds what `query` asks for, reusing a `--listen` socket with the same port or path, as
/// the workers (running as `user`) could. With `--balance hash|sticky` a TCP server gets a
/// socket for each of `slots` worker slots; unix paths and UDP stay one shared socket.
pub fn bind_for(
    query: &QueryServer,
    balance: Balance,
    cli: &[Listener],
    user: Option<&User>,
    slots: usize,
) -> Step {
    match decide(query, balance, cli, user, slots) {
        Ok(step) => step,
        Err(e) => Step::Now(Err(e)),
    }
}

fn decide(
    query: &QueryServer,
    balance: Balance,
    cli: &[Listener],
    user: Option<&User>,
    slots: usize,
) -> Result<Step, (i32, String)> {
    let kind = query.kind().map_err(|e| (-libc::EINVAL, e.to_string()))?;
    let address = query.address.as_deref();
    let port = query.port.unwrap_or(0);
    match kind {
        ServerKind::Fd => Err((
            -libc::EBADF,
            "listen({fd}) asks for an fd of the primary; herd has none to give".into(),
        )),
        ServerKind::Unix => {
            let balance = if balance.per_slot() {
                Balance::Shared
            } else {
                balance
            };
            Ok(unix_step(query, balance, cli))
        }
        ServerKind::Tcp4 | ServerKind::Tcp6 => {
            let port = port_of(port)?;
            if let Some((l, sockname)) = cli_tcp_listener(cli, address, port) {
                return Ok(Step::Now(reuse(l, balance, sockname)));
            }
            refuse_privileged(port, user)?;
            bind_tcp_for(address, port, balance, slots).map(|b| Step::Now(Ok(b)))
        }
        ServerKind::Udp4 | ServerKind::Udp6 => {
            let port = port_of(port)?;
            refuse_privileged(port, user)?;
            bind_udp_for(address, kind, port).map(|b| Step::Now(Ok(b)))
        }
    }
}

/// A unix path: the `--listen` socket at that path, or a bind left to the helper (with the
/// workers' rights), in the mode `readableAll`/`writableAll` ask for.
fn unix_step(query: &QueryServer, balance: Balance, cli: &[Listener]) -> Step {
    let path = PathBuf::from(query.address.as_deref().unwrap_or_default());
    if let Some(l) = cli
        .iter()
        .find(|l| l.addr == ListenAddr::Unix(path.clone()))
    {
        return Step::Now(reuse(l, balance, None));
    }
    let mut mode = 0o660;
    if query.readable_all == Some(true) {
        mode |= 0o444;
    }
    if query.writable_all == Some(true) {
        mode |= 0o222;
    }
    Step::Unix { path, mode }
}

/// The `--listen` TCP socket on `port` (and `address`, if given), with its sockname. Port
/// 0 asks for a new port, never a `--listen` one.
fn cli_tcp_listener<'a>(
    cli: &'a [Listener],
    address: Option<&str>,
    port: u16,
) -> Option<(&'a Listener, Option<Sockname>)> {
    if port == 0 {
        return None;
    }
    cli.iter().find_map(|l| match &l.addr {
        ListenAddr::Tcp(a)
            if a.port() == port
                && address.is_none_or(|h| h.parse::<IpAddr>().ok() == Some(a.ip())) =>
        {
            Some((l, Some(Sockname::from(*a))))
        }
        _ => None,
    })
}

/// Binds a new TCP listener: on `address`, or on every interface, dual-stack if the machine
/// has IPv6 (Node's rule for `listen(port)`).
fn bind_tcp_for(
    address: Option<&str>,
    port: u16,
    balance: Balance,
    slots: usize,
) -> Result<Bound, (i32, String)> {
    let candidates: Vec<SocketAddr> = match address {
        Some(host) => vec![SocketAddr::new(parse_ip(host)?, port)],
        None => vec![
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
        ],
    };
    if let Some(policy) = plan::kernel_policy(balance) {
        let mut last = None;
        for addr in candidates {
            match plan::bind_group(policy, addr, None, slots) {
                Ok(group) => {
                    let g = group.borrow();
                    let local = g.local_addr();
                    let socket = g
                        .socket(0)
                        .ok_or((-libc::EINVAL, "no socket".to_string()))?
                        .try_clone_to_owned()
                        .map_err(|e| bind_error(&e, addr))?;
                    drop(g);
                    return Ok(Bound {
                        socket,
                        display: local.to_string(),
                        mode: balance,
                        sockname: Some(Sockname::from(local)),
                        unix_file: None,
                        from_cli: false,
                        group: Some(group),
                    });
                }
                Err((errno, problem)) => last = Some((errno, problem)),
            }
        }
        let (errno, problem) = last.expect("at least one candidate");
        return Err((-errno.unwrap_or(libc::EINVAL), problem));
    }
    let mut last = None;
    for addr in candidates {
        match plan::bind_tcp(addr, true) {
            Ok(socket) => {
                let local = local_addr(&socket).unwrap_or(addr);
                return Ok(Bound {
                    socket: socket.into(),
                    display: local.to_string(),
                    mode: balance,
                    sockname: Some(Sockname::from(local)),
                    unix_file: None,
                    from_cli: false,
                    group: None,
                });
            }
            Err(e) => last = Some((addr, e)),
        }
    }
    let (addr, e) = last.expect("at least one candidate");
    Err(bind_error(&e, addr))
}

/// Binds a UDP socket (always shared: datagrams are not handed out) on `address`, or on
/// every interface of the family `kind` names.
fn bind_udp_for(
    address: Option<&str>,
    kind: ServerKind,
    port: u16,
) -> Result<Bound, (i32, String)> {
    let ip = match (address, kind) {
        (Some(h), _) => parse_ip(h)?,
        (None, ServerKind::Udp6) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        (None, _) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    let addr = SocketAddr::new(ip, port);
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.nonblocking().cloexec(),
        None,
    )
    .and_then(|s| {
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        Ok(s)
    })
    .map_err(|e| bind_error(&e, addr))?;
    let local = local_addr(&socket).unwrap_or(addr);
    Ok(Bound {
        socket: socket.into(),
        display: format!("udp {local}"),
        mode: Balance::Shared,
        sockname: None,
        unix_file: None,
        from_cli: false,
        group: None,
    })
}

fn parse_ip(host: &str) -> Result<IpAddr, (i32, String)> {
    host.parse()
        .map_err(|_| (-libc::EINVAL, format!("`{host}` is not an IP address")))
}

fn local_addr(socket: &Socket) -> Option<SocketAddr> {
    socket.local_addr().ok().and_then(|a| a.as_socket())
}

/// The negative errno and the user's explanation of a failed bind.
fn bind_error(e: &std::io::Error, addr: SocketAddr) -> (i32, String) {
    (
        -e.raw_os_error().unwrap_or(libc::EINVAL),
        plan::describe_bind_error(e, &addr.to_string()),
    )
}

/// A TCP/UDP port from queryServer (unix sockets send -1, so this is not checked for them).
fn port_of(port: i64) -> Result<u16, (i32, String)> {
    u16::try_from(port).map_err(|_| (-libc::EINVAL, format!("port {port} is out of range")))
}

/// EACCES for a privileged port when the workers run as a non-root `--user`: what they would
/// get binding it themselves (they have no capabilities). Ports the operator bound with
/// `--listen` are reused before this is asked.
fn refuse_privileged(port: u16, user: Option<&User>) -> Result<(), (i32, String)> {
    let Some(user) = user.filter(|u| u.uid != 0) else {
        return Ok(());
    };
    let start = unprivileged_port_start();
    if port == 0 || port >= start {
        return Ok(());
    }
    Err((
        -libc::EACCES,
        format!(
            "port {port} is privileged (below {start}) and the workers run as `{}`, who may not bind it; pass --listen with that port to have herd bind it for them, or use a port of {start} or more",
            user.name
        ),
    ))
}

/// The first port an unprivileged process may bind (`net.ipv4.ip_unprivileged_port_start`,
/// which covers IPv6 too; 1024 where it cannot be read).
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

fn reuse(l: &Listener, mode: Balance, sockname: Option<Sockname>) -> Result<Bound, (i32, String)> {
    let socket = rustix::io::fcntl_dupfd_cloexec(&l.socket, 3)
        .map_err(|e| (-e.raw_os_error(), e.to_string()))?;
    Ok(Bound {
        socket,
        display: l.addr.to_string(),
        // A unix `--listen` path has no group: one shared socket.
        mode: if l.group.is_none() && mode.per_slot() {
            Balance::Shared
        } else {
            mode
        },
        sockname,
        unix_file: None,
        from_cli: true,
        group: l.group.clone(),
    })
}

/// Makes a [`Server`] from a fresh bind.
pub fn new_server(query: &QueryServer, bound: Bound) -> Server {
    let key = query.key();
    Server {
        key_json: Rc::from(quote(&key)),
        key,
        display: bound.display,
        mode: bound.mode,
        socket: Rc::new(bound.socket),
        data: query.data.clone(),
        sockname: bound.sockname,
        workers: Vec::new(),
        cursor: 0,
        pending: VecDeque::new(),
        gate: None,
        accept_task: None,
        unix_file: bound.unix_file,
        from_cli: bound.from_cli,
        refused: Default::default(),
        group: bound.group,
        drains: BTreeMap::new(),
        drain_hand: None,
    }
}
