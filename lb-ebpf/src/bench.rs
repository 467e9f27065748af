//! Benchmark harnesses, never attached. BPF_PROG_TEST_RUN with `repeat` feeds each pass the
//! previous pass's output, so a new-flow benchmark needs every pass to carry a new flow:
//! these programs move the frame to the next client (source port, then source address) after
//! running the load balancer. They expect an untagged IPv4 TCP frame with a 20-byte header.
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use crate::parse::ptr_at_mut;

const SADDR_LOW: usize = 14 + 14; // last two bytes of the IPv4 source address
const SPORT: usize = 14 + 20;

/// Advances the frame's (source address, source port) to the next client.
#[inline(always)]
fn next_client(ctx: &XdpContext) {
    let (Some(port), Some(addr)) = (
        ptr_at_mut::<[u8; 2]>(ctx, SPORT),
        ptr_at_mut::<[u8; 2]>(ctx, SADDR_LOW),
    ) else {
        return;
    };
    // SAFETY: both pointers were bounds-checked by `ptr_at_mut`.
    unsafe {
        let p = u16::from_be_bytes(*port).wrapping_add(1);
        *port = p.to_be_bytes();
        if p == 0 {
            *addr = u16::from_be_bytes(*addr).wrapping_add(1).to_be_bytes();
        }
    }
}

/// The load balancer, then the next client: every pass is a new flow.
#[xdp]
pub fn bench_lb_new_flow(ctx: XdpContext) -> u32 {
    let action = crate::lb(&ctx);
    next_client(&ctx);
    action
}

/// The harness alone: its cost is included in `bench_lb_new_flow`'s.
#[xdp]
pub fn bench_next_client(ctx: XdpContext) -> u32 {
    next_client(&ctx);
    xdp_action::XDP_PASS
}
