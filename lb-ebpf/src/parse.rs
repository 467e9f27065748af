//! Bounds-checked header parsing: Ethernet, one 802.1Q tag, IPv4 (any IHL), IPv6 (fixed
//! header), TCP, UDP, and the ICMP/ICMPv6 errors that quote a flow.
//!
//! Every read goes through [`ptr_at`]. Broken L2/L3/L4 headers are dropped as malformed (the
//! kernel would discard them too); anything we do not balance (fragments, IPv6 extension
//! headers, other protocols) is passed untouched with its own reason.
use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, Stat};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::proto::{
    ETH_P_8021Q, ICMP_DEST_UNREACH, ICMP_HDR_LEN, ICMPV6_DEST_UNREACH, ICMPV6_PKT_TOOBIG, IP_DF,
    IPPROTO_ICMP, IPPROTO_ICMPV6,
};
pub use crate::proto::{ETH_P_IP, ETH_P_IPV6};
use crate::ptr::{holds, unreadable};
pub use crate::ptr::{ptr_at, ptr_at_mut};
use crate::{Verdict, maps::maybe_vip_addr};

const MALFORMED: Verdict = Verdict::discard(Stat::DropMalformed);
const NOT_VIP: Verdict = Verdict::pass(Stat::PassNotVip);
const SPLIT: Verdict = Verdict::pass(Stat::PassSplitHeaders);

/// The header `T` at `off` in the frame's first buffer, where the program can read it; or
/// why not: split (a multi-buffer frame that holds it past its first buffer: passed, the
/// kernel reads it) or malformed (the frame ends before it). The judgement costs a helper
/// call on the failure path only.
#[inline(always)]
fn header<T>(ctx: &XdpContext, off: usize) -> Result<*const T, Verdict> {
    ptr_at(ctx, off).ok_or_else(|| unreadable(ctx, off + size_of::<T>(), SPLIT, MALFORMED))
}

/// What the rest of the program needs from a frame. The parse writes it in place
/// ([`Parsed::EMPTY`] first): built in the parse and returned by value, its 40-byte key was
/// copied twice more on every packet (64 instructions of copies on the established path).
pub struct Parsed {
    /// Client-to-VIP 5-tuple (for ICMP errors: the quoted flow, turned around).
    pub key: FlowKey,
    /// The packet is an ICMP error about `key`: forward it, but never create a flow for it.
    pub icmp_error: bool,
    /// TCP flags (`lb_common::TCP_*`); 0 for UDP and ICMP errors.
    pub tcp_flags: u8,
    /// The reason to pass it with if it turns out not to be for a VIP.
    pub not_vip: Verdict,
    /// Where the IP header starts (after Ethernet and an optional VLAN tag) and its total
    /// length, TOS / traffic class, and whether it may not be fragmented (IPv4 DF; always
    /// for IPv6): what encapsulation and "too big" replies need.
    pub ip: IpFacts,
    /// The guard's program admitted the packet's source (`guard`): a guarded VIP serves it
    /// without handing it to that program again.
    pub admitted: bool,
}

impl Parsed {
    /// Copied from read-only data (a few stores; an all-zero one becomes a `memset` call, a
    /// byte loop). The parse sets `not_vip` before anything reads it.
    pub const EMPTY: Parsed = Parsed {
        key: FlowKey::ZERO,
        icmp_error: false,
        tcp_flags: 0,
        not_vip: NOT_VIP,
        ip: IpFacts {
            l3: 0,
            l4: 0,
            len: 0,
            tos: 0,
            df: false,
        },
        admitted: false,
    };
}

#[derive(Clone, Copy)]
pub struct IpFacts {
    pub l3: usize,
    /// Where the L4 header (TCP, UDP or ICMP) starts.
    pub l4: usize,
    pub len: usize,
    pub tos: u8,
    pub df: bool,
}

#[inline(always)]
pub fn v4_addr(a: [u8; 4]) -> [u32; 4] {
    [u32::from_ne_bytes(a), 0, 0, 0]
}

/// A 2-byte field of the frame as the `u16` `u16::from_ne_bytes` makes of it, read as one
/// 16-bit word.
///
/// The frame starts at an even address (NET_IP_ALIGN is 0 or 2; `forward::l2_dsr` relies on
/// the same) and the IP and L4 headers sit at even offsets (Ethernet 14, a VLAN tag 4, IPv4
/// headers multiples of 4, IPv6 40), so their address and port fields are 2-aligned. Read
/// through their `[u8; N]` types the compiler loads them a byte at a time (BPF has no
/// unaligned loads): four loads, three shifts and three ors per IPv4 address, where two
/// 16-bit loads, a shift and an or do.
///
/// # Safety
/// `p` is in the frame (checked by `ptr_at`) at an even offset.
#[inline(always)]
unsafe fn word16(p: *const [u8; 2]) -> u16 {
    // SAFETY: the caller's; 2-aligned as above.
    unsafe { core::ptr::read(p as *const u16) }
}

