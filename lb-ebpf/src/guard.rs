//! The guard in front of a VIP (`lb_common::guard`). The lists are checked in a program of
//! their own, `lb_guard`, entered by a tail call: inlined where the VIP's state is read (the
//! flow table's and the slot table's paths, five places), the lookups and both address
//! families were walked by the verifier once per state reaching each place and took
//! `lb_full` past its million-instruction budget. Here each place pays one test of the
//! VIP's flags ([`gate`]); a guarded VIP's packet leaves the selection with [`ENTER`],
//! `path` hands it to `lb_guard`, which checks the source, and hands what it admits to
//! `lb_full` with `GUARD_ADMITTED` in its XDP metadata ([`admitted`]).
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{
    FAMILY_V4, FlowKey, GUARD_ADMITTED, GUARD_PLACED, PROTO_TCP, SCOPE_NODE, Stat, TCP_ACK,
    TCP_SYN, VIP_F_ALLOW, VIP_F_DENY, VIP_F_GUARD, VIP_F_NODE_DENY, VIP_F_RATE, VipInfo, deny_live,
};

use crate::{
    Verdict,
    maps::{
        LB_ALLOW4, LB_ALLOW6, LB_DENY4, LB_DENY6, LB_PROGS, PROG_FULL, PROG_GUARD, source_entry,
    },
    parse,
    ptr::Frame,
};

/// Not a verdict: the packet's VIP is guarded and the packet not yet admitted; `route` hands
/// it to `lb_guard`. Its action is no XDP action, so it can never leave the program as one.
pub const ENTER: Verdict = Verdict {
    stat: Stat::DropSourceNotAllowed,
    action: u32::MAX,
};
/// As [`ENTER`], for a packet no remembered flow decided (the slot table places it): if it
/// opens a flow (a SYN, a UDP datagram), the VIP's new-flow limits apply to it.
pub const ENTER_NEW: Verdict = Verdict {
    stat: Stat::DropVipRate,
    action: u32::MAX - 1,
};

/// The selection's check where a remembered flow is decided: `Err(ENTER)` for a packet of a
/// VIP with source lists that the guard has not admitted yet. One test of a word already
/// read for a VIP without.
#[inline(always)]
pub fn gate(vip: &VipInfo, pkt: &parse::Parsed) -> Result<(), Verdict> {
    if vip.flags & VIP_F_GUARD != 0 && !pkt.admitted {
        return Err(ENTER);
    }
    Ok(())
}

/// The check where the slot table places a packet: [`gate`], and a VIP with new-flow
/// limits too (`Err(ENTER_NEW)`).
#[inline(always)]
pub fn gate_new(vip: &VipInfo, pkt: &parse::Parsed) -> Result<(), Verdict> {
    if vip.flags & (VIP_F_GUARD | VIP_F_RATE) != 0 && !pkt.admitted {
        return Err(ENTER_NEW);
    }
    Ok(())
}

/// A verdict of the selection, with [`ENTER`] carried out: the packet goes to `lb_guard`
/// (returns only when that tail call failed: dropped as a send failure).
#[inline(always)]
pub fn route(ctx: &XdpContext, v: Verdict) -> Verdict {
    if v.action != ENTER.action && v.action != ENTER_NEW.action {
        return v;
    }
    // The guard's program is told a placed packet by its metadata.
    if v.action == ENTER_NEW.action && set_meta(ctx, GUARD_PLACED).is_err() {
        return Verdict::discard(Stat::DropTxError);
    }
    // SAFETY: tail call into our own program array; on success it does not return.
    unsafe { LB_PROGS.tail_call(ctx, PROG_GUARD) };
    Verdict::discard(Stat::DropTxError)
}

/// Whether the guard's program admitted this frame (its metadata holds `GUARD_ADMITTED`).
#[inline(always)]
pub fn admitted(ctx: &XdpContext) -> bool {
    meta_is(ctx, GUARD_ADMITTED)
}

/// Whether the frame's first 4 bytes of metadata are `word`.
#[inline(always)]
fn meta_is(ctx: &XdpContext, word: u32) -> bool {
    let meta = ctx.metadata();
    if meta + 4 > ctx.metadata_end() {
        return false;
    }
    // SAFETY: 4 bytes inside the metadata, bounds checked just above.
    unsafe { core::ptr::read_unaligned(meta as *const u32) == word }
}

/// `lb_guard`'s body: the frame parsed again, its VIP's lists checked; admitted, it goes on
/// to `lb_full` marked as admitted.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let mut len = (ctx.data_end() - ctx.data()) as u64;
    let verdict = match parse::prefilter(ctx) {
        Ok(candidate) => check(ctx, candidate, &mut len),
        Err(verdict) => Err(verdict),
    };
    crate::act(verdict, len)
}

