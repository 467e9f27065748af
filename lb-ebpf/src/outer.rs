//! Outer headers for IPIP and GUE, built as values (shared by the XDP forwarding path and the
//! tc health-check path, which write them differently). Formats: `lb_common::encap`'s docs.
use lb_common::{
    Backend, ENCAP_GUE, FAMILY_V4, FlowKey, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HDR_LEN, IPV6_HDR_LEN,
    LbConfig, OUTER_TTL, PREVIOUS_HOPS, PROTO_UDP, csum_fold, encap_overhead, flow_entropy,
    gue_hops_len, gue_source_port, outer_source,
};
use network_types::{
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

use crate::{fib::Outer, proto::IP_DF};

/// Everything about one encapsulation, decided before the packet is touched.
pub struct Plan {
    pub outer: Outer,
    /// Bytes added in front of the inner IP header.
    pub overhead: usize,
    /// Second-chance hops for the GUE variant-0 header (`lb_common::second_chance`), when set.
    pub hops: Option<Hops>,
}

/// The previous backends' addresses a GUE header carries, in their map entries (no copies:
/// the stack is tight): `count` of them (1 to `PREVIOUS_HOPS`); entries from `count` on
/// repeat the first, so every one is a valid pointer and each is indexed by a constant.
#[derive(Clone, Copy)]
pub struct Hops {
    pub count: u8,
    pub addr: [&'static [u32; 4]; PREVIOUS_HOPS],
}

/// The inner packet as the outer header needs it.
pub struct Inner {
    pub v4: bool,
    /// IP length in bytes.
    pub len: usize,
    /// TOS or traffic class.
    pub tos: u8,
}

/// Plans the encapsulation of `inner` for `b`. `None` when the result would not fit an IP
/// length.
#[inline(always)]
pub fn plan(
    cfg: &LbConfig,
    b: &Backend,
    key: &FlowKey,
    inner: &Inner,
    ifindex: u32,
    hops: Option<Hops>,
) -> Option<Plan> {
    let (inner_v4, inner_len, tos) = (inner.v4, inner.len, inner.tos);
    let gue = b.encap == ENCAP_GUE;
    let hops = hops.filter(|_| gue);
    let overhead = encap_overhead(b.encap, b.family)
        + match &hops {
            Some(h) => gue_hops_len(b.family, h.count),
            None => 0,
        };
    let len = inner_len + overhead;
    if len > 0xffff {
        return None;
    }
    let proto = if gue {
        PROTO_UDP
    } else if inner_v4 {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    Some(Plan {
        outer: Outer {
            family: b.family,
            proto,
            src: outer_source(cfg, b, key),
            dst: b.addr,
            sport: if gue { gue_source_port(key).to_be() } else { 0 },
            dport: if gue { cfg.gue_port } else { 0 },
            len: len as u16,
            tos,
            ifindex,
        },
        overhead,
        hops,
    })
}

/// Sum of an address's 16-bit words in native order (see [`ipv4`] on byte order).
#[inline(always)]
pub fn addr_sum(a: &[u32; 4]) -> u64 {
    a[0] as u64 + a[1] as u64 + a[2] as u64 + a[3] as u64
}

/// An IPv4 header for `o` (DF set when `df`), checksum included. Sums run over native-order
/// words and the result is stored with `to_ne_bytes`: the one's-complement sum is
/// byte-order independent.
#[inline(always)]
pub fn ipv4(o: &Outer, df: bool) -> Ipv4Hdr {
    let mut h = Ipv4Hdr {
        vihl: 0x45,
        tos: o.tos,
        tot_len: o.len.to_be_bytes(),
        id: [0, 0],
        frags: if df { IP_DF.to_be_bytes() } else { [0, 0] },
        ttl: OUTER_TTL,
        proto: o.proto,
        check: [0, 0],
        src_addr: o.src[0].to_ne_bytes(),
        dst_addr: o.dst[0].to_ne_bytes(),
    };
    let sum = u16::from_ne_bytes([h.vihl, h.tos]) as u64
        + u16::from_ne_bytes(h.tot_len) as u64
        + u16::from_ne_bytes(h.frags) as u64
        + u16::from_ne_bytes([h.ttl, h.proto]) as u64
        + o.src[0] as u64
        + o.dst[0] as u64;
    h.check = csum_fold(sum).to_ne_bytes();
    h
}

/// The outer IPv6 header: traffic class copied, flow label from the flow's entropy.
#[inline(always)]
pub fn ipv6(o: &Outer, key: &FlowKey) -> Ipv6Hdr {
    let label = flow_entropy(key) & 0x000f_ffff;
    let vcf = (6u32 << 28) | ((o.tos as u32) << 20) | label;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    for i in 0..4 {
        let s = o.src[i].to_ne_bytes();
        let d = o.dst[i].to_ne_bytes();
        src[i * 4..i * 4 + 4].copy_from_slice(&s);
        dst[i * 4..i * 4 + 4].copy_from_slice(&d);
    }
    Ipv6Hdr {
        vcf: vcf.to_be_bytes(),
        payload_len: (o.len as usize - IPV6_HDR_LEN).to_be_bytes_u16(),
        next_hdr: o.proto,
        hop_limit: OUTER_TTL,
        src_addr: src,
        dst_addr: dst,
    }
}

/// The outer UDP header of a GUE packet (checksum 0).
#[inline(always)]
pub fn udp(o: &Outer) -> UdpHdr {
    let ip = if o.family == FAMILY_V4 {
        IPV4_HDR_LEN
    } else {
        IPV6_HDR_LEN
    };
    UdpHdr {
        src: o.sport.to_ne_bytes(),
        dst: o.dport.to_ne_bytes(),
        len: (o.len as usize - ip).to_be_bytes_u16(),
        check: [0, 0],
    }
}

/// `usize` to a big-endian `u16` field (callers keep lengths under 65536).
trait BeU16 {
    fn to_be_bytes_u16(self) -> [u8; 2];
}

impl BeU16 for usize {
    #[inline(always)]
    fn to_be_bytes_u16(self) -> [u8; 2] {
        (self as u16).to_be_bytes()
    }
}
