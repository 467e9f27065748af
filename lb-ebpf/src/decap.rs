//! The backends' decapsulation program (`lb decap`): strips IPIP and GUE (variant 1) outer
//! headers from packets sent to this host for a configured VIP, so the inner packet reaches
//! the stack as if the client had sent it here (the VIP on `lo` answers it, directly to the
//! client). This kernel has no ipip/fou modules; this program replaces them, with none of their
//! setup (no tunnel device, no per-tunnel rp_filter).
//!
//! Everything else passes untouched, counted by reason: other traffic, tunnels to other
//! addresses, tunnels to this host for addresses that are not configured VIPs, broken headers.
//! The program never drops.
#![no_std]
#![no_main]

#[cfg(feature = "bench")]
mod decap_bench;

// Shared with the load balancer (the library).
use lb_ebpf::{fib, owner, proto, ptr};

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO,
        TC_ACT_OK, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action,
    },
    cty::c_void,
    helpers::{bpf_redirect, bpf_xdp_adjust_head},
    macros::{classifier, map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Counter, DECAP_MAX_ADDRS, DECAP_MAX_LOCAL, DecapAddr, DecapConfig, DecapStat, FAMILY_V4,
    FAMILY_V6, GUE_BASE_LEN, GUE_HOPS_WORD_LEN, GUE_MAX_HOPS, HopsHeader, IPPROTO_IPIP,
    IPPROTO_IPV6, PROTO_UDP, UDP_HDR_LEN, hop_addr_len, parse_hops_word,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

use crate::{
    owner::Hops,
    proto::{ETH_P_IP, ETH_P_IPV6},
    ptr::{Frame, ptr_at, ptr_at_mut, unreadable},
};

/// The header `T` at `off` in the frame's first buffer, or why it cannot be read there:
/// split by a multi-buffer frame's buffer boundary, or past the frame's end (malformed).
#[inline(always)]
fn header<T>(ctx: &impl Frame, off: usize) -> Result<*const T, DecapStat> {
    ptr_at(ctx, off).ok_or_else(|| {
        unreadable(
            ctx,
            off + core::mem::size_of::<T>(),
            DecapStat::PassSplitHeaders,
            MALFORMED,
        )
    })
}

#[map(name = "DECAP_VIPS")]
static DECAP_VIPS: HashMap<DecapAddr, u32> = HashMap::with_max_entries(DECAP_MAX_ADDRS, 0);

#[map(name = "DECAP_STATS")]
static DECAP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DecapStat::COUNT, 0);

/// Written by `lb decap` before loading.
#[unsafe(no_mangle)]
static DECAP_CONFIG: DecapConfig = DecapConfig::DEFAULT;

#[inline(always)]
fn count(stat: DecapStat, len: u64) {
    if let Some(c) = DECAP_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: this CPU's slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}

/// Multi-buffer aware (`xdp.frags`): a backend at a jumbo MTU gets its large tunnel packets
/// whole. Headers are read in the first buffer; the strip moves only the head, so the inner
/// packet's later buffers are kept as they are.
#[xdp(frags)]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    decap_xdp(&ctx)
}

#[inline(always)]
fn decap_xdp(ctx: &XdpContext) -> u32 {
    // The whole frame, a jumbo one's later buffers included.
    let len = ctx.frame_len() as u64;
    let (stat, action) = match classify(ctx) {
        Err(s) => (s, xdp_action::XDP_PASS),
        Ok(found) => match decide(ctx.ctx as *mut c_void, ctx, &found) {
            Decision::Keep(reason) => match strip_xdp(ctx, &found) {
                Ok(_) => (reason, xdp_action::XDP_PASS),
                Err(s) => (s, xdp_action::XDP_PASS),
            },
            Decision::Forward(h) => match forward_xdp(ctx, h) {
                Ok(sent) => sent,
                Err(reason) => match strip_xdp(ctx, &found) {
                    Ok(_) => (reason, xdp_action::XDP_PASS),
                    Err(s) => (s, xdp_action::XDP_PASS),
                },
            },
        },
    };
    count(stat, len);
    action
}

/// What to do with a tunnel packet for a configured VIP.
enum Decision {
    /// Decapsulate and hand to the stack, counted with this reason.
    Keep(DecapStat),
    /// Not ours: on to the next hop of the list.
    Forward(Hops),
}