/// A 2-byte big-endian field of the frame (a length, the fragment word) as a number, read
/// as one 16-bit word (see [`word16`]) where `u16::from_be_bytes` loads two bytes.
///
/// # Safety
/// As [`word16`].
#[inline(always)]
unsafe fn be16(p: *const [u8; 2]) -> u16 {
    // SAFETY: the caller's.
    u16::from_be(unsafe { word16(p) })
}

// `frame_v4_addr` puts the first half in the low bits, as `u32::from_ne_bytes` does on a
// little-endian machine (the program's target, bpfel).
const _: () = assert!(cfg!(target_endian = "little"));

/// An IPv4 address field of the frame as [`v4_addr`] makes it, read as two 16-bit words.
///
/// # Safety
/// As [`word16`].
#[inline(always)]
unsafe fn frame_v4_addr(p: *const [u8; 4]) -> [u32; 4] {
    let p = p as *const [u8; 2];
    // SAFETY: the caller's; both halves inside the 4-byte field.
    let (lo, hi) = unsafe { (word16(p), word16(p.add(1))) };
    [u32::from(lo) | (u32::from(hi) << 16), 0, 0, 0]
}

#[inline(always)]
fn v6_addr(a: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// A frame whose destination may be a VIP address: its family, where its IP header starts,
/// and the destination (read once, here).
#[derive(Clone, Copy)]
pub enum Candidate {
    V4 { l3: usize, dst: [u32; 4] },
    V6 { l3: usize, dst: [u32; 4] },
}

/// The VIP pre-filter, first and alone: Ethernet, an optional VLAN tag, and the IP
/// destination against the VIP-address bitmap. Most frames on a shared interface are not for
/// a VIP, and they leave here, passed without any further check (the kernel judges its own
/// traffic: a broken IP header not addressed to a VIP is its to drop, a fragment or IP
/// options not addressed to one are plain `passed_not_vip`). Only a frame too short to hold
/// the headers that tell is malformed here.
#[inline(always)]
pub fn prefilter(ctx: &XdpContext) -> Result<Candidate, Verdict> {
    let eth: *const EthHdr = header(ctx, 0)?;
    // SAFETY: `ptr_at` checked the header is inside the frame.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3 = EthHdr::LEN;
    if ether_type == ETH_P_8021Q {
        let vlan: *const VlanHdr = header(ctx, l3)?;
        ether_type = unsafe { (*vlan).ether_type };
        l3 += VlanHdr::LEN;
    }
    if ether_type == ETH_P_IP {
        let ip: *const Ipv4Hdr = header(ctx, l3)?;
        // SAFETY: checked by `ptr_at`; an even offset (`word16`).
        let dst = unsafe { frame_v4_addr(&raw const (*ip).dst_addr) };
        if !maybe_vip_addr(&dst) {
            return Err(NOT_VIP);
        }
        Ok(Candidate::V4 { l3, dst })
    } else if ether_type == ETH_P_IPV6 {
        let ip: *const Ipv6Hdr = header(ctx, l3)?;
        // SAFETY: checked by `ptr_at`.
        let dst = v6_addr(unsafe { (*ip).dst_addr });
        if !maybe_vip_addr(&dst) {
            return Err(NOT_VIP);
        }
        Ok(Candidate::V6 { l3, dst })
    } else {
        Err(NOT_VIP)
    }
}

/// The whole parse into `out`: the pre-filter, then the IP and L4 headers.
#[inline(always)]
pub fn parse(ctx: &XdpContext, out: &mut Parsed) -> Result<(), Verdict> {
    parse_candidate(ctx, prefilter(ctx)?, out)
}

/// The IP and L4 headers of a frame the pre-filter let through, into `out`.
#[inline(always)]
pub fn parse_candidate(ctx: &XdpContext, c: Candidate, out: &mut Parsed) -> Result<(), Verdict> {
    match c {
        Candidate::V4 { l3, dst } => parse_v4(ctx, l3, dst, out),
        Candidate::V6 { l3, dst } => parse_v6(ctx, l3, dst, out),
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3: usize, dst: [u32; 4], out: &mut Parsed) -> Result<(), Verdict> {
    let ip: *const Ipv4Hdr = header(ctx, l3)?;
    // SAFETY: checked by `ptr_at`.
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(MALFORMED);
    }
    // SAFETY: inside the checked header, at even offsets (`word16`).
    let (tot_len, frags) = unsafe {
        (
            be16(&raw const ip.tot_len) as usize,
            be16(&raw const ip.frags),
        )
    };
    // Complete by the whole frame: a jumbo frame's payload may sit in later buffers.
    if tot_len < ihl || !holds(ctx, l3 + tot_len) {
        return Err(MALFORMED);
    }
    // More-fragments flag or a fragment offset: no L4 header to balance on.
    if frags & 0x3fff != 0 {
        return Err(Verdict::pass(Stat::PassFragment));
    }
    let not_vip = if ihl > Ipv4Hdr::LEN {
        Verdict::pass(Stat::PassIpOptions)
    } else {
        NOT_VIP
    };
    // `dst` passed the pre-filter (an ICMP error we steer is addressed to its VIP too, see
    // `steer_error`).
    let l4 = l3 + ihl;
    let l4_len = tot_len - ihl;
    let facts = IpFacts {
        l3,
        l4,
        len: tot_len,
        tos: ip.tos,
        df: frags & IP_DF != 0,
    };
    out.ip = facts;
    out.not_vip = not_vip;
    match ip.proto {
        PROTO_TCP | PROTO_UDP => {
            // SAFETY: inside the checked header, at an even offset (`word16`).
            let src = unsafe { frame_v4_addr(&raw const ip.src_addr) };
            flow(ctx, out, (src, dst, ip.proto, FAMILY_V4), l4, l4_len)
        }
        IPPROTO_ICMP => {
            let icmp: *const [u8; ICMP_HDR_LEN] = header(ctx, l4)?;
            if unsafe { (*icmp)[0] } != ICMP_DEST_UNREACH {
                return Err(not_vip);
            }
            // The quote ends where the ICMP packet's IP total length says.
            let quoted = quoted_v4(ctx, l4 + ICMP_HDR_LEN, l3 + tot_len).ok_or(not_vip)?;
            steer_error(quoted, dst, out)
        }
        _ => Err(not_vip),
    }
}

/// An IPv4 TCP or UDP packet in its plainest form, read straight into registers: what the
/// express lane (`express`) needs of it. Only what a cache hit uses is kept (every value
/// live across the map lookups is a stack spill on BPF); the rest of the full path's
/// record is read again from the frame if the packet goes on ([`PlainV4::parsed`]).
pub struct PlainV4 {
    /// The flow's key as [`FlowKey::words`] ([`FlowKey::v4_words`]).
    pub words: [u64; 5],
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
    /// Where the IP header starts.
    pub l3: usize,
}

impl PlainV4 {
    /// The IP protocol (TCP or UDP), from the key.
    #[inline(always)]
    pub fn proto(&self) -> u8 {
        FlowKey::from_words(self.words).proto
    }

    /// The full path's record of this packet, as [`parse_v4`] makes it (the IP header read
    /// again for its length, TOS and DF).
    #[inline(always)]
    pub fn parsed(&self, ctx: &XdpContext) -> Result<Parsed, Verdict> {
        let ip: *const Ipv4Hdr = header(ctx, self.l3)?;
        // SAFETY: checked by `ptr_at`.
        let ip = unsafe { &*ip };
        Ok(Parsed {
            key: FlowKey::from_words(self.words),
            icmp_error: false,
            tcp_flags: self.tcp_flags,
            not_vip: NOT_VIP,
            ip: IpFacts {
                l3: self.l3,
                l4: self.l3 + Ipv4Hdr::LEN,
                // SAFETY: inside the checked header, at even offsets (`word16`).
                len: unsafe { be16(&raw const ip.tot_len) } as usize,
                tos: ip.tos,
                df: unsafe { be16(&raw const ip.frags) } & IP_DF != 0,
            },
            admitted: false,
        })
    }
}

/// The frame (a pre-filter candidate with its IPv4 header at `l3`, destination `dst`) when
/// it is an IPv4 TCP or UDP packet that [`parse_v4`] takes as it is: a 20-byte IP header
/// (no options), the IP length inside the first buffer (a multi-buffer frame goes on to
/// [`parse_v4`], which judges it by the whole frame), not a fragment, and an L4 header that
/// [`l4_ports`] accepts. `None` for anything else, which [`parse_v4`] judges (and counts).
#[inline(always)]
pub fn plain_v4(ctx: &XdpContext, l3: usize, dst: u32) -> Option<PlainV4> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3)?;
    // SAFETY: checked by `ptr_at`.
    let ip = unsafe { &*ip };
    // Version 4, IHL 5: the L4 header at a constant offset.
    if ip.vihl != 0x45 {
        return None;
    }
    // SAFETY: inside the checked header, at even offsets (`word16`).
    let (tot_len, frags) = unsafe {
        (
            be16(&raw const ip.tot_len) as usize,
            be16(&raw const ip.frags),
        )
    };
    if tot_len < Ipv4Hdr::LEN || ctx.data() + l3 + tot_len > ctx.data_end() || frags & 0x3fff != 0 {
        return None;
    }
    let proto = ip.proto;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    // SAFETY: inside the checked header, at an even offset (`word16`).
    let src = unsafe { frame_v4_addr(&raw const ip.src_addr) }[0];
    let (sport, dport, tcp_flags) =
        l4_ports(ctx, proto, l3 + Ipv4Hdr::LEN, tot_len - Ipv4Hdr::LEN).ok()?;
    Some(PlainV4 {
        words: FlowKey::v4_words(src, dst, u32::from(sport) | u32::from(dport) << 16, proto),
        tcp_flags,
        l3,
    })
}

