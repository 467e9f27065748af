//! Removing the outer headers, so the inner packet reaches the stack as if the client had
//! sent it here: XDP moves the frame's head, tc uses `bpf_skb_adjust_room`.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::bpf_xdp_adjust_head,
    programs::{TcContext, XdpContext},
};
use lb_common::DecapStat;
use network_types::eth::EthHdr;

use crate::{
    classify::{Found, MALFORMED, header},
    proto::ETH_P_IP,
    ptr::ptr_at_mut,
};

#[inline(always)]
pub fn strip_xdp(ctx: &XdpContext, found: &Found) -> Result<DecapStat, DecapStat> {
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
pub fn strip_tc(ctx: &TcContext, found: &Found) -> Result<DecapStat, DecapStat> {
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
