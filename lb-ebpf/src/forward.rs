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
    // Both MACs in one copy of six 16-bit words: a byte-wise copy (what a `[u8; 12]` copy
    // compiles to, BPF having no unaligned access) takes twice the loads and stores on every
    // forwarded packet, and a field assignment between two raw places can become two
    // `memmove` calls (`tests/tests/fixtures/insns.rs` checks the L2 paths make no call). A
    // frame starts at an even address (NET_IP_ALIGN is 0 or 2), and the backend's MACs at
    // offset 16 of a map value.
    const _: () =
        assert!(core::mem::offset_of!(Backend, src_mac) == core::mem::offset_of!(Backend, mac) + 6);
    const _: () = assert!(core::mem::offset_of!(Backend, mac) % 2 == 0);
    // SAFETY: `ptr_at_mut` checked the Ethernet header (destination then source MAC, 12
    // bytes) is inside the frame; the source is the backend entry's `mac` and `src_mac`,
    // adjacent (asserted above); map memory and the frame never overlap; both 2-aligned.
    unsafe {
        let from = (backend as *const Backend as *const u8).add(core::mem::offset_of!(Backend, mac))
            as *const u16;
        let to = eth as *mut u16;
        // Volatile: word by word as written; a plain loop or a `[u16; 6]` copy is turned back
        // into a `memcpy` call (a byte loop) by the compiler.
        let mut i = 0;
        while i < 6 {
            core::ptr::write_volatile(to.add(i), core::ptr::read_volatile(from.add(i)));
            i += 1;
        }
    }
    if backend.ifindex == 0 || backend.ifindex as usize == ctx.ingress_ifindex() {
        return Ok(Verdict::forward(xdp_action::XDP_TX));
    }
    LB_TX_PORTS
        .redirect(backend.ifindex, 0)
        .map(Verdict::forward)
        .map_err(|_| Verdict::discard(Stat::DropTxError))
}
