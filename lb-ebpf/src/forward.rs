//! L2 direct server return: only the MACs change, the backend holds the VIP and answers the
//! client directly. Encapsulation (`encap`) and NAT (`nat`) are the other ways out.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Backend, Stat};
use network_types::eth::EthHdr;

use crate::{Verdict, maps::LB_TX_PORTS, parse::ptr_at_mut};

/// Rewrites the MACs to reach `backend` and sends the frame: XDP_TX when the backend is
/// behind the receiving interface (`ifindex` 0 or the ingress one), XDP_REDIRECT otherwise.
#[inline(always)]
pub fn l2_dsr(ctx: &XdpContext, backend: &Backend) -> Result<Verdict, Verdict> {
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0).ok_or(Verdict::discard(Stat::DropMalformed))?;
    // Both MACs in one non-overlapping copy of a known size, which the compiler expands into
    // loads and stores. A field assignment between two raw places became a call to
    // `memmove` per MAC (a byte loop of 54 instructions each: 18 % of a packet's path, found
    // by the instruction counter of `cargo xtask bench`).
    const _: () =
        assert!(core::mem::offset_of!(Backend, src_mac) == core::mem::offset_of!(Backend, mac) + 6);
    // SAFETY: `ptr_at_mut` checked the Ethernet header (destination then source MAC, 12
    // bytes) is inside the frame; the source is the backend entry's `mac` and `src_mac`,
    // adjacent (asserted above); map memory and the frame never overlap.
    unsafe {
        let from =
            (backend as *const Backend as *const u8).add(core::mem::offset_of!(Backend, mac));
        core::ptr::copy_nonoverlapping(from, eth as *mut u8, 12);
    }
    if backend.ifindex == 0 || backend.ifindex as usize == ctx.ingress_ifindex() {
        return Ok(Verdict::forward(xdp_action::XDP_TX));
    }
    LB_TX_PORTS
        .redirect(backend.ifindex, 0)
        .map(Verdict::forward)
        .map_err(|_| Verdict::discard(Stat::DropTxError))
}
