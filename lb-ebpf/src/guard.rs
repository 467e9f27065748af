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
    FAMILY_V4, FlowKey, GUARD_ADMITTED, SCOPE_NODE, Stat, VIP_F_ALLOW, VIP_F_DENY, VIP_F_GUARD,
    VIP_F_NODE_DENY, VipInfo, deny_live,
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

/// The selection's check where it reads a VIP's state: `Err(ENTER)` for a guarded VIP's
/// packet the guard has not admitted yet. One test of a word already read for an unguarded
/// VIP.
#[inline(always)]
pub fn gate(vip: &VipInfo, pkt: &parse::Parsed) -> Result<(), Verdict> {
    if vip.flags & VIP_F_GUARD != 0 && !pkt.admitted {
        return Err(ENTER);
    }
    Ok(())
}

/// A verdict of the selection, with [`ENTER`] carried out: the packet goes to `lb_guard`
/// (returns only when that tail call failed: dropped as a send failure).
#[inline(always)]
pub fn route(ctx: &XdpContext, v: Verdict) -> Verdict {
    if v.action != ENTER.action {
        return v;
    }
    // SAFETY: tail call into our own program array; on success it does not return.
    unsafe { LB_PROGS.tail_call(ctx, PROG_GUARD) };
    Verdict::discard(Stat::DropTxError)
}

/// Whether the guard's program admitted this frame (its metadata holds `GUARD_ADMITTED`).
#[inline(always)]
pub fn admitted(ctx: &XdpContext) -> bool {
    let meta = ctx.metadata();
    if meta + 4 > ctx.metadata_end() {
        return false;
    }
    // SAFETY: 4 bytes inside the metadata, bounds checked just above.
    unsafe { core::ptr::read_unaligned(meta as *const u32) == GUARD_ADMITTED }
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
    admit(vip_id, vip, &pkt.key)?;
    mark(ctx)?;
    // SAFETY: tail call into our own program array; on success it does not return.
    unsafe { LB_PROGS.tail_call(ctx, PROG_FULL) };
    Err(Verdict::discard(Stat::DropTxError))
}

/// Puts `GUARD_ADMITTED` in front of the frame as XDP metadata.
#[inline(always)]
fn mark(ctx: &XdpContext) -> Result<(), Verdict> {
    const FAILED: Verdict = Verdict::discard(Stat::DropTxError);
    // SAFETY: helper on our own context.
    if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_meta(ctx.ctx, -4) } != 0 {
        return Err(FAILED);
    }
    let meta = ctx.metadata();
    if meta + 4 > ctx.metadata_end() {
        return Err(FAILED);
    }
    // SAFETY: 4 bytes inside the metadata just made, bounds checked above.
    unsafe { core::ptr::write_unaligned(meta as *mut u32, GUARD_ADMITTED) };
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
