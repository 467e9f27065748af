//! Backend selection: the flow table first, then the VIP's live Maglev slot table.
use lb_common::{
    BACKEND_F_PRESENT, Backend, FlowValue, Stat, VIP_F_SRC_HASH, flow_hash, slot_index,
};

use crate::{
    Verdict,
    maps::{LB_BACKENDS, LB_SLOTS, config, find_flow, find_vip_id, present_vip, remember_flow},
    parse::Parsed,
    stats,
};

const NO_BACKEND: Verdict = Verdict::Drop(Stat::DropNoBackend);

pub struct Picked {
    pub id: u32,
    pub backend: Backend,
    pub vip_id: u32,
    /// The flow was placed by the slot table now (not found in the flow table).
    pub new_flow: bool,
}

/// A present backend with id `id`, if any.
#[inline(always)]
fn present_backend(id: u32) -> Option<Backend> {
    let b = *LB_BACKENDS.get(id)?;
    (b.flags & BACKEND_F_PRESENT != 0).then_some(b)
}

/// Picks the backend for `pkt`, which passed the VIP address pre-filter. A flow-table hit
/// needs one hash lookup; only new flows look the VIP up by key.
#[inline(always)]
pub fn pick(pkt: &Parsed) -> Result<Picked, Verdict> {
    let cfg = config();
    if let Some(flow) = find_flow(&cfg, &pkt.key)
        && let Some(vip) = present_vip(flow.vip_id)
        // A recycled VIP or backend id belongs to something else now: place the flow again.
        && vip.generation == flow.vip_generation
        && let Some(b) = present_backend(flow.backend_id)
        && b.generation == flow.backend_generation
    {
        stats::count(Stat::FlowHit, 0);
        return Ok(Picked {
            id: flow.backend_id,
            backend: b,
            vip_id: flow.vip_id,
            new_flow: false,
        });
    }
    let vip_id = find_vip_id(&pkt.key).ok_or(pkt.not_vip)?;
    let vip = present_vip(vip_id).ok_or(pkt.not_vip)?;
    stats::count(Stat::FlowMiss, 0);
    if vip.backend_count == 0 {
        return Err(NO_BACKEND);
    }
    let hash = flow_hash(&pkt.key, cfg.hash_seed, vip.flags & VIP_F_SRC_HASH != 0);
    // checked: a zero ring size (never loaded so) must not become a panic path.
    let slot = hash
        .checked_rem(u64::from(cfg.ring_size))
        .ok_or(NO_BACKEND)? as u32;
    let id = *LB_SLOTS
        .get(slot_index(vip_id, vip.active_gen, cfg.ring_size, slot))
        .ok_or(NO_BACKEND)?;
    let b = present_backend(id).ok_or(NO_BACKEND)?;
    if !pkt.icmp_error {
        let value = FlowValue {
            backend_id: id,
            backend_generation: b.generation,
            vip_id,
            vip_generation: vip.generation,
        };
        remember_flow(&cfg, &pkt.key, &value);
    }
    Ok(Picked {
        id,
        backend: b,
        vip_id,
        new_flow: !pkt.icmp_error,
    })
}