/// Second chance: a packet without a hop list is ours; one with hops is ours when this
/// host owns its flow (`owner::owned`), else it goes to the next hop, if one is left.
#[inline(always)]
fn decide(raw: *mut c_void, ctx: &impl Frame, found: &Found) -> Decision {
    let h = found.hops;
    if h.count == 0 {
        return Decision::Keep(DecapStat::Decapsulated);
    }
    if h.next >= h.count {
        return Decision::Keep(DecapStat::KeptLastHop);
    }
    match owner::owned(raw, ctx, found.inner, found.inner_type == ETH_P_IP) {
        Some(reason) => Decision::Keep(reason),
        None => Decision::Forward(h),
    }
}

/// The outer header for the next hop that is not this host: a hop that is another of this
/// host's addresses (a host may serve a VIP on several) cannot own the flow either, since the
/// sockets are the host's, and the FIB has no route to ourselves: it is skipped (`h.next`
/// moves past it), or the hops after it would never be tried. `Err(KeptLastHop)`: none left.
#[inline(always)]
fn next_outer_elsewhere(
    ctx: &impl Frame,
    h: &mut Hops,
    ifindex: u32,
) -> Result<fib::Outer, DecapStat> {
    let o = next_outer(ctx, h, ifindex)?;
    if !is_local_addr(&o.dst, u32::from(o.family)) {
        // The usual case: no helper call.
        return Ok(o);
    }
    // `hop[next]` is ours; the hops after it are copied out by the helper (`Frame::load`):
    // read in place at an offset computed at run time, LLVM addressed the words from the end
    // of the bounds check, which the verifier refuses. Bounded: the loop unrolls.
    h.next += 1;
    let at = (h.word & 0x1ff) + GUE_HOPS_WORD_LEN;
    for i in 1..GUE_MAX_HOPS as usize {
        if i != h.next as usize || h.next >= h.count {
            continue;
        }
        let local = if h.family == FAMILY_V4 {
            ctx.load::<u32>(at + 4 * i)
                .is_some_and(|a| is_local_addr(&[a, 0, 0, 0], FAMILY_V4 as u32))
        } else {
            ctx.load::<[u32; 4]>(at + 16 * i)
                .is_some_and(|a| is_local_addr(&a, FAMILY_V6 as u32))
        };
        if local {
            h.next += 1;
        }
    }
    if h.next >= h.count {
        return Err(DecapStat::KeptLastHop);
    }
    next_outer(ctx, h, ifindex)
}

/// The outer header as the FIB needs it, with the destination replaced by the next hop.
#[inline(always)]
fn next_outer(ctx: &impl Frame, h: &Hops, ifindex: u32) -> Result<fib::Outer, DecapStat> {
    let l3 = EthHdr::LEN;
    let eth: *const EthHdr = header(ctx, 0)?;
    // SAFETY: checked by `ptr_at`.
    if !owner::hop_fits(h, unsafe { (*eth).ether_type } == ETH_P_IP) {
        // Hops of the other family than the outer header: unusable, so the packet stays.
        return Err(DecapStat::KeptLastHop);
    }
    let next = (h.next & 3) as usize;
    let word = h.word & 0x1ff;
    let udp: *const UdpHdr;
    let mut o = fib::Outer {
        family: h.family,
        proto: PROTO_UDP,
        src: [0; 4],
        dst: [0; 4],
        sport: 0,
        dport: 0,
        len: 0,
        tos: 0,
        ifindex,
    };
    if h.family == FAMILY_V4 {
        let ip: *const [u8; 20] = header(ctx, l3)?;
        // SAFETY: checked by `ptr_at`.
        let ip = unsafe { &*ip };
        if ip[0] != 0x45 || ip[8] <= 1 {
            // Options, or no TTL left to forward with: keep it.
            return Err(DecapStat::KeptNoRoute);
        }
        let hop: *const [u8; 4] = header(ctx, word + GUE_HOPS_WORD_LEN + next * 4)?;
        o.src[0] = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
        o.dst[0] = u32::from_ne_bytes(unsafe { *hop });
        o.len = u16::from_be_bytes([ip[2], ip[3]]);
        o.tos = ip[1];
        udp = header(ctx, l3 + 20)?;
    } else {
        let ip: *const Ipv6Hdr = header(ctx, l3)?;
        // SAFETY: checked by `ptr_at`.
        let ip = unsafe { &*ip };
        if ip.hop_limit <= 1 {
            return Err(DecapStat::KeptNoRoute);
        }
        let hop: *const [u32; 4] = header(ctx, word + GUE_HOPS_WORD_LEN + next * 16)?;
        for i in 0..4 {
            let a = &ip.src_addr[i * 4..i * 4 + 4];
            o.src[i] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        }
        o.dst = unsafe { *hop };
        o.len = u16::from_be_bytes(ip.payload_len) + Ipv6Hdr::LEN as u16;
        udp = header(ctx, l3 + Ipv6Hdr::LEN)?;
    }
    // SAFETY: checked by `ptr_at`.
    unsafe {
        o.sport = u16::from_ne_bytes((*udp).src);
        o.dport = u16::from_ne_bytes((*udp).dst);
    }
    Ok(o)
}