#[inline(always)]
fn is_ipv6_ext(next: u8) -> bool {
    // hop-by-hop, routing, fragment, ESP, AH, destination options, mobility, HIP, shim6,
    // and the two experimental values.
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3: usize, dst: [u32; 4], out: &mut Parsed) -> Result<(), Verdict> {
    let ip: *const Ipv6Hdr = header(ctx, l3)?;
    // SAFETY: checked by `ptr_at`.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(MALFORMED);
    }
    // SAFETY: inside the checked header, at an even offset (`word16`).
    let payload = unsafe { be16(&raw const ip.payload_len) } as usize;
    let l4 = l3 + Ipv6Hdr::LEN;
    if !holds(ctx, l4 + payload) {
        return Err(MALFORMED);
    }
    let facts = IpFacts {
        l3,
        l4,
        len: Ipv6Hdr::LEN + payload,
        tos: (ip.vcf[0] << 4) | (ip.vcf[1] >> 4),
        df: true,
    };
    out.ip = facts;
    out.not_vip = NOT_VIP;
    match ip.next_hdr {
        PROTO_TCP | PROTO_UDP => {
            let src = v6_addr(ip.src_addr);
            flow(ctx, out, (src, dst, ip.next_hdr, FAMILY_V6), l4, payload)
        }
        IPPROTO_ICMPV6 => {
            let icmp: *const [u8; ICMP_HDR_LEN] = header(ctx, l4)?;
            let t = unsafe { (*icmp)[0] };
            if t != ICMPV6_DEST_UNREACH && t != ICMPV6_PKT_TOOBIG {
                return Err(NOT_VIP);
            }
            let quoted = quoted_v6(ctx, l4 + ICMP_HDR_LEN, l4 + payload).ok_or(NOT_VIP)?;
            steer_error(quoted, dst, out)
        }
        next if is_ipv6_ext(next) => Err(Verdict::pass(Stat::PassIpv6Ext)),
        _ => Err(NOT_VIP),
    }
}

