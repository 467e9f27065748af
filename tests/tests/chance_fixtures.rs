//! Second-chance fixtures through the real programs (BPF_PROG_TEST_RUN), inside a namespace
//! whose FIB gives known next hops and which holds real sockets for the backend side:
//! - the load balancer writes the slot's previous backends (one to three) into a GUE
//!   variant-0 header (exact bytes, IPv4 and IPv6), and plain variant 1 for slots without one;
//! - the decap program keeps a SYN, a packet of an established socket, a syncookie ACK and a
//!   connected UDP socket's datagram, forwards an unknown flow's packet to the next hop (exact
//!   bytes: destination, TTL, checksum, `next`), and keeps it when no hop is left.
use std::{
    collections::BTreeMap,
    io::Read as _,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::Ipv4Header;
use lb_common::{
    DecapStat as D, ENCAP_GUE, FlowKey, PROTO_TCP, Stat, flow_entropy, gue_source_port, slot_of,
};
use lb_tests::{
    chance::{CLIENT4, CLIENT6, VIP4, VIP6, gue_hop, gue_hops, outer, sockets},
    frames::{v4, v6},
    routed::{FibNs, GW_MAC},
    world::{RING, SCENE, SEED, World, flow_key, ip, xdp_md},
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_REDIRECT: u32 = 7;

const LB4: &str = "10.31.0.2";
const LB6: &str = "fd00:31::2";

fn tcp4(src: &str, sport: u16, flags: &str, payload: &[u8]) -> Vec<u8> {
    SCENE.tcp4((v4(src), sport), (v4(VIP4), 80), flags, payload)
}

fn tcp6(sport: u16, syn: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let b = SCENE
        .eth()
        .ipv6(v6(CLIENT6), v6(VIP6), 64)
        .tcp(sport, 80, 1000, 64000);
    if syn { b.syn() } else { b.ack(1) }
        .write(&mut out, b"")
        .expect("build");
    out
}

/// For each number of previous backends a slot of VIP `vip_index` carries (0 to
/// `PREVIOUS_HOPS`), a client port whose flow lands in such a slot, where there is one.
fn flows(world: &World, vip_index: usize, v6: bool) -> BTreeMap<usize, u16> {
    let v = &world.vips[vip_index];
    let mut found = BTreeMap::new();
    for sport in 30000..40000u16 {
        let key = if v6 {
            flow_key(ip(CLIENT6), sport, ip(VIP6), 80, PROTO_TCP)
        } else {
            flow_key(ip(CLIENT4), sport, ip(VIP4), 80, PROTO_TCP)
        };
        let slot = slot_of(&key, SEED, false, RING).expect("slot") as usize;
        let hops = v
            .previous
            .get(slot)
            .map_or(0, |p| p.iter().filter(|id| **id != 0).count());
        found.entry(hops).or_insert(sport);
    }
    found
}

#[test]
fn load_balancer_carries_the_previous_backends_in_gue_private_data() -> anyhow::Result<()> {
    let f = FibNs::new()?;
    let mut world = World::new()?;
    let addrs4 = ["10.41.0.2", "10.41.0.3", "10.41.0.4"];
    let addrs6 = ["fd00:41::2", "fd00:41::3", "fd00:41::4", "fd00:41::5"];
    for (i, a) in addrs4.iter().enumerate() {
        world.set_backend_encap(i as u32 + 1, ip(a), ENCAP_GUE, ip(LB4))?;
    }
    for (i, a) in addrs6.iter().enumerate() {
        world.set_backend_encap(i as u32 + 4, ip(a), ENCAP_GUE, ip(LB6))?;
    }
    // IPv4: backend 3 leaves, then 2: slots 3 -> 2 -> 1 carry 2 and 3, slots that moved once
    // one backend, slots of 1 none. IPv6: 4 and 5 hand every slot to 6, 6 to 7, 7 to 4: a
    // slot that was 5's carries 7, 6 and 5; one that was 4's, 7 and 6 (4 owns it again).
    world.move_with_previous(0, &[1, 2])?;
    world.move_with_previous(0, &[1])?;
    for set in [[6], [7], [4]] {
        world.move_with_previous(4, &set)?;
    }
    f.ns.run(|| -> anyhow::Result<()> {
        for v6 in [false, true] {
            let index = if v6 { 4 } else { 0 };
            let found = flows(&world, index, v6);
            let counts: Vec<usize> = found.keys().copied().collect();
            assert_eq!(counts, if v6 { vec![2, 3] } else { vec![0, 1, 2] });
            for (hops, sport) in found {
                let (frame, key): (Vec<u8>, FlowKey) = if v6 {
                    let k = flow_key(ip(CLIENT6), sport, ip(VIP6), 80, PROTO_TCP);
                    (tcp6(sport, false), k)
                } else {
                    let k = flow_key(ip(CLIENT4), sport, ip(VIP4), 80, PROTO_TCP);
                    (tcp4(CLIENT4, sport, "A", b"payload"), k)
                };
                let slot = slot_of(&key, SEED, false, RING).expect("slot") as usize;
                let v = &world.vips[index];
                let backend = |id: u32| {
                    if v6 {
                        ip(addrs6[id as usize - 4])
                    } else {
                        ip(addrs4[id as usize - 1])
                    }
                };
                let to = backend(v.table[slot]);
                let carried: Vec<IpAddr> = v
                    .previous
                    .get(slot)
                    .into_iter()
                    .flatten()
                    .filter(|id| **id != 0)
                    .map(|id| backend(*id))
                    .collect();
                let gue = if hops == 0 {
                    Vec::new()
                } else {
                    gue_hops(!v6, &carried, 0)
                };
                let src = ip(if v6 { LB6 } else { LB4 });
                // Twice: a slot in its window is never remembered, so both packets carry it.
                for pass in 0..2 {
                    let (action, out) = world.run_on(&frame, f.ifindex)?;
                    assert_eq!(action, XDP_TX, "v6 {v6} hops {hops} pass {pass}");
                    let want = outer(
                        GW_MAC,
                        f.mac,
                        (src, to),
                        gue_source_port(&key),
                        flow_entropy(&key),
                        &gue,
                        &frame[14..],
                    );
                    assert_eq!(out, want, "v6 {v6} hops {hops} pass {pass}: bytes");
                }
            }
        }
        Ok(())
    })??;
    assert!(world.dp.stats.global()?.get(Stat::Forwarded).packets >= 10);
    Ok(())
}

/// Runs the decap program (`tc`: its tc variant) on `frame` received on `ifindex`.
fn decap_run(
    ebpf: &mut aya::Ebpf,
    frame: &[u8],
    tc: bool,
    ifindex: u32,
) -> anyhow::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 64];
    let res = if tc {
        // A `struct __sk_buff` naming the receiving device (`ifindex`, at byte 40).
        let mut skb = [0u8; 44];
        skb[40..].copy_from_slice(&ifindex.to_ne_bytes());
        lb_userspace::decap::tc_program(ebpf)?.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&skb),
            ..Default::default()
        })?
    } else {
        let ctx = xdp_md(frame.len(), ifindex);
        lb_userspace::decap::program(ebpf)?.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })?
    };
    out.truncate(res.data_size_out as usize);
    let action = match (tc, res.return_value) {
        (true, 0) => XDP_PASS,
        (true, 7) => TC_ACT_REDIRECT,
        (true, other) => 100 + other,
        (false, a) => a,
    };
    Ok((action, out))
}