/// Rewrites the outer header for the next hop: destination, TTL or hop limit one less
/// (IPv4 checksum recomputed), and the hop list's `next` one further.
#[inline(always)]
fn rewrite_outer(ctx: &impl Frame, h: &Hops, o: &fib::Outer) -> Result<(), DecapStat> {
    let l3 = EthHdr::LEN;
    if h.family == FAMILY_V4 {
        let ip: *mut [u8; 20] = ptr_at_mut(ctx, l3).ok_or(MALFORMED)?;
        // SAFETY: checked by `ptr_at_mut`.
        let ip = unsafe { &mut *ip };
        ip[16..20].copy_from_slice(&o.dst[0].to_ne_bytes());
        ip[8] -= 1;
        let c = owner::ipv4_checksum(ip).to_ne_bytes();
        ip[10] = c[0];
        ip[11] = c[1];
    } else {
        let ip: *mut Ipv6Hdr = ptr_at_mut(ctx, l3).ok_or(MALFORMED)?;
        // SAFETY: checked by `ptr_at_mut`.
        let ip = unsafe { &mut *ip };
        for i in 0..4 {
            ip.dst_addr[i * 4..i * 4 + 4].copy_from_slice(&o.dst[i].to_ne_bytes());
        }
        ip.hop_limit -= 1;
    }
    let w: *mut [u8; 4] = ptr_at_mut(ctx, h.word & 0x1ff).ok_or(MALFORMED)?;
    // SAFETY: checked by `ptr_at_mut`.
    unsafe { (*w)[1] = h.next + 1 };
    Ok(())
}

/// Sends the packet to the next hop from XDP: out of the receiving interface (XDP_TX) or
/// another one (redirect); an unresolved neighbour hands the rewritten packet to the stack,
/// which forwards it. `Err`: keep the packet (no route).
#[inline(always)]
fn forward_xdp(ctx: &XdpContext, mut h: Hops) -> Result<(DecapStat, u32), DecapStat> {
    let ingress = ctx.ingress_ifindex() as u32;
    let h = &mut h;
    let o = next_outer_elsewhere(ctx, h, ingress)?;
    match fib::lookup(ctx.ctx as *mut c_void, &o, 0) {
        fib::Fib::Hop(nh) => {
            rewrite_outer(ctx, h, &o)?;
            let eth: *mut EthHdr = ptr_at_mut(ctx, 0).ok_or(MALFORMED)?;
            // SAFETY: checked by `ptr_at_mut`.
            unsafe {
                (*eth).dst_addr = nh.dmac;
                (*eth).src_addr = nh.smac;
            }
            if nh.ifindex == ingress {
                Ok((DecapStat::Forwarded, xdp_action::XDP_TX))
            } else {
                // SAFETY: plain helper call.
                let rc = unsafe { bpf_redirect(nh.ifindex, 0) } as u32;
                Ok((DecapStat::Forwarded, rc))
            }
        }
        fib::Fib::NoNeighbour | fib::Fib::TooBig(_) => {
            rewrite_outer(ctx, h, &o)?;
            Ok((DecapStat::ForwardedByStack, xdp_action::XDP_PASS))
        }
        fib::Fib::Fail(_) => Err(DecapStat::KeptNoRoute),
    }
}

/// The tc variant: the route from the FIB, the neighbour left to `bpf_redirect_neigh`.
#[inline(always)]
fn forward_tc(ctx: &TcContext, mut h: Hops) -> Result<(DecapStat, i32), DecapStat> {
    // SAFETY: reads the skb's device field (at tc ingress, the receiving interface).
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    let h = &mut h;
    let o = next_outer_elsewhere(ctx, h, ingress)?;
    let (ifindex, nh) = fib::route(ctx.skb.skb as *mut c_void, &o).ok_or(DecapStat::KeptNoRoute)?;
    rewrite_outer(ctx, h, &o)?;
    Ok((
        DecapStat::Forwarded,
        fib::redirect_neigh(ifindex, h.family, nh),
    ))
}

