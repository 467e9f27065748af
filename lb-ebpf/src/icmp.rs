//! "Too big" answers for packets that no longer fit the path once encapsulated: ICMP
//! "fragmentation needed" (IPv4 with DF) or ICMPv6 "packet too big", from the VIP to the
//! client, quoting the start of the original packet, sent back out of the receiving interface
//! (Katran's and Cilium's behaviour). The client's stack lowers its path MTU for the VIP.
//!
//! Shape: the frame grows at its head by the new IP + ICMP headers (the original IP packet
//! becomes the quote) and is cut at its tail to a fixed quote length, so the checksum runs
//! over a constant number of bytes (`bpf_csum_diff`, bounded for the verifier).
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{FAMILY_V4, Stat, csum_fold};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    Verdict, outer,
    parse::{Parsed, ptr_at_mut},
    proto::{
        ETH_P_IP, ETH_P_IPV6, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_HDR_LEN, ICMPV6_PKT_TOOBIG,
        IPPROTO_ICMP, IPPROTO_ICMPV6,
    },
    ptr::Frame,
};

/// Bytes of the original IPv4 packet quoted: the header (options included) and the ports.
const QUOTE4: usize = 64;
/// Bytes of the original IPv6 packet quoted: the header and the start of TCP/UDP.
const QUOTE6: usize = 128;
/// The IPv6 quote when the first buffer of a multi-buffer frame is shorter than [`QUOTE6`]
/// (a driver that splits headers from data): the header and the L4 header's first 24 bytes,
/// all a client's stack reads of it (ports and sequence number).
const QUOTE6_SHORT: usize = 64;
/// Ethernet header and one VLAN tag: where an IP header can start.
const MAX_L3: usize = 18;

const CANNOT: Verdict = Verdict::discard(Stat::DropTooBig);

/// Answers `pkt` with a "too big" carrying `mtu` (the inner packet size that fits).
#[inline(always)]
pub fn too_big(ctx: &XdpContext, pkt: &Parsed, mtu: u32) -> Verdict {
    // Never an error about an error; IPv4 without DF may be fragmented, which we cannot do.
    if pkt.icmp_error || !pkt.ip.df {
        return CANNOT;
    }
    let done = if pkt.key.family == FAMILY_V4 {
        too_big_v4(ctx, pkt, mtu)
    } else {
        too_big_v6(ctx, pkt, mtu)
    };
    done.unwrap_or(CANNOT)
}

/// Moves the original IP packet to `at` (growing the head) and cuts the frame to `at + quote`.
/// Returns the original frame's (destination, source) MACs.
#[inline(always)]
fn reshape(ctx: &XdpContext, l3: usize, at: usize, quote: usize) -> Option<([u8; 6], [u8; 6])> {
    // Verifier note: `l3` comes from a spilled struct and has lost its range; Ethernet plus at
    // most one VLAN tag bounds it again before it meets a packet pointer.
    if l3 > MAX_L3 {
        return None;
    }
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0)?;
    // The quote must be in the packet before anything moves.
    ptr_at_mut::<[u8; 4]>(ctx, l3 + quote - 4)?;
    // SAFETY: checked by `ptr_at_mut`.
    let macs = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    let grow = at as i32 - l3 as i32;
    // SAFETY: helpers on our own context; pointers are re-derived after each.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return None;
    }
    // Cut to the quote from the whole frame's end: a jumbo frame's later buffers go first
    // (the helper frees them, then trims the first buffer).
    let len = ctx.frame_len() as i32;
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, (at + quote) as i32 - len) } != 0 {
        return None;
    }
    Some(macs)
}

#[inline(always)]
fn reply_eth(ctx: &XdpContext, macs: ([u8; 6], [u8; 6]), ether_type: u16) -> Option<()> {
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0)?;
    // SAFETY: checked by `ptr_at_mut`. Back to where the frame came from.
    unsafe {
        (*eth).dst_addr = macs.1;
        (*eth).src_addr = macs.0;
        (*eth).ether_type = ether_type;
    }
    Some(())
}

/// One's-complement sum of `N` bytes of the frame at `off` (native-order words).
#[inline(always)]
fn sum_at<const N: usize>(ctx: &XdpContext, off: usize) -> Option<u64> {
    let p: *mut [u8; N] = ptr_at_mut(ctx, off)?;
    // SAFETY: `p` covers N bytes inside the packet; N is a multiple of 4 and at most 512.
    let s = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p as *mut u32, N as u32, 0) };
    (s >= 0).then_some(s as u64)
}

