//! The backends' decapsulation program (`lb decap`): strips IPIP and GUE (variant 1) outer
//! headers from packets sent to this host for a configured VIP, so the inner packet reaches
//! the stack as if the client had sent it here (the VIP on `lo` answers it, directly to the
//! client). This kernel has no ipip/fou modules; this program replaces them, with none of their
//! setup (no tunnel device, no per-tunnel rp_filter).
//!
//! A tunnel to this host is taken only from a trusted sender (`lb decap --trusted-source`: the
//! load balancers and the peer backends); from anyone else it is dropped, since its inner
//! source could be any address. Everything else passes untouched, counted by reason: other
//! traffic, tunnels to other addresses, tunnels to this host for addresses that are not
//! configured VIPs, broken headers.
//!
//! This file holds the entry points; the work is in `classify` (is it a tunnel we take, and
//! where is its inner packet), `trust` (this host's addresses and the trusted senders),
//! `forward` (second chance: keep the packet or send it to the next hop), `strip` (removing
//! the outer headers) and `maps` (maps, configuration and counters).
#![no_std]
#![no_main]

#[path = "decap/capture.rs"]
mod capture;
#[path = "decap/classify.rs"]
mod classify;
#[cfg(feature = "bench")]
mod decap_bench;
#[path = "decap/forward.rs"]
mod forward;
#[path = "decap/maps.rs"]
mod maps;
#[path = "decap/strip.rs"]
mod strip;
#[path = "decap/trust.rs"]
mod trust;

// Shared with the load balancer (the library).
use lb_ebpf::{fib, owner, proto, ptr};

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    cty::c_void,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::DecapStat;

use crate::{
    classify::classify,
    forward::{Decision, decide, forward_tc, forward_xdp},
    maps::count,
    ptr::Frame,
    strip::{strip_tc, strip_xdp},
};

/// Multi-buffer aware (`xdp.frags`): a backend at a jumbo MTU gets its large tunnel packets
/// whole. Headers are read in the first buffer; the strip moves only the head, so the inner
/// packet's later buffers are kept as they are.
#[xdp(frags)]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    // While `lb decap --capture` runs, the frame is copied as it arrived and its verdict
    // recorded (`capture`); otherwise these are the two branches it costs. The flag is read
    // again at the end rather than kept: a value live across the decap path would have the
    // verifier walk that path twice, once per value.
    if capture::running() {
        capture::arrive(ctx.ctx);
    }
    let (stat, action, changed) = decap_xdp(&ctx);
    if capture::running() {
        capture::record(ctx.ctx, stat as u32, action, changed);
    }
    action
}

/// The packet's reason, its action, and whether the frame was changed (stripped, or
/// rewritten for the next hop).
#[inline(always)]
fn decap_xdp(ctx: &XdpContext) -> (DecapStat, u32, bool) {
    // The whole frame, a jumbo one's later buffers included.
    let len = ctx.frame_len() as u64;
    let pass = xdp_action::XDP_PASS;
    let (stat, action, changed) = match classify(ctx) {
        Err(DecapStat::UntrustedSource) => {
            (DecapStat::UntrustedSource, xdp_action::XDP_DROP, false)
        }
        Err(s) => (s, pass, false),
        Ok(found) => match decide(ctx.ctx as *mut c_void, ctx, &found) {
            Decision::Keep(reason) => match strip_xdp(ctx, &found) {
                Ok(_) => (reason, pass, true),
                Err(s) => (s, pass, false),
            },
            Decision::Forward(h) => match forward_xdp(ctx, h) {
                Ok((s, a)) => (s, a, true),
                Err(reason) => match strip_xdp(ctx, &found) {
                    Ok(_) => (reason, pass, true),
                    Err(s) => (s, pass, false),
                },
            },
        },
    };
    count(stat, len);
    (stat, action, changed)
}

/// The same program at tc ingress (`lb decap --attach tc`), for drivers where XDP is not
/// wanted: the outer headers are removed with `bpf_skb_adjust_room`, keeping a GRO'd
/// packet's segment size (`BPF_F_ADJ_ROOM_FIXED_GSO`) and setting the inner protocol.
#[classifier]
pub fn lb_decap_tc(ctx: TcContext) -> i32 {
    let len = u64::from(ctx.len());
    // Headers up to the inner IP header must be in the linear part for direct access.
    let _ = ctx.pull_data(ctx.len().min(PULL));
    let (stat, action) = match classify(&ctx) {
        Err(DecapStat::UntrustedSource) => (DecapStat::UntrustedSource, TC_ACT_SHOT),
        Err(s) => (s, TC_ACT_OK),
        Ok(found) => match decide(ctx.skb.skb as *mut c_void, &ctx, &found) {
            Decision::Keep(reason) => match strip_tc(&ctx, &found) {
                Ok(_) => (reason, TC_ACT_OK),
                Err(s) => (s, TC_ACT_OK),
            },
            Decision::Forward(h) => match forward_tc(&ctx, h) {
                Ok(sent) => sent,
                Err(reason) => match strip_tc(&ctx, &found) {
                    Ok(_) => (reason, TC_ACT_OK),
                    Err(s) => (s, TC_ACT_OK),
                },
            },
        },
    };
    count(stat, len);
    action
}

/// Ethernet, outer IPv6, UDP, a GUE header with one IPv6 hop, an inner IPv6 header and a
/// TCP header.
const PULL: u32 = 14 + 40 + 8 + 24 + 40 + 20;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
