//! Packet fixtures through the real verifier-loaded program with BPF_PROG_TEST_RUN.
//!
//! Every case names its input frame (built with etherparse), the expected XDP action, the
//! counter that must move, and the expected output: byte-identical for passed frames; for
//! forwarded ones, the input with the destination MAC set to the expected backend's (computed
//! in userspace from the same Maglev table and flow hash) and the source MAC set to ours.
use std::net::IpAddr;

use etherparse::{
    Icmpv4Type, Icmpv6Type, IpFragOffset, IpHeaders, IpNumber, Ipv4Header, Ipv4Options,
    Ipv6Extensions, Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader, PacketBuilder, VlanId,
    icmpv4::DestUnreachableHeader,
};
use lb_common::{FlowEvent, FlowKey, PROTO_TCP, PROTO_UDP, Stat};
use lb_tests::{
    frames::{v4, v6},
    world::{CLIENT_MAC, LB_MAC, ROUTER_MAC, SCENE, World, backend_mac, flow_key, ip},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// What a case must produce.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// XDP_PASS, output identical to input, this counter +1.
    Pass(Stat),
    /// XDP_DROP, this counter +1.
    Drop(Stat),
    /// XDP_TX to the backend the slot table gives this flow key.
    Tx(FlowKey),
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    expect: Expect,
}

const CLIENT4: &str = "192.0.2.7";
const CLIENT6: &str = "2001:db8:c::7";
const VIP4: &str = "10.0.0.10";
const VIP6: &str = "2001:db8::10";

fn eth() -> etherparse::PacketBuilderStep<etherparse::Ethernet2Header> {
    SCENE.eth()
}

fn tcp4(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    SCENE.tcp4((v4(src), sport), (v4(dst), dport), "S", b"hello")
}

fn udp4(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    SCENE.udp4(v4(src), sport, v4(dst), dport)
}

fn tcp6(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    eth()
        .ipv6(v6(src), v6(dst), 64)
        .tcp(sport, dport, 1000, 64000)
        .syn()
        .write(&mut out, b"hello")
        .expect("build");
    out
}

fn udp6(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    eth()
        .ipv6(v6(src), v6(dst), 64)
        .udp(sport, dport)
        .write(&mut out, b"query")
        .expect("build");
    out
}

fn vlan_tcp4(sport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    eth()
        .single_vlan(VlanId::try_new(100).expect("vlan id"))
        .ipv4(v4(CLIENT4), v4(VIP4), 64)
        .tcp(sport, 80, 1, 1000)
        .write(&mut out, b"x")
        .expect("build");
    out
}

fn vlan_udp6(sport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    eth()
        .single_vlan(VlanId::try_new(7).expect("vlan id"))
        .ipv6(v6(CLIENT6), v6(VIP6), 64)
        .udp(sport, 53)
        .write(&mut out, b"x")
        .expect("build");
    out
}

/// IPv4 TCP with header options (IHL 6: one NOP x3 + EOL word) and optionally fragment bits.
fn tcp4_with(
    src: &str,
    sport: u16,
    dst: &str,
    dport: u16,
    options: bool,
    mf: bool,
    offset: u16,
) -> Vec<u8> {
    let mut h = Ipv4Header::new(0, 64, IpNumber::TCP, v4(src), v4(dst)).expect("header");
    if options {
        h.options = Ipv4Options::from([1u8, 1, 1, 0]);
    }
    h.more_fragments = mf;
    h.fragment_offset = IpFragOffset::try_new(offset).expect("offset");
    let mut out = Vec::new();
    eth()
        .ip(IpHeaders::Ipv4(h, Default::default()))
        .tcp(sport, dport, 1, 1000)
        .write(&mut out, b"opts")
        .expect("build");
    out
}

fn tcp6_with_ext(sport: u16, exts: Ipv6Extensions) -> Vec<u8> {
    let h = Ipv6Header {
        hop_limit: 64,
        source: v6(CLIENT6),
        destination: v6(VIP6),
        ..Default::default()
    };
    let mut out = Vec::new();
    eth()
        .ip(IpHeaders::Ipv6(h, exts))
        .tcp(sport, 80, 1, 1000)
        .write(&mut out, b"ext")
        .expect("build");
    out
}

