//! NAT fixtures through the real programs (BPF_PROG_TEST_RUN; `lb_xdp` tail-calls `lb_nat`),
//! inside a namespace whose FIB gives known next hops: TCP and UDP, IPv4 and IPv6, both
//! directions, each output frame compared byte for byte with one rebuilt independently by
//! etherparse (addresses, ports and every checksum recomputed from scratch), the NAT port
//! exhaustion counted and dropped, and ICMP errors about translated flows translated for the
//! other side (from the backends' side, IPv4 and IPv6, and from the clients' side).
use std::net::IpAddr;

use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
use lb_common::Stat;
use lb_tests::{
    expect::{rewritten, source_port},
    frames::{v4, v6},
    routed::{FibNs, GW_MAC},
    world::{SCENE, World, ip},
};
use lb_userspace::dataplane::LoadOptions;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const CLIENT4: &str = "192.0.2.7";
const CLIENT6: &str = "2001:db8:c::7";
const VIP4: &str = "10.0.0.10";
const VIP6: &str = "2001:db8::10";
/// The load balancer's address on the fixture link: its NAT source.
const SRC4: &str = "10.31.0.2";
const SRC6: &str = "fd00:31::2";
const BACKEND4: &str = "10.41.0.2";
const BACKEND6: &str = "fd00:41::2";

fn frame(proto: &str, (src, sport): (IpAddr, u16), (dst, dport): (IpAddr, u16)) -> Vec<u8> {
    let mut out = Vec::new();
    let payload = b"request";
    let b = SCENE.eth();
    match (src, dst, proto) {
        (IpAddr::V4(s), IpAddr::V4(d), "tcp") => b
            .ipv4(s.octets(), d.octets(), 64)
            .tcp(sport, dport, 1000, 64000)
            .ack(1)
            .write(&mut out, payload),
        (IpAddr::V4(s), IpAddr::V4(d), _) => b
            .ipv4(s.octets(), d.octets(), 64)
            .udp(sport, dport)
            .write(&mut out, payload),
        (IpAddr::V6(s), IpAddr::V6(d), "tcp") => b
            .ipv6(s.octets(), d.octets(), 64)
            .tcp(sport, dport, 1000, 64000)
            .ack(1)
            .write(&mut out, payload),
        (IpAddr::V6(s), IpAddr::V6(d), _) => b
            .ipv6(s.octets(), d.octets(), 64)
            .udp(sport, dport)
            .write(&mut out, payload),
        _ => unreachable!(),
    }
    .expect("builds");
    out
}

/// The fixture namespace, with routes back to the clients too.
fn fib() -> anyhow::Result<FibNs> {
    let f = FibNs::new()?;
    f.ns.ip(&["route", "add", "192.0.2.0/24", "via", "10.31.0.1"])?;
    f.ns.ip(&["-6", "route", "add", "2001:db8:c::/64", "via", "fd00:31::1"])?;
    Ok(f)
}

fn nat_world(opts: LoadOptions) -> anyhow::Result<World> {
    let mut world = World::with_options(opts)?;
    for id in [1, 2, 3] {
        world.set_backend_nat(id, ip(BACKEND4), 8000 + id as u16, ip(SRC4))?;
    }
    for id in [4, 5] {
        world.set_backend_nat(id, ip(BACKEND6), 8000 + id as u16, ip(SRC6))?;
    }
    Ok(world)
}

