//! Multi-buffer frames through BPF_PROG_TEST_RUN: the first buffer's length is set in
//! `xdp_md.data_end` and the kernel puts the rest in page-sized fragments (it also caps the
//! first buffer at a page less its head and tail room, as generic XDP and veth do). Every
//! output is read back whole (fragments included) and compared byte for byte.
use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::PacketHeaders;
use lb_common::{DecapStat, ENCAP_GUE, ENCAP_IPIP, FlowKey, PROTO_TCP, PROTO_UDP, Stat};
use lb_tests::{
    expect::{encapsulated, rewritten, source_port, src_of},
    routed::{FibNs, GW_MAC},
    world::{LB_MAC, SCENE, World, backend_mac, flow_key, ip, pin_to_cpu0, xdp_md_split},
};

use crate::frames::{Kind, SIZES, frame};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const CLIENT4: &str = "192.0.2.7";
const CLIENT6: &str = "2001:db8:c::7";
const VIP4: &str = "10.0.0.10";
const VIP6: &str = "2001:db8::10";
const BACKEND4: &str = "10.41.0.2";
const BACKEND6: &str = "fd00:41::2";

/// First-buffer lengths: as long as the kernel allows (a page less head and tail room: the
/// cut generic XDP and veth make), and 128 bytes (a driver that splits headers from data).
const LINEAR: [usize; 2] = [usize::MAX, 128];

fn client(kind: Kind) -> &'static str {
    if kind.v4() { CLIENT4 } else { CLIENT6 }
}

fn vip(kind: Kind) -> &'static str {
    if kind.v4() { VIP4 } else { VIP6 }
}

/// The VIP port of the world's VIPs for `kind` (TCP 80, UDP 53 in both families).
fn vport(kind: Kind) -> u16 {
    if kind.tcp() { 80 } else { 53 }
}

fn proto(kind: Kind) -> u8 {
    if kind.tcp() { PROTO_TCP } else { PROTO_UDP }
}

/// A `size`-byte frame of `kind` from the client's port `sport` to its VIP.
fn to_vip(kind: Kind, size: usize, sport: u16) -> Vec<u8> {
    frame(
        SCENE.eth(),
        kind,
        (client(kind), sport),
        (vip(kind), vport(kind)),
        size,
    )
}

/// The flow key of [`to_vip`]'s frame.
fn key_of(kind: Kind, sport: u16) -> FlowKey {
    flow_key(
        ip(client(kind)),
        sport,
        ip(vip(kind)),
        vport(kind),
        proto(kind),
    )
}

/// Points every backend at the fixture's backend host of its family with `encap`.
fn encapsulate_to_backends(world: &mut World, encap: u8) -> anyhow::Result<()> {
    for id in [1, 2, 3] {
        world.set_backend_encap(id, ip(BACKEND4), encap, src_of(ip(BACKEND4)))?;
    }
    for id in [4, 5] {
        world.set_backend_encap(id, ip(BACKEND6), encap, src_of(ip(BACKEND6)))?;
    }
    Ok(())
}

/// Every (kind, size, first buffer) combination, with a client port unique to it.
fn combinations() -> Vec<(Kind, usize, usize, u16)> {
    let mut out = Vec::new();
    for kind in Kind::ALL {
        for size in SIZES {
            for linear in LINEAR {
                let sport = 20000 + out.len() as u16;
                out.push((kind, size, linear, sport));
            }
        }
    }
    out
}

/// The fixture namespace with its main link at a jumbo MTU (room for a 9000-byte packet and
/// the outer headers) and routes back to the clients (NAT answers).
fn jumbo_fib() -> anyhow::Result<FibNs> {
    let f = FibNs::new()?;
    f.set_mtu(9100)?;
    f.ns.ip(&["route", "add", "192.0.2.0/24", "via", "10.31.0.1"])?;
    f.ns.ip(&["-6", "route", "add", "2001:db8:c::/64", "via", "fd00:31::1"])?;
    Ok(f)
}