#[inline(always)]
fn too_big_v4(ctx: &XdpContext, pkt: &Parsed, mtu: u32) -> Option<Verdict> {
    const AT: usize = EthHdr::LEN + Ipv4Hdr::LEN + ICMP_HDR_LEN;
    let macs = reshape(ctx, pkt.ip.l3, AT, QUOTE4)?;
    reply_eth(ctx, macs, ETH_P_IP)?;
    let icmp: *mut [u8; ICMP_HDR_LEN] = ptr_at_mut(ctx, EthHdr::LEN + Ipv4Hdr::LEN)?;
    let mtu = (mtu.min(0xffff) as u16).to_be_bytes();
    // SAFETY: checked by `ptr_at_mut`.
    unsafe {
        *icmp = [
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            0,
            0,
            0,
            0,
            mtu[0],
            mtu[1],
        ]
    };
    let sum = sum_at::<{ ICMP_HDR_LEN + QUOTE4 }>(ctx, EthHdr::LEN + Ipv4Hdr::LEN)?;
    let check = csum_fold(sum).to_ne_bytes();
    unsafe {
        (*icmp)[2] = check[0];
        (*icmp)[3] = check[1];
    }
    let o = crate::fib::Outer {
        family: FAMILY_V4,
        proto: IPPROTO_ICMP,
        src: pkt.key.dst,
        dst: pkt.key.src,
        sport: 0,
        dport: 0,
        len: (Ipv4Hdr::LEN + ICMP_HDR_LEN + QUOTE4) as u16,
        tos: 0,
        ifindex: 0,
    };
    let ip: *mut Ipv4Hdr = ptr_at_mut(ctx, EthHdr::LEN)?;
    // SAFETY: checked by `ptr_at_mut`.
    unsafe { *ip = outer::ipv4(&o, false) };
    Some(Verdict::reply(Stat::IcmpTooBig, xdp_action::XDP_TX))
}

/// The quote is read in place, so it must sit in the frame's first buffer: the usual one
/// when it does, the short one when only that does.
#[inline(always)]
fn too_big_v6(ctx: &XdpContext, pkt: &Parsed, mtu: u32) -> Option<Verdict> {
    if pkt.ip.l3 > MAX_L3 {
        return None;
    }
    if ptr_at_mut::<[u8; 4]>(ctx, pkt.ip.l3 + QUOTE6 - 4).is_some() {
        too_big_v6_quoting::<QUOTE6, { ICMP_HDR_LEN + QUOTE6 }>(ctx, pkt, mtu)
    } else {
        too_big_v6_quoting::<QUOTE6_SHORT, { ICMP_HDR_LEN + QUOTE6_SHORT }>(ctx, pkt, mtu)
    }
}

/// [`too_big_v6`] with a quote of `Q` bytes (`N`: the ICMP header and the quote).
#[inline(always)]
fn too_big_v6_quoting<const Q: usize, const N: usize>(
    ctx: &XdpContext,
    pkt: &Parsed,
    mtu: u32,
) -> Option<Verdict> {
    const AT: usize = EthHdr::LEN + Ipv6Hdr::LEN + ICMP_HDR_LEN;
    let macs = reshape(ctx, pkt.ip.l3, AT, Q)?;
    reply_eth(ctx, macs, ETH_P_IPV6)?;
    let icmp: *mut [u8; ICMP_HDR_LEN] = ptr_at_mut(ctx, EthHdr::LEN + Ipv6Hdr::LEN)?;
    let m = mtu.to_be_bytes();
    // SAFETY: checked by `ptr_at_mut`.
    unsafe { *icmp = [ICMPV6_PKT_TOOBIG, 0, 0, 0, m[0], m[1], m[2], m[3]] };
    let len = N as u32;
    // Pseudo-header: addresses, upper-layer length, next header (native-order words).
    let pseudo = outer::addr_sum(&pkt.key.src)
        + outer::addr_sum(&pkt.key.dst)
        + len.to_be() as u64
        + (IPPROTO_ICMPV6 as u32).to_be() as u64;
    let sum = sum_at::<N>(ctx, EthHdr::LEN + Ipv6Hdr::LEN)?;
    let check = csum_fold(sum + pseudo).to_ne_bytes();
    unsafe {
        (*icmp)[2] = check[0];
        (*icmp)[3] = check[1];
    }
    let o = crate::fib::Outer {
        family: lb_common::FAMILY_V6,
        proto: IPPROTO_ICMPV6,
        src: pkt.key.dst,
        dst: pkt.key.src,
        sport: 0,
        dport: 0,
        len: (Ipv6Hdr::LEN + N) as u16,
        tos: 0,
        ifindex: 0,
    };
    let ip: *mut Ipv6Hdr = ptr_at_mut(ctx, EthHdr::LEN)?;
    let mut h = outer::ipv6(&o, &pkt.key);
    h.vcf = [0x60, 0, 0, 0];
    // SAFETY: checked by `ptr_at_mut`.
    unsafe { *ip = h };
    Some(Verdict::reply(Stat::IcmpTooBig, xdp_action::XDP_TX))
}
