//! Kernel-side balancing: one listening socket per worker slot in one `SO_REUSEPORT` group,
//! and a classic BPF program (`SO_ATTACH_REUSEPORT_CBPF`) that picks the slot of every new
//! connection inside the kernel, so no connection ever passes through herd.
//!
//! - [`Group`] binds the sockets, one per slot, all on the same address. The kernel keeps a
//!   group's sockets in an array in the order they started listening, and the program's
//!   return value is an index into that array. Closing one moves the last socket into its
//!   place, so a group never closes a socket while the app lives: a slot's socket survives
//!   its worker's crash, hang, reload and restart (its queue with it), a retired slot keeps its
//!   socket (left out of the live set), and index == slot for the group's whole life.
//! - The program maps a 32-bit hash of the connection to one of [`BUCKETS`] buckets (its top
//!   8 bits) and the bucket to a slot through a binary decision tree generated from a table:
//!   - [`Policy::Hash`]: the kernel's flow hash (`SKF_AD_RXHASH`; where it is 0, a hash of
//!     the source address and port computed in the program), buckets split into contiguous,
//!     even ranges over the live slots;
//!   - [`Policy::Sticky`]: a hash of the client's source address (IPv4 at `SKF_NET_OFF+12`,
//!     IPv6 at `+8..+24`, told apart by `SKF_AD_PROTOCOL`; never the port, a browser opens
//!     many connections), buckets given to slots by rendezvous (highest-random-weight)
//!     hashing, so a change of the live set moves only the buckets of the slot that changed.
//! - [`Group::route`] attaches a new program whenever the live set changes; the kernel swaps
//!   programs atomically (one `setsockopt` on any socket of the group), so no connection sees
//!   a half-made choice. Classic BPF for reuseport needs no privilege.
//!
//! The program only ever returns the index of a socket of the group. A kernel that refuses the
//! program gives [`RouteError`], which names the modes that work without it.

use std::io;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::rc::Rc;

use socket2::{Domain, Socket, Type};

/// Buckets a hash is folded into (its top 8 bits).
pub const BUCKETS: usize = 256;

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h; libc has it only for Android).
#[cfg(not(any(target_arch = "sparc64", target_arch = "sparc")))]
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
#[cfg(any(target_arch = "sparc64", target_arch = "sparc"))]
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 0x0035;

/// The largest classic BPF program the kernel takes.
const MAX_INSNS: usize = 4096;

/// How the program picks a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Spread connections evenly over the live slots by the connection's flow hash.
    Hash,
    /// Keep a client address on one slot.
    Sticky,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Hash => "hash",
            Policy::Sticky => "sticky",
        }
    }
}

/// The kernel would not take the routing program.
#[derive(Debug, thiserror::Error)]
#[error("the kernel refused herd's SO_REUSEPORT routing program for --balance {mode} ({source}); this needs Linux 4.6 or later — use --balance round-robin or --balance shared instead")]
pub struct RouteError {
    pub mode: &'static str,
    #[source]
    pub source: io::Error,
}

/// One listening socket per slot, all on the same address, in one reuseport group.
#[derive(Debug)]
pub struct Group {
    policy: Policy,
    /// The bound address (the real port when port 0 was asked for).
    addr: SocketAddr,
    v6only: Option<bool>,
    backlog: i32,
    /// Index = slot = the socket's index in the kernel's group. Never shrinks. Shared with
    /// the Node workers' queued `queryServer` answers.
    sockets: Vec<Rc<OwnedFd>>,
    /// The live set the attached program routes to (sorted).
    live: Vec<usize>,
    /// The attached program's bucket → slot table.
    table: Vec<u16>,
}

impl Group {
    /// Binds `slots` sockets to `addr` (at least one) and routes over all of them.
    /// `v6only`: set `IPV6_V6ONLY` on an IPv6 address (None leaves the system default).
    pub fn bind(
        policy: Policy,
        addr: SocketAddr,
        v6only: Option<bool>,
        slots: usize,
        backlog: i32,
    ) -> Result<Group, GroupError> {
        let first = listen_one(addr, v6only, backlog).map_err(GroupError::Bind)?;
        let local = Socket::from(first.try_clone().map_err(GroupError::Bind)?)
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(addr);
        let mut group = Group {
            policy,
            addr: local,
            v6only,
            backlog,
            sockets: vec![Rc::new(first)],
            live: Vec::new(),
            table: Vec::new(),
        };
        group.grow(slots).map_err(GroupError::Bind)?;
        let all: Vec<usize> = (0..group.len()).collect();
        group.route(&all).map_err(GroupError::Route)?;
        Ok(group)
    }

