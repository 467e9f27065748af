//! Second-chance test parts shared by fixtures and the benchmark: GUE frames with a hop list
//! (the documented format, built independently of the programs) and a backend namespace's
//! real sockets.
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};

use etherparse::{IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, UdpHeader};

use crate::{net::Netns, world::ip};

pub const CLIENT4: &str = "192.0.2.7";
pub const CLIENT6: &str = "2001:db8:c::7";
pub const VIP4: &str = "10.0.0.10";
pub const VIP6: &str = "2001:db8::10";

/// The outer frame around `inner_ip` (an IP packet): Ethernet to `dst_mac`, outer IP from
/// `src` to `dst` (TTL 64; DF for IPv4; IPv6 flow label `label`), UDP from `sport` to 6080
/// (checksum 0), then `gue` (a GUE header, or nothing for variant 1).
pub fn outer(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    (src, dst): (IpAddr, IpAddr),
    sport: u16,
    label: u32,
    gue: &[u8],
    inner_ip: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + gue.len() + inner_ip.len();
    let mut out = Vec::new();
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&0x0800u16.to_be_bytes());
            let tos = if inner_ip[0] >> 4 == 4 {
                inner_ip[1]
            } else {
                (inner_ip[0] << 4) | (inner_ip[1] >> 4)
            };
            let mut h = Ipv4Header::new(udp_len as u16, 64, IpNumber::UDP, s.octets(), d.octets())
                .expect("header");
            h.dont_fragment = true;
            h.dscp = etherparse::IpDscp::try_new(tos >> 2).expect("dscp");
            h.ecn = etherparse::IpEcn::try_new(tos & 3).expect("ecn");
            h.header_checksum = h.calc_header_checksum();
            h.write(&mut out).expect("write");
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&0x86ddu16.to_be_bytes());
            let tos = (inner_ip[0] << 4) | (inner_ip[1] >> 4);
            Ipv6Header {
                traffic_class: tos,
                flow_label: Ipv6FlowLabel::try_new(label & 0xfffff).expect("label"),
                payload_length: udp_len as u16,
                next_header: IpNumber::UDP,
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
            }
            .write(&mut out)
            .expect("write");
        }
        _ => unreachable!("one family"),
    }
    UdpHeader {
        source_port: sport,
        destination_port: 6080,
        length: udp_len as u16,
        checksum: 0,
    }
    .write(&mut out)
    .expect("write");
    out.extend_from_slice(gue);
    out.extend_from_slice(inner_ip);
    out
}

/// A GUE variant-0 header with one hop (the documented format), `next` as given.
pub fn gue_hop(inner_v4: bool, hop: IpAddr, next: u8) -> Vec<u8> {
    gue_hops(inner_v4, &[hop], next)
}

/// A GUE variant-0 header with `hops` (one family; the documented format), `next` as given.
pub fn gue_hops(inner_v4: bool, hops: &[IpAddr], next: u8) -> Vec<u8> {
    let fam = if hops[0].is_ipv4() { 4 } else { 6 };
    let addrs: Vec<u8> = hops
        .iter()
        .flat_map(|h| match h {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        })
        .collect();
    let words = (4 + addrs.len()) / 4;
    let count = hops.len() as u8;
    let mut g = vec![words as u8, if inner_v4 { 4 } else { 41 }, 0, 0];
    g.extend_from_slice(&[1, next, count, fam]);
    g.extend_from_slice(&addrs);
    g
}

/// The sockets a backend holds: VIPs and the client addresses on `lo` (so real connections
/// have the clients' tuples), a listener on each VIP's port 80, one established connection
/// per family, and a UDP socket on VIP4:53 connected to one client port.
pub struct Sockets {
    _listen: Vec<TcpListener>,
    _conns: Vec<(TcpStream, TcpStream)>,
    _udp: Vec<UdpSocket>,
    pub est4: u16,
    pub est6: u16,
    pub udp_connected_to: u16,
}

pub fn sockets(ns: &Netns) -> anyhow::Result<Sockets> {
    for a in [VIP4, CLIENT4] {
        ns.ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])?;
    }
    for a in [VIP6, CLIENT6] {
        ns.ip(&["addr", "add", &format!("{a}/128"), "dev", "lo", "nodad"])?;
    }
    ns.ip(&["link", "set", "lo", "up"])?;
    ns.run(|| -> anyhow::Result<Sockets> {
        let mut listen = Vec::new();
        let mut conns = Vec::new();
        let mut ports = Vec::new();
        for (vip, client) in [(VIP4, CLIENT4), (VIP6, CLIENT6)] {
            let l = TcpListener::bind(SocketAddr::new(ip(vip), 80))?;
            let s = socket2::Socket::new(
                socket2::Domain::for_address(SocketAddr::new(ip(client), 0)),
                socket2::Type::STREAM,
                None,
            )?;
            s.bind(&SocketAddr::new(ip(client), 0).into())?;
            s.connect(&SocketAddr::new(ip(vip), 80).into())?;
            let c: TcpStream = s.into();
            let (a, _) = l.accept()?;
            ports.push(c.local_addr()?.port());
            conns.push((c, a));
            listen.push(l);
        }
        let u = UdpSocket::bind(SocketAddr::new(ip(VIP4), 53))?;
        u.connect(SocketAddr::new(ip(CLIENT4), 5353))?;
        let unconnected = UdpSocket::bind(SocketAddr::new(ip(VIP4), 54))?;
        Ok(Sockets {
            _listen: listen,
            _conns: conns,
            _udp: vec![u, unconnected],
            est4: ports[0],
            est6: ports[1],
            udp_connected_to: 5353,
        })
    })?
}
