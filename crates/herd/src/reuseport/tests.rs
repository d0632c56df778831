//! The programs run in the kernel here: groups on loopback, clients from chosen source
//! addresses (127.0.0.2..9, bound before connect), and the slot that accepted each one.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;

use socket2::{Domain, Socket, Type};

use super::*;

const LOCAL: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

fn group(policy: Policy, slots: usize) -> Group {
    Group::bind(policy, LOCAL, None, slots, 128).expect("bind a reuseport group on loopback")
}

/// A connected client from `src` (any port).
fn connect_from(src: IpAddr, to: SocketAddr) -> Socket {
    let s = Socket::new(Domain::for_address(to), Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::new(src, 0).into())
        .expect("bind source");
    s.connect(&to.into()).expect("connect");
    s
}

/// The slot whose socket has the next connection (waits up to 5 s), accepting it.
fn landed(g: &Group) -> usize {
    let mut fds: Vec<libc::pollfd> = (0..g.len())
        .map(|i| libc::pollfd {
            fd: g.socket(i).expect("slot").as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: fds is a valid array of pollfd for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 5000) };
    assert!(n > 0, "no slot got the connection within 5 s");
    let slot = fds
        .iter()
        .position(|p| p.revents & libc::POLLIN != 0)
        .expect("a readable slot");
    rustix::net::accept(g.socket(slot).expect("slot")).expect("accept");
    slot
}

/// Slots with nothing queued.
fn assert_empty(g: &Group, slot: usize) {
    let r = rustix::net::accept(g.socket(slot).expect("slot"));
    assert!(
        matches!(r, Err(e) if e == rustix::io::Errno::AGAIN),
        "slot {slot} had a connection queued"
    );
}

fn client(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))
}

#[test]
fn the_programs_return_value_is_the_slot() {
    // The kernel indexes the group in listen() order; herd relies on index == slot.
    let g = group(Policy::Hash, 4);
    for slot in 0..4u32 {
        attach(g.socket(3).expect("slot"), &[insn(RET | K, 0, 0, slot)]).expect("attach");
        let _c = connect_from(client(1), g.local_addr());
        assert_eq!(landed(&g), slot as usize);
    }
}

#[test]
fn sticky_keeps_each_address_on_its_slot_as_the_model_says() {
    let g = group(Policy::Sticky, 4);
    let table = table(Policy::Sticky, &[0, 1, 2, 3]);
    let mut used = BTreeSet::new();
    for i in 2..=9 {
        let expect = table[sticky_bucket_v4(Ipv4Addr::new(127, 0, 0, i))] as usize;
        for _ in 0..3 {
            let _c = connect_from(client(i), g.local_addr());
            assert_eq!(landed(&g), expect, "127.0.0.{i}");
        }
        assert_eq!(g.sticky_slot(client(i)), Some(expect));
        used.insert(expect);
    }
    assert!(
        used.len() >= 3,
        "8 addresses over 4 slots used only {used:?}"
    );
}

#[test]
fn sticky_over_ipv6() {
    let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0);
    let Ok(mut g) = Group::bind(Policy::Sticky, addr, Some(true), 3, 128) else {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    };
    let bucket = sticky_bucket_v6(Ipv6Addr::LOCALHOST);
    for live in [vec![0, 1, 2], vec![0, 2], vec![1]] {
        g.route(&live).expect("route");
        let expect = table(Policy::Sticky, &live)[bucket] as usize;
        for _ in 0..3 {
            let _c = connect_from(IpAddr::V6(Ipv6Addr::LOCALHOST), g.local_addr());
            assert_eq!(landed(&g), expect, "live {live:?}");
        }
    }
}

#[test]
fn sticky_skips_a_slot_that_is_not_live_and_moves_only_its_clients() {
    let mut g = group(Policy::Sticky, 3);
    let before: Vec<usize> = (2..=9)
        .map(|i| {
            let _c = connect_from(client(i), g.local_addr());
            landed(&g)
        })
        .collect();
    let gone = before[0];
    let live: Vec<usize> = (0..3).filter(|&s| s != gone).collect();
    assert!(g.route(&live).expect("route"));
    for (i, &was) in (2..=9).zip(&before) {
        let _c = connect_from(client(i), g.local_addr());
        let now = landed(&g);
        assert_ne!(now, gone, "127.0.0.{i} reached the slot that is not live");
        if was != gone {
            assert_eq!(now, was, "127.0.0.{i} moved though its slot is live");
        }
    }
    assert_empty(&g, gone);
}

