//! Encapsulation fixtures through the real program (BPF_PROG_TEST_RUN), run inside a namespace
//! whose FIB gives known next hops: every mode and family combination with its exact output
//! frame (outer headers built independently with etherparse, checksums included), the "too
//! big" answers, and the FIB's failure cases.
use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::{
    Icmpv4Type, Icmpv6Type, IpNumber, Ipv4Header, NetHeaders, PacketHeaders, TransportHeader,
    icmpv4::DestUnreachableHeader,
};
use lb_common::{ENCAP_GUE, ENCAP_IPIP, FlowEvent, PROTO_TCP, Stat};
use lb_tests::{
    expect::{encapsulated, src_of},
    frames::{v4, v6},
    routed::FibNs,
    world::{LB_MAC, ROUTER_MAC, SCENE, World, flow_key, ip},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const CLIENT4: &str = "192.0.2.7";
const CLIENT6: &str = "2001:db8:c::7";
const VIP4: &str = "10.0.0.10";
const VIP6: &str = "2001:db8::10";

/// Points every backend of VIP4 (ids 1-3) and VIP6 (ids 4-5) at `to` with `encap`.
fn all_to(world: &mut World, encap: u8, to4: &str, to6: &str) -> anyhow::Result<()> {
    for id in [1, 2, 3] {
        world.set_backend_encap(id, ip(to4), encap, src_of(ip(to4)))?;
    }
    for id in [4, 5] {
        world.set_backend_encap(id, ip(to6), encap, src_of(ip(to6)))?;
    }
    Ok(())
}

fn tcp4(sport: u16, payload: &[u8]) -> Vec<u8> {
    SCENE.tcp4((v4(CLIENT4), sport), (v4(VIP4), 80), "A", payload)
}

fn tcp6(sport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    SCENE
        .eth()
        .ipv6(v6(CLIENT6), v6(VIP6), 64)
        .tcp(sport, 80, 1000, 64000)
        .ack(1)
        .write(&mut out, payload)
        .expect("build");
    out
}

#[test]
fn every_mode_and_family_has_exact_output_bytes() -> anyhow::Result<()> {
    let f = FibNs::new()?;
    let mut world = World::new()?;
    let cases: [(&str, u8, bool, &str, &str); 6] = [
        ("ipip v4 in v4", ENCAP_IPIP, true, "10.41.0.2", "fd00:41::2"),
        ("gue v4 in v4", ENCAP_GUE, true, "10.41.0.2", "fd00:41::2"),
        (
            "ipip v6 in v6",
            ENCAP_IPIP,
            false,
            "10.41.0.2",
            "fd00:41::2",
        ),
        ("gue v6 in v6", ENCAP_GUE, false, "10.41.0.2", "fd00:41::2"),
        // Mixed: the backend's family decides the outer header.
        ("ipip v4 in v6", ENCAP_IPIP, true, "fd00:41::2", "10.41.0.2"),
        ("gue v6 in v4", ENCAP_GUE, false, "fd00:41::2", "10.41.0.2"),
    ];
    f.ns.run(|| -> anyhow::Result<()> {
        // The flow cache is per CPU: every run on CPU 0.
        lb_tests::world::pin_to_cpu0()?;
        for (n, (name, encap, inner_v4, to4, to6)) in cases.into_iter().enumerate() {
            all_to(&mut world, encap, to4, to6)?;
            let sport = 41000 + n as u16;
            let (frame, key, backend) = if inner_v4 {
                let k = flow_key(ip(CLIENT4), sport, ip(VIP4), 80, PROTO_TCP);
                (tcp4(sport, b"payload"), k, ip(to4))
            } else {
                let k = flow_key(ip(CLIENT6), sport, ip(VIP6), 80, PROTO_TCP);
                (tcp6(sport, b"payload"), k, ip(to6))
            };
            // Three times: a flow's first packet goes on probation, its second makes it
            // established, and its third is served from this CPU's flow cache (for IPv4 by
            // the express lane); the bytes are the same each time.
            let hits = world.dp.stats.global()?.flow(FlowEvent::Hit);
            let mut out = Vec::new();
            for pass in 0..3 {
                let before = world.dp.stats.global()?.get(Stat::Forwarded).packets;
                let (action, o) = world.run_on(&frame, f.ifindex)?;
                assert_eq!(action, XDP_TX, "{name}, pass {pass}");
                let want = encapsulated(&f, &frame, &key, encap, backend);
                assert_eq!(o, want, "{name}, pass {pass}: output bytes");
                assert_eq!(
                    world.dp.stats.global()?.get(Stat::Forwarded).packets,
                    before + 1,
                    "{name}"
                );
                out = o;
            }
            assert_eq!(
                world.dp.stats.global()?.flow(FlowEvent::Hit) - hits,
                1,
                "{name}: the third packet is a cache hit"
            );
            // An independent parse agrees: outer checksum valid, inner packet untouched.
            let p = PacketHeaders::from_ethernet_slice(&out).expect("parses");
            if let Some(NetHeaders::Ipv4(h, _)) = &p.net {
                assert_eq!(h.header_checksum, h.calc_header_checksum(), "{name}");
            }
            if encap == ENCAP_GUE {
                let Some(TransportHeader::Udp(u)) = &p.transport else {
                    panic!("{name}: no UDP header")
                };
                assert!(u.source_port >= 49152, "{name}: GUE source port");
            }
        }
        Ok(())
    })??;
    Ok(())
}

/// A 1450-byte TCP segment client -> VIP4 (DF as given).
fn big4(sport: u16, df: bool) -> Vec<u8> {
    let mut h = Ipv4Header::new(0, 64, IpNumber::TCP, v4(CLIENT4), v4(VIP4)).expect("header");
    h.dont_fragment = df;
    let mut out = Vec::new();
    SCENE
        .eth()
        .ip(etherparse::IpHeaders::Ipv4(h, Default::default()))
        .tcp(sport, 80, 1000, 64000)
        .ack(1)
        .write(&mut out, &[b'b'; 1410])
        .expect("build");
    out
}

#[test]
fn too_big_answers_and_fib_failures() -> anyhow::Result<()> {
    let f = FibNs::new()?;
    let mut world = World::new()?;
    f.ns.run(|| -> anyhow::Result<()> {
        let count = |w: &World, s: Stat| w.dp.stats.global().map(|g| g.get(s).packets);
        // IPv4 + IPIP over a 1400-byte route: "fragmentation needed", MTU 1380, quoting the
        // first 64 bytes of the original packet, back to where it came from.
        all_to(&mut world, ENCAP_IPIP, "10.42.0.2", "fd00:42::2")?;
        let frame = big4(42000, true);
        let before = count(&world, Stat::IcmpTooBig)?;
        let (action, out) = world.run_on(&frame, f.ifindex)?;
        assert_eq!(action, XDP_TX);
        let mut ip = Ipv4Header::new(0, 64, IpNumber::ICMP, v4(VIP4), v4(CLIENT4))?;
        ip.dont_fragment = false;
        let mut want = Vec::new();
        etherparse::PacketBuilder::ethernet2(LB_MAC, ROUTER_MAC)
            .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1380 },
            ))
            .write(&mut want, &frame[14..14 + 64])?;
        assert_eq!(out, want, "ICMP fragmentation needed");
        assert_eq!(count(&world, Stat::IcmpTooBig)?, before + 1);
        // Without DF it cannot be answered (nor fragmented): dropped, counted.
        let before = count(&world, Stat::DropTooBig)?;
        let (action, _) = world.run_on(&big4(42001, false), f.ifindex)?;
        assert_eq!(action, XDP_DROP);
        assert_eq!(count(&world, Stat::DropTooBig)?, before + 1);

        // IPv6 + GUE (48 bytes) over the same route: "packet too big", MTU 1352.
        all_to(&mut world, ENCAP_GUE, "10.42.0.2", "fd00:42::2")?;
        let frame = tcp6(42002, &[b'b'; 1400]);
        let (action, out) = world.run_on(&frame, f.ifindex)?;
        assert_eq!(action, XDP_TX);
        let mut want = Vec::new();
        etherparse::PacketBuilder::ethernet2(LB_MAC, ROUTER_MAC)
            .ipv6(v6(VIP6), v6(CLIENT6), 64)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1352 })
            .write(&mut want, &frame[14..14 + 128])?;
        assert_eq!(out, want, "ICMPv6 packet too big");

        // No route to the backend: dropped as dropped_no_route.
        all_to(&mut world, ENCAP_IPIP, "10.99.0.2", "fd00:99::2")?;
        let before = count(&world, Stat::DropNoRoute)?;
        let (action, _) = world.run_on(&tcp4(42003, b"x"), f.ifindex)?;
        assert_eq!(action, XDP_DROP);
        assert_eq!(count(&world, Stat::DropNoRoute)?, before + 1);

        // A next hop without a neighbour entry: encapsulated and handed to the stack (which
        // resolves it), addressed as received.
        all_to(&mut world, ENCAP_IPIP, "10.44.0.2", "fd00:44::2")?;
        let frame = tcp4(42004, b"x");
        let before = count(&world, Stat::PassNoNeighbour)?;
        let (action, out) = world.run_on(&frame, f.ifindex)?;
        assert_eq!(action, XDP_PASS);
        assert_eq!(count(&world, Stat::PassNoNeighbour)?, before + 1);
        assert_eq!(&out[..12], &frame[..12], "MACs as received");
        let p = PacketHeaders::from_ethernet_slice(&out)?;
        let Some(NetHeaders::Ipv4(h, _)) = &p.net else {
            panic!("no outer IPv4")
        };
        assert_eq!(
            (h.protocol, h.destination),
            (IpNumber::IPV4, [10, 44, 0, 2])
        );
        assert_eq!(&out[34..], &frame[14..], "inner packet untouched");
        Ok(())
    })??;
    Ok(())
}