/// An ICMP error is steered to a backend only when it is addressed to the VIP its quote came
/// from (a backend's packet VIP -> client met a router): an error addressed to anything else
/// (the load balancer's own address, say) is the kernel's, whatever it quotes.
#[inline(always)]
fn steer_error(quoted: FlowKey, outer_dst: [u32; 4], out: &mut Parsed) -> Result<(), Verdict> {
    if quoted.dst != outer_dst {
        return Err(out.not_vip);
    }
    out.key = quoted;
    out.icmp_error = true;
    Ok(())
}

/// A TCP or UDP packet's key into `out`: addresses, protocol and family, then the ports and
/// flags from the L4 header at `l4` (of `l4_len` bytes by the IP header).
#[inline(always)]
fn flow(
    ctx: &XdpContext,
    out: &mut Parsed,
    (src, dst, proto, family): ([u32; 4], [u32; 4], u8, u8),
    l4: usize,
    l4_len: usize,
) -> Result<(), Verdict> {
    let (sport, dport, flags) = l4_ports(ctx, proto, l4, l4_len)?;
    out.key.src = src;
    out.key.dst = dst;
    out.key.sport = sport;
    out.key.dport = dport;
    out.key.proto = proto;
    out.key.family = family;
    out.tcp_flags = flags;
    Ok(())
}

/// Offsets of the data offset and flags bytes in the TCP header.
const TCP_DOFF_OFFSET: usize = 12;
const TCP_FLAGS_OFFSET: usize = 13;