    /// The bound address, with the real port.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Slots that have a socket (every slot ever used; retired ones included).
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// The slot's listening socket (non-blocking, close-on-exec), to pass to its worker.
    pub fn socket(&self, slot: usize) -> Option<BorrowedFd<'_>> {
        self.sockets.get(slot).map(|s| s.as_fd())
    }

    /// The slot's listening socket, shared.
    pub fn socket_rc(&self, slot: usize) -> Option<Rc<OwnedFd>> {
        self.sockets.get(slot).cloned()
    }

    /// The slot the attached program gives a client address ([`Policy::Sticky`]), as the
    /// kernel computes it: for connections herd takes from a slot's queue itself.
    pub fn sticky_slot(&self, peer: IpAddr) -> Option<usize> {
        if self.policy != Policy::Sticky {
            return None;
        }
        let bucket = match peer {
            IpAddr::V4(ip) => sticky_bucket_v4(ip),
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                // The kernel sees the IPv4 packet of a v4-mapped client.
                Some(v4) => sticky_bucket_v4(v4),
                None => sticky_bucket_v6(ip),
            },
        };
        self.table.get(bucket).map(|&s| usize::from(s))
    }

    /// The live set the attached program routes to.
    #[cfg(test)]
    pub fn live(&self) -> &[usize] {
        &self.live
    }

    /// Adds sockets until there are `slots` (for scaling up); never removes any.
    pub fn grow(&mut self, slots: usize) -> io::Result<()> {
        while self.sockets.len() < slots.max(1) {
            let socket = listen_one(self.addr, self.v6only, self.backlog)?;
            self.sockets.push(Rc::new(socket));
        }
        Ok(())
    }

    /// Routes new connections to the `live` slots only, replacing the program when the set
    /// changed. Slots without a socket are ignored; an empty set keeps the current program
    /// (connections wait in the queues of the slots last live, for their next workers).
    /// Returns whether a new program was attached.
    pub fn route(&mut self, live: &[usize]) -> Result<bool, RouteError> {
        let mut live: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&s| s < self.sockets.len())
            .collect();
        live.sort_unstable();
        live.dedup();
        if live.is_empty() || live == self.live {
            return Ok(false);
        }
        let table = table(self.policy, &live);
        let program = program(self.policy, &table, true);
        attach(self.sockets[0].as_fd(), &program).map_err(|source| RouteError {
            mode: self.policy.name(),
            source,
        })?;
        self.live = live;
        self.table = table;
        Ok(true)
    }
}

/// Why a group could not be made.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("{0}")]
    Bind(io::Error),
    #[error(transparent)]
    Route(RouteError),
}