/// The same program at tc ingress (`lb decap --attach tc`), for drivers where XDP is not
/// wanted: the outer headers are removed with `bpf_skb_adjust_room`, keeping a GRO'd
/// packet's segment size (`BPF_F_ADJ_ROOM_FIXED_GSO`) and setting the inner protocol.
#[classifier]
pub fn lb_decap_tc(ctx: TcContext) -> i32 {
    let len = u64::from(ctx.len());
    // Headers up to the inner IP header must be in the linear part for direct access.
    let _ = ctx.pull_data(ctx.len().min(PULL));
    let (stat, action) = match classify(&ctx) {
        Err(s) => (s, TC_ACT_OK),
        Ok(found) => match decide(ctx.skb.skb as *mut c_void, &ctx, &found) {
            Decision::Keep(reason) => match strip_tc(&ctx, &found) {
                Ok(_) => (reason, TC_ACT_OK),
                Err(s) => (s, TC_ACT_OK),
            },
            Decision::Forward(h) => match forward_tc(&ctx, h) {
                Ok(sent) => sent,
                Err(reason) => match strip_tc(&ctx, &found) {
                    Ok(_) => (reason, TC_ACT_OK),
                    Err(s) => (s, TC_ACT_OK),
                },
            },
        },
    };
    count(stat, len);
    action
}

/// Ethernet, outer IPv6, UDP, a GUE header with one IPv6 hop, an inner IPv6 header and a
/// TCP header.
const PULL: u32 = 14 + 40 + 8 + 24 + 40 + 20;

/// Where the inner packet starts and the Ethernet type it will carry; for a GUE packet with
/// a hop list (second chance), where the list is.
struct Found {
    inner: usize,
    inner_type: u16,
    hops: Hops,
}

#[inline(always)]
fn strip_xdp(ctx: &XdpContext, found: &Found) -> Result<DecapStat, DecapStat> {
    let eth: *const EthHdr = header(ctx, 0)?;
    // SAFETY: checked by `ptr_at`; copied before the frame moves.
    let (dst, src) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    let cut = (found.inner - EthHdr::LEN) as i32;
    // SAFETY: helper on our own context; the frame is re-checked below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, cut) } != 0 {
        return Err(MALFORMED);
    }
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0).ok_or(MALFORMED)?;
    // SAFETY: checked by `ptr_at_mut`.
    unsafe {
        (*eth).dst_addr = dst;
        (*eth).src_addr = src;
        (*eth).ether_type = found.inner_type;
    }
    Ok(DecapStat::Decapsulated)
}

#[inline(always)]
fn strip_tc(ctx: &TcContext, found: &Found) -> Result<DecapStat, DecapStat> {
    let cut = (found.inner - EthHdr::LEN) as i32;
    let inner = if found.inner_type == ETH_P_IP {
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4
    } else {
        BPF_F_ADJ_ROOM_DECAP_L3_IPV6
    };
    ctx.adjust_room(
        -cut,
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | inner),
    )
    .map_err(|_| MALFORMED)?;
    ctx.store(12, &found.inner_type, 0).map_err(|_| MALFORMED)?;
    Ok(DecapStat::Decapsulated)
}

const NOT_ENCAP: DecapStat = DecapStat::PassNotEncap;
const MALFORMED: DecapStat = DecapStat::PassMalformed;

/// An outer header that may carry a tunnel: where the payload starts and what it is.
struct Tunnel {
    /// Offset of the inner IP header.
    inner: usize,
    /// Inner family required by the outer protocol (IPIP, GUE variant 0); `None` for GUE
    /// variant 1 (read from the inner version nibble).
    family: Option<u32>,
    /// The second-chance hop list of a GUE variant-0 header.
    hops: Hops,
}

/// Whether `a` (a tunnel's outer destination) is one of this host's addresses.
#[inline(always)]
fn is_local(a: &DecapAddr) -> bool {
    in_local_config(&a.addr, a.family)
}