/// Runs the decap program once on `frame`, at XDP or (`tc`) at tc ingress; returns the
/// action mapped to XDP's (TC_ACT_OK is a pass) and the output frame.
fn decap_run(ebpf: &mut aya::Ebpf, frame: &[u8], tc: bool) -> anyhow::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 64];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..Default::default()
    };
    let res = if tc {
        lb_userspace::decap::tc_program(ebpf)?.test_run(opts)?
    } else {
        lb_userspace::decap::program(ebpf)?.test_run(opts)?
    };
    out.truncate(res.data_size_out as usize);
    let action = match (tc, res.return_value) {
        (true, 0) => XDP_PASS,
        (true, other) => 100 + other,
        (false, a) => a,
    };
    Ok((action, out))
}

fn decap_count(ebpf: &mut aya::Ebpf, s: lb_common::DecapStat) -> anyhow::Result<u64> {
    let m: aya::maps::PerCpuArray<_, lb_common::Counter> = aya::maps::PerCpuArray::try_from(
        ebpf.map_mut(lb_common::DECAP_STATS_MAP).expect("stats map"),
    )?;
    Ok(m.get(&(s as u32), 0)?.iter().map(|c| c.packets).sum())
}

/// The backend side: what the load balancer sends is decapsulated to exactly the client's
/// packet; everything else passes untouched, counted by reason.
#[test]
fn decap_strips_exactly_and_passes_the_rest() -> anyhow::Result<()> {
    use lb_common::DecapStat as D;
    let f = FibNs::new()?;
    let local = [ip("10.41.0.2"), ip("fd00:41::2")].into_iter().collect();
    let vips = [ip(VIP4), ip(VIP6)].into_iter().collect();
    let mut ebpf = lb_userspace::decap::load(6080, &local, None)?;
    lb_userspace::decap::set_vips(&mut ebpf, &vips)?;
    let cases: [(u8, bool, &str, &str); 4] = [
        (ENCAP_IPIP, true, "10.41.0.2", "fd00:41::2"),
        (ENCAP_GUE, false, "10.41.0.2", "fd00:41::2"),
        (ENCAP_GUE, true, "fd00:41::2", "10.41.0.2"),
        (ENCAP_IPIP, false, "10.41.0.2", "fd00:41::2"),
    ];
    for (n, (encap, inner_v4, to4, to6)) in cases.into_iter().enumerate() {
        let sport = 43000 + n as u16;
        let (inner, key, backend) = if inner_v4 {
            let k = flow_key(ip(CLIENT4), sport, ip(VIP4), 80, PROTO_TCP);
            (tcp4(sport, b"payload"), k, ip(to4))
        } else {
            let k = flow_key(ip(CLIENT6), sport, ip(VIP6), 80, PROTO_TCP);
            (tcp6(sport, b"payload"), k, ip(to6))
        };
        let encapsulated = encapsulated(&f, &inner, &key, encap, backend);
        for tc in [false, true] {
            let before = decap_count(&mut ebpf, D::Decapsulated)?;
            let (action, out) = decap_run(&mut ebpf, &encapsulated, tc)?;
            assert_eq!(action, XDP_PASS);
            // The outer frame's MACs, the inner packet's Ethernet type, the inner packet.
            let mut want = encapsulated[..12].to_vec();
            want.extend_from_slice(&inner[12..]);
            assert_eq!(out, want, "case {n} (tc: {tc}): decapsulated bytes");
            assert_eq!(decap_count(&mut ebpf, D::Decapsulated)?, before + 1);
        }
    }
    // Untouched, by reason.
    let key = flow_key(ip(CLIENT4), 44000, ip(VIP4), 80, PROTO_TCP);
    let plain = tcp4(44000, b"x");
    let to_other_host = encapsulated(&f, &plain, &key, ENCAP_IPIP, ip("10.41.0.9"));
    let mut not_vip = plain.clone();
    not_vip[30..34].copy_from_slice(&[10, 0, 0, 99]);
    let not_vip_ipv4 = Ipv4Header::from_slice(&not_vip[14..])?.0;
    let sum = not_vip_ipv4.calc_header_checksum().to_be_bytes();
    not_vip[24..26].copy_from_slice(&sum);
    let to_non_vip = encapsulated(&f, &not_vip, &key, ENCAP_IPIP, ip("10.41.0.2"));
    let mut other_udp = encapsulated(&f, &plain, &key, ENCAP_GUE, ip("10.41.0.2"));
    other_udp[36..38].copy_from_slice(&53u16.to_be_bytes());
    let truncated = encapsulated(&f, &plain, &key, ENCAP_IPIP, ip("10.41.0.2"))[..40].to_vec();
    let mut fragment = encapsulated(&f, &plain, &key, ENCAP_IPIP, ip("10.41.0.2"));
    fragment[20] = 0x20; // more fragments
    for (name, frame, stat) in [
        ("plain TCP", plain, D::PassNotEncap),
        ("tunnel to another host", to_other_host, D::PassNotLocal),
        ("tunnel for a non-VIP", to_non_vip, D::PassNotVip),
        ("UDP to another port", other_udp, D::PassNotEncap),
        ("truncated inner header", truncated, D::PassMalformed),
        ("outer fragment", fragment, D::PassFragment),
    ] {
        for tc in [false, true] {
            let before = decap_count(&mut ebpf, stat)?;
            let (action, out) = decap_run(&mut ebpf, &frame, tc)?;
            assert_eq!(
                (action, &out),
                (XDP_PASS, &frame),
                "{name} (tc: {tc}): untouched"
            );
            assert_eq!(
                decap_count(&mut ebpf, stat)?,
                before + 1,
                "{name} (tc: {tc})"
            );
        }
    }
    Ok(())
}