#[test]
fn both_directions_have_exact_bytes_for_tcp_udp_ipv4_ipv6() -> anyhow::Result<()> {
    let f = fib()?;
    let mut world = nat_world(World::options())?;
    let cases = [
        ("tcp", CLIENT4, VIP4, 80, SRC4, BACKEND4),
        ("udp", CLIENT4, VIP4, 53, SRC4, BACKEND4),
        ("tcp", CLIENT6, VIP6, 80, SRC6, BACKEND6),
        ("udp", CLIENT6, VIP6, 53, SRC6, BACKEND6),
    ];
    f.ns.run(|| -> anyhow::Result<()> {
        for (n, (proto, client, vip, vport, src, backend)) in cases.into_iter().enumerate() {
            let name = format!("{proto} {client} -> {vip}:{vport}");
            let cport = 40000 + n as u16;
            let (client, vip, src, backend) = (ip(client), ip(vip), ip(src), ip(backend));
            // Client -> VIP becomes LB:port -> backend:its port.
            let request = frame(proto, (client, cport), (vip, vport));
            let (action, out) = world.run_on(&request, f.ifindex)?;
            assert_eq!(action, XDP_TX, "{name}");
            let nat_port = source_port(&out);
            assert!((1024..=32767).contains(&nat_port), "{name}: {nat_port}");
            let p = PacketHeaders::from_ethernet_slice(&out).expect("parses");
            let dport = match p.transport.expect("l4") {
                TransportHeader::Tcp(t) => t.destination_port,
                TransportHeader::Udp(u) => u.destination_port,
                _ => unreachable!(),
            };
            assert!(
                (8001..=8005).contains(&dport),
                "{name}: backend port {dport}"
            );
            let want = rewritten(&request, (src, nat_port), (backend, dport), (f.mac, GW_MAC));
            assert_eq!(out, want, "{name}: request bytes");
            // The backend's answer to LB:port becomes VIP -> client.
            let answer = frame(proto, (backend, dport), (src, nat_port));
            let (action, back) = world.run_on(&answer, f.ifindex)?;
            assert_eq!(action, XDP_TX, "{name}: answer");
            let want = rewritten(&answer, (vip, vport), (client, cport), (f.mac, GW_MAC));
            assert_eq!(back, want, "{name}: answer bytes");
            // The connection's next packet keeps its port and backend.
            let (_, again) = world.run_on(&request, f.ifindex)?;
            assert_eq!(again, out, "{name}: second packet");
        }
        Ok(())
    })??;
    let nat = &mut world.dp.nat;
    assert_eq!(nat.fwd.keys().count(), 4);
    assert_eq!(nat.rev.keys().count(), 4);
    // The agent's sweep: nothing has expired now; 31 s on, the UDP connections (idle 30 s)
    // have; 901 s on, the answered TCP ones (900 s) too, both directions.
    let now = lb_userspace::dataplane::kernel::coarse_now_s();
    let s = nat.sweep(now)?;
    assert_eq!((s.live, s.expired), (4, 0));
    let s = nat.sweep(now + 31)?;
    assert_eq!((s.live, s.expired), (2, 2));
    let s = nat.sweep(now + 901)?;
    assert_eq!((s.live, s.expired), (0, 2));
    assert_eq!((nat.fwd.keys().count(), nat.rev.keys().count()), (0, 0));
    Ok(())
}

#[test]
fn exhausted_ports_unknown_answers_and_icmp_errors() -> anyhow::Result<()> {
    let f = fib()?;
    // One NAT port: the second connection to the same backend finds none.
    let mut world = nat_world(LoadOptions {
        nat_ports: (5000, 5000),
        ..World::options()
    })?;
    // VIP 10.0.0.10:53/udp: backends 1 and 2 -> one of them per flow; make both the same.
    world.set_backend_nat(2, ip(BACKEND4), 8001, ip(SRC4))?;
    world.set_backend_nat(1, ip(BACKEND4), 8001, ip(SRC4))?;
    let stat =
        |w: &World, s: Stat| -> anyhow::Result<u64> { Ok(w.dp.stats.global()?.get(s).packets) };
    f.ns.run(|| -> anyhow::Result<()> {
        let first = frame("udp", (ip(CLIENT4), 41000), (ip(VIP4), 53));
        let (action, out) = world.run_on(&first, f.ifindex)?;
        assert_eq!(action, XDP_TX);
        assert_eq!(source_port(&out), 5000);
        let second = frame("udp", (ip(CLIENT4), 41001), (ip(VIP4), 53));
        let (action, out) = world.run_on(&second, f.ifindex)?;
        assert_eq!(action, XDP_DROP);
        assert_eq!(out, second, "a dropped frame is untouched");
        assert_eq!(stat(&world, Stat::DropNatNoPort)?, 1);
        // An answer to the NAT address matching nothing is the kernel's.
        let stray = frame("tcp", (ip(BACKEND4), 22), (ip(SRC4), 5001));
        let (action, out) = world.run_on(&stray, f.ifindex)?;
        assert_eq!((action, out), (XDP_PASS, stray));
        assert_eq!(stat(&world, Stat::PassNatUnknown)?, 1);
        // An ICMP error from the backend about the translated flow goes to its client,
        // translated: outer VIP -> client, quoting what the client sent (client:41000 ->
        // VIP:53).
        let quoted = frame("udp", (ip(SRC4), 5000), (ip(BACKEND4), 8001));
        let icmp = icmp4(BACKEND4, SRC4, &quoted);
        let (action, out) = world.run_on(&icmp, f.ifindex)?;
        assert_eq!(action, XDP_TX);
        let want = translated_icmp(
            &icmp,
            (ip(VIP4), ip(CLIENT4)),
            ((ip(CLIENT4), 41000), (ip(VIP4), 53)),
            (f.mac, GW_MAC),
        );
        assert_eq!(out, want, "ICMP from the backend's side: bytes");
        // From the client's side (a router on the way back says the answer did not fit):
        // translated for the backend, quoting what the backend sent.
        let quoted = frame("udp", (ip(VIP4), 53), (ip(CLIENT4), 41000));
        let icmp = icmp4("198.51.100.1", VIP4, &quoted);
        let (action, out) = world.run_on(&icmp, f.ifindex)?;
        assert_eq!(action, XDP_TX);
        let want = translated_icmp(
            &icmp,
            (ip(SRC4), ip(BACKEND4)),
            ((ip(BACKEND4), 8001), (ip(SRC4), 5000)),
            (f.mac, GW_MAC),
        );
        assert_eq!(out, want, "ICMP from the client's side: bytes");
        // ICMPv6 "packet too big" from the backend's side, for an IPv6 connection.
        let request = frame("tcp", (ip(CLIENT6), 42000), (ip(VIP6), 80));
        let (action, out) = world.run_on(&request, f.ifindex)?;
        assert_eq!(action, XDP_TX);
        let nat_port = source_port(&out);
        let bport = match PacketHeaders::from_ethernet_slice(&out)
            .expect("parses")
            .transport
        {
            Some(TransportHeader::Tcp(t)) => t.destination_port,
            _ => unreachable!(),
        };
        let quoted = frame("tcp", (ip(SRC6), nat_port), (ip(BACKEND6), bport));
        let mut icmp = Vec::new();
        SCENE
            .eth()
            .ipv6(v6(BACKEND6), v6(SRC6), 64)
            .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 })
            .write(&mut icmp, &quoted[14..])
            .expect("builds");
        let (action, out) = world.run_on(&icmp, f.ifindex)?;
        assert_eq!(action, XDP_TX);
        let want = translated_icmp(
            &icmp,
            (ip(VIP6), ip(CLIENT6)),
            ((ip(CLIENT6), 42000), (ip(VIP6), 80)),
            (f.mac, GW_MAC),
        );
        assert_eq!(out, want, "ICMPv6 from the backend's side: bytes");
        Ok(())
    })??;
    Ok(())
}