#[test]
fn hash_spreads_connections_over_the_live_slots_only() {
    let mut g = group(Policy::Hash, 3);
    g.route(&[0, 2]).expect("route");
    let mut counts = [0usize; 3];
    for _ in 0..200 {
        let _c = connect_from(client(1), g.local_addr());
        counts[landed(&g)] += 1;
    }
    assert_eq!(counts[1], 0, "{counts:?}");
    assert!(counts[0] >= 60 && counts[2] >= 60, "{counts:?}");
    assert_empty(&g, 1);
}

#[test]
fn hash_without_the_kernels_flow_hash_uses_address_and_port() {
    let g = group(Policy::Hash, 2);
    let program = program(Policy::Hash, &table(Policy::Hash, &[0, 1]), false);
    attach(g.socket(0).expect("slot"), &program).expect("attach");
    let mut counts = [0usize; 2];
    for _ in 0..100 {
        let _c = connect_from(client(1), g.local_addr());
        counts[landed(&g)] += 1;
    }
    assert!(counts[0] >= 25 && counts[1] >= 25, "{counts:?}");
}

#[test]
fn a_group_grows_and_keeps_its_order() {
    let mut g = group(Policy::Hash, 1);
    g.grow(3).expect("grow");
    assert_eq!(g.len(), 3);
    g.route(&[2]).expect("route");
    for _ in 0..5 {
        let _c = connect_from(client(1), g.local_addr());
        assert_eq!(landed(&g), 2);
    }
    // An empty live set keeps the last program.
    assert!(!g.route(&[]).expect("route"));
    assert_eq!(g.live(), &[2]);
}

#[test]
fn rendezvous_moves_only_the_changed_slots_buckets() {
    let all: Vec<usize> = (0..6).collect();
    let full = table(Policy::Sticky, &all);
    for gone in 0..6 {
        let live: Vec<usize> = all.iter().copied().filter(|&s| s != gone).collect();
        let less = table(Policy::Sticky, &live);
        for b in 0..BUCKETS {
            if full[b] as usize != gone {
                assert_eq!(less[b], full[b], "bucket {b} moved when slot {gone} left");
            } else {
                assert_ne!(less[b] as usize, gone);
            }
        }
    }
    // Adding a slot takes buckets only for itself.
    let seven: Vec<usize> = (0..7).collect();
    let more = table(Policy::Sticky, &seven);
    for b in 0..BUCKETS {
        assert!(more[b] == full[b] || more[b] == 6, "bucket {b}");
    }
}

#[test]
fn tables_are_fair_and_programs_fit() {
    for n in 1..=64usize {
        let live: Vec<usize> = (0..n).map(|i| i * 2).collect();
        for policy in [Policy::Hash, Policy::Sticky] {
            let t = table(policy, &live);
            let mut counts = vec![0usize; 2 * n];
            for &s in &t {
                counts[s as usize] += 1;
            }
            for (slot, &c) in counts.iter().enumerate() {
                if slot % 2 == 1 {
                    assert_eq!(c, 0, "{policy:?} gave buckets to slot {slot}, not live");
                } else if policy == Policy::Hash {
                    let even = BUCKETS / n;
                    assert!(c == even || c == even + 1, "{policy:?} n={n}: {c}");
                } else if n <= 4 {
                    let even = BUCKETS / n;
                    assert!(
                        c * 10 >= even * 7 && c * 10 <= even * 13,
                        "sticky n={n}: {counts:?}"
                    );
                }
            }
            assert!(program(policy, &t, true).len() <= MAX_INSNS);
        }
    }
}

#[test]
fn eight_loopback_clients_cover_two_slots() {
    let t = table(Policy::Sticky, &[0, 1]);
    let mut counts = [0usize; 2];
    for i in 2..=9 {
        counts[t[sticky_bucket_v4(Ipv4Addr::new(127, 0, 0, i))] as usize] += 1;
    }
    eprintln!("127.0.0.2..9 over 2 slots: {counts:?}");
    assert!(counts[0] >= 2 && counts[1] >= 2, "{counts:?}");
}
