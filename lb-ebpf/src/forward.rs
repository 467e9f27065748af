//! Forwarding. This mode is L2 direct server return: only the MACs change, the
//! backend holds the VIP and answers the client directly. Encapsulation and NAT modes plug in
//! here later, selected per backend.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Backend, Stat};
use network_types::eth::EthHdr;

use crate::{Verdict, maps::LB_TX_PORTS, parse::ptr_at_mut};

/// Rewrites the MACs to reach `backend` and sends the frame: XDP_TX when the backend is
/// behind the receiving interface (`ifindex` 0 or the ingress one), XDP_REDIRECT otherwise.
#[inline(always)]
pub fn l2_dsr(ctx: &XdpContext, backend: &Backend) -> Result<Verdict, Verdict> {
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0).ok_or(Verdict::Drop(Stat::DropMalformed))?;
    // SAFETY: `ptr_at_mut` checked the header is inside the frame.
    unsafe {
        (*eth).dst_addr = backend.mac;
        (*eth).src_addr = backend.src_mac;
    }
    if backend.ifindex == 0 || backend.ifindex as usize == ctx.ingress_ifindex() {
        return Ok(Verdict::Forward(xdp_action::XDP_TX));
    }
    LB_TX_PORTS
        .redirect(backend.ifindex, 0)
        .map(Verdict::Forward)
        .map_err(|_| Verdict::Drop(Stat::DropTxError))
}