/// [`is_local`] for a hop's address on the forwarding path. Not inlined: a BPF-to-BPF call (a
/// few instructions) where inlined copies made the program much longer and its hot paths
/// slower (the decap address check's note in docs/experiments/).
#[inline(never)]
fn is_local_addr(addr: &[u32; 4], family: u32) -> bool {
    in_local_config(addr, family)
}

/// Whether address `addr` of `family` (IPv4: word 0, the rest 0) is in the read-only
/// configuration's local addresses, read field by field in place (a copy of the configuration
/// would take 164 bytes of a stack the tc program has not got to spare).
#[inline(always)]
fn in_local_config(addr: &[u32; 4], family: u32) -> bool {
    // SAFETY: plain reads of an initialised global (volatile: the values written at load
    // time, not the compile-time defaults).
    let n = unsafe { core::ptr::read_volatile(&DECAP_CONFIG.n_local) } as usize;
    let mut i = 0;
    while i < DECAP_MAX_LOCAL {
        if i < n {
            let l = &DECAP_CONFIG.local[i];
            // SAFETY: as above.
            let (f, a) = unsafe {
                (
                    core::ptr::read_volatile(&l.family),
                    core::ptr::read_volatile(&l.addr),
                )
            };
            if f == family && a == *addr {
                return true;
            }
        }
        i += 1;
    }
    false
}

/// Whether the frame is a tunnel to this host for a configured VIP, and where its inner
/// packet is; otherwise why not.
#[inline(always)]
fn classify(ctx: &impl Frame) -> Result<Found, DecapStat> {
    let eth: *const EthHdr = header(ctx, 0)?;
    // SAFETY: checked by `ptr_at`.
    let ether_type = unsafe { (*eth).ether_type };
    let l3 = EthHdr::LEN;
    let (tunnel, local) = if ether_type == ETH_P_IP {
        outer_v4(ctx, l3)?
    } else if ether_type == ETH_P_IPV6 {
        outer_v6(ctx, l3)?
    } else {
        return Err(NOT_ENCAP);
    };
    if !is_local(&local) {
        return Err(DecapStat::PassNotLocal);
    }
    let (vip, inner_type) = inner_dst(ctx, &tunnel)?;
    if unsafe { DECAP_VIPS.get(vip) }.is_none() {
        return Err(DecapStat::PassNotVip);
    }
    Ok(Found {
        inner: tunnel.inner,
        inner_type,
        hops: tunnel.hops,
    })
}

#[inline(always)]
fn outer_v4(ctx: &impl Frame, l3: usize) -> Result<(Tunnel, DecapAddr), DecapStat> {
    let ip: *const Ipv4Hdr = header(ctx, l3)?;
    // SAFETY: checked by `ptr_at`.
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(MALFORMED);
    }
    if ip.proto != IPPROTO_IPIP && ip.proto != IPPROTO_IPV6 && ip.proto != PROTO_UDP {
        return Err(NOT_ENCAP);
    }
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(DecapStat::PassFragment);
    }
    let local = DecapAddr {
        addr: [u32::from_ne_bytes(ip.dst_addr), 0, 0, 0],
        family: FAMILY_V4 as u32,
    };
    Ok((tunnel(ctx, l3 + ihl, ip.proto)?, local))
}

#[inline(always)]
fn outer_v6(ctx: &impl Frame, l3: usize) -> Result<(Tunnel, DecapAddr), DecapStat> {
    let ip: *const Ipv6Hdr = header(ctx, l3)?;
    // SAFETY: checked by `ptr_at`.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(MALFORMED);
    }
    let h = ip.next_hdr;
    if h != IPPROTO_IPIP && h != IPPROTO_IPV6 && h != PROTO_UDP {
        return Err(NOT_ENCAP);
    }
    let mut addr = [0u32; 4];
    for (i, w) in addr.iter_mut().enumerate() {
        let a = &ip.dst_addr[i * 4..i * 4 + 4];
        *w = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
    }
    let local = DecapAddr {
        addr,
        family: FAMILY_V6 as u32,
    };
    Ok((tunnel(ctx, l3 + Ipv6Hdr::LEN, h)?, local))
}

