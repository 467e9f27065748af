//! Second chance on the backend: whether this host keeps a tunnel packet (it owns the flow,
//! or no usable hop is left) or sends it on to the next hop of its list, and the sending: the
//! outer header rewritten in place (from this host, to the hop) and out through the FIB.
use aya_ebpf::{
    bindings::xdp_action,
    cty::c_void,
    helpers::bpf_redirect,
    programs::{TcContext, XdpContext},
};
use lb_common::{DecapStat, FAMILY_V4, FAMILY_V6, GUE_HOPS_WORD_LEN, GUE_MAX_HOPS, PROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv6Hdr, udp::UdpHdr};

use crate::{
    classify::{Found, MALFORMED, header, words},
    fib, owner,
    owner::Hops,
    proto::ETH_P_IP,
    ptr::{Frame, ptr_at_mut},
    trust::{is_local_addr, trusted},
};

/// What to do with a tunnel packet for a configured VIP.
pub enum Decision {
    /// Decapsulate and hand to the stack, counted with this reason.
    Keep(DecapStat),
    /// Not ours: on to the next hop of the list.
    Forward(Hops),
}

/// Second chance: a packet without a hop list is ours; one with hops is ours when this
/// host owns its flow (`owner::owned`), else it goes to the next hop, if one is left.
#[inline(always)]
pub fn decide(raw: *mut c_void, ctx: &impl Frame, found: &Found) -> Decision {
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
        return trusted_hop(o);
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
    trusted_hop(next_outer(ctx, h, ifindex)?)
}

/// `o` when its destination (the next hop) is trusted: second chance sends packets only to
/// the peers it knows, never to whatever address a hop list names. Otherwise the packet is
/// kept, as when no hop is left: it came from a trusted load balancer, so handing it to the
/// stack is what would happen without second chance, and the stack answers (a reset for a
/// flow it does not know) where a drop would leave the client waiting.
#[inline(always)]
fn trusted_hop(o: fib::Outer) -> Result<fib::Outer, DecapStat> {
    if trusted(&o.dst, u32::from(o.family)) {
        Ok(o)
    } else {
        Err(DecapStat::HopUntrusted)
    }
}

/// The outer header as the FIB needs it, with the destination replaced by the next hop and
/// the source by this host's address the packet came to (of the hop's family: hops must be of
/// the outer header's), as GLB's redirect does: the forwarded packet comes from this host, so
/// source checks on the way (uRPF, cloud source/destination checks) pass it.
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
        o.src[0] = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
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
        o.src = words(&ip.dst_addr);
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

/// Rewrites the outer header for the next hop: source (this host) and destination, TTL or hop
/// limit one less (IPv4 checksum recomputed), and the hop list's `next` one further.
#[inline(always)]
fn rewrite_outer(ctx: &impl Frame, h: &Hops, o: &fib::Outer) -> Result<(), DecapStat> {
    let l3 = EthHdr::LEN;
    if h.family == FAMILY_V4 {
        let ip: *mut [u8; 20] = ptr_at_mut(ctx, l3).ok_or(MALFORMED)?;
        // SAFETY: checked by `ptr_at_mut`.
        let ip = unsafe { &mut *ip };
        ip[12..16].copy_from_slice(&o.src[0].to_ne_bytes());
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
            ip.src_addr[i * 4..i * 4 + 4].copy_from_slice(&o.src[i].to_ne_bytes());
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
pub fn forward_xdp(ctx: &XdpContext, mut h: Hops) -> Result<(DecapStat, u32), DecapStat> {
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
pub fn forward_tc(ctx: &TcContext, mut h: Hops) -> Result<(DecapStat, i32), DecapStat> {
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