fn listen_one(addr: SocketAddr, v6only: Option<bool>, backlog: i32) -> io::Result<OwnedFd> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Inherited by accepted connections (see `plan::bind_tcp`).
    socket.set_tcp_nodelay(true)?;
    if let (Some(only), SocketAddr::V6(_)) = (v6only, addr) {
        socket.set_only_v6(only)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Replaces the group's program (any socket of the group will do).
fn attach(fd: BorrowedFd<'_>, program: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(program.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "program too long"))?;
    let fprog = libc::sock_fprog {
        len,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: fprog points at `program`, which outlives the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::from_ref(&fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// ---------------------------------------------------------------- bucket → slot

use crate::mix::mix64 as mix;

/// Rendezvous score of a bucket on a slot: the bucket goes to its best live slot.
fn score(bucket: usize, slot: usize) -> u64 {
    mix((bucket as u64) << 32 ^ mix(slot as u64 + 1))
}

/// The slot of every bucket, over the non-empty, sorted, deduplicated `live` set.
pub fn table(policy: Policy, live: &[usize]) -> Vec<u16> {
    debug_assert!(!live.is_empty());
    let n = live.len().max(1);
    (0..BUCKETS)
        .map(|b| {
            let slot = match policy {
                // Contiguous, even ranges: few runs, so a small program.
                Policy::Hash => live.get(b * n / BUCKETS).copied().unwrap_or(0),
                Policy::Sticky => live
                    .iter()
                    .copied()
                    .max_by_key(|&s| score(b, s))
                    .unwrap_or(0),
            };
            slot as u16
        })
        .collect()
}

// ---------------------------------------------------------------- the program

// Instruction classes and fields (linux/filter.h, linux/bpf_common.h).
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const IMM: u16 = 0x00;
const ABS: u16 = 0x20;
const IND: u16 = 0x40;
const MEM: u16 = 0x60;
const MSH: u16 = 0xa0;
const MUL: u16 = 0x20;
const RSH: u16 = 0x70;
const XOR: u16 = 0xa0;
const JA: u16 = 0x00;
const JEQ: u16 = 0x10;
const JGE: u16 = 0x30;
const K: u16 = 0x00;
const X: u16 = 0x08;
const TAX: u16 = 0x00;

const AD_PROTOCOL: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_PROTOCOL) as u32;
const AD_RXHASH: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_RXHASH) as u32;
const NET: i32 = libc::SKF_NET_OFF;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86dd;
/// Multipliers of the in-program hash (odd, well spread).
const K1: u32 = 0x9e37_79b1;
const K2: u32 = 0x85eb_ca6b;

/// A forward-only assembler with labels (classic BPF jumps only go forward).
#[derive(Default)]
struct Asm {
    items: Vec<Item>,
    labels: usize,
}

enum Item {
    Op(u16, u32),
    /// Conditional jump to labels (true, false).
    Jmp(u16, u32, usize, usize),
    /// Unconditional jump to a label.
    Ja(usize),
    Label(usize),
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels += 1;
        self.labels - 1
    }
    fn op(&mut self, code: u16, k: u32) {
        self.items.push(Item::Op(code, k));
    }
    fn jmp(&mut self, code: u16, k: u32, t: usize, f: usize) {
        self.items.push(Item::Jmp(code, k, t, f));
    }
    fn ja(&mut self, to: usize) {
        self.items.push(Item::Ja(to));
    }
    fn at(&mut self, label: usize) {
        self.items.push(Item::Label(label));
    }

    fn finish(self) -> Vec<libc::sock_filter> {
        let mut pos = vec![usize::MAX; self.labels];
        let mut n = 0;
        for item in &self.items {
            match item {
                Item::Label(l) => pos[*l] = n,
                _ => n += 1,
            }
        }
        let mut out = Vec::with_capacity(n);
        for item in &self.items {
            let here = out.len() + 1;
            let ins = match *item {
                Item::Label(_) => continue,
                Item::Op(code, k) => insn(code, 0, 0, k),
                Item::Ja(to) => insn(JMP | JA, 0, 0, (pos[to] - here) as u32),
                Item::Jmp(code, k, t, f) => {
                    let short = |to: usize| {
                        u8::try_from(pos[to] - here).expect("conditional jumps are kept short")
                    };
                    insn(code, short(t), short(f), k)
                }
            };
            out.push(ins);
        }
        out
    }
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

fn net(offset: i32) -> u32 {
    (NET + offset) as u32
}

/// Leaves a hash of the source address in A (IPv4, or the IPv6 address's four words; 0 for
/// anything else), and, with `port`, of the source port too. Ends by jumping to `done`.
fn source_hash(a: &mut Asm, port: bool, done: usize) {
    let (v4, v6, not_v4, other) = (a.label(), a.label(), a.label(), a.label());
    a.op(LD | W | ABS, AD_PROTOCOL);
    a.jmp(JMP | JEQ | K, ETH_P_IP, v4, not_v4);
    a.at(not_v4);
    a.jmp(JMP | JEQ | K, ETH_P_IPV6, v6, other);
    // Neither (cannot happen for TCP): one bucket.
    a.at(other);
    a.op(LD | IMM, 0);
    a.ja(done);
    // IPv4: the source address at +12; the port at the start of the TCP header (+ihl*4).
    a.at(v4);
    a.op(LD | W | ABS, net(12));
    a.op(ALU | MUL | K, K1);
    if port {
        a.op(ST, 0);
        a.op(LDX | B | MSH, net(0));
        a.op(LD | H | IND, net(0));
        a.op(LDX | MEM, 0);
        a.op(ALU | XOR | X, 0);
        a.op(ALU | MUL | K, K1);
    }
    a.ja(done);
    // IPv6: the source address at +8..+24; the port right after the fixed header (+40).
    a.at(v6);
    for (i, off) in [8, 12, 16, 20].into_iter().enumerate() {
        if i > 0 {
            a.op(MISC | TAX, 0);
        }
        a.op(LD | W | ABS, net(off));
        if i > 0 {
            a.op(ALU | XOR | X, 0);
        }
        a.op(ALU | MUL | K, K1);
    }
    if port {
        a.op(MISC | TAX, 0);
        a.op(LD | H | ABS, net(40));
        a.op(ALU | XOR | X, 0);
        a.op(ALU | MUL | K, K1);
    }
    a.ja(done);
}

/// The program for `table` (one slot per bucket). `rxhash`: use the kernel's flow hash in
/// [`Policy::Hash`] (false: always the in-program hash of source address and port).
pub fn program(policy: Policy, table: &[u16], rxhash: bool) -> Vec<libc::sock_filter> {
    let mut a = Asm::default();
    let finish = a.label();
    match policy {
        Policy::Sticky => source_hash(&mut a, false, finish),
        Policy::Hash => {
            if rxhash {
                let (computed, given) = (a.label(), a.label());
                a.op(LD | W | ABS, AD_RXHASH);
                a.jmp(JMP | JEQ | K, 0, computed, given);
                a.at(given);
                a.op(ALU | MUL | K, K1);
                a.ja(finish);
                a.at(computed);
            }
            source_hash(&mut a, true, finish);
        }
    }
    // Finish the hash: A ^= A >> 15; A *= K2; bucket = A >> 24.
    a.at(finish);
    a.op(MISC | TAX, 0);
    a.op(ALU | RSH | K, 15);
    a.op(ALU | XOR | X, 0);
    a.op(ALU | MUL | K, K2);
    a.op(ALU | RSH | K, 24);
    // The bucket → slot tree over runs of equal slots.
    let mut runs: Vec<(usize, u16)> = Vec::new();
    for (b, &slot) in table.iter().enumerate() {
        if runs.last().is_none_or(|&(_, s)| s != slot) {
            runs.push((b, slot));
        }
    }
    tree(&mut a, &runs);
    let out = a.finish();
    debug_assert!(out.len() <= MAX_INSNS);
    out
}

/// A balanced decision tree on A (the bucket) over `runs` (start bucket, slot).
fn tree(a: &mut Asm, runs: &[(usize, u16)]) {
    if let [(_, slot)] = runs {
        a.op(RET | K, u32::from(*slot));
        return;
    }
    let mid = runs.len() / 2;
    let (left, right) = runs.split_at(mid);
    let (far, near) = (a.label(), a.label());
    // A >= first bucket of the right half: a long jump over the left subtree (`ja` has a
    // 32-bit offset, conditional jumps only 8 bits).
    let hop = a.label();
    a.jmp(JMP | JGE | K, right[0].0 as u32, hop, near);
    a.at(hop);
    a.ja(far);
    a.at(near);
    tree(a, left);
    a.at(far);
    tree(a, right);
}

// ---------------------------------------------------------------- a model of the program

/// What the program computes for an IPv4 source address (sticky): its bucket.
pub fn sticky_bucket_v4(ip: std::net::Ipv4Addr) -> usize {
    finish_hash(u32::from(ip).wrapping_mul(K1))
}

/// What the program computes for an IPv6 source address (sticky): its bucket.
pub fn sticky_bucket_v6(ip: std::net::Ipv6Addr) -> usize {
    let o = ip.octets();
    let mut h = 0u32;
    for (i, w) in o.chunks_exact(4).enumerate() {
        let w = u32::from_be_bytes([w[0], w[1], w[2], w[3]]);
        h = if i == 0 { w } else { w ^ h }.wrapping_mul(K1);
    }
    finish_hash(h)
}

fn finish_hash(h: u32) -> usize {
    ((h ^ (h >> 15)).wrapping_mul(K2) >> 24) as usize
}

#[cfg(test)]
mod tests;