/// Where the inner packet starts after the outer IP header at `l4` with protocol `proto`.
#[inline(always)]
fn tunnel(ctx: &impl Frame, l4: usize, proto: u8) -> Result<Tunnel, DecapStat> {
    match proto {
        IPPROTO_IPIP => Ok(Tunnel {
            inner: l4,
            family: Some(FAMILY_V4 as u32),
            hops: Hops::NONE,
        }),
        IPPROTO_IPV6 => Ok(Tunnel {
            inner: l4,
            family: Some(FAMILY_V6 as u32),
            hops: Hops::NONE,
        }),
        _ => {
            let udp: *const UdpHdr = header(ctx, l4)?;
            // SAFETY: checked by `ptr_at`; the config global is plain data.
            let port = unsafe { core::ptr::read_volatile(&DECAP_CONFIG) }.gue_port;
            if u16::from_ne_bytes(unsafe { (*udp).dst }) != port {
                return Err(NOT_ENCAP);
            }
            gue(ctx, l4 + UDP_HDR_LEN)
        }
    }
}

/// A GUE payload at `at`: variant 1 (the inner IP header itself, version nibble 4 or 6) or
/// variant 0 (a GUE header; its private data may carry a hop list, `lb_common::second_chance`).
#[inline(always)]
fn gue(ctx: &impl Frame, at: usize) -> Result<Tunnel, DecapStat> {
    let h: *const [u8; GUE_BASE_LEN] = header(ctx, at)?;
    // SAFETY: checked by `ptr_at`.
    let h = unsafe { *h };
    match h[0] >> 6 {
        1 => Ok(Tunnel {
            inner: at,
            family: None,
            hops: Hops::NONE,
        }),
        0 => {
            // A control message (C bit) or flag fields are not ours to read.
            if h[0] & 0x20 != 0 || h[2] != 0 || h[3] != 0 {
                return Err(NOT_ENCAP);
            }
            let family = match h[1] {
                IPPROTO_IPIP => FAMILY_V4 as u32,
                IPPROTO_IPV6 => FAMILY_V6 as u32,
                _ => return Err(MALFORMED),
            };
            let words = (h[0] & 0x1f) as usize;
            let mut hops = Hops::NONE;
            if words > 0 {
                let w: *const [u8; 4] = header(ctx, at + GUE_BASE_LEN)?;
                // SAFETY: checked by `ptr_at`.
                if let HopsHeader::Hops {
                    next,
                    count,
                    family: hf,
                } = parse_hops_word(unsafe { *w })
                    && GUE_HOPS_WORD_LEN + count as usize * hop_addr_len(hf) <= words * 4
                {
                    hops = Hops {
                        word: at + GUE_BASE_LEN,
                        next,
                        count,
                        family: hf,
                    };
                }
            }
            Ok(Tunnel {
                inner: at + GUE_BASE_LEN + words * 4,
                family: Some(family),
                hops,
            })
        }
        _ => Err(MALFORMED),
    }
}

/// The inner packet's destination and the Ethernet type it will carry.
#[inline(always)]
fn inner_dst(ctx: &impl Frame, t: &Tunnel) -> Result<(DecapAddr, u16), DecapStat> {
    // Verifier note: a one-byte check compiles to `>=`, from which the verifier learns no
    // range; check the smallest inner header (20 bytes) instead.
    let first: *const [u8; Ipv4Hdr::LEN] = header(ctx, t.inner)?;
    // SAFETY: checked by `ptr_at`.
    let version = (unsafe { (*first)[0] } >> 4) as u32;
    if t.family.is_some_and(|f| f != version) {
        return Err(MALFORMED);
    }
    if version == FAMILY_V4 as u32 {
        let ip: *const Ipv4Hdr = header(ctx, t.inner)?;
        // SAFETY: checked by `ptr_at`.
        let dst = unsafe { (*ip).dst_addr };
        let addr = DecapAddr {
            addr: [u32::from_ne_bytes(dst), 0, 0, 0],
            family: FAMILY_V4 as u32,
        };
        Ok((addr, ETH_P_IP))
    } else if version == FAMILY_V6 as u32 {
        let ip: *const Ipv6Hdr = header(ctx, t.inner)?;
        // SAFETY: checked by `ptr_at`.
        let d = unsafe { (*ip).dst_addr };
        let mut addr = [0u32; 4];
        for (i, w) in addr.iter_mut().enumerate() {
            *w = u32::from_ne_bytes([d[i * 4], d[i * 4 + 1], d[i * 4 + 2], d[i * 4 + 3]]);
        }
        Ok((
            DecapAddr {
                addr,
                family: FAMILY_V6 as u32,
            },
            ETH_P_IPV6,
        ))
    } else {
        Err(MALFORMED)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