fn raw_ext() -> Ipv6RawExtHeader {
    Ipv6RawExtHeader::new_raw(IpNumber::TCP, &[0u8; 6]).expect("ext header")
}

/// ICMP "fragmentation needed" from a router about a packet the backend sent VIP -> client.
fn icmp4_frag_needed(
    vip: &str,
    vport: u16,
    client: &str,
    cport: u16,
    quote_len: Option<usize>,
) -> Vec<u8> {
    let mut inner = Vec::new();
    PacketBuilder::ipv4(v4(vip), v4(client), 64)
        .tcp(vport, cport, 5, 1000)
        .write(&mut inner, &[0u8; 100])
        .expect("inner");
    inner.truncate(quote_len.unwrap_or(28));
    let mut out = Vec::new();
    eth()
        .ipv4(v4("198.51.100.1"), v4(vip), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut out, &inner)
        .expect("build");
    out
}

fn icmp6_too_big(vport: u16, cport: u16) -> Vec<u8> {
    let mut inner = Vec::new();
    PacketBuilder::ipv6(v6(VIP6), v6(CLIENT6), 64)
        .tcp(vport, cport, 5, 1000)
        .write(&mut inner, &[0u8; 100])
        .expect("inner");
    inner.truncate(48);
    let mut out = Vec::new();
    eth()
        .ipv6(v6("2001:db8:ffff::1"), v6(VIP6), 64)
        .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
        .write(&mut out, &inner)
        .expect("build");
    out
}

fn icmp4_echo(dst: &str) -> Vec<u8> {
    let mut out = Vec::new();
    eth()
        .ipv4(v4(CLIENT4), v4(dst), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut out, b"ping")
        .expect("build");
    out
}

fn icmp6_echo() -> Vec<u8> {
    let mut out = Vec::new();
    eth()
        .ipv6(v6(CLIENT6), v6(VIP6), 64)
        .icmpv6_echo_request(1, 1)
        .write(&mut out, b"ping")
        .expect("build");
    out
}

fn arp_request() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&v4(CLIENT4));
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&v4(VIP4));
    f
}

fn ethertype_frame(ethertype: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&LB_MAC);
    f.extend_from_slice(&ROUTER_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&[0u8; 46]);
    f
}

fn ipv4_other_proto(proto: u8) -> Vec<u8> {
    let mut out = Vec::new();
    eth()
        .ipv4(v4(CLIENT4), v4(VIP4), 64)
        .write(&mut out, IpNumber(proto), b"payload-for-proto")
        .expect("build");
    out
}

/// `frame` with byte `at` replaced.
fn patched(mut frame: Vec<u8>, at: usize, value: u8) -> Vec<u8> {
    frame[at] = value;
    frame
}

fn cut(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    frame.truncate(len);
    frame
}

// Offsets in an untagged frame.
const L3: usize = 14;
const L4_V4: usize = 34;
const L4_V6: usize = 54;