/// An ICMP port unreachable from `src` to `dst` quoting `quoted` (a frame).
fn icmp4(src: &str, dst: &str, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = Vec::new();
    SCENE
        .eth()
        .ipv4(v4(src), v4(dst), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ))
        .write(&mut icmp, &quoted[14..])
        .expect("builds");
    icmp
}

/// The ICMP error `frame` as it must leave: outer `src -> dst`, the quote's addresses and
/// ports replaced (its IPv4 checksum recomputed, its TCP/UDP checksum left as quoted), the
/// ICMP checksum recomputed from scratch (ICMPv6: with its pseudo-header).
fn translated_icmp(
    frame: &[u8],
    (src, dst): (IpAddr, IpAddr),
    ((qsrc, qsport), (qdst, qdport)): ((IpAddr, u16), (IpAddr, u16)),
    (smac, dmac): ([u8; 6], [u8; 6]),
) -> Vec<u8> {
    let octets6 = |a: IpAddr| match a {
        IpAddr::V6(a) => a.octets(),
        _ => unreachable!(),
    };
    let octets4 = |a: IpAddr| match a {
        IpAddr::V4(a) => a.octets(),
        _ => unreachable!(),
    };
    let p = PacketHeaders::from_ethernet_slice(frame).expect("parses");
    let quote = p.payload.slice();
    let mut new_quote = Vec::new();
    let rest = if src.is_ipv4() {
        let (mut q, rest) = etherparse::Ipv4Header::from_slice(quote).expect("quote");
        (q.source, q.destination) = (octets4(qsrc), octets4(qdst));
        q.header_checksum = q.calc_header_checksum();
        q.write(&mut new_quote).expect("write");
        rest
    } else {
        let (mut q, rest) = etherparse::Ipv6Header::from_slice(quote).expect("quote");
        (q.source, q.destination) = (octets6(qsrc), octets6(qdst));
        q.write(&mut new_quote).expect("write");
        rest
    };
    new_quote.extend_from_slice(&qsport.to_be_bytes());
    new_quote.extend_from_slice(&qdport.to_be_bytes());
    new_quote.extend_from_slice(&rest[4..]);
    let mut out = Vec::new();
    let mut eth = p.link.expect("eth").ethernet2().expect("eth2");
    (eth.source, eth.destination) = (smac, dmac);
    eth.write(&mut out).expect("write");
    match (p.net, p.transport) {
        (Some(NetHeaders::Ipv4(mut h, _)), Some(TransportHeader::Icmpv4(i))) => {
            (h.source, h.destination) = (octets4(src), octets4(dst));
            h.header_checksum = h.calc_header_checksum();
            h.write(&mut out).expect("write");
            let i = etherparse::Icmpv4Header::with_checksum(i.icmp_type, &new_quote);
            i.write(&mut out).expect("write");
        }
        (Some(NetHeaders::Ipv6(mut h, _)), Some(TransportHeader::Icmpv6(i))) => {
            (h.source, h.destination) = (octets6(src), octets6(dst));
            h.write(&mut out).expect("write");
            let i = etherparse::Icmpv6Header::with_checksum(
                i.icmp_type,
                h.source,
                h.destination,
                &new_quote,
            )
            .expect("checksum");
            i.write(&mut out).expect("write");
        }
        _ => unreachable!(),
    }
    out.extend_from_slice(&new_quote);
    out
}
