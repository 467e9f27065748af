//! Encapsulated forwarding (IPIP, GUE) in XDP: plan the outer header, ask the FIB for the next
//! hop (answering "too big" when the path MTU does not fit), then grow the frame at its head
//! and write Ethernet + outer IP (+ UDP) in front of the untouched inner packet.
//!
//! The order matters: nothing is written before the FIB has accepted the packet, so every
//! drop or ICMP reply sees the original frame.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_coarse_ns, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    BACKEND_F_PRESENT, Backend, ENCAP_GUE, FAMILY_V4, GUE_BASE_LEN, GUE_HOPS_WORD_LEN,
    IPV4_HDR_LEN, LbConfig, NEXTHOP_TTL_S, NextHopCache, PREVIOUS_HOPS, Stat, UDP_HDR_LEN,
    gue_base_word, gue_hops_word,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

use crate::{
    Verdict,
    fib::{self, Fib, NextHop},
    icmp,
    maps::{LB_BACKENDS, LB_NEXTHOPS, LB_TX_PORTS},
    outer::{self, Hops},
    parse::{ETH_P_IP, ETH_P_IPV6, Parsed, ptr_at_mut},
    select::Picked,
};

/// The previous backends' addresses when the flow's slot is in a drain window and the packet
/// can carry them: GUE only (IPIP has no room for them). The hops are the longest prefix of
/// the slot's previous backends that are present entries of the outer header's family on
/// other hosts; the agent writes only such backends (`agent::second_chance`), so the prefix stops
/// short only when an entry changed under a packet.
#[inline(always)]
pub fn second_chance_hops(picked: &Picked) -> Option<Hops> {
    let b = picked.backend;
    let previous = picked.previous?;
    if b.encap != ENCAP_GUE {
        return None;
    }
    let carried = |id: u32| -> Option<&'static [u32; 4]> {
        if id == 0 || id == picked.id {
            return None;
        }
        let prev = LB_BACKENDS.get(id)?;
        (prev.flags & BACKEND_F_PRESENT != 0 && prev.family == b.family && prev.addr != b.addr)
            .then_some(&prev.addr)
    };
    let first = carried(previous[0])?;
    let mut hops = Hops {
        count: 1,
        addr: [first; PREVIOUS_HOPS],
    };
    // Unrolled: each index is a constant.
    for (i, id) in previous.iter().enumerate().skip(1) {
        match carried(*id) {
            Some(a) => {
                hops.addr[i] = a;
                hops.count = i as u8 + 1;
            }
            None => break,
        }
    }
    Some(hops)
}

/// Encapsulates `pkt` to `b` and sends it; with `hops`, a GUE header carries them as the
/// next hops (second chance, `lb_common::second_chance`).
#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    cfg: &LbConfig,
    pkt: &Parsed,
    id: u32,
    b: &Backend,
    hops: Option<Hops>,
) -> Result<Verdict, Verdict> {
    let ingress = ctx.ingress_ifindex() as u32;
    let inner = outer::Inner {
        v4: pkt.key.family == FAMILY_V4,
        len: pkt.ip.len,
        tos: pkt.ip.tos,
    };
    let plan = outer::plan(cfg, b, &pkt.key, &inner, ingress, hops)
        .ok_or(Verdict::discard(Stat::DropTooBig))?;
    let next = match next_hop(ctx, id, b, &plan.outer) {
        Fib::Hop(h) => Some(h),
        Fib::NoNeighbour => None,
        Fib::TooBig(mtu) => {
            return Ok(icmp::too_big(
                ctx,
                pkt,
                mtu.saturating_sub(plan.overhead as u32),
            ));
        }
        Fib::Fail(stat) => return Err(Verdict::discard(stat)),
    };
    // The frame's MACs as received: the no-neighbour path hands the packet to our own stack,
    // which only takes frames addressed to us.
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0).ok_or(Verdict::discard(Stat::DropMalformed))?;
    // SAFETY: checked by `ptr_at_mut`.
    let (rx_dst, rx_src) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    // Grow so the inner IP header ends up right after the outer headers; a VLAN tag, if any,
    // is dropped (the FIB's egress device decides tagging).
    let grow = plan.overhead as i32 - (pkt.ip.l3 as i32 - EthHdr::LEN as i32);
    // SAFETY: helper on our own context; every pointer is re-derived and re-checked after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(Verdict::discard(Stat::DropTxError));
    }
    let (dst_mac, src_mac) = match &next {
        Some(h) => (h.dmac, h.smac),
        None => (rx_dst, rx_src),
    };
    write_headers(ctx, &plan, &pkt.key, inner.v4, dst_mac, src_mac)?;
    match next {
        None => Ok(Verdict::pass(Stat::PassNoNeighbour)),
        Some(h) if h.ifindex == ingress => Ok(Verdict::forward(xdp_action::XDP_TX)),
        Some(h) => LB_TX_PORTS
            .redirect(h.ifindex, 0)
            .map(Verdict::forward)
            .map_err(|_| Verdict::discard(Stat::DropTxError)),
    }
}

