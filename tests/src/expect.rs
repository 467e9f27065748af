//! Expected output frames, built independently of the program (etherparse, every checksum
//! computed from scratch): what the fixtures compare the program's output with, byte for byte.
use std::net::IpAddr;

use etherparse::{
    IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, NetHeaders, PacketHeaders, TransportHeader,
    UdpHeader,
};
use lb_common::{ENCAP_GUE, FlowKey, flow_entropy, gue_source_port};

use crate::routed::{FibNs, GW_MAC};

/// The load balancer's encapsulation sources in [`FibNs`] (its addresses on the fixture link).
pub const SRC4: &str = "10.31.0.2";
pub const SRC6: &str = "fd00:31::2";

/// The encapsulation source for a backend at `addr`.
pub fn src_of(addr: IpAddr) -> IpAddr {
    crate::world::ip(if addr.is_ipv4() { SRC4 } else { SRC6 })
}

/// The frame the program must send for `inner` (a frame from the router) to `backend`.
pub fn encapsulated(f: &FibNs, inner: &[u8], key: &FlowKey, encap: u8, backend: IpAddr) -> Vec<u8> {
    let ip_packet = &inner[14..];
    let inner_v4 = ip_packet[0] >> 4 == 4;
    let tos = if inner_v4 {
        ip_packet[1]
    } else {
        (ip_packet[0] << 4) | (ip_packet[1] >> 4)
    };
    let proto = match (encap, inner_v4) {
        (ENCAP_GUE, _) => IpNumber::UDP,
        (_, true) => IpNumber::IPV4,
        (_, false) => IpNumber::IPV6,
    };
    let udp_len = if encap == ENCAP_GUE { 8 } else { 0 };
    let mut out = Vec::new();
    let ether_type: u16 = if backend.is_ipv4() { 0x0800 } else { 0x86dd };
    out.extend_from_slice(&GW_MAC);
    out.extend_from_slice(&f.mac);
    out.extend_from_slice(&ether_type.to_be_bytes());
    match (backend, src_of(backend)) {
        (IpAddr::V4(dst), IpAddr::V4(src)) => {
            let mut h = Ipv4Header::new(
                (ip_packet.len() + udp_len) as u16,
                64,
                proto,
                src.octets(),
                dst.octets(),
            )
            .expect("header");
            h.dont_fragment = true;
            h.dscp = etherparse::IpDscp::try_new(tos >> 2).expect("dscp");
            h.ecn = etherparse::IpEcn::try_new(tos & 3).expect("ecn");
            h.header_checksum = h.calc_header_checksum();
            h.write(&mut out).expect("write");
        }
        (IpAddr::V6(dst), IpAddr::V6(src)) => {
            let h = Ipv6Header {
                traffic_class: tos,
                flow_label: Ipv6FlowLabel::try_new(flow_entropy(key) & 0xfffff).expect("label"),
                payload_length: (ip_packet.len() + udp_len) as u16,
                next_header: proto,
                hop_limit: 64,
                source: src.octets(),
                destination: dst.octets(),
            };
            h.write(&mut out).expect("write");
        }
        _ => unreachable!("source and backend share a family"),
    }
    if encap == ENCAP_GUE {
        let u = UdpHeader {
            source_port: gue_source_port(key),
            destination_port: 6080,
            length: (ip_packet.len() + 8) as u16,
            checksum: 0,
        };
        u.write(&mut out).expect("write");
    }
    out.extend_from_slice(ip_packet);
    out
}

/// `frame` with its addresses, ports and MACs replaced, every checksum computed anew by
/// etherparse (not incrementally, as the program does).
pub fn rewritten(
    frame: &[u8],
    (src, sport): (IpAddr, u16),
    (dst, dport): (IpAddr, u16),
    (smac, dmac): ([u8; 6], [u8; 6]),
) -> Vec<u8> {
    let p = PacketHeaders::from_ethernet_slice(frame).expect("parses");
    let payload = p.payload.slice().to_vec();
    let mut out = Vec::new();
    let mut eth = p.link.expect("ethernet").ethernet2().expect("eth2");
    eth.source = smac;
    eth.destination = dmac;
    eth.write(&mut out).expect("write");
    let mut transport = p.transport.expect("l4");
    match p.net.expect("ip") {
        NetHeaders::Ipv4(mut h, _) => {
            h.source = match src {
                IpAddr::V4(a) => a.octets(),
                _ => unreachable!(),
            };
            h.destination = match dst {
                IpAddr::V4(a) => a.octets(),
                _ => unreachable!(),
            };
            h.header_checksum = h.calc_header_checksum();
            h.write(&mut out).expect("write");
            match &mut transport {
                TransportHeader::Tcp(t) => {
                    (t.source_port, t.destination_port) = (sport, dport);
                    t.checksum = t.calc_checksum_ipv4(&h, &payload).expect("csum");
                }
                TransportHeader::Udp(u) => {
                    (u.source_port, u.destination_port) = (sport, dport);
                    u.checksum = u.calc_checksum_ipv4(&h, &payload).expect("csum");
                }
                _ => unreachable!(),
            }
        }
        NetHeaders::Ipv6(mut h, _) => {
            h.source = match src {
                IpAddr::V6(a) => a.octets(),
                _ => unreachable!(),
            };
            h.destination = match dst {
                IpAddr::V6(a) => a.octets(),
                _ => unreachable!(),
            };
            h.write(&mut out).expect("write");
            match &mut transport {
                TransportHeader::Tcp(t) => {
                    (t.source_port, t.destination_port) = (sport, dport);
                    t.checksum = t.calc_checksum_ipv6(&h, &payload).expect("csum");
                }
                TransportHeader::Udp(u) => {
                    (u.source_port, u.destination_port) = (sport, dport);
                    u.checksum = u.calc_checksum_ipv6(&h, &payload).expect("csum");
                }
                _ => unreachable!(),
            }
        }
        _ => unreachable!(),
    }
    match transport {
        TransportHeader::Tcp(t) => t.write(&mut out).expect("write"),
        TransportHeader::Udp(u) => u.write(&mut out).expect("write"),
        _ => unreachable!(),
    }
    out.extend_from_slice(&payload);
    out
}

/// The source port the program chose (the only field it picks at random).
pub fn source_port(frame: &[u8]) -> u16 {
    let p = PacketHeaders::from_ethernet_slice(frame).expect("parses");
    match p.transport.expect("l4") {
        TransportHeader::Tcp(t) => t.source_port,
        TransportHeader::Udp(u) => u.source_port,
        _ => unreachable!(),
    }
}