#[test]
fn l2_frames_of_every_size_reach_their_backend_whole() -> anyhow::Result<()> {
    let f = jumbo_fib()?;
    let mut world = World::new()?;
    f.ns.run(|| -> anyhow::Result<()> {
        pin_to_cpu0()?;
        for (kind, size, linear, sport) in combinations() {
            let name = format!("{kind:?} {size} bytes, first buffer {linear}");
            let input = to_vip(kind, size, sport);
            let backend = world
                .table_backend(&key_of(kind, sport))
                .expect("a VIP with backends");
            let before = world.dp.stats.global()?.get(Stat::Forwarded);
            let (action, out) = world.run_split(&input, f.ifindex, linear)?;
            let after = world.dp.stats.global()?.get(Stat::Forwarded);
            let mut want = input.clone();
            want[0..6].copy_from_slice(&backend_mac(backend));
            want[6..12].copy_from_slice(&LB_MAC);
            assert_eq!(action, XDP_TX, "{name}");
            assert!(
                out == want,
                "{name}: output differs from the input beyond its MACs"
            );
            assert_eq!(after.packets - before.packets, 1, "{name}: forwarded");
            assert_eq!(
                after.bytes - before.bytes,
                size as u64,
                "{name}: the whole frame is counted"
            );
        }
        Ok(())
    })??;
    Ok(())
}

/// IPIP and GUE carry the whole inner packet of a multi-buffer frame (the outer header's length
/// is the whole packet's), and the backend's decap program strips them and hands the inner
/// packet on whole, its later buffers untouched.
#[test]
fn tunnels_carry_and_decap_strips_multi_buffer_frames() -> anyhow::Result<()> {
    let f = jumbo_fib()?;
    let mut world = World::new()?;
    let mut ebpf = decap_for_fixtures()?;
    f.ns.run(|| -> anyhow::Result<()> {
        pin_to_cpu0()?;
        for encap in [ENCAP_IPIP, ENCAP_GUE] {
            encapsulate_to_backends(&mut world, encap)?;
            for (kind, size, linear, sport) in combinations() {
                let name = format!("encap {encap} {kind:?} {size} bytes, first buffer {linear}");
                let input = to_vip(kind, size, sport);
                let to = ip(if kind.v4() { BACKEND4 } else { BACKEND6 });
                let (action, tunnel) = world.run_split(&input, f.ifindex, linear)?;
                assert_eq!(action, XDP_TX, "{name}");
                let want = encapsulated(&f, &input, &key_of(kind, sport), encap, to);
                assert!(tunnel == want, "{name}: output bytes differ");
                let before = decap_count(&mut ebpf, DecapStat::Decapsulated)?;
                let (action, out) = decap_run(&mut ebpf, &tunnel, f.ifindex, linear)?;
                assert_eq!(action, XDP_PASS, "{name}: decap");
                // The tunnel frame's MACs, the inner packet's Ethernet type and bytes.
                let mut want = tunnel[..12].to_vec();
                want.extend_from_slice(&input[12..]);
                assert!(out == want, "{name}: decapsulated packet differs");
                let after = decap_count(&mut ebpf, DecapStat::Decapsulated)?;
                assert_eq!(after.0 - before.0, 1, "{name}: decap counted");
                assert_eq!(
                    after.1 - before.1,
                    tunnel.len() as u64,
                    "{name}: the whole frame's bytes"
                );
            }
        }
        Ok(())
    })??;
    Ok(())
}

#[test]
fn too_big_answers_are_cut_from_a_jumbo_frame() -> anyhow::Result<()> {
    let f = jumbo_fib()?;
    let mut world = World::new()?;
    // Backends behind the fixture's 1400-byte link.
    for id in [1, 2, 3] {
        world.set_backend_encap(id, ip("10.42.0.2"), ENCAP_IPIP, src_of(ip(BACKEND4)))?;
    }
    for id in [4, 5] {
        world.set_backend_encap(id, ip("fd00:42::2"), ENCAP_IPIP, src_of(ip(BACKEND6)))?;
    }
    f.ns.run(|| -> anyhow::Result<()> {
        pin_to_cpu0()?;
        for (n, kind) in [Kind::Tcp4, Kind::Tcp6].into_iter().enumerate() {
            for linear in LINEAR {
                let name = format!("{kind:?} first buffer {linear}");
                let input = to_vip(kind, 9014, 30000 + n as u16);
                let before = world.dp.stats.global()?.get(Stat::IcmpTooBig).packets;
                let (action, out) = world.run_split(&input, f.ifindex, linear)?;
                assert_eq!(action, XDP_TX, "{name}");
                // Ethernet, IP, ICMP and the fixed quote: 64 bytes of IPv4; 128 of IPv6, or 64
                // when the first buffer is shorter than that.
                let (ip_len, quote) = match (kind.v4(), linear >= 14 + 128) {
                    (true, _) => (20, 64),
                    (false, true) => (40, 128),
                    (false, false) => (40, 64),
                };
                assert_eq!(out.len(), 14 + ip_len + 8 + quote, "{name}: reply length");
                assert_eq!(
                    &out[14 + ip_len + 8..],
                    &input[14..14 + quote],
                    "{name}: the quote is the packet's start"
                );
                let p = PacketHeaders::from_ethernet_slice(&out).expect("reply parses");
                let mtu = match p.transport {
                    Some(etherparse::TransportHeader::Icmpv4(h)) => match h.icmp_type {
                        etherparse::Icmpv4Type::DestinationUnreachable(
                            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                                next_hop_mtu,
                            },
                        ) => u32::from(next_hop_mtu),
                        other => panic!("{name}: {other:?}"),
                    },
                    Some(etherparse::TransportHeader::Icmpv6(h)) => match h.icmp_type {
                        etherparse::Icmpv6Type::PacketTooBig { mtu } => mtu,
                        other => panic!("{name}: {other:?}"),
                    },
                    other => panic!("{name}: {other:?}"),
                };
                // The 1400-byte link less the IPIP header of the backend's family.
                assert_eq!(mtu, if kind.v4() { 1380 } else { 1360 }, "{name}");
                assert_eq!(
                    world.dp.stats.global()?.get(Stat::IcmpTooBig).packets,
                    before + 1,
                    "{name}"
                );
            }
        }
        Ok(())
    })??;
    Ok(())
}

