//! The XDP load balancer program.
#![no_std]
#![no_main]

mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::Stat;

/// Entry point attached to the load balancer's interface.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    stats::count(Stat::PassNotVip, len);
    xdp_action::XDP_PASS
}

/// Trivial program for veth peers: native XDP_TX/REDIRECT on a veth is only delivered when the
/// peer runs XDP, and it is the floor in benchmarks.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
