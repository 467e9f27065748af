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

#[allow(
    dead_code,
    reason = "shared with the load balancer, which uses all of it; decap needs the Ethernet types"
)]
mod proto;
mod ptr;

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO,
        TC_ACT_OK, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action,
    },
    helpers::bpf_xdp_adjust_head,
    macros::{classifier, map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Counter, DECAP_MAX_ADDRS, DECAP_MAX_LOCAL, DecapAddr, DecapConfig, DecapStat, FAMILY_V4,
    FAMILY_V6, IPPROTO_IPIP, IPPROTO_IPV6, PROTO_UDP, UDP_HDR_LEN,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

use crate::{
    proto::{ETH_P_IP, ETH_P_IPV6},
    ptr::{Frame, ptr_at, ptr_at_mut},
};

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

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    decap_xdp(&ctx)
}

#[inline(always)]
fn decap_xdp(ctx: &XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let stat = match classify(ctx).and_then(|found| strip_xdp(ctx, &found)) {
        Ok(s) | Err(s) => s,
    };
    count(stat, len);
    xdp_action::XDP_PASS
}

/// The same program at tc ingress (`lb decap --attach tc`), for drivers where XDP is not
/// wanted: the outer headers are removed with `bpf_skb_adjust_room`, keeping a GRO'd
/// packet's segment size (`BPF_F_ADJ_ROOM_FIXED_GSO`) and setting the inner protocol.
#[classifier]
pub fn lb_decap_tc(ctx: TcContext) -> i32 {
    let len = u64::from(ctx.len());
    // Headers up to the inner IP header must be in the linear part for direct access.
    let _ = ctx.pull_data(ctx.len().min(PULL));
    let stat = match classify(&ctx).and_then(|found| strip_tc(&ctx, &found)) {
        Ok(s) | Err(s) => s,
    };
    count(stat, len);
    TC_ACT_OK
}

/// Benchmark harness (never attached): the decap program, then the frame put back as it came
/// (the outer header restored from the saved first 64 bytes), so `repeat` passes measure the
/// same tunnel packet. The restore is included in its time.
#[xdp]
pub fn bench_decap(ctx: XdpContext) -> u32 {
    const SAVED: usize = 64;
    let Some(head) = ptr_at::<[u8; SAVED]>(&ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: bounds-checked above.
    let saved = unsafe { *head };
    let before = ctx.data_end() - ctx.data();
    let action = decap_xdp(&ctx);
    let cut = before as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: helper on our own context; pointers re-derived after.
    if cut > 0 && unsafe { bpf_xdp_adjust_head(ctx.ctx, -cut) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    if let Some(head) = ptr_at_mut::<[u8; SAVED]>(&ctx, 0) {
        // SAFETY: bounds-checked by `ptr_at_mut`.
        unsafe { *head = saved };
    }
    action
}

/// Ethernet, outer IPv6, UDP and an inner IPv6 header.
const PULL: u32 = 14 + 40 + 8 + 40;

/// Where the inner packet starts and the Ethernet type it will carry.
struct Found {
    inner: usize,
    inner_type: u16,
}

#[inline(always)]
fn strip_xdp(ctx: &XdpContext, found: &Found) -> Result<DecapStat, DecapStat> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(MALFORMED)?;
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
    /// Inner family required by the outer protocol (IPIP); `None` for GUE (read from the
    /// inner version nibble).
    family: Option<u32>,
}

/// Whether `a` is one of this host's addresses (from the read-only configuration).
#[inline(always)]
fn is_local(a: &DecapAddr) -> bool {
    // SAFETY: a plain read of an initialised global (volatile: the value written at load time,
    // not the compile-time default).
    let cfg = unsafe { core::ptr::read_volatile(&DECAP_CONFIG) };
    let n = cfg.n_local as usize;
    let mut i = 0;
    while i < DECAP_MAX_LOCAL {
        if i < n && cfg.local[i] == *a {
            return true;
        }
        i += 1;
    }
    false
}

/// Whether the frame is a tunnel to this host for a configured VIP, and where its inner
/// packet is; otherwise why not.
#[inline(always)]
fn classify(ctx: &impl Frame) -> Result<Found, DecapStat> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(MALFORMED)?;
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
    })
}

#[inline(always)]
fn outer_v4(ctx: &impl Frame, l3: usize) -> Result<(Tunnel, DecapAddr), DecapStat> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(MALFORMED)?;
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
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(MALFORMED)?;
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
        }),
        IPPROTO_IPV6 => Ok(Tunnel {
            inner: l4,
            family: Some(FAMILY_V6 as u32),
        }),
        _ => {
            let udp: *const UdpHdr = ptr_at(ctx, l4).ok_or(MALFORMED)?;
            // SAFETY: checked by `ptr_at`; the config global is plain data.
            let port = unsafe { core::ptr::read_volatile(&DECAP_CONFIG) }.gue_port;
            if u16::from_ne_bytes(unsafe { (*udp).dst }) != port {
                return Err(NOT_ENCAP);
            }
            Ok(Tunnel {
                inner: l4 + UDP_HDR_LEN,
                family: None,
            })
        }
    }
}

/// The inner packet's destination and the Ethernet type it will carry.
#[inline(always)]
fn inner_dst(ctx: &impl Frame, t: &Tunnel) -> Result<(DecapAddr, u16), DecapStat> {
    // Verifier note: a one-byte check compiles to `>=`, from which the verifier learns no
    // range; check the smallest inner header (20 bytes) instead.
    let first: *const [u8; Ipv4Hdr::LEN] = ptr_at(ctx, t.inner).ok_or(MALFORMED)?;
    // SAFETY: checked by `ptr_at`.
    let version = (unsafe { (*first)[0] } >> 4) as u32;
    if t.family.is_some_and(|f| f != version) {
        return Err(MALFORMED);
    }
    if version == FAMILY_V4 as u32 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, t.inner).ok_or(MALFORMED)?;
        // SAFETY: checked by `ptr_at`.
        let dst = unsafe { (*ip).dst_addr };
        let addr = DecapAddr {
            addr: [u32::from_ne_bytes(dst), 0, 0, 0],
            family: FAMILY_V4 as u32,
        };
        Ok((addr, ETH_P_IP))
    } else if version == FAMILY_V6 as u32 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, t.inner).ok_or(MALFORMED)?;
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