fn cases() -> Vec<Case> {
    use Expect::*;
    let t = |s: &str, sp, d: &str, dp, p| Tx(flow_key(ip(s), sp, ip(d), dp, p));
    let malformed = Drop(Stat::DropMalformed);
    let not_vip = Pass(Stat::PassNotVip);
    let c = |name, frame, expect| Case {
        name,
        frame,
        expect,
    };
    vec![
        // Each protocol and family to a VIP.
        c(
            "ipv4 tcp to vip",
            tcp4(CLIENT4, 40001, VIP4, 80),
            t(CLIENT4, 40001, VIP4, 80, PROTO_TCP),
        ),
        c(
            "ipv4 udp to vip",
            udp4(CLIENT4, 40002, VIP4, 53),
            t(CLIENT4, 40002, VIP4, 53, PROTO_UDP),
        ),
        c(
            "ipv6 tcp to vip",
            tcp6(CLIENT6, 40003, VIP6, 80),
            t(CLIENT6, 40003, VIP6, 80, PROTO_TCP),
        ),
        c(
            "ipv6 udp to vip",
            udp6(CLIENT6, 40004, VIP6, 53),
            t(CLIENT6, 40004, VIP6, 53, PROTO_UDP),
        ),
        c(
            "vlan ipv4 tcp to vip",
            vlan_tcp4(40005),
            t(CLIENT4, 40005, VIP4, 80, PROTO_TCP),
        ),
        c(
            "vlan ipv6 udp to vip",
            vlan_udp6(40006),
            t(CLIENT6, 40006, VIP6, 53, PROTO_UDP),
        ),
        c(
            "ipv4 options to vip",
            tcp4_with(CLIENT4, 40007, VIP4, 80, true, false, 0),
            t(CLIENT4, 40007, VIP4, 80, PROTO_TCP),
        ),
        c(
            "another client port, another flow",
            tcp4(CLIENT4, 51000, VIP4, 80),
            t(CLIENT4, 51000, VIP4, 80, PROTO_TCP),
        ),
        // Wildcard VIP (port 0 = every TCP port).
        c(
            "wildcard vip port 8080",
            tcp4(CLIENT4, 40008, "10.0.0.20", 8080),
            t(CLIENT4, 40008, "10.0.0.20", 8080, PROTO_TCP),
        ),
        c(
            "wildcard vip port 22",
            tcp4(CLIENT4, 40009, "10.0.0.20", 22),
            t(CLIENT4, 40009, "10.0.0.20", 22, PROTO_TCP),
        ),
        c(
            "wildcard vip is tcp only",
            udp4(CLIENT4, 40010, "10.0.0.20", 8080),
            not_vip,
        ),
        // Source-only hashing: the expected backend ignores the ports.
        c(
            "source hash, port a",
            tcp4(CLIENT4, 40011, "10.0.0.30", 443),
            t(CLIENT4, 40011, "10.0.0.30", 443, PROTO_TCP),
        ),
        c(
            "source hash, port b",
            tcp4(CLIENT4, 60012, "10.0.0.30", 443),
            t(CLIENT4, 60012, "10.0.0.30", 443, PROTO_TCP),
        ),
        // ICMP errors about VIP flows follow the flow.
        c(
            "icmp frag needed for vip flow",
            icmp4_frag_needed(VIP4, 80, CLIENT4, 40001, None),
            t(CLIENT4, 40001, VIP4, 80, PROTO_TCP),
        ),
        c(
            "icmp frag needed, longer quote",
            icmp4_frag_needed(VIP4, 80, CLIENT4, 40777, Some(60)),
            t(CLIENT4, 40777, VIP4, 80, PROTO_TCP),
        ),
        c(
            "icmpv6 packet too big for vip flow",
            icmp6_too_big(80, 40003),
            t(CLIENT6, 40003, VIP6, 80, PROTO_TCP),
        ),
        c(
            "icmp error quoting a non-vip flow",
            icmp4_frag_needed("10.9.9.9", 80, CLIENT4, 40001, None),
            not_vip,
        ),
        c(
            "icmp error with truncated quote",
            icmp4_frag_needed(VIP4, 80, CLIENT4, 40001, Some(22)),
            not_vip,
        ),
        // Empty table.
        c(
            "vip without backends",
            tcp4(CLIENT4, 40013, "10.0.0.40", 80),
            Drop(Stat::DropNoBackend),
        ),
        // Not for a VIP: untouched.
        c("arp request for the vip", arp_request(), not_vip),
        c("icmp echo to the vip address", icmp4_echo(VIP4), not_vip),
        c("icmpv6 echo to the vip address", icmp6_echo(), not_vip),
        c(
            "tcp to a non-vip address",
            tcp4(CLIENT4, 40014, "10.0.0.99", 80),
            not_vip,
        ),
        c(
            "tcp to the vip address, other port",
            tcp4(CLIENT4, 40015, VIP4, 81),
            not_vip,
        ),
        c(
            "udp to a tcp-only vip port",
            udp4(CLIENT4, 40016, VIP4, 80),
            not_vip,
        ),
        c(
            "ipv6 tcp to a non-vip",
            tcp6(CLIENT6, 40017, "2001:db8::99", 80),
            not_vip,
        ),
        c("lldp frame", ethertype_frame(0x88cc), not_vip),
        c("qinq outer tag", ethertype_frame(0x88a8), not_vip),
        c("gre to the vip address", ipv4_other_proto(47), not_vip),
        // The pre-filter decides first: options on a packet to no VIP address are just not
        // for a VIP; on one to a VIP address that matches no VIP they have their own reason.
        c(
            "ipv4 options, not a vip address",
            tcp4_with(CLIENT4, 40018, "10.0.0.99", 80, true, false, 0),
            not_vip,
        ),
        c(
            "ipv4 options to the vip address, other port",
            tcp4_with(CLIENT4, 40018, VIP4, 81, true, false, 0),
            Pass(Stat::PassIpOptions),
        ),
        // Nothing addressed elsewhere is dropped, however broken its IP header: the kernel
        // judges its own traffic.
        c(
            "bad ipv4 version, not a vip address",
            patched(tcp4(CLIENT4, 40024, "10.0.0.99", 80), L3, 0x65),
            not_vip,
        ),
        c(
            "fragment, not a vip address",
            tcp4_with(CLIENT4, 40025, "10.0.0.99", 80, false, true, 0),
            not_vip,
        ),
        // Fragments and extension headers pass, even for a VIP.
        c(
            "ipv4 first fragment (MF)",
            tcp4_with(CLIENT4, 40019, VIP4, 80, false, true, 0),
            Pass(Stat::PassFragment),
        ),
        c(
            "ipv4 later fragment (offset)",
            tcp4_with(CLIENT4, 40020, VIP4, 80, false, false, 100),
            Pass(Stat::PassFragment),
        ),
        c(
            "ipv6 hop-by-hop",
            tcp6_with_ext(
                40021,
                Ipv6Extensions {
                    hop_by_hop_options: Some(raw_ext()),
                    ..Default::default()
                },
            ),
            Pass(Stat::PassIpv6Ext),
        ),
        c(
            "ipv6 destination options",
            tcp6_with_ext(
                40022,
                Ipv6Extensions {
                    destination_options: Some(raw_ext()),
                    ..Default::default()
                },
            ),
            Pass(Stat::PassIpv6Ext),
        ),
        c(
            "ipv6 fragment header",
            tcp6_with_ext(
                40023,
                Ipv6Extensions {
                    fragment: Some(Ipv6FragmentHeader::new(
                        IpNumber::TCP,
                        IpFragOffset::ZERO,
                        true,
                        7,
                    )),
                    ..Default::default()
                },
            ),
            Pass(Stat::PassIpv6Ext),
        ),
        // Truncated at every header boundary.
        c(
            "ethernet header only",
            cut(tcp4(CLIENT4, 1, VIP4, 80), 14),
            malformed,
        ),
        c("vlan tag cut", cut(vlan_tcp4(1), 16), malformed),
        c(
            "ipv4 header cut",
            cut(tcp4(CLIENT4, 1, VIP4, 80), L3 + 10),
            malformed,
        ),
        c(
            "ipv4 options cut",
            cut(tcp4_with(CLIENT4, 1, VIP4, 80, true, false, 0), L3 + 22),
            malformed,
        ),
        c(
            "tcp header cut",
            cut(tcp4(CLIENT4, 1, VIP4, 80), L4_V4 + 10),
            malformed,
        ),
        c(
            "udp header cut",
            cut(udp4(CLIENT4, 1, VIP4, 53), L4_V4 + 4),
            malformed,
        ),
        c(
            "ipv6 header cut",
            cut(tcp6(CLIENT6, 1, VIP6, 80), L3 + 20),
            malformed,
        ),
        c(
            "ipv6 tcp header cut",
            cut(tcp6(CLIENT6, 1, VIP6, 80), L4_V6 + 12),
            malformed,
        ),
        c(
            "vlan ipv4 header cut",
            cut(vlan_tcp4(1), 18 + 12),
            malformed,
        ),
        // Wrong length and version fields.
        c(
            "ipv4 ihl 4",
            patched(tcp4(CLIENT4, 1, VIP4, 80), L3, 0x44),
            malformed,
        ),
        c(
            "ipv4 ihl 15 beyond the frame",
            patched(tcp4(CLIENT4, 1, VIP4, 80), L3, 0x4f),
            malformed,
        ),
        c(
            "ip version 5",
            patched(tcp4(CLIENT4, 1, VIP4, 80), L3, 0x55),
            malformed,
        ),
        c(
            "ipv4 total length beyond the frame",
            patched(tcp4(CLIENT4, 1, VIP4, 80), L3 + 2, 0x7f),
            malformed,
        ),
        c(
            "ipv4 total length below the header",
            patched(patched(tcp4(CLIENT4, 1, VIP4, 80), L3 + 2, 0), L3 + 3, 12),
            malformed,
        ),
        c(
            "ipv6 payload length beyond the frame",
            patched(tcp6(CLIENT6, 1, VIP6, 80), L3 + 4, 0x40),
            malformed,
        ),
        c(
            "ipv6 version 4 in an ipv6 ethertype",
            patched(tcp6(CLIENT6, 1, VIP6, 80), L3, 0x40),
            malformed,
        ),
        c(
            "tcp data offset 4",
            patched(tcp4(CLIENT4, 1, VIP4, 80), L4_V4 + 12, 0x40),
            malformed,
        ),
        c(
            "tcp data offset beyond the packet",
            patched(tcp4(CLIENT4, 1, VIP4, 80), L4_V4 + 12, 0xf0),
            malformed,
        ),
        c(
            "udp length below 8",
            patched(
                patched(udp4(CLIENT4, 1, VIP4, 53), L4_V4 + 4, 0),
                L4_V4 + 5,
                4,
            ),
            malformed,
        ),
        c(
            "udp length beyond the ip payload",
            patched(udp4(CLIENT4, 1, VIP4, 53), L4_V4 + 4, 0x10),
            malformed,
        ),
    ]
}

