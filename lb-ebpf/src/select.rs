//! Backend selection: this CPU's flow cache (`lb_common::cache`), the established flow table,
//! then the probation table, then the VIP's live Maglev slot table. The rules for whether a
//! remembered entry still decides live in `lb_common::entry_decides`, shared with the agent's
//! `trace`.
//!
//! Why two tables: a TCP SYN is placed but never remembered (it costs a hash and a slot read),
//! a flow's first remembered packet (the handshake's ACK, a first UDP datagram) goes on
//! probation, and only its next packet makes it established. A flood of spoofed first packets
//! (SYN, or SYN then ACK) therefore churns the probation table and never evicts an established
//! flow. The price: a table change between a connection's SYN and its ACK (one RTT) moves it.
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use lb_common::{
    BACKEND_F_PRESENT, Backend, ENCAP_NAT, FLOW_F_FIN, FLOW_TABLE_OFF, FlowCacheSlot, FlowEvent,
    FlowValue, LbConfig, PROTO_UDP, PacketFacts, Previous, Slot, Stat, TableKey, VIP_F_GUARD,
    VIP_F_SRC_HASH, VipInfo, cache_tick, cached_entry_decides, entry_decides, probation_hash,
    slot_index, slot_of,
};

use crate::{
    Verdict, guard,
    maps::{
        LB_BACKENDS, LB_SLOTS, cache_fill, empty_of, established, find_vip_id, flow_cache,
        forget_established, forget_probation, on_probation, present_vip, remember_established,
        remember_probation, table_key, uncache,
    },
    parse::Parsed,
    stats::count_flow,
};

const NO_BACKEND: Verdict = Verdict::discard(Stat::DropNoBackend);

pub struct Picked {
    pub id: u32,
    /// The backend's entry in place (map memory): only the fields a path needs are read (a
    /// copy of the 60-byte entry cost 70 more instructions on every balanced packet).
    pub backend: &'static Backend,
    pub vip_id: u32,
    /// The flow was placed by the slot table now (no table decided it).
    pub new_flow: bool,
    /// The slot's previous backends (second chance), in the slot's map entry, when the table
    /// placed the packet; `None` when a remembered entry did (one store on those paths, where
    /// a copy of the ids cost three).
    pub previous: Option<&'static Previous>,
}

/// Where the flow's stale entry was, when one was found but no longer decides.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Found {
    Nowhere,
    Established,
    Probation,
}

#[inline(always)]
fn now_s() -> u32 {
    // SAFETY: helper without arguments; CLOCK_MONOTONIC_COARSE, no locking.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// The flow cache's clock (`lb_common::cache_tick`): the kernel's jiffies, which the verifier
/// inlines as one load where `bpf_ktime_get_coarse_ns` is a helper call.
#[inline(always)]
pub fn tick() -> u32 {
    // SAFETY: helper without arguments.
    cache_tick(unsafe { bpf_jiffies64() })
}

/// The backend a remembered entry points at, if the entry still decides; `Err` when the
/// VIP's guard must judge the packet first (`guard::gate`: a remembered flow is judged too,
/// so a deny takes effect on established connections at once).
#[inline(always)]
fn deciding(
    flow: &FlowValue,
    facts: &PacketFacts,
    cfg: &LbConfig,
    pkt: &Parsed,
) -> Result<Option<&'static Backend>, Verdict> {
    let Some(vip) = present_vip(flow.vip_id) else {
        return Ok(None);
    };
    guard::gate(vip, pkt)?;
    let backend = LB_BACKENDS.get(flow.backend_id);
    if entry_decides(flow, vip, backend, facts, cfg.fin_grace_s) {
        Ok(backend)
    } else {
        Ok(None)
    }
}

/// The entry as this packet leaves it: last-seen now, FIN remembered.
#[inline(always)]
fn touched(flow: &FlowValue, facts: &PacketFacts) -> FlowValue {
    let mut v = *flow;
    v.last_seen = facts.now_s;
    if facts.is_fin() {
        v.flags |= FLOW_F_FIN;
    }
    v
}

