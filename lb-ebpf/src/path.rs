//! A packet's way through `lb_xdp`: the VIP pre-filter (`parse::prefilter`), the express
//! lane for a plain IPv4 TCP or UDP packet (`express`), or the full parse in the tail-called
//! `lb_full`; then the backend's selection (`select`) and the delivery (`forward`, `encap`),
//! or the NAT program (`nat`).
use aya_ebpf::programs::XdpContext;
use lb_common::{CAPTURE_NONE, ENCAP_L2, ENCAP_NAT, LbConfig, Stat};

use crate::{
    Verdict, act, capture, encap, express, forward, guard, maps, nat, parse,
    ptr::Frame,
    select::{self, CacheProbe},
    stats,
};

/// `lb_xdp`'s body: the XDP action for the frame of `ctx`.
#[inline(always)]
pub fn lb(ctx: &XdpContext) -> u32 {
    // The first buffer's length: the whole frame's for every frame the express lane takes.
    let len = (ctx.data_end() - ctx.data()) as u64;
    // While a capture runs, every frame is copied as it arrived and takes the full path,
    // where each verdict is recorded (`capture`); otherwise this is the one branch it costs.
    if capture::running() {
        core::hint::cold_path();
        capture::arrive(ctx);
        capture::enter_full(ctx);
    }
    // Traffic not for a VIP leaves right after the pre-filter through its own `act`: there
    // its verdict is one of two constants, so it compiles to a counter and a return, without
    // the full path's verdict plumbing.
    let verdict = match parse::prefilter(ctx) {
        // A plain IPv4 TCP or UDP packet (the common case) is read once, into registers, and
        // goes by the express lane (`express`), which serves a busy flow's packet from the
        // flow cache or hands the packet to the full path already parsed.
        Ok(parse::Candidate::V4 { l3, dst }) => match parse::plain_v4(ctx, l3, dst[0]) {
            Some(p) => return express::balance(ctx, &p, len),
            None => enter_full(ctx),
        },
        Ok(_) => enter_full(ctx),
        Err(verdict) => return act(Err(verdict), len),
    };
    act(verdict, len)
}

/// Every other VIP candidate takes the full path in `lb_full`, a program of its own: the
/// verifier walks the selection and the delivery once per inlined copy and cannot prune one
/// copy against another, so the rarer way in keeps its copy out of `lb_xdp`'s walk.
/// Returns only when the tail call failed (no program in the array): dropped as a send
/// failure, as for the NAT program.
#[inline(always)]
fn enter_full(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    // SAFETY: tail call into our own program array; on success it does not return.
    unsafe { maps::LB_PROGS.tail_call(ctx, maps::PROG_FULL) };
    Err(Verdict::discard(Stat::DropTxError))
}

/// `lb_full`'s body: the frame parsed again from the start (cheaper than carrying the
/// pre-filter's result across the tail call), then balanced. `CAPTURE`: `lb_full_capture`'s,
/// which keeps the VIP and backend and hands the verdict to the capture (`capture`).
#[inline(always)]
pub fn full<const CAPTURE: bool>(ctx: &XdpContext) -> u32 {
    let mut len = (ctx.data_end() - ctx.data()) as u64;
    let verdict = match parse::prefilter(ctx) {
        Ok(candidate) => try_lb::<CAPTURE>(ctx, candidate, &mut len),
        Err(verdict) => Err(verdict),
    };
    let action = act(verdict, len);
    if CAPTURE {
        capture::leave(ctx, verdict);
    }
    action
}

/// The full path for a frame the pre-filter let through: parsed into a [`parse::Parsed`]
/// record, then balanced. `len` comes in as the first buffer's length and leaves as the
/// length the counters count.
#[inline(always)]
fn try_lb<const CAPTURE: bool>(
    ctx: &XdpContext,
    candidate: parse::Candidate,
    len: &mut u64,
) -> Result<Verdict, Verdict> {
    let mut pkt = parse::Parsed::EMPTY;
    parse::parse_candidate(ctx, candidate, &mut pkt)?;
    // Entered from `lb_guard` with its mark: the source was checked there.
    pkt.admitted = guard::admitted(ctx);
    // An IP packet longer than the first buffer is a multi-buffer frame: count all of it.
    if (pkt.ip.l3 + pkt.ip.len) as u64 > *len {
        *len = ctx.frame_len() as u64;
    }
    // Read once: the selection and the encapsulation both need the load-time constants.
    balance::<CAPTURE>(ctx, &pkt, maps::config(), *len, CacheProbe::NotYet)
}

/// Balances a parsed VIP packet. `probed`: whether the express lane already probed this
/// CPU's cache slot for it ([`CacheProbe`]). `NOTE`: keep the VIP and backend for a
/// capture's record (`lb_full_capture` only).
#[inline(always)]
pub fn balance<const NOTE: bool>(
    ctx: &XdpContext,
    pkt: &parse::Parsed,
    cfg: &LbConfig,
    len: u64,
    probed: CacheProbe,
) -> Result<Verdict, Verdict> {
    // A backend's answer to a NAT address is the NAT program's (one array read decides;
    // other VIP packets pay only that). `nat::enter` returns only when the tail call failed
    // (no NAT program in the array): dropped as a send failure.
    if nat::is_nat_addr(pkt) {
        nat::enter(ctx);
        return Err(Verdict::discard(Stat::DropTxError));
    }
    // A match, not a closure: the tail call in `guard::route` must stay in this program's
    // body (the kernel refuses a tail call in a called function that returns no integer, and
    // a closure may be left a function of its own).
    let picked = match select::pick(pkt, cfg, probed) {
        Ok(p) => p,
        Err(v) => return Err(guard::route(ctx, v)),
    };
    deliver::<NOTE>(ctx, cfg, pkt, &picked, len)
}

/// Counts and sends a packet the selection placed.
#[inline(always)]
pub fn deliver<const NOTE: bool>(
    ctx: &XdpContext,
    cfg: &LbConfig,
    pkt: &parse::Parsed,
    picked: &select::Picked,
    len: u64,
) -> Result<Verdict, Verdict> {
    stats::count_vip(picked.vip_id, len, picked.new_flow);
    if picked.backend.encap == ENCAP_NAT {
        if NOTE {
            // NAT's backend is the NAT table's, not the slot's: `lb_nat` notes it.
            capture::note(picked.vip_id, CAPTURE_NONE);
        }
        // The NAT table decides the backend (and counts it).
        nat::enter(ctx);
        return Err(Verdict::discard(Stat::DropTxError));
    }
    stats::count_backend(picked.id, len);
    let sent = if picked.backend.encap == ENCAP_L2 {
        forward::l2_dsr(ctx, picked.backend)
    } else {
        let hops = encap::second_chance_hops(picked);
        encap::encapsulate(ctx, cfg, pkt, picked.id, picked.backend, hops)
    };
    // Noted once the frame is sent, not before: the map lookup's branch then comes after
    // the delivery's, which the verifier would otherwise walk once per side of it.
    if NOTE {
        capture::note(picked.vip_id, picked.id);
    }
    sent
}