/// An ICMP error about a VIP flow (a router's "fragmentation needed" about a backend's
/// answer, addressed to the VIP) is encapsulated to that flow's backend like its packets.
#[test]
fn icmp_errors_about_vip_flows_follow_the_tunnel() -> anyhow::Result<()> {
    let f = FibNs::new()?;
    let mut world = World::new()?;
    f.ns.run(|| -> anyhow::Result<()> {
        all_to(&mut world, ENCAP_IPIP, "10.41.0.2", "fd00:41::2")?;
        let mut quoted = Vec::new();
        etherparse::PacketBuilder::ipv4(v4(VIP4), v4(CLIENT4), 64)
            .tcp(80, 46000, 5, 1000)
            .write(&mut quoted, &[0u8; 100])?;
        quoted.truncate(28);
        let mut frame = Vec::new();
        SCENE
            .eth()
            .ipv4(v4("198.51.100.1"), v4(VIP4), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
            ))
            .write(&mut frame, &quoted)?;
        let key = flow_key(ip(CLIENT4), 46000, ip(VIP4), 80, PROTO_TCP);
        let (action, out) = world.run_on(&frame, f.ifindex)?;
        assert_eq!(action, XDP_TX);
        assert_eq!(
            out,
            encapsulated(&f, &frame, &key, ENCAP_IPIP, ip("10.41.0.2"))
        );
        Ok(())
    })??;
    Ok(())
}