fn nat_world() -> anyhow::Result<World> {
    let mut world = World::new()?;
    for id in [1, 2, 3] {
        world.set_backend_nat(id, ip(BACKEND4), 8000 + id as u16, ip("10.31.0.2"))?;
    }
    for id in [4, 5] {
        world.set_backend_nat(id, ip(BACKEND6), 8000 + id as u16, ip("fd00:31::2"))?;
    }
    Ok(world)
}

fn dport_of(frame: &[u8]) -> u16 {
    match PacketHeaders::from_ethernet_slice(frame)
        .expect("parses")
        .transport
    {
        Some(etherparse::TransportHeader::Tcp(t)) => t.destination_port,
        Some(etherparse::TransportHeader::Udp(u)) => u.destination_port,
        other => panic!("no TCP/UDP header: {other:?}"),
    }
}

/// Full NAT both ways for multi-buffer frames: the program updates the checksums
/// incrementally from the headers alone; the expected frames have theirs computed anew over
/// the whole payload.
#[test]
fn nat_translates_multi_buffer_frames_both_ways() -> anyhow::Result<()> {
    let f = jumbo_fib()?;
    let mut world = nat_world()?;
    f.ns.run(|| -> anyhow::Result<()> {
        for (kind, size, linear, cport) in combinations() {
            let name = format!("NAT {kind:?} {size} bytes, first buffer {linear}");
            let (src, backend) = if kind.v4() {
                ("10.31.0.2", BACKEND4)
            } else {
                ("fd00:31::2", BACKEND6)
            };
            let request = to_vip(kind, size, cport);
            let (action, out) = world.run_split(&request, f.ifindex, linear)?;
            assert_eq!(action, XDP_TX, "{name}");
            let (nat_port, bport) = (source_port(&out), dport_of(&out));
            let want = rewritten(
                &request,
                (ip(src), nat_port),
                (ip(backend), bport),
                (f.mac, GW_MAC),
            );
            assert!(out == want, "{name}: request bytes differ");
            let answer = frame(SCENE.eth(), kind, (backend, bport), (src, nat_port), size);
            let (action, back) = world.run_split(&answer, f.ifindex, linear)?;
            assert_eq!(action, XDP_TX, "{name}: answer");
            let want = rewritten(
                &answer,
                (ip(vip(kind)), vport(kind)),
                (ip(client(kind)), cport),
                (f.mac, GW_MAC),
            );
            assert!(back == want, "{name}: answer bytes differ");
        }
        Ok(())
    })??;
    Ok(())
}