#[test]
fn packet_fixtures() -> anyhow::Result<()> {
    run_fixtures(World::new()?)
}

/// The same fixtures with the per-CPU flow table (`--per-cpu-flows`).
#[test]
fn packet_fixtures_per_cpu_flow_table() -> anyhow::Result<()> {
    run_fixtures(World::with_flows(4096, true)?)
}

fn run_fixtures(mut world: World) -> anyhow::Result<()> {
    let all = cases();
    assert!(all.len() >= 40, "only {} cases", all.len());
    check_cases(&mut world, all)
}

/// Runs every case; all must meet their expectation.
fn check_cases(world: &mut World, cases: Vec<Case>) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for case in cases {
        if let Some(p) = check(world, &case)? {
            failures.push(format!("{}: {p}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

/// Runs one case: what is wrong with the outcome, if anything.
fn check(world: &mut World, case: &Case) -> anyhow::Result<Option<String>> {
    let before = world.dp.stats.global()?;
    let (action, out) = world.run(&case.frame)?;
    let after = world.dp.stats.global()?;
    let moved = |s: Stat| after.get(s).packets - before.get(s).packets;
    Ok(match case.expect {
        Expect::Pass(stat) => {
            (action != XDP_PASS || out != case.frame || moved(stat) != 1).then(|| {
                format!(
                    "want PASS untouched +1 {}: got action {action}, same={}, moved {}",
                    stat.name(),
                    out == case.frame,
                    moved(stat)
                )
            })
        }
        Expect::Drop(stat) => (action != XDP_DROP || moved(stat) != 1).then(|| {
            format!(
                "want DROP +1 {}: got action {action}, moved {}",
                stat.name(),
                moved(stat)
            )
        }),
        Expect::Tx(key) => {
            let backend = world
                .table_backend(&key)
                .expect("fixture flow is for a VIP with backends");
            let mut want = case.frame.clone();
            want[0..6].copy_from_slice(&backend_mac(backend));
            want[6..12].copy_from_slice(&LB_MAC);
            (action != XDP_TX || out != want || moved(Stat::Forwarded) != 1).then(|| {
                format!(
                    "want TX to backend {backend}: got action {action}, dst mac {:02x?}",
                    &out.get(0..6)
                )
            })
        }
    })
}

/// A busy IPv4 flow's packet is served by the program's express lane (this CPU's flow cache,
/// straight from the frame's fields) only when the full parse would take the frame as it is:
/// every variant of a cached flow's frame that the full parse judges otherwise (a broken
/// length or data offset, a fragment) gets the full parse's outcome, and the variants it
/// balances (a VLAN tag, IP options) go to the flow's backend. Counted: the plain frames and
/// the balanced variants are cache hits, the rest are not.
#[test]
fn a_busy_flows_odd_frames_get_the_full_parses_outcome() -> anyhow::Result<()> {
    use Expect::*;
    // The flow cache is per CPU: every run on CPU 0.
    lb_tests::world::pin_to_cpu0()?;
    let mut world = World::new()?;
    let sport = 47100;
    let tcp = tcp4_with(CLIENT4, sport, VIP4, 80, false, false, 0);
    let udp = udp4(CLIENT4, sport, VIP4, 53);
    // On probation, then established, then served from the cache.
    for frame in [&tcp, &udp] {
        for _ in 0..3 {
            assert_eq!(world.run(frame)?.0, XDP_TX);
        }
    }
    let tcp_tx = Tx(flow_key(ip(CLIENT4), sport, ip(VIP4), 80, PROTO_TCP));
    let udp_tx = Tx(flow_key(ip(CLIENT4), sport, ip(VIP4), 53, PROTO_UDP));
    let malformed = Drop(Stat::DropMalformed);
    let c = |name, frame, expect| Case {
        name,
        frame,
        expect,
    };
    let hits = vec![
        c("tcp, from the cache", tcp.clone(), tcp_tx),
        c("tcp with a vlan tag", vlan_tcp4(sport), tcp_tx),
        c(
            "tcp with ip options",
            tcp4_with(CLIENT4, sport, VIP4, 80, true, false, 0),
            tcp_tx,
        ),
        c("udp, from the cache", udp.clone(), udp_tx),
    ];
    let others = vec![
        c(
            "tcp first fragment (MF)",
            tcp4_with(CLIENT4, sport, VIP4, 80, false, true, 0),
            Pass(Stat::PassFragment),
        ),
        c(
            "tcp later fragment",
            tcp4_with(CLIENT4, sport, VIP4, 80, false, false, 8),
            Pass(Stat::PassFragment),
        ),
        c(
            "ip total length beyond the frame",
            patched(tcp.clone(), L3 + 2, 0x7f),
            malformed,
        ),
        c(
            "ip total length below the header",
            patched(patched(tcp.clone(), L3 + 2, 0), L3 + 3, 12),
            malformed,
        ),
        c("ihl 4", patched(tcp.clone(), L3, 0x44), malformed),
        c(
            "tcp data offset 4",
            patched(tcp.clone(), L4_V4 + 12, 0x40),
            malformed,
        ),
        c(
            "tcp data offset beyond the packet",
            patched(tcp.clone(), L4_V4 + 12, 0xf0),
            malformed,
        ),
        c("tcp header cut", cut(tcp.clone(), L4_V4 + 10), malformed),
        c(
            "udp length beyond the ip payload",
            patched(udp.clone(), L4_V4 + 4, 0x10),
            malformed,
        ),
        c(
            "udp length below 8",
            patched(patched(udp.clone(), L4_V4 + 4, 0), L4_V4 + 5, 4),
            malformed,
        ),
    ];
    let hit_count = |world: &World| -> anyhow::Result<u64> {
        Ok(world.dp.stats.global()?.flow(FlowEvent::Hit))
    };
    let before = hit_count(&world)?;
    let n = hits.len() as u64;
    check_cases(&mut world, hits)?;
    assert_eq!(hit_count(&world)? - before, n, "each a cache hit");
    let before = hit_count(&world)?;
    check_cases(&mut world, others)?;
    assert_eq!(hit_count(&world)?, before, "none served by the cache");
    Ok(())
}

fn dst_mac(frame: &[u8]) -> [u8; 6] {
    frame[0..6].try_into().expect("6 bytes")
}

/// ICMP errors are forwarded like their flow but never create a flow entry, and per-VIP and
/// per-backend counters account for forwarded packets.
#[test]
fn icmp_errors_do_not_create_flows_and_counters_account() -> anyhow::Result<()> {
    let mut world = World::new()?;
    let key = flow_key(ip(CLIENT4), 46000, ip(VIP4), 80, PROTO_TCP);
    let (action, _) = world.run(&icmp4_frag_needed(VIP4, 80, CLIENT4, 46000, None))?;
    assert_eq!(action, XDP_TX);
    assert!(
        world.dp.flows.get(&key)?.is_none(),
        "an ICMP error created a flow"
    );

    let frame = SCENE.tcp4((v4(CLIENT4), 46000), (v4(VIP4), 80), "A", b"hello");
    for _ in 0..5 {
        assert_eq!(world.run(&frame)?.0, XDP_TX);
    }
    let backend = world.table_backend(&key).expect("backend");
    let vip = world.dp.stats.vip(0)?;
    assert_eq!(vip.packets, 6);
    assert_eq!(vip.new_flows, 1, "one TCP flow was placed");
    let b = world.dp.stats.backend(backend)?;
    assert_eq!(b.packets, 6);
    assert!(b.bytes >= 6 * frame.len() as u64 - 64);
    Ok(())
}

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The (client -> VIP) key of a frame according to etherparse, for TCP/UDP and for ICMP
/// errors quoting TCP/UDP; `None` when etherparse sees no such flow.
fn etherparse_key(frame: &[u8]) -> Option<FlowKey> {
    use etherparse::{LaxSlicedPacket, NetSlice, SlicedPacket, TransportSlice};
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let (src, dst, frag) = match p.net.as_ref()? {
        NetSlice::Ipv4(s) => (
            IpAddr::from(s.header().source()),
            IpAddr::from(s.header().destination()),
            s.is_payload_fragmented(),
        ),
        NetSlice::Ipv6(s) => (
            IpAddr::from(s.header().source()),
            IpAddr::from(s.header().destination()),
            s.is_payload_fragmented(),
        ),
        _ => return None,
    };
    if frag {
        return None;
    }
    // An ICMP error quotes the IP header and only 8 bytes of L4: read the ports from those.
    let quoted = |payload: &[u8]| -> Option<FlowKey> {
        let inner = LaxSlicedPacket::from_ip(payload).ok()?;
        // The quoted length fields describe the original packet, not the quote: find the
        // ports right after the quoted IP header whatever they say.
        let (isrc, idst, l4, hdr_len) = match inner.net.as_ref()? {
            etherparse::LaxNetSlice::Ipv4(s) => (
                IpAddr::from(s.header().source()),
                IpAddr::from(s.header().destination()),
                s.payload(),
                usize::from(s.header().ihl()) * 4,
            ),
            etherparse::LaxNetSlice::Ipv6(s) => (
                IpAddr::from(s.header().source()),
                IpAddr::from(s.header().destination()),
                s.payload(),
                40,
            ),
            _ => return None,
        };
        let proto = match l4.ip_number {
            IpNumber::TCP => PROTO_TCP,
            IpNumber::UDP => PROTO_UDP,
            _ => return None,
        };
        let p = payload.get(hdr_len..hdr_len + 4)?;
        let (sport, dport) = (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        );
        Some(flow_key(idst, dport, isrc, sport, proto))
    };
    match p.transport.as_ref()? {
        TransportSlice::Tcp(t) => Some(flow_key(
            src,
            t.source_port(),
            dst,
            t.destination_port(),
            PROTO_TCP,
        )),
        TransportSlice::Udp(u) => Some(flow_key(
            src,
            u.source_port(),
            dst,
            u.destination_port(),
            PROTO_UDP,
        )),
        TransportSlice::Icmpv4(i) => quoted(i.payload()),
        TransportSlice::Icmpv6(i) => quoted(i.payload()),
        _ => None,
    }
}

/// Thousands of random and mutated frames: the program never aborts, returns only PASS, DROP
/// or TX, never modifies a frame it passes, and only ever rewrites the two MACs of a frame
/// that etherparse independently sees as a flow to a configured VIP.
#[test]
fn random_and_mutated_frames() -> anyhow::Result<()> {
    let mut world = World::new()?;
    let seeds: Vec<Vec<u8>> = cases().into_iter().map(|c| c.frame).collect();
    let mut rng = Rng(0x0dd_ba11_cafe_f00d);
    let mut counts = [0usize; 4];
    for i in 0..4000 {
        let frame = if i % 4 == 0 {
            let len = 14 + rng.below(120);
            let mut f: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Half of the random frames get an IP ethertype so the parsers are exercised.
            if rng.below(2) == 0 {
                let et: [u8; 2] = if rng.below(2) == 0 {
                    [0x08, 0x00]
                } else {
                    [0x86, 0xdd]
                };
                f[12..14].copy_from_slice(&et);
            }
            f
        } else {
            let mut f = seeds[rng.below(seeds.len())].clone();
            for _ in 0..1 + rng.below(4) {
                let at = 12 + rng.below(f.len() - 12);
                f[at] = rng.next() as u8;
            }
            if rng.below(4) == 0 {
                let keep = 14 + rng.below(f.len() - 13);
                f.truncate(keep);
            }
            f
        };
        let (action, out) = world.run(&frame)?;
        assert!(
            matches!(action, XDP_DROP | XDP_PASS | XDP_TX),
            "frame {i}: action {action} for {frame:02x?}"
        );
        counts[action as usize] += 1;
        if action == XDP_PASS || action == XDP_DROP {
            assert_eq!(out, frame, "frame {i}: a {action} frame was modified");
            continue;
        }
        assert_eq!(out.len(), frame.len());
        assert_eq!(
            out[12..],
            frame[12..],
            "frame {i}: bytes beyond the MACs changed"
        );
        assert_eq!(out[6..12], LB_MAC);
        let key = etherparse_key(&frame);
        let vip = key.as_ref().and_then(|k| world.vip_for(k));
        assert!(
            vip.is_some(),
            "frame {i} was forwarded but is not for a VIP: {frame:02x?}"
        );
    }
    eprintln!(
        "actions: drop {} pass {} tx {}",
        counts[1], counts[2], counts[3]
    );
    assert!(
        counts[3] > 100 && counts[2] > 100 && counts[1] > 100,
        "mutations too weak: {counts:?}"
    );
    Ok(())
}

/// A backend behind another interface is reached with XDP_REDIRECT through the device map;
/// one whose interface is missing from the map is dropped and counted.
#[test]
fn backend_behind_another_interface_is_redirected() -> anyhow::Result<()> {
    const XDP_REDIRECT: u32 = 4;
    // BPF_PROG_TEST_RUN receives on the namespace's loopback and the device map resolves
    // ifindexes in the caller's namespace: run in a namespace with a veth as egress device.
    let ns = lb_tests::Netns::new("redir")?;
    let veth = lb_tests::VethPair::new(&ns, "10.88.0.1/24", &ns, "10.88.0.2/24")?;
    let mut world = World::new()?;
    ns.run(|| -> anyhow::Result<()> {
        let egress = lb_userspace::dataplane::if_index(&veth.a).expect("veth in namespace");
        world.dp.tx_ports.insert(egress, egress, None, 0)?;
        for id in [1, 2, 3] {
            world.set_backend_via(id, ip(&format!("10.1.0.{id}")), egress)?;
        }
        let frame = tcp4(CLIENT4, 47000, VIP4, 80);
        let (action, out) = world.run(&frame)?;
        assert_eq!(action, XDP_REDIRECT);
        let key = flow_key(ip(CLIENT4), 47000, ip(VIP4), 80, PROTO_TCP);
        assert_eq!(
            dst_mac(&out),
            backend_mac(world.table_backend(&key).expect("backend"))
        );

        // Egress device not in the map: dropped, counted as a transmit error.
        for id in [1, 2, 3] {
            world.set_backend_via(id, ip(&format!("10.1.0.{id}")), egress + 1000)?;
        }
        let before = world.dp.stats.global()?.get(Stat::DropTxError).packets;
        let (action, _) = world.run(&tcp4(CLIENT4, 47001, VIP4, 80))?;
        assert_eq!(action, XDP_DROP);
        assert_eq!(
            world.dp.stats.global()?.get(Stat::DropTxError).packets,
            before + 1
        );
        Ok(())
    })?
}