/// Whether this CPU's flow-cache slot was already probed for a packet when it reaches
/// [`pick`].
#[derive(Clone, Copy)]
pub enum CacheProbe {
    /// Not probed (the full parse's packets): [`pick`] probes the slot itself when the
    /// packet may use one.
    NotYet,
    /// Probed by the express lane without a decision: the packet's slot, or `None` when the
    /// packet may use none (as [`pick`] would have found). The slot is not probed again, only
    /// kept in step.
    Missed(Option<*mut FlowCacheSlot>),
}

/// Picks the backend for `pkt`, which passed the VIP address pre-filter. A busy flow's packet
/// is decided by this CPU's flow cache (an array read, a key compare and two array reads);
/// the established table (one hash lookup) decides once a second per flow and for packets
/// that may change an entry; only flows no table decides look the VIP up.
///
/// `probed`: whether the express lane already probed this CPU's cache slot for the packet
/// ([`CacheProbe`]).
#[inline(always)]
pub fn pick(pkt: &Parsed, cfg: &LbConfig, probed: CacheProbe) -> Result<Picked, Verdict> {
    if cfg.flow_table == FLOW_TABLE_OFF {
        // Stateless: the live table decides every packet, nothing is remembered.
        let (vip_id, slot, b, _) = by_table(pkt, cfg)?;
        return Ok(Picked {
            previous: Some(&slot.previous),
            ..picked(slot.backend, b, vip_id, false)
        });
    }
    let mut facts = PacketFacts {
        proto: pkt.key.proto,
        tcp_flags: pkt.tcp_flags,
        now_s: 0,
    };
    let cache = match probed {
        CacheProbe::Missed(slot) => slot,
        CacheProbe::NotYet => {
            // A SYN, FIN or RST skips the cache: it looks at the slot only if it changes the
            // entry.
            let cache = if cfg.flow_cache_slots != 0 && facts.cacheable() {
                flow_cache(cfg, &pkt.key)
            } else {
                None
            };
            if let Some(slot) = cache
                && let Some(p) = from_cache(slot, pkt)
            {
                return Ok(p);
            }
            cache
        }
    };
    // The clock (a helper call, as dear as a map lookup) is read only where the tables
    // need the second: UDP ages and a FIN (here), a TCP entry once a FIN was seen, and the
    // once-a-second refresh of an entry the cache is filled from (below). A packet the
    // cache serves reads only its tick (jiffies, one load), a new TCP flow's first packet
    // no clock at all.
    if facts.proto == PROTO_UDP || facts.is_fin() {
        facts.now_s = now_s();
    }
    let mut found = Found::Nowhere;
    let tk = table_key(cfg, &pkt.key);
    if let Some(entry) = established(cfg, &tk) {
        if let Some(p) = from_established(entry, pkt, &tk, &mut facts, cfg, cache)? {
            return Ok(p);
        }
        count_flow(FlowEvent::Replaced);
        found = Found::Established;
        // The entry is placed again or forgotten below: this CPU's slot must not keep it.
        uncache(cfg, &pkt.key);
    }
    // Only packets no established entry decided hash their key for the probation table.
    let ph = probation_hash(&pkt.key);
    if found == Found::Nowhere
        && let Some(flow) = on_probation(cfg, &pkt.key, ph)
    {
        // A FIN entry's grace needs the time; so does a promotion that fills the cache.
        if (flow.flags & FLOW_F_FIN != 0 || cache.is_some()) && facts.now_s == 0 {
            facts.now_s = now_s();
        }
        if let Some(b) = deciding(&flow, &facts, cfg, pkt)? {
            count_flow(FlowEvent::Promoted);
            forget_probation(cfg, &pkt.key, ph);
            if facts.is_rst() {
                count_flow(FlowEvent::EndedRst);
                uncache(cfg, &pkt.key);
            } else {
                let now = touched(&flow, &facts);
                remember_established(cfg, &tk, &now);
                match cache {
                    Some(slot) if now.flags & FLOW_F_FIN == 0 => {
                        cache_fill(slot, &pkt.key, &now, tick())
                    }
                    Some(slot) => empty_of(slot, &pkt.key),
                    None => uncache(cfg, &pkt.key),
                }
            }
            return Ok(picked(flow.backend_id, b, flow.vip_id, false));
        }
        count_flow(FlowEvent::Replaced);
        found = Found::Probation;
    }
    place(pkt, &tk, &facts, cfg, found, ph)
}

