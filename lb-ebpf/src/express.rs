//! The express lane: a plain IPv4 TCP or UDP packet (`parse::plain_v4`, read once, into
//! registers). A busy flow's packet is served by this CPU's flow cache straight from those
//! fields; any other packet goes on to the full path with its `parse::Parsed` record made
//! from them, and with the cache slot already probed (`select::CacheProbe`).
//!
//! It decides nothing of its own: the frame is taken only when the full parse would take it
//! as it is, the cache slot is the one the full path probes (same key words,
//! `lb_common::FlowKey::v4_words`), the decision is `select::cache_decides` (the cache's
//! rules: `lb_common::cached_entry_decides`, the part of `entry_decides` a hit can meet),
//! and the hit is counted, rewritten and sent by the same functions, so a packet gets the
//! same action, bytes and counters either way.
//!
//! The NAT-address check the full path makes first is skipped for a hit: a slot is filled
//! only after that check (a backend's answer to a NAT address never reaches the cache), and
//! a VIP never sits on a NAT source address (the agent refuses it), so a slot that still
//! decides names a VIP address, not a NAT one.
use aya_ebpf::programs::XdpContext;
use lb_common::{ENCAP_L2, FLOW_TABLE_OFF, FlowCacheSlot, FlowEvent, PacketFacts};

use crate::{
    Verdict, act, forward,
    maps::{config, flow_cache_of},
    parse::PlainV4,
    path::deliver,
    select::{CacheProbe, cache_decides, picked},
    stats::{count_backend, count_cache_hit, count_flow, count_vip},
};

/// The verdict for a plain IPv4 packet `p` of a frame of `len` bytes.
#[inline(always)]
pub fn balance(ctx: &XdpContext, p: &PlainV4, len: u64) -> u32 {
    // The configuration's address is read again where it is needed after the cache probe
    // (one load from a constant address) rather than kept: every value live across the
    // probe's helper calls is a stack round trip on the hit path.
    let cfg = config();
    let facts = PacketFacts {
        proto: p.proto(),
        tcp_flags: p.tcp_flags,
        now_s: 0,
    };
    // `Some(slot)`: probed (`None` inside: no slot for this packet, as the full path
    // would find).
    let mut slot = None;
    if cfg.flow_table != FLOW_TABLE_OFF && facts.cacheable() {
        slot = flow_cache_of(cfg, &p.words);
        if let Some(s) = slot
            && let Some((flow, backend)) = cache_decides(s, &p.words)
        {
            if backend.encap == ENCAP_L2 {
                // The hit as the full path counts and sends it, without its record; a sent
                // packet's `forwarded` reason and `flow_hit` event in one entry (one lookup
                // instead of two).
                count_vip(flow.vip_id, len, false);
                count_backend(flow.backend_id, len);
                return match forward::l2_dsr(ctx, backend) {
                    Ok(sent) => {
                        count_cache_hit(len);
                        sent.action()
                    }
                    failed => {
                        count_flow(FlowEvent::Hit);
                        act(failed, len)
                    }
                };
            }
            count_flow(FlowEvent::Hit);
            // Encapsulation needs the record (lengths, family, TOS).
            let picked = picked(flow.backend_id, backend, flow.vip_id, false);
            // A match, not a closure: a closure may be left a function of its own, and the
            // kernel refuses the tail calls `deliver` may make (NAT) in a called function
            // that returns no integer.
            let verdict = match p.parsed(ctx) {
                Ok(pkt) => deliver::<false>(ctx, config(), &pkt, &picked, len),
                Err(v) => Err(v),
            };
            return act(verdict, len);
        }
    }
    // Marked cold: the register allocator then keeps the full path's stack traffic (spills)
    // off the hit.
    core::hint::cold_path();
    act(balance_full(ctx, p, len, slot), len)
}

/// The full path for `p`, whose cache slot was probed (`slot`) without a decision.
#[inline(always)]
fn balance_full(
    ctx: &XdpContext,
    p: &PlainV4,
    len: u64,
    slot: Option<*mut FlowCacheSlot>,
) -> Result<Verdict, Verdict> {
    let pkt = p.parsed(ctx)?;
    crate::path::balance::<false>(ctx, &pkt, config(), len, CacheProbe::Missed(slot))
}
