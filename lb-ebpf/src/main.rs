//! The XDP load balancer.
//!
//! `lb_xdp` parses a frame (`parse`), finds its VIP (`maps`), picks a backend through the flow
//! table and the VIP's Maglev slot table (`select`), rewrites and sends the frame (`forward`)
//! and counts what happened (`stats`). NAT VIPs and backends' answers to NAT addresses go on
//! to [`lb_nat`] by a tail call (`nat`). Every outcome is a [`Verdict`]; [`act`] is the one
//! place that turns verdicts into XDP actions and counters. Nothing is logged per packet.
#![no_std]
#![no_main]

mod bench;
mod encap;
mod express;
mod fib;
mod forward;
mod hc;
mod icmp;
mod maps;
mod nat;
mod nat_rewrite;
mod outer;
mod parse;
mod proto;
mod ptr;
mod select;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{ENCAP_L2, ENCAP_NAT, FlowCacheSlot, LbConfig, Stat};

use crate::ptr::Frame;

/// What to do with a packet, and why: the XDP action to return and the reason to count it
/// under. Made only by the constructors below, which say which action each kind of outcome
/// takes; [`act`] counts and returns. (It was an enum of four kinds, and the match that
/// turned it into an action and a counter cost ~15 instructions on every path.)
#[derive(Clone, Copy)]
pub struct Verdict {
    stat: Stat,
    action: u32,
}

impl Verdict {
    /// Hand the packet to the kernel untouched.
    pub const fn pass(stat: Stat) -> Self {
        Self {
            stat,
            action: xdp_action::XDP_PASS,
        }
    }

    /// Drop the packet.
    pub const fn discard(stat: Stat) -> Self {
        Self {
            stat,
            action: xdp_action::XDP_DROP,
        }
    }

    /// The XDP action it takes.
    pub const fn action(self) -> u32 {
        self.action
    }

    /// The packet was rewritten; return this action (XDP_TX or a redirect); its reason is
    /// always [`Stat::Forwarded`].
    pub const fn forward(action: u32) -> Self {
        Self {
            stat: Stat::Forwarded,
            action,
        }
    }

    /// The packet was turned into an answer to its sender (an ICMP "too big"); return this
    /// action and count this reason.
    pub const fn reply(stat: Stat, action: u32) -> Self {
        Self { stat, action }
    }
}

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
#[xdp(frags)]
pub fn lb_nat(ctx: XdpContext) -> u32 {
    // The whole frame (a jumbo one included): NAT's own work dwarfs the helper call.
    let len = ctx.frame_len() as u64;
    act(nat::run(&ctx, len), len)
}

#[inline(always)]
fn lb(ctx: &XdpContext) -> u32 {
    // The first buffer's length: the whole frame's for every frame the express lane takes;
    // the full path replaces it for a multi-buffer frame (`try_lb`).
    let mut len = (ctx.data_end() - ctx.data()) as u64;
    // Traffic not for a VIP leaves right after the pre-filter through its own `act`: there
    // its verdict is one of two constants, so it compiles to a counter and a return, without
    // the full path's verdict plumbing (129 -> 71 instructions for a non-VIP packet).
    let verdict = match parse::prefilter(ctx) {
        // A plain IPv4 TCP or UDP packet (the common case) is read once, into registers, and
        // goes by the express lane (`express`), which serves a busy flow's packet from the
        // flow cache or hands the packet to the full path already parsed.
        Ok(parse::Candidate::V4 { l3, dst }) => match parse::plain_v4(ctx, l3, dst[0]) {
            Some(p) => return express::balance(ctx, &p, len),
            None => try_lb(ctx, parse::Candidate::V4 { l3, dst }, &mut len),
        },
        Ok(candidate) => try_lb(ctx, candidate, &mut len),
        Err(verdict) => return act(Err(verdict), len),
    };
    act(verdict, len)
}

/// The one place that turns a [`Verdict`] into an XDP action and a counter.
#[inline(always)]
fn act(verdict: Result<Verdict, Verdict>, len: u64) -> u32 {
    let (Ok(v) | Err(v)) = verdict;
    stats::count(v.stat, len);
    v.action
}

/// The full path for a frame the pre-filter let through: parsed into a [`parse::Parsed`]
/// record, then balanced. `len` comes in as the first buffer's length and leaves as the
/// length the counters count.
#[inline(always)]
fn try_lb(
    ctx: &XdpContext,
    candidate: parse::Candidate,
    len: &mut u64,
) -> Result<Verdict, Verdict> {
    let mut pkt = parse::Parsed::EMPTY;
    parse::parse_candidate(ctx, candidate, &mut pkt)?;
    // An IP packet longer than the first buffer is a multi-buffer frame: count all of it.
    if (pkt.ip.l3 + pkt.ip.len) as u64 > *len {
        *len = ctx.frame_len() as u64;
    }
    // Read once: the selection and the encapsulation both need the load-time constants.
    balance(ctx, &pkt, maps::config(), *len, None)
}

/// Balances a parsed VIP packet. `probed`: the express lane already probed this CPU's cache
/// slot for it without a decision (`Some`, with the slot when there is one), or not.
#[inline(always)]
fn balance(
    ctx: &XdpContext,
    pkt: &parse::Parsed,
    cfg: &LbConfig,
    len: u64,
    probed: Option<Option<*mut FlowCacheSlot>>,
) -> Result<Verdict, Verdict> {
    // A backend's answer to a NAT address is the NAT program's (one array read decides;
    // other VIP packets pay only that). `nat::enter` returns only when the tail call failed
    // (no NAT program in the array): dropped as a send failure.
    if nat::is_nat_addr(pkt) {
        nat::enter(ctx);
        return Err(Verdict::discard(Stat::DropTxError));
    }
    let picked = select::pick(pkt, cfg, probed)?;
    deliver(ctx, cfg, pkt, &picked, len)
}

/// Counts and sends a packet the selection placed.
#[inline(always)]
fn deliver(
    ctx: &XdpContext,
    cfg: &LbConfig,
    pkt: &parse::Parsed,
    picked: &select::Picked,
    len: u64,
) -> Result<Verdict, Verdict> {
    stats::count_vip(picked.vip_id, len, picked.new_flow);
    if picked.backend.encap == ENCAP_NAT {
        // The NAT table decides the backend (and counts it).
        nat::enter(ctx);
        return Err(Verdict::discard(Stat::DropTxError));
    }
    stats::count_backend(picked.id, len);
    if picked.backend.encap == ENCAP_L2 {
        forward::l2_dsr(ctx, picked.backend)
    } else {
        let hops = encap::second_chance_hops(picked);
        encap::encapsulate(ctx, cfg, pkt, picked.id, picked.backend, hops)
    }
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
