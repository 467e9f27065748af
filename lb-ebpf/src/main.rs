//! The XDP load balancer.
//!
//! `lb_xdp` parses a frame (`parse`), finds its VIP (`maps`), picks a backend through the flow
//! table and the VIP's Maglev slot table (`select`), rewrites and sends the frame (`forward`)
//! and counts what happened (`stats`). NAT VIPs and backends' answers to NAT addresses go on
//! to [`lb_nat`] by a tail call (`nat`). Every outcome is a [`Verdict`]; [`act`] is the one
//! place that turns verdicts into XDP actions and counters. Nothing is logged per packet.
#![no_std]
#![no_main]

#[cfg(feature = "bench")]
mod bench;
mod capture;
mod encap;
mod express;
mod forward;
mod guard;
mod hc;
mod icmp;
mod maps;
mod nat;
mod nat_rewrite;
mod nat_state;
mod outer;
mod parse;
mod path;
mod rate;
mod select;
mod stats;
mod top_sources;
mod verdict;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
// Shared with the decap program (the library); the modules reach them as `crate::ptr` etc.
use lb_ebpf::{fib, proto, ptr};

use crate::{
    path::lb,
    ptr::Frame,
    verdict::{Verdict, act},
};

/// Entry point attached to the load balancer's interface. Multi-buffer aware (`xdp.frags`)
/// so native attach works at jumbo MTUs on drivers that split such frames: every header the
/// program reads is in the first buffer (`data..data_end`), completeness is judged against
/// the whole frame (`ptr::holds`), and headers cut by a buffer boundary are passed under
/// their own reason (`Stat::PassSplitHeaders`). A multi-buffer frame takes the full path
/// (the express lane takes only frames whose IP packet fits the first buffer, so single-
/// buffer frames pay nothing for this), which counts its whole length.
// Inlined into the generated entry: as one more BPF-to-BPF call the body costs a call and a
// spill of the context on every packet (LLVM stopped inlining it once the flow cache grew it).
#[xdp(frags)]
#[inline(always)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    lb(&ctx)
}

/// NAT VIPs and answers to NAT addresses (`nat`): a program of its own, entered from
/// [`lb_xdp`] by a tail call. Verifier note: a tail call starts a fresh 512-byte stack; the
/// NAT path (two entries, two keys, FIB parameters) does not fit beside the rest.
/// The full path, for the frames `lb_xdp`'s express lane does not take (IPv6, IPv4 with
/// options or fragments), entered by a tail call: a program of its own, so the verifier walks
/// its copy of the selection and the delivery once, apart from `lb_xdp`'s.
#[xdp(frags)]
pub fn lb_full(ctx: XdpContext) -> u32 {
    path::full::<false>(&ctx)
}

/// The full path while a capture runs (`capture`): `lb_full` with the capture's hooks, a
/// program of its own so `lb_full` carries none. Entered from `lb_xdp` for every frame, and
/// only while a capture runs.
#[xdp(frags)]
pub fn lb_full_capture(ctx: XdpContext) -> u32 {
    path::full::<true>(&ctx)
}

/// The guard's source lists (`guard`), for packets to a VIP that has them: a program of
/// its own, entered by a tail call, so the lists cost the other programs' verification one
/// test per place the selection reads a VIP's state.
#[xdp(frags)]
pub fn lb_guard(ctx: XdpContext) -> u32 {
    guard::run(&ctx)
}

#[xdp(frags)]
pub fn lb_nat(ctx: XdpContext) -> u32 {
    // The whole frame (a jumbo one included): NAT's own work dwarfs the helper call.
    let len = ctx.frame_len() as u64;
    let verdict = nat::run(&ctx, len);
    let action = act(verdict, len);
    if capture::running() {
        core::hint::cold_path();
        capture::leave(&ctx, verdict);
    }
    action
}

/// Packet capture (`capture`): records the verdict `lb_full` or `lb_nat` handed over and
/// returns its action; entered by a tail call, and only while a capture runs.
#[xdp(frags)]
pub fn lb_capture(ctx: XdpContext) -> u32 {
    capture::record(&ctx)
}

/// Trivial program for veth peers: native XDP_TX/REDIRECT on a veth is only delivered when the
/// peer runs XDP. It is also the floor in benchmarks. Multi-buffer aware, or a veth peer
/// running it could not take jumbo frames (the kernel caps such a peer's MTU at a page).
#[xdp(frags)]
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