/// The TCP or UDP (`proto`) header at `l4`, checked against the IP length `l4_len`: its
/// source and destination ports (network byte order) and the TCP flags (0 for UDP).
#[inline(always)]
fn l4_ports(
    ctx: &XdpContext,
    proto: u8,
    l4: usize,
    l4_len: usize,
) -> Result<(u16, u16, u8), Verdict> {
    if proto == PROTO_TCP {
        let tcp_ptr: *const TcpHdr = header(ctx, l4)?;
        // SAFETY: checked by `ptr_at`.
        let tcp = unsafe { &*tcp_ptr };
        // The data offset is the high nibble of byte 12 (read as it is: the header type's
        // bit-field accessor cost six more instructions and two stack round trips).
        // SAFETY: byte 12 of the 20 checked.
        let doff = (unsafe { *(tcp_ptr as *const u8).add(TCP_DOFF_OFFSET) } >> 4) as usize * 4;
        if doff < TcpHdr::LEN || doff > l4_len {
            return Err(MALFORMED);
        }
        // Flags read through the header pointer itself: the verifier knows its 20 bytes are
        // in the packet, while a freshly computed pointer would need its own bound check.
        // SAFETY: inside the checked header, at even offsets (`word16`); byte 13 of the 20.
        return Ok(unsafe {
            (
                word16(&raw const tcp.source),
                word16(&raw const tcp.dest),
                *(tcp_ptr as *const u8).add(TCP_FLAGS_OFFSET),
            )
        });
    }
    let udp: *const UdpHdr = header(ctx, l4)?;
    // SAFETY: checked by `ptr_at`.
    let udp = unsafe { &*udp };
    // SAFETY: inside the checked header, at an even offset.
    let len = unsafe { be16(&raw const udp.len) } as usize;
    if len < UdpHdr::LEN || len > l4_len {
        return Err(MALFORMED);
    }
    // SAFETY: as for TCP.
    Ok(unsafe { (word16(&raw const udp.src), word16(&raw const udp.dst), 0) })
}

/// `v`, hidden from the optimiser (see `quoted_v4`).
#[inline(always)]
fn opaque(v: usize) -> usize {
    // SAFETY: a volatile read of a local.
    unsafe { core::ptr::read_volatile(&v) }
}

/// The flow quoted by an ICMP error: the quoted packet went VIP -> client, so the tuple is
/// turned around to the client -> VIP direction the flow table uses. `end` is where the
/// ICMP packet ends by its IP length: quoted bytes past it (Ethernet padding) are not read.
#[inline(always)]
fn quoted_v4(ctx: &XdpContext, off: usize, end: usize) -> Option<FlowKey> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, off)?;
    // SAFETY: checked by `ptr_at`.
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || (ip.proto != PROTO_TCP && ip.proto != PROTO_UDP) {
        return None;
    }
    // Verifier note: `end` is laundered through a volatile read, or LLVM proves this check
    // implies the packet bound below (the IP length was checked against `data_end`) and drops
    // that one, which the verifier needs.
    let end = opaque(end);
    if off + ihl + 4 > end {
        return None;
    }
    let ports: *const [u8; 4] = ptr_at(ctx, off + ihl)?;
    let p = unsafe { *ports };
    Some(FlowKey {
        src: v4_addr(ip.dst_addr),
        dst: v4_addr(ip.src_addr),
        sport: u16::from_ne_bytes([p[2], p[3]]),
        dport: u16::from_ne_bytes([p[0], p[1]]),
        proto: ip.proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    })
}

#[inline(always)]
fn quoted_v6(ctx: &XdpContext, off: usize, end: usize) -> Option<FlowKey> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, off)?;
    // SAFETY: checked by `ptr_at`.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 || (ip.next_hdr != PROTO_TCP && ip.next_hdr != PROTO_UDP) {
        return None;
    }
    // Verifier note: `end` is laundered through a volatile read, or LLVM proves this check
    // implies the packet bound below (the IP length was checked against `data_end`) and drops
    // that one, which the verifier needs.
    let end = opaque(end);
    if off + Ipv6Hdr::LEN + 4 > end {
        return None;
    }
    let ports: *const [u8; 4] = ptr_at(ctx, off + Ipv6Hdr::LEN)?;
    let p = unsafe { *ports };
    Some(FlowKey {
        src: v6_addr(ip.dst_addr),
        dst: v6_addr(ip.src_addr),
        sport: u16::from_ne_bytes([p[2], p[3]]),
        dport: u16::from_ne_bytes([p[0], p[1]]),
        proto: ip.next_hdr,
        family: FAMILY_V6,
        _pad: [0; 2],
    })
}