/// The FIB's answer for `plan`, from this CPU's cache when it is fresh, for the same backend
/// generation and interface, and known to fit (or known not to); else asked and cached. A
/// route or neighbour change is seen within `NEXTHOP_TTL_S`.
#[inline(always)]
pub fn next_hop(ctx: &XdpContext, id: u32, b: &Backend, o: &fib::Outer) -> Fib {
    let len = o.len;
    let Some(c) = LB_NEXTHOPS.get_ptr_mut(id) else {
        return fib::lookup(ctx.ctx as *mut _, o, 0);
    };
    // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it meanwhile. Read
    // and written in place: copies of the entry would cost stack the XDP path has not got.
    let cached = unsafe { &mut *c };
    let now = now_s();
    let fresh = cached.stamp_s != 0
        && now.wrapping_sub(cached.stamp_s) < NEXTHOP_TTL_S
        && cached.generation == b.generation;
    if fresh {
        if len <= cached.ok_len {
            return Fib::Hop(NextHop {
                ifindex: cached.ifindex,
                smac: cached.smac,
                dmac: cached.dmac,
            });
        }
        if cached.mtu != 0 && len > cached.mtu {
            return Fib::TooBig(u32::from(cached.mtu));
        }
    }
    let answer = fib::lookup(ctx.ctx as *mut _, o, 0);
    if !matches!(answer, Fib::Hop(_) | Fib::TooBig(_)) {
        // Not cached: asked again next time.
        return answer;
    }
    if !fresh {
        *cached = NextHopCache {
            generation: b.generation,
            stamp_s: now.max(1),
            ..NextHopCache::default()
        };
    }
    match &answer {
        Fib::Hop(h) => {
            cached.ifindex = h.ifindex;
            cached.smac = h.smac;
            cached.dmac = h.dmac;
            cached.ok_len = cached.ok_len.max(len);
        }
        Fib::TooBig(mtu) => cached.mtu = (*mtu).min(0xffff) as u16,
        _ => {}
    }
    answer
}

#[inline(always)]
fn now_s() -> u32 {
    // SAFETY: helper without arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

#[inline(always)]
fn write_headers(
    ctx: &XdpContext,
    plan: &outer::Plan,
    key: &lb_common::FlowKey,
    inner_v4: bool,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
) -> Result<(), Verdict> {
    const BROKEN: Verdict = Verdict::discard(Stat::DropTxError);
    let o = &plan.outer;
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0).ok_or(BROKEN)?;
    let outer_v4 = o.family == FAMILY_V4;
    // SAFETY: every pointer below was bounds-checked by `ptr_at_mut`.
    unsafe {
        (*eth).dst_addr = dst_mac;
        (*eth).src_addr = src_mac;
        (*eth).ether_type = if outer_v4 { ETH_P_IP } else { ETH_P_IPV6 };
    }
    let ip_len = if outer_v4 {
        let ip: *mut Ipv4Hdr = ptr_at_mut(ctx, EthHdr::LEN).ok_or(BROKEN)?;
        unsafe { *ip = outer::ipv4(o, true) };
        IPV4_HDR_LEN
    } else {
        let ip: *mut Ipv6Hdr = ptr_at_mut(ctx, EthHdr::LEN).ok_or(BROKEN)?;
        unsafe { *ip = outer::ipv6(o, key) };
        Ipv6Hdr::LEN
    };
    if plan.overhead > ip_len {
        let udp: *mut UdpHdr = ptr_at_mut(ctx, EthHdr::LEN + ip_len).ok_or(BROKEN)?;
        unsafe { *udp = outer::udp(o) };
    }
    if let Some(h) = &plan.hops {
        // Stores of a fixed size at constant offsets per family and hop (the loop unrolls)
        // keep the stack small and the verifier's bounds simple; each address is copied from
        // its map entry straight into the frame.
        let at = EthHdr::LEN + ip_len + UDP_HDR_LEN;
        let words: *mut [u32; 2] = ptr_at_mut(ctx, at).ok_or(BROKEN)?;
        unsafe {
            *words = [
                gue_base_word(inner_v4, o.family, h.count),
                gue_hops_word(o.family, h.count),
            ]
        };
        let first = at + GUE_BASE_LEN + GUE_HOPS_WORD_LEN;
        for i in 0..PREVIOUS_HOPS {
            if i >= h.count as usize {
                break;
            }
            if outer_v4 {
                let p: *mut u32 = ptr_at_mut(ctx, first + 4 * i).ok_or(BROKEN)?;
                unsafe { *p = h.addr[i][0] };
            } else {
                let p: *mut [u32; 4] = ptr_at_mut(ctx, first + 16 * i).ok_or(BROKEN)?;
                unsafe { *p = *h.addr[i] };
            }
        }
    }
    Ok(())
}