#[inline(always)]
fn check(ctx: &XdpContext, candidate: parse::Candidate, len: &mut u64) -> Result<Verdict, Verdict> {
    let mut pkt = parse::Parsed::EMPTY;
    parse::parse_candidate(ctx, candidate, &mut pkt)?;
    if (pkt.ip.l3 + pkt.ip.len) as u64 > *len {
        *len = ctx.frame_len() as u64;
    }
    let vip_id = crate::maps::find_vip_id(&pkt.key).ok_or(pkt.not_vip)?;
    let vip = crate::maps::present_vip(vip_id).ok_or(pkt.not_vip)?;
    admit(vip_id, vip, &pkt.key).inspect_err(|v| count_drop(vip_id, &pkt.key, v))?;
    // A flow's first packet: a SYN (without ACK), or a UDP datagram the slot table placed.
    let opens = !pkt.icmp_error
        && if pkt.key.proto == PROTO_TCP {
            pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        } else {
            meta_is(ctx, GUARD_PLACED)
        };
    if vip.flags & VIP_F_RATE != 0 && opens {
        crate::rate::limit(vip_id, &pkt.key).inspect_err(|v| count_drop(vip_id, &pkt.key, v))?;
    }
    set_meta(ctx, GUARD_ADMITTED).map_err(|()| Verdict::discard(Stat::DropTxError))?;
    // SAFETY: tail call into our own program array; on success it does not return.
    unsafe { LB_PROGS.tail_call(ctx, PROG_FULL) };
    Err(Verdict::discard(Stat::DropTxError))
}

/// Counts a packet of `key` the guard dropped for VIP `vip_id` with `verdict` (its reason is
/// counted by `act`), and samples it for the top sources.
#[inline(always)]
fn count_drop(vip_id: u32, key: &FlowKey, verdict: &Verdict) {
    if let Some(c) = crate::maps::LB_VIP_GUARD_STATS.get_ptr_mut(vip_id) {
        // SAFETY: this CPU's slot; nothing else writes it concurrently.
        unsafe { *c += 1 };
    }
    crate::top_sources::sample(key, verdict.stat);
}

/// Puts `word` in front of the frame as its 4 bytes of XDP metadata (whatever metadata it
/// had: BPF_PROG_TEST_RUN's repeated passes run on the frame as the last pass left it).
#[inline(always)]
fn set_meta(ctx: &XdpContext, word: u32) -> Result<(), ()> {
    let delta = (ctx.metadata_end() as i64 - 4 - ctx.metadata() as i64) as i32;
    // SAFETY: helper on our own context.
    if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_meta(ctx.ctx, delta) } != 0 {
        return Err(());
    }
    let meta = ctx.metadata();
    if meta + 4 > ctx.metadata_end() {
        return Err(());
    }
    // SAFETY: 4 bytes inside the metadata just made, bounds checked above.
    unsafe { core::ptr::write_unaligned(meta as *mut u32, word) };
    Ok(())
}

/// Whether VIP `vip_id` (state `vip`) admits the packet of `key` by its source: `Err` with
/// the reason when a deny list holds the source (checked first: a deny match always wins) or
/// when the VIP has an allow list that does not.
#[inline(always)]
pub fn admit(vip_id: u32, vip: &VipInfo, key: &FlowKey) -> Result<(), Verdict> {
    let flags = vip.flags;
    let v4 = key.family == FAMILY_V4;
    if flags & VIP_F_NODE_DENY != 0 && denied(SCOPE_NODE, &key.src, v4) {
        return Err(Verdict::discard(Stat::DropSourceDenied));
    }
    if flags & VIP_F_DENY != 0 && denied(vip_id, &key.src, v4) {
        return Err(Verdict::discard(Stat::DropSourceDenied));
    }
    if flags & VIP_F_ALLOW != 0
        && source_entry(&LB_ALLOW4, &LB_ALLOW6, vip_id, &key.src, v4).is_none()
    {
        return Err(Verdict::discard(Stat::DropSourceNotAllowed));
    }
    Ok(())
}

/// Whether the deny list of `scope` holds `src` with an entry that has not ended (the
/// longest matching prefix's entry decides; the clock is read only on a match that ends).
#[inline(always)]
fn denied(scope: u32, src: &[u32; 4], v4: bool) -> bool {
    match source_entry(&LB_DENY4, &LB_DENY6, scope, src, v4) {
        None => false,
        Some(&0) => true,
        // SAFETY: helper without arguments.
        Some(&end) => deny_live(end, unsafe { bpf_ktime_get_coarse_ns() }),
    }
}