fn decap_count(ebpf: &mut aya::Ebpf, s: D) -> anyhow::Result<u64> {
    let m: aya::maps::PerCpuArray<_, lb_common::Counter> = aya::maps::PerCpuArray::try_from(
        ebpf.map_mut(lb_common::DECAP_STATS_MAP).expect("stats map"),
    )?;
    Ok(m.get(&(s as u32), 0)?.iter().map(|c| c.packets).sum())
}

fn udp4(sport: u16, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    SCENE
        .eth()
        .ipv4(v4(CLIENT4), v4(VIP4), 64)
        .udp(sport, dport)
        .write(&mut out, b"q")
        .expect("build");
    out
}

#[test]
fn backend_keeps_what_it_owns_and_forwards_the_rest() -> anyhow::Result<()> {
    let f = FibNs::new()?;
    let socks = sockets(&f.ns)?;
    let local = [ip("10.41.0.2"), ip("fd00:41::2")].into_iter().collect();
    let vips = [ip(VIP4), ip(VIP6)].into_iter().collect();
    let mut ebpf = lb_userspace::decap::load(6080, &local, None)?;
    lb_userspace::decap::set_vips(&mut ebpf, &vips)?;
    let lb4 = (ip("10.31.0.9"), ip("10.41.0.2"));
    let lb6 = (ip("fd00:31::9"), ip("fd00:41::2"));
    let hop4 = ip("10.41.0.3");
    let hop6 = ip("fd00:41::3");
    let rx_mac = [0x02, 0, 0, 0, 0x0a, 0x01];
    let wrap = |inner: &[u8], next: u8| -> Vec<u8> {
        let v4_inner = inner[14] >> 4 == 4;
        let (pair, hop) = if v4_inner { (lb4, hop4) } else { (lb6, hop6) };
        outer(
            f.mac,
            rx_mac,
            pair,
            50000,
            7,
            &gue_hop(v4_inner, hop, next),
            &inner[14..],
        )
    };
    let kept = |frame: &[u8], inner: &[u8]| -> Vec<u8> {
        let mut want = frame[..12].to_vec();
        want.extend_from_slice(&inner[12..]);
        want
    };
    let cases: Vec<(&str, Vec<u8>, D)> = vec![
        ("v4 SYN", tcp4(CLIENT4, 40001, "S", b""), D::KeptSyn),
        ("v6 SYN", tcp6(40002, true), D::KeptSyn),
        (
            "v4 established",
            tcp4(CLIENT4, socks.est4, "A", b"x"),
            D::KeptSocket,
        ),
        ("v6 established", tcp6(socks.est6, false), D::KeptSocket),
        (
            "connected UDP",
            udp4(socks.udp_connected_to, 53),
            D::KeptSocket,
        ),
    ];
    f.ns.run(|| -> anyhow::Result<()> {
        for tc in [false, true] {
            for (name, inner, stat) in &cases {
                let frame = wrap(inner, 0);
                let before = decap_count(&mut ebpf, *stat)?;
                let (action, out) = decap_run(&mut ebpf, &frame, tc, f.ifindex)?;
                assert_eq!(action, XDP_PASS, "{name} (tc {tc})");
                assert_eq!(out, kept(&frame, inner), "{name} (tc {tc}): decapsulated");
                assert_eq!(decap_count(&mut ebpf, *stat)?, before + 1, "{name}");
            }
            // No hop left: kept whatever it is.
            let inner = tcp4(CLIENT4, 40003, "A", b"x");
            let frame = wrap(&inner, 1);
            let (action, out) = decap_run(&mut ebpf, &frame, tc, f.ifindex)?;
            assert_eq!((action, out), (XDP_PASS, kept(&frame, &inner)), "last hop");
            // Unknown flows (TCP ACK with no socket, UDP to an unconnected socket): sent on
            // to the next hop, rewritten in place.
            for (name, inner) in [
                ("v4 unknown ACK", tcp4(CLIENT4, 40004, "A", b"x")),
                ("v6 unknown ACK", tcp6(40005, false)),
                ("UDP, unconnected socket", udp4(5354, 54)),
            ] {
                let frame = wrap(&inner, 0);
                let before = decap_count(&mut ebpf, D::Forwarded)?;
                let (action, out) = decap_run(&mut ebpf, &frame, tc, f.ifindex)?;
                let v4_inner = inner[14] >> 4 == 4;
                let mut want = if v4_inner {
                    let mut w = outer(
                        GW_MAC,
                        f.mac,
                        (lb4.0, hop4),
                        50000,
                        7,
                        &gue_hop(true, hop4, 1),
                        &inner[14..],
                    );
                    w[22] = 63; // TTL
                    let h = Ipv4Header::from_slice(&w[14..])?.0;
                    w[24..26].copy_from_slice(&h.calc_header_checksum().to_be_bytes());
                    w
                } else {
                    let mut w = outer(
                        GW_MAC,
                        f.mac,
                        (lb6.0, hop6),
                        50000,
                        7,
                        &gue_hop(false, hop6, 1),
                        &inner[14..],
                    );
                    w[21] = 63; // hop limit
                    w
                };
                if tc {
                    // tc leaves the MACs to `bpf_redirect_neigh`.
                    want[..12].copy_from_slice(&frame[..12]);
                    assert_eq!(action, TC_ACT_REDIRECT, "{name} (tc)");
                } else {
                    assert_eq!(action, XDP_TX, "{name}");
                }
                assert_eq!(out, want, "{name} (tc {tc}): forwarded bytes");
                assert_eq!(decap_count(&mut ebpf, D::Forwarded)?, before + 1, "{name}");
            }
            // Three hops, this host the first of them: on to the second, `next` 2, whether
            // the packet comes as the first hop (`next` 1) or the load balancer sent it to this
            // host first (`next` 0: the first hop is this host again, skipped). A list whose
            // only hop left is this host: kept.
            for v4_inner in [true, false] {
                let (inner, pair, hops) = if v4_inner {
                    let h = [ip("10.41.0.2"), ip("10.41.0.3"), ip("10.41.0.4")];
                    (tcp4(CLIENT4, 40006, "A", b"x"), lb4, h)
                } else {
                    let h = [ip("fd00:41::2"), ip("fd00:41::3"), ip("fd00:41::4")];
                    (tcp6(40007, false), lb6, h)
                };
                let at = |dst: IpAddr, next: u8| {
                    outer(
                        f.mac,
                        rx_mac,
                        (pair.0, dst),
                        50000,
                        7,
                        &gue_hops(v4_inner, &hops, next),
                        &inner[14..],
                    )
                };
                let mut want = at(hops[1], 2);
                want[..12].copy_from_slice(&[GW_MAC, f.mac].concat());
                if v4_inner {
                    want[22] = 63;
                    let h = Ipv4Header::from_slice(&want[14..])?.0;
                    want[24..26].copy_from_slice(&h.calc_header_checksum().to_be_bytes());
                } else {
                    want[21] = 63;
                }
                for next in [1, 0] {
                    let frame = at(hops[0], next);
                    let (action, out) = decap_run(&mut ebpf, &frame, tc, f.ifindex)?;
                    let mut want = want.clone();
                    if tc {
                        want[..12].copy_from_slice(&frame[..12]);
                    }
                    let sent = if tc { TC_ACT_REDIRECT } else { XDP_TX };
                    let name = format!("three hops from {next}, v4 {v4_inner} (tc {tc})");
                    assert_eq!(action, sent, "{name}");
                    assert_eq!(out, want, "{name}: bytes");
                }
                let only_us = outer(
                    f.mac,
                    rx_mac,
                    (pair.0, hops[0]),
                    50000,
                    7,
                    &gue_hops(v4_inner, &hops[..1], 0),
                    &inner[14..],
                );
                let before = decap_count(&mut ebpf, D::KeptLastHop)?;
                let (action, out) = decap_run(&mut ebpf, &only_us, tc, f.ifindex)?;
                assert_eq!((action, out), (XDP_PASS, kept(&only_us, &inner)), "only us");
                assert_eq!(decap_count(&mut ebpf, D::KeptLastHop)?, before + 1);
            }
        }
        Ok(())
    })??;
    Ok(())
}