/// `--ipip-source-prefix`: each IPIP flow's outer source is taken from the prefix (IPv4 /16,
/// IPv6 /64) by the shared rule, and the outer IPv4 checksum covers it.
#[test]
fn ipip_sources_from_a_prefix() -> anyhow::Result<()> {
    let f = FibNs::new()?;
    let mut world = World::with_options(lb_userspace::LoadOptions {
        ipip_prefix4: Some("172.31.0.0".parse()?),
        ipip_prefix6: Some("fd00:99:1:2::".parse()?),
        ..World::options()
    })?;
    let cfg = world.dp.opts.config();
    f.ns.run(|| -> anyhow::Result<()> {
        all_to(&mut world, ENCAP_IPIP, "10.41.0.2", "fd00:41::2")?;
        let mut seen = std::collections::BTreeSet::new();
        for sport in 47000..47040u16 {
            let (action, out) = world.run_on(&tcp4(sport, b"x"), f.ifindex)?;
            assert_eq!(action, XDP_TX);
            let p = PacketHeaders::from_ethernet_slice(&out)?;
            let Some(NetHeaders::Ipv4(h, _)) = &p.net else {
                panic!("no outer IPv4")
            };
            assert_eq!(h.header_checksum, h.calc_header_checksum());
            assert_eq!(&h.source[..2], &[172, 31]);
            let key = flow_key(ip(CLIENT4), sport, ip(VIP4), 80, PROTO_TCP);
            let b = world.dp.backends.get(1)?;
            let want = lb_common::outer_source(&cfg, &b, &key)[0].to_ne_bytes();
            assert_eq!(h.source, want, "the shared rule");
            seen.insert(h.source);
        }
        assert!(seen.len() > 30, "sources spread over flows: {}", seen.len());
        let (_, out) = world.run_on(&tcp6(47100, b"x"), f.ifindex)?;
        let p = PacketHeaders::from_ethernet_slice(&out)?;
        let Some(NetHeaders::Ipv6(h, _)) = &p.net else {
            panic!("no outer IPv6")
        };
        assert_eq!(&h.source[..8], &[0xfd, 0, 0, 0x99, 0, 1, 0, 2]);
        Ok(())
    })??;
    Ok(())
}