#[test]
fn headers_split_by_a_buffer_boundary_are_passed_not_malformed() -> anyhow::Result<()> {
    let mut world = World::new()?;
    let lo = 1;
    let mut check = |name: &str,
                     input: &[u8],
                     linear: usize,
                     want_action: u32,
                     stat: Stat|
     -> anyhow::Result<()> {
        let before = world.dp.stats.global()?.get(stat).packets;
        let (action, out) = world.run_split(input, lo, linear)?;
        assert_eq!(action, want_action, "{name}");
        if want_action == XDP_PASS {
            assert!(out == input, "{name}: passed untouched");
        }
        assert_eq!(
            world.dp.stats.global()?.get(stat).packets,
            before + 1,
            "{name}: counted as {}",
            stat.name()
        );
        Ok(())
    };
    for kind in Kind::ALL {
        let input = to_vip(kind, 9014, 31000);
        // Cut inside the IP header, and inside the L4 header.
        check(
            &format!("{kind:?} cut in IP"),
            &input,
            30,
            XDP_PASS,
            Stat::PassSplitHeaders,
        )?;
        let l4 = kind.headers() - 4;
        check(
            &format!("{kind:?} cut in L4"),
            &input,
            l4,
            XDP_PASS,
            Stat::PassSplitHeaders,
        )?;
        // Not for a VIP: passed untouched at every size.
        for size in SIZES {
            let other = frame(
                SCENE.eth(),
                kind,
                (client(kind), 31001),
                (
                    if kind.v4() {
                        "10.9.9.9"
                    } else {
                        "2001:db8:9::9"
                    },
                    80,
                ),
                size,
            );
            check(
                &format!("{kind:?} not a VIP, {size}"),
                &other,
                usize::MAX,
                XDP_PASS,
                Stat::PassNotVip,
            )?;
        }
    }
    // A multi-buffer frame whose IP length claims more than the whole frame holds is still
    // malformed.
    let mut long = frame(SCENE.eth(), Kind::Tcp4, (CLIENT4, 31002), (VIP4, 80), 4000);
    long[16..18].copy_from_slice(&4100u16.to_be_bytes());
    check(
        "IP length past the frame",
        &long,
        usize::MAX,
        XDP_DROP,
        Stat::DropMalformed,
    )?;
    let mut long6 = frame(SCENE.eth(), Kind::Udp6, (CLIENT6, 31003), (VIP6, 53), 4000);
    long6[18..20].copy_from_slice(&4100u16.to_be_bytes());
    check(
        "IPv6 payload past the frame",
        &long6,
        usize::MAX,
        XDP_DROP,
        Stat::DropMalformed,
    )?;
    Ok(())
}

/// Runs the decap program on `frame` received on `ifindex` with a first buffer of `linear`.
fn decap_run(
    ebpf: &mut aya::Ebpf,
    frame: &[u8],
    ifindex: u32,
    linear: usize,
) -> anyhow::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 64];
    let ctx = xdp_md_split(linear.min(frame.len()), ifindex);
    let res = lb_userspace::decap::program(ebpf)?.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        ..Default::default()
    })?;
    out.truncate(res.data_size_out as usize);
    Ok((res.return_value, out))
}

fn decap_count(ebpf: &mut aya::Ebpf, s: DecapStat) -> anyhow::Result<(u64, u64)> {
    let m: aya::maps::PerCpuArray<_, lb_common::Counter> = aya::maps::PerCpuArray::try_from(
        ebpf.map_mut(lb_common::DECAP_STATS_MAP).expect("stats map"),
    )?;
    let all = m.get(&(s as u32), 0)?;
    Ok((
        all.iter().map(|c| c.packets).sum(),
        all.iter().map(|c| c.bytes).sum(),
    ))
}

/// The decap program for backends 10.41.0.2 and fd00:41::2 serving both VIPs.
fn decap_for_fixtures() -> anyhow::Result<aya::Ebpf> {
    let local = [ip(BACKEND4), ip(BACKEND6)].into_iter().collect();
    let vips = [ip(VIP4), ip(VIP6)].into_iter().collect();
    let mut ebpf = lb_userspace::decap::load(6080, &local, None)?;
    lb_userspace::decap::set_vips(&mut ebpf, &vips)?;
    Ok(ebpf)
}

/// A tunnel packet whose headers the first buffer cuts is passed untouched by the decap
/// program, under its own reason.
#[test]
fn decap_passes_split_tunnel_headers() -> anyhow::Result<()> {
    let f = jumbo_fib()?;
    let mut world = World::new()?;
    let mut ebpf = decap_for_fixtures()?;
    encapsulate_to_backends(&mut world, ENCAP_GUE)?;
    f.ns.run(|| -> anyhow::Result<()> {
        let input = to_vip(Kind::Tcp4, 9014, 32000);
        let (_, tunnel) = world.run_split(&input, f.ifindex, usize::MAX)?;
        let before = decap_count(&mut ebpf, DecapStat::PassSplitHeaders)?;
        // Cut inside the GUE payload's inner IP header.
        let (action, out) = decap_run(&mut ebpf, &tunnel, f.ifindex, 14 + 20 + 8 + 10)?;
        assert_eq!(action, XDP_PASS);
        assert!(out == tunnel, "split tunnel packet passed untouched");
        let after = decap_count(&mut ebpf, DecapStat::PassSplitHeaders)?;
        assert_eq!(after.0 - before.0, 1, "counted as split headers");
        Ok(())
    })??;
    Ok(())
}