/// The flow cache's decision: its slot holds this flow, filled in this tick, and the entry
/// still decides. Anything else is the tables' (a deciding established entry fills the slot
/// again).
#[inline(always)]
fn from_cache(slot: *mut FlowCacheSlot, pkt: &Parsed) -> Option<Picked> {
    let (flow, b) = cache_decides(slot, pkt.key.words())?;
    count_flow(FlowEvent::Hit);
    Some(picked(flow.backend_id, b, flow.vip_id, false))
}

/// What this CPU's cache slot `slot` decides for a cacheable packet (`PacketFacts::
/// cacheable`) of key `words`: the entry (in the slot) and its backend when the slot holds
/// the flow, was filled in this tick and the entry still decides; `None` leaves the packet to
/// the tables. Nothing counted: the caller counts the hit once it serves it.
///
/// The entry is judged by `lb_common::cached_entry_decides`: of `entry_decides`'s rules only
/// those about the tables can apply to a hit (no SYN, no FIN entry, no idle time: the slot
/// serves only within the tick of its fill, when the entry's last-seen was refreshed).
#[inline(always)]
pub fn cache_decides(
    slot: *mut FlowCacheSlot,
    words: &[u64; 5],
) -> Option<(&'static FlowValue, &'static Backend)> {
    // SAFETY: this CPU's slot (its own region of the cache array, written by no one else
    // while this program runs on this CPU, so it holds still while read in place).
    let c: &'static FlowCacheSlot = unsafe { &*slot };
    // The slot serves if it holds the flow and was filled in this tick.
    if !c.holds_words(words) || !c.filled_in(tick()) {
        return None;
    }
    let vip = present_vip(c.value.vip_id)?;
    // A guarded VIP's packets are judged by the tables' path, which checks the source
    // (`deciding`): the hit path pays this one test of a word it has read.
    if vip.flags & VIP_F_GUARD != 0 {
        return None;
    }
    let b = cached_entry_decides(&c.value, vip, LB_BACKENDS.get(c.value.backend_id))?;
    Some((&c.value, b))
}

/// The established entry's decision, if it still decides: the entry refreshed (last-seen at
/// most once a second, the FIN), forgotten on RST, and this CPU's cache slot kept in step
/// (filled for a packet that may use it, emptied when a SYN, FIN or RST changed the entry).
#[inline(always)]
fn from_established(
    entry: *mut FlowValue,
    pkt: &Parsed,
    tk: &TableKey,
    facts: &mut PacketFacts,
    cfg: &LbConfig,
    cache: Option<*mut FlowCacheSlot>,
) -> Result<Option<Picked>, Verdict> {
    // SAFETY: the map's value, valid while this program runs; plain data.
    let flow = unsafe { *entry };
    // A FIN entry's grace needs the time; so do the once-a-second refresh and the cache fill.
    if (flow.flags & FLOW_F_FIN != 0 || cache.is_some()) && facts.now_s == 0 {
        facts.now_s = now_s();
    }
    let Some(b) = deciding(&flow, facts, cfg, pkt)? else {
        return Ok(None);
    };
    count_flow(FlowEvent::Hit);
    let decided = picked(flow.backend_id, b, flow.vip_id, false);
    if facts.is_rst() {
        count_flow(FlowEvent::EndedRst);
        forget_established(cfg, tk);
        uncache(cfg, &pkt.key);
        return Ok(Some(decided));
    }
    let mut now = flow;
    let write = facts.now_s != 0
        && (flow.last_seen != facts.now_s || (facts.is_fin() && flow.flags & FLOW_F_FIN == 0));
    if write {
        // At most one write a second per entry (plus the FIN): the hot path stays a read.
        now = touched(&flow, facts);
        // SAFETY: as above; a racing writer on another CPU writes the same values.
        unsafe { *entry = now };
    }
    match cache {
        Some(slot) if now.flags & FLOW_F_FIN == 0 => cache_fill(slot, &pkt.key, &now, tick()),
        // The slot is at hand: a FIN entry is never cached.
        Some(slot) => empty_of(slot, &pkt.key),
        None if write => uncache(cfg, &pkt.key),
        None => {}
    }
    Ok(Some(decided))
}

#[inline(always)]
pub fn picked(id: u32, backend: &'static Backend, vip_id: u32, new_flow: bool) -> Picked {
    Picked {
        id,
        backend,
        vip_id,
        new_flow,
        previous: None,
    }
}

