//! Health checks through the tunnel: a tc egress program on the load balancer's interface
//! that encapsulates the agent's probe packets to the VIP exactly as `encap` does for clients,
//! so a probe only succeeds when the backend decapsulates and holds the VIP (Katran's
//! healthchecking program does the same with socket marks).
//!
//! The agent marks a probe socket `HC_MARK_BASE | backend id`; every packet of that socket
//! leaving the interface is encapsulated to that backend and redirected to the FIB's next hop.
//! Other packets are untouched. The backend's answer comes back from the VIP straight to the
//! agent's address (direct server return), which the XDP program passes as not-a-VIP.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use lb_common::{
    BACKEND_F_PRESENT, ENCAP_GUE, ENCAP_L2, FAMILY_V4, FAMILY_V6, FlowKey, HC_MARK_BASE,
    HC_MARK_MASK, HcStat, IPV4_HDR_LEN,
};
use network_types::{eth::EthHdr, ip::Ipv6Hdr};

use crate::{
    fib,
    maps::{LB_BACKENDS, config},
    outer,
    parse::{ETH_P_IP, ETH_P_IPV6},
};

#[map(name = "LB_HC_STATS")]
static LB_HC_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(HcStat::COUNT, 0);

#[inline(always)]
fn count(stat: HcStat) {
    if let Some(c) = LB_HC_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: this CPU's slot.
        unsafe { *c += 1 };
    }
}

#[classifier]
pub fn lb_hc_encap(ctx: TcContext) -> i32 {
    // SAFETY: reading a field of the program's own context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & HC_MARK_MASK != HC_MARK_BASE {
        return TC_ACT_OK;
    }
    match encapsulate(&ctx, mark & !HC_MARK_MASK) {
        Ok(action) => {
            count(HcStat::Encapsulated);
            action
        }
        Err((stat, action)) => {
            count(stat);
            action
        }
    }
}

const FAILED: (HcStat, i32) = (HcStat::Failed, TC_ACT_SHOT);

#[inline(always)]
fn encapsulate(ctx: &TcContext, id: u32) -> Result<i32, (HcStat, i32)> {
    let not_ours = (HcStat::NoBackend, TC_ACT_OK);
    let b = *LB_BACKENDS.get(id).ok_or(not_ours)?;
    if b.flags & BACKEND_F_PRESENT == 0 || b.encap == ENCAP_L2 {
        return Err(not_ours);
    }
    let ether_type: u16 = ctx.load(12).map_err(|_| FAILED)?;
    let inner_v4 = ether_type == ETH_P_IP;
    if !inner_v4 && ether_type != ETH_P_IPV6 {
        return Err(not_ours);
    }
    let (key, tos) = inner_key(ctx, inner_v4).ok_or(FAILED)?;
    let inner_len = (ctx.len() as usize)
        .checked_sub(EthHdr::LEN)
        .ok_or(FAILED)?;
    let cfg = config();
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let inner = outer::Inner {
        v4: inner_v4,
        len: inner_len,
        tos,
    };
    let plan = outer::plan(cfg, &b, &key, &inner, ifindex, None).ok_or(FAILED)?;
    // Looked up as if received on the probe's egress interface, like a client's packet (an
    // output lookup would pin the route to that interface); the neighbour is left to
    // `bpf_redirect_neigh`, which resolves it if needed (a probe never fails for an
    // unresolved next hop).
    let (ifindex, nh) =
        fib::route(ctx.skb.skb as *mut _, &plan.outer).ok_or((HcStat::NoRoute, TC_ACT_SHOT))?;
    let outer_v4 = b.family == FAMILY_V4;
    let mut flags = if outer_v4 {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    } else {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
    } as u64;
    if b.encap == ENCAP_GUE {
        flags |= BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64;
    }
    ctx.adjust_room(plan.overhead as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| FAILED)?;
    // The MACs are filled in by `bpf_redirect_neigh`.
    let eth = EthHdr {
        dst_addr: [0; 6],
        src_addr: [0; 6],
        ether_type: if outer_v4 { ETH_P_IP } else { ETH_P_IPV6 },
    };
    ctx.store(0, &eth, 0).map_err(|_| FAILED)?;
    let ip_len = if outer_v4 {
        ctx.store(EthHdr::LEN, &outer::ipv4(&plan.outer, true), 0)
            .map_err(|_| FAILED)?;
        IPV4_HDR_LEN
    } else {
        ctx.store(EthHdr::LEN, &outer::ipv6(&plan.outer, &key), 0)
            .map_err(|_| FAILED)?;
        Ipv6Hdr::LEN
    };
    if b.encap == ENCAP_GUE {
        ctx.store(EthHdr::LEN + ip_len, &outer::udp(&plan.outer), 0)
            .map_err(|_| FAILED)?;
    }
    Ok(fib::redirect_neigh(ifindex, b.family, nh))
}

/// The probe's own 5-tuple (for the flow's entropy) and TOS, read from the skb.
#[inline(always)]
fn inner_key(ctx: &TcContext, v4: bool) -> Option<(FlowKey, u8)> {
    let l3 = EthHdr::LEN;
    let mut key = FlowKey::default();
    let (tos, l4) = if v4 {
        let h: [u8; 20] = ctx.load(l3).ok()?;
        key.family = FAMILY_V4;
        key.proto = h[9];
        key.src[0] = u32::from_ne_bytes([h[12], h[13], h[14], h[15]]);
        key.dst[0] = u32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
        (h[1], l3 + ((h[0] & 0x0f) as usize) * 4)
    } else {
        let h: [u8; 8] = ctx.load(l3).ok()?;
        key.family = FAMILY_V6;
        key.proto = h[6];
        key.src = ctx.load(l3 + 8).ok()?;
        key.dst = ctx.load(l3 + 24).ok()?;
        ((h[0] << 4) | (h[1] >> 4), l3 + Ipv6Hdr::LEN)
    };
    let ports: [u16; 2] = ctx.load(l4).ok()?;
    key.sport = ports[0];
    key.dport = ports[1];
    Some((key, tos))
}