/// An ACK completing a handshake the listener answered with a syncookie has no socket yet:
/// `bpf_tcp_check_syncookie` recognises it, so the backend keeps it. The cookie is real: a
/// SYN is sent from a raw socket to a listener with `tcp_syncookies=2` and the SYN-ACK read.
#[test]
fn a_syncookie_ack_is_kept() -> anyhow::Result<()> {
    let f = FibNs::new()?;
    let _socks = sockets(&f.ns)?;
    f.ns.sysctl("net.ipv4.tcp_syncookies", "2")?;
    let local = [ip("10.41.0.2")].into_iter().collect();
    let vips = [ip(VIP4)].into_iter().collect();
    let mut ebpf = lb_userspace::decap::load(6080, &local, None)?;
    lb_userspace::decap::set_vips(&mut ebpf, &vips)?;
    let sport = 40100u16;
    let isn = 1000u32;
    let cookie = f.ns.run(|| syn_ack_seq(sport, isn))??;
    // The ACK: seq isn+1, ack cookie+1.
    let mut ack = Vec::new();
    SCENE
        .eth()
        .ipv4(v4(CLIENT4), v4(VIP4), 64)
        .tcp(sport, 80, isn + 1, 64000)
        .ack(cookie.wrapping_add(1))
        .write(&mut ack, b"")
        .expect("build");
    let frame = outer(
        f.mac,
        [2, 0, 0, 0, 0x0a, 1],
        (ip("10.31.0.9"), ip("10.41.0.2")),
        50000,
        7,
        &gue_hop(true, ip("10.41.0.3"), 0),
        &ack[14..],
    );
    f.ns.run(|| -> anyhow::Result<()> {
        for tc in [false, true] {
            let before = decap_count(&mut ebpf, D::KeptSyncookie)?;
            let (action, _) = decap_run(&mut ebpf, &frame, tc, f.ifindex)?;
            assert_eq!(action, XDP_PASS, "tc {tc}");
            assert_eq!(
                decap_count(&mut ebpf, D::KeptSyncookie)?,
                before + 1,
                "tc {tc}"
            );
        }
        // A wrong cookie is not ours: forwarded.
        let mut bad = frame.clone();
        let n = bad.len();
        // The ACK number sits 8 bytes into the inner TCP header (20-byte inner IPv4 header
        // at the end of the frame's headers).
        let ack_at = n - 20 + 8;
        bad[ack_at] ^= 0x55;
        let before = decap_count(&mut ebpf, D::Forwarded)?;
        let (action, _) = decap_run(&mut ebpf, &bad, false, f.ifindex)?;
        assert_eq!(action, XDP_TX);
        assert_eq!(decap_count(&mut ebpf, D::Forwarded)?, before + 1);
        Ok(())
    })??;
    Ok(())
}