/// The backend id and VIP id the live slot table gives a new flow (NAT's placement: its
/// connections live in the NAT table).
#[inline(always)]
pub fn slot_backend(pkt: &Parsed, cfg: &LbConfig) -> Result<(u32, u32), Verdict> {
    let (vip_id, slot, _, _) = by_table(pkt, cfg)?;
    Ok((slot.backend, vip_id))
}

/// The VIP id, slot and backend the VIP's live slot table gives the packet.
#[inline(always)]
fn by_table(
    pkt: &Parsed,
    cfg: &LbConfig,
) -> Result<(u32, &'static Slot, &'static Backend, &'static VipInfo), Verdict> {
    let vip_id = find_vip_id(&pkt.key).ok_or(pkt.not_vip)?;
    let vip = present_vip(vip_id).ok_or(pkt.not_vip)?;
    guard::gate_new(vip, pkt)?;
    if vip.backend_count == 0 {
        return Err(NO_BACKEND);
    }
    let slot = slot_of(
        &pkt.key,
        cfg.hash_seed,
        vip.flags & VIP_F_SRC_HASH != 0,
        cfg.ring_size,
    )
    .ok_or(NO_BACKEND)?;
    let slot = LB_SLOTS
        .get(slot_index(vip_id, vip.active_gen, cfg.ring_size, slot))
        .ok_or(NO_BACKEND)?;
    let b = LB_BACKENDS.get(slot.backend).ok_or(NO_BACKEND)?;
    // The live table is the authority for placing: it never names a down backend once
    // published (the DOWN flag is about remembered flows, and is written just before).
    if b.flags & BACKEND_F_PRESENT == 0 {
        return Err(NO_BACKEND);
    }
    Ok((vip_id, slot, b, vip))
}

/// Places the flow by the VIP's live slot table, and remembers it as the packet warrants.
#[inline(always)]
fn place(
    pkt: &Parsed,
    tk: &TableKey,
    facts: &PacketFacts,
    cfg: &LbConfig,
    found: Found,
    ph: u64,
) -> Result<Picked, Verdict> {
    let (vip_id, slot, b, vip) = by_table(pkt, cfg)?;
    let id = slot.backend;
    if pkt.icmp_error || slot.in_window() || b.encap == ENCAP_NAT {
        // An ICMP error is steered like its flow, never a reason to remember one. A slot
        // with previous backends is in its drain window: the flow may belong to any of them,
        // and only the backends can tell (second chance), so every packet is placed by the
        // table and carries them all until the window ends. A NAT VIP's connections live in the NAT
        // table, which decides their backend (`nat::forward`).
        return Ok(Picked {
            previous: Some(&slot.previous),
            ..picked(id, b, vip_id, false)
        });
    }
    if facts.is_syn() || facts.is_rst() {
        // A new connection (or its end): nothing to remember, and a stale entry is done.
        if facts.is_syn() {
            count_flow(FlowEvent::SynPlaced);
        }
        match found {
            Found::Established => forget_established(cfg, tk),
            Found::Probation => forget_probation(cfg, &pkt.key, ph),
            Found::Nowhere => {}
        }
        return Ok(picked(id, b, vip_id, false));
    }
    // The entry is made only here, where it is remembered (built before the SYN's return,
    // its six stores ran on every SYN).
    let value = FlowValue {
        backend_id: id,
        backend_generation: b.generation,
        vip_id,
        vip_generation: vip.generation,
        last_seen: facts.now_s,
        flags: if facts.is_fin() { FLOW_F_FIN } else { 0 },
    };
    // The VIP's `new_flows` counts flows when first remembered (a TCP connection once, at
    // its handshake's ACK; a UDP flow at its first datagram), not every placement of a SYN.
    let mut remembered_new = false;
    if found == Found::Established {
        // An established flow that had to move (its backend went down) stays established.
        remember_established(cfg, tk, &value);
    } else {
        if found == Found::Nowhere {
            count_flow(if pkt.key.proto == PROTO_UDP {
                FlowEvent::NewUdp
            } else {
                FlowEvent::MissNotSyn
            });
            remembered_new = true;
        }
        remember_probation(cfg, &pkt.key, ph, &value);
    }
    Ok(picked(id, b, vip_id, remembered_new))
}
