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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::rc::Rc;

use herd_proto::node::{quote, QueryServer, ServerKind};
use serde_json::value::RawValue;
use socket2::{Domain, Socket, Type};

use crate::balance::{AcceptGate, Pending};
use crate::plan::{self, Listener};
use crate::spec::{Balance, ListenAddr};
use crate::supervisor::WorkerId;

pub type ServerId = usize;

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
    pub sockname: Option<String>,
    /// Workers that hold this server, in the order they asked.
    pub workers: Vec<WorkerId>,
    /// Round-robin cursor into `workers`.
    pub cursor: usize,
    /// Connections accepted while no worker was free.
    pub pending: VecDeque<Pending>,
    pub gate: Option<Rc<AcceptGate>>,
    pub accept_task: Option<tokio::task::JoinHandle<()>>,
    /// A socket file herd created and must remove.
    pub unix_path: Option<PathBuf>,
    /// Bound from `--listen`: owned by the plan, never closed early.
    pub from_cli: bool,
    /// Connections closed because every worker refused them.
    pub refused: crate::node::channel::Tally,
}

impl Server {
    /// The reply fields (JSON object body) for a successful queryServer.
    pub fn reply_fields(&self, ack: i64) -> String {
        let data = self.data.as_ref().map_or("null", |d| d.get());
        match self.mode {
            Balance::Shared => format!(
                r#""errno":0,"key":{},"ack":{ack},"data":{data}"#,
                self.key_json
            ),
            Balance::RoundRobin | Balance::Sticky => match &self.sockname {
                Some(sockname) => format!(
                    r#""errno":null,"key":{},"ack":{ack},"data":{data},"sockname":{sockname}"#,
                    self.key_json
                ),
                None => format!(
                    r#""errno":null,"key":{},"ack":{ack},"data":{data}"#,
                    self.key_json
                ),
            },
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
        if let Some(path) = &self.unix_path {
            if !self.from_cli {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The servers by id. An id is never reused: events still queued for a removed server
/// (accepted connections, hand-off answers) then find nothing, instead of a new server that
/// took its number.
#[derive(Default)]
pub struct Servers {
    by_key: HashMap<String, ServerId>,
    by_id: BTreeMap<ServerId, Server>,
    next: ServerId,
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

    pub fn remove(&mut self, id: ServerId) -> Option<Server> {
        let server = self.by_id.remove(&id)?;
        self.by_key.remove(&server.key);
        Some(server)
    }

    pub fn clear(&mut self) {
        self.by_key.clear();
        self.by_id.clear();
    }
}

/// A bound socket for a new key, or the negative errno to answer with.
pub struct Bound {
    pub socket: OwnedFd,
    pub display: String,
    pub mode: Balance,
    pub sockname: Option<String>,
    pub unix_path: Option<PathBuf>,
    pub from_cli: bool,
}

/// Binds what `query` asks for, reusing a `--listen` socket with the same port or path.
pub fn bind_for(
    query: &QueryServer,
    balance: Balance,
    cli: &[Listener],
) -> Result<Bound, (i32, String)> {
    let kind = query.kind().map_err(|e| (-libc::EINVAL, e.to_string()))?;
    let address = query.address.as_deref();
    let port = query.port.unwrap_or(0);
    let stream_mode = balance;
    match kind {
        ServerKind::Fd => Err((
            -libc::EBADF,
            "listen({fd}) asks for an fd of the primary; herd has none to give".into(),
        )),
        ServerKind::Unix => {
            let path = PathBuf::from(address.unwrap_or_default());
            if let Some(l) = cli
                .iter()
                .find(|l| l.addr == ListenAddr::Unix(path.clone()))
            {
                return reuse(l, stream_mode, None);
            }
            let mut mode = 0o660;
            if query.readable_all == Some(true) {
                mode |= 0o444;
            }
            if query.writable_all == Some(true) {
                mode |= 0o222;
            }
            let socket = plan::bind_unix(&path, mode).map_err(|e| (-libc::EADDRINUSE, e))?;
            Ok(Bound {
                socket,
                display: format!("unix:{}", path.display()),
                mode: stream_mode,
                sockname: None,
                unix_path: Some(path),
                from_cli: false,
            })
        }
        ServerKind::Tcp4 | ServerKind::Tcp6 => {
            let port16 = port_of(port)?;
            if port16 != 0 {
                let matching = cli.iter().find(|l| match &l.addr {
                    ListenAddr::Tcp(a) => {
                        a.port() == port16
                            && address.is_none_or(|h| h.parse::<IpAddr>().ok() == Some(a.ip()))
                    }
                    ListenAddr::Unix(_) => false,
                });
                if let Some(l) = matching {
                    let sockname = match &l.addr {
                        ListenAddr::Tcp(a) => Some(sockname_json(*a)),
                        ListenAddr::Unix(_) => None,
                    };
                    return reuse(l, stream_mode, sockname);
                }
            }
            let candidates: Vec<SocketAddr> = match address {
                Some(host) => {
                    let ip: IpAddr = host
                        .parse()
                        .map_err(|_| (-libc::EINVAL, format!("`{host}` is not an IP address")))?;
                    vec![SocketAddr::new(ip, port16)]
                }
                // `listen(port)`: every interface, dual-stack if the machine has IPv6 (Node's rule).
                None => vec![
                    SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port16),
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port16),
                ],
            };
            let mut last = None;
            for addr in candidates {
                match plan::bind_tcp(addr, true) {
                    Ok(socket) => {
                        let local = socket
                            .local_addr()
                            .ok()
                            .and_then(|a| a.as_socket())
                            .unwrap_or(addr);
                        return Ok(Bound {
                            socket: socket.into(),
                            display: local.to_string(),
                            mode: stream_mode,
                            sockname: Some(sockname_json(local)),
                            unix_path: None,
                            from_cli: false,
                        });
                    }
                    Err(e) => last = Some((addr, e)),
                }
            }
            let (addr, e) = last.expect("at least one candidate");
            let errno = -e.raw_os_error().unwrap_or(libc::EINVAL);
            Err((errno, plan::describe_bind_error(&e, &addr.to_string())))
        }
        ServerKind::Udp4 | ServerKind::Udp6 => {
            let port16 = port_of(port)?;
            let ip: IpAddr = match (address, kind) {
                (Some(h), _) => h
                    .parse()
                    .map_err(|_| (-libc::EINVAL, format!("`{h}` is not an IP address")))?,
                (None, ServerKind::Udp6) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                (None, _) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            };
            let addr = SocketAddr::new(ip, port16);
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
            .map_err(|e| {
                (
                    -e.raw_os_error().unwrap_or(libc::EINVAL),
                    plan::describe_bind_error(&e, &addr.to_string()),
                )
            })?;
            let local = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .unwrap_or(addr);
            Ok(Bound {
                socket: socket.into(),
                display: format!("udp {local}"),
                mode: Balance::Shared,
                sockname: None,
                unix_path: None,
                from_cli: false,
            })
        }
    }
}

/// A TCP/UDP port from queryServer (unix sockets send -1, so this is not checked for them).
fn port_of(port: i64) -> Result<u16, (i32, String)> {
    u16::try_from(port).map_err(|_| (-libc::EINVAL, format!("port {port} is out of range")))
}

fn reuse(l: &Listener, mode: Balance, sockname: Option<String>) -> Result<Bound, (i32, String)> {
    let socket = rustix::io::fcntl_dupfd_cloexec(&l.socket, 3)
        .map_err(|e| (-e.raw_os_error(), e.to_string()))?;
    Ok(Bound {
        socket,
        display: l.addr.to_string(),
        mode,
        sockname,
        unix_path: match &l.addr {
            ListenAddr::Unix(p) => Some(p.clone()),
            ListenAddr::Tcp(_) => None,
        },
        from_cli: true,
    })
}

/// What a round-robin worker's `server.address()` returns.
fn sockname_json(addr: SocketAddr) -> String {
    let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
    format!(
        r#"{{"address":{},"family":"{family}","port":{}}}"#,
        quote(&addr.ip().to_string()),
        addr.port()
    )
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
        unix_path: bound.unix_path,
        from_cli: bound.from_cli,
        refused: Default::default(),
    }
}