/// Sends a SYN from CLIENT4:`sport` (sequence `isn`) to VIP4:80 through a raw socket and
/// returns the SYN-ACK's sequence number (the cookie).
fn syn_ack_seq(sport: u16, isn: u32) -> anyhow::Result<u32> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::TCP),
    )?;
    s.bind(&SocketAddr::new(ip(CLIENT4), 0).into())?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let tcp = etherparse::TcpHeader {
        source_port: sport,
        destination_port: 80,
        sequence_number: isn,
        syn: true,
        window_size: 64000,
        ..Default::default()
    };
    let mut tcp = tcp;
    tcp.checksum = tcp.calc_checksum_ipv4_raw(v4(CLIENT4), v4(VIP4), &[])?;
    let bytes = tcp.to_bytes();
    s.send_to(&bytes, &SocketAddr::new(ip(VIP4), 0).into())?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut raw = s;
    while Instant::now() < deadline {
        let mut buf = [0u8; 1500];
        let n = match raw.read(&mut buf) {
            Ok(n) => n,
            Err(_) => continue,
        };
        let Ok((ip4, rest)) = Ipv4Header::from_slice(&buf[..n]) else {
            continue;
        };
        if ip4.source != v4(VIP4) || ip4.destination != v4(CLIENT4) {
            continue;
        }
        let Ok((t, _)) = etherparse::TcpHeader::from_slice(rest) else {
            continue;
        };
        if t.destination_port == sport && t.syn && t.ack {
            return Ok(t.sequence_number);
        }
    }
    anyhow::bail!("no SYN-ACK from the listener")
}
