//! New-flow limits (`lb_common::VipRate`), for `lb_guard`: a flow's first packet passes the
//! source's bucket at this VIP (a /32, or an IPv6 /64) and the VIP's, or is dropped. Both
//! buckets are shared by every CPU and updated without a lock (a generic cell rate algorithm,
//! `lb_common::gcra`: one time per bucket): two CPUs placing flows at the same instant may
//! both take the last token, so a limit can be passed by one flow per CPU at that instant,
//! never more; a per-CPU bucket would instead allow the limit on every CPU.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{FAMILY_V4, FlowKey, SourceRateKey, Stat, gcra};

use crate::{
    Verdict,
    maps::{LB_SOURCE_RATE, LB_VIP_RATE},
};

/// Charges a new flow of `key` at VIP `vip_id` to its buckets, or refuses it (counted by
/// which limit refused it). Nothing is charged for a refused flow.
#[inline(always)]
pub fn limit(vip_id: u32, key: &FlowKey) -> Result<(), Verdict> {
    let Some(r) = LB_VIP_RATE.get_ptr_mut(vip_id) else {
        return Ok(());
    };
    // SAFETY: map memory of this VIP's entry; another CPU may write `tat` meanwhile (see the
    // module's note).
    let r = unsafe { &mut *r };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut source = None;
    if r.source_interval_ns != 0 {
        let sk = SourceRateKey {
            vip_id,
            family: key.family as u32,
            addr: if key.family == FAMILY_V4 {
                [key.src[0], 0]
            } else {
                [key.src[0], key.src[1]]
            },
        };
        // SAFETY: plain data copied out.
        let tat = unsafe { LB_SOURCE_RATE.get(sk) }.copied().unwrap_or(0);
        let next = gcra(tat, now, r.source_interval_ns, r.source_tolerance_ns)
            .ok_or(Verdict::discard(Stat::DropSourceRate))?;
        source = Some((sk, next));
    }
    let mut vip_next = None;
    if r.interval_ns != 0 {
        vip_next = Some(
            gcra(r.tat, now, r.interval_ns, r.tolerance_ns)
                .ok_or(Verdict::discard(Stat::DropVipRate))?,
        );
    }
    if let Some((sk, next)) = source {
        // Best effort: a full LRU evicts its least recent source.
        let _ = LB_SOURCE_RATE.insert(sk, next, 0);
    }
    if let Some(next) = vip_next {
        r.tat = next;
    }
    Ok(())
}
