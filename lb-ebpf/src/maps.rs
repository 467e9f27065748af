//! The program's maps and load-time configuration. Each map is described once in
//! `lb_common::LB_MAPS` (a test checks these declarations against it); the agent resizes
//! them from it and fills `LB_CONFIG` before loading.
use aya_ebpf::{
    helpers::bpf_get_smp_processor_id,
    macros::map,
    maps::{
        Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, lpm_trie::Key,
    },
};
use lb_common::{
    BPF_F_MMAPABLE, BPF_F_NO_COMMON_LRU, Backend, DEFAULT_FLOW_CACHE_SLOTS, DEFAULT_FLOW_ENTRIES,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, DEFAULT_NAT_ENTRIES, DEFAULT_RING_SIZE,
    FLOW_TABLE_PER_CPU, FlowCacheSlot, FlowKey, FlowValue, GUARD_ENTRIES, GuardSrc4, GuardSrc6,
    LbConfig, MAX_TX_PORTS, NatEntry, NextHopCache, PROG_FULL as PROG_FULL_INDEX,
    PROG_NAT as PROG_NAT_INDEX, ProbationSlot, Slot, TableKey, VIP_F_PRESENT, VIP_FILTER_WORDS,
    VIP_INDEX_PROBES, VIP_INDEX_SLOTS, VipIndexEntry, VipInfo, VipKey, flow_cache_index_of,
    probation_check, probation_slot, vip_filter_bit, vip_index_slot,
};

#[map(name = "LB_VIPS")]
pub static LB_VIPS: HashMap<VipKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

#[map(name = "LB_VIP_INFO")]
pub static LB_VIP_INFO: Array<VipInfo> = Array::with_max_entries(DEFAULT_MAX_VIPS, 0);

#[map(name = "LB_VIP_FILTER")]
pub static LB_VIP_FILTER: Array<u64> = Array::with_max_entries(VIP_FILTER_WORDS, 0);

/// See `lb_common::VIP_INDEX_MAP`.
#[map(name = "LB_VIP_INDEX")]
pub static LB_VIP_INDEX: Array<VipIndexEntry> = Array::with_max_entries(VIP_INDEX_SLOTS, 0);

/// Two generations of M slots (backend and previous backends) per VIP; see
/// `lb_common::slot_index`.
#[map(name = "LB_SLOTS")]
pub static LB_SLOTS: Array<Slot> =
    Array::with_max_entries(DEFAULT_MAX_VIPS * 2 * DEFAULT_RING_SIZE, 0);

#[map(name = "LB_BACKENDS")]
pub static LB_BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Shared (not per-CPU) LRU: a flow must find its entry whichever CPU its next packet lands
/// on (RSS changes, generic mode and veth run on the sender's CPU). Keyed by the 16-byte
/// `TableKey` of a flow's `FlowKey` (`table_key`): the kernel hashes the whole key on every
/// lookup.
#[map(name = "LB_FLOWS")]
pub static LB_FLOWS: LruHashMap<TableKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

/// Alternative flow table for `FLOW_TABLE_PER_CPU` mode: one hash table, but LRU lists and
/// free entries per CPU (`BPF_F_NO_COMMON_LRU`), so inserts never share a lock. The agent
/// sizes the table not in use to one entry.
#[map(name = "LB_FLOWS_PERCPU")]
pub static LB_FLOWS_PERCPU: LruHashMap<TableKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, BPF_F_NO_COMMON_LRU);

/// Probation table: flows seen once. Their next packet moves them to the established table,
/// so spoofed first packets (a SYN-then-ACK flood) only churn this table. A direct-mapped
/// array, not an LRU hash: a first packet overwrites its flow's slot (an inlined array write
/// where an LRU insert takes locks and may evict), and a flow that lost its slot to another before its
/// second packet is simply placed again and put on probation again. The agent sizes it to a
/// quarter of the flow table, rounded up to a power of two (`LbConfig::probation_slots`).
#[map(name = "LB_FLOWS_NEW")]
pub static LB_FLOWS_NEW: Array<ProbationSlot> =
    Array::with_max_entries(DEFAULT_FLOW_ENTRIES / 4, 0);

/// The per-CPU flow cache in front of the established table (`lb_common::cache`): one plain
/// array with a region of `LbConfig::flow_cache_slots` slots per possible CPU, sized by the
/// agent (one slot when off); never pinned (a cache). `BPF_F_MMAPABLE` makes the kernel place
/// the values page-aligned: each 64-byte slot is one cache line.
#[map(name = "LB_FLOW_CACHE")]
pub static LB_FLOW_CACHE: Array<FlowCacheSlot> =
    Array::with_max_entries(DEFAULT_FLOW_CACHE_SLOTS, BPF_F_MMAPABLE);

/// This CPU's cache slot for `key`; `None` without a cache (or for a CPU beyond the array,
/// which the agent sizes for every possible CPU).
#[inline(always)]
pub fn flow_cache(cfg: &LbConfig, key: &FlowKey) -> Option<*mut FlowCacheSlot> {
    flow_cache_of(cfg, key.words())
}

/// [`flow_cache`] of a key given as its [`FlowKey::words`].
#[inline(always)]
pub fn flow_cache_of(cfg: &LbConfig, words: &[u64; 5]) -> Option<*mut FlowCacheSlot> {
    let slots = cfg.flow_cache_slots;
    if slots == 0 {
        return None;
    }
    // SAFETY: helper without arguments (inlined by the verifier on x86-64).
    let cpu = unsafe { bpf_get_smp_processor_id() };
    LB_FLOW_CACHE.get_ptr_mut(flow_cache_index_of(cpu, words, slots))
}

/// Fills this CPU's cache slot with what the established table decided for `key` (its entry
/// as refreshed this second) in cache tick `tick` (kept in the slot's `value.last_seen`,
/// `lb_common::FlowCacheSlot`).
#[inline(always)]
pub fn cache_fill(slot: *mut FlowCacheSlot, key: &FlowKey, value: &FlowValue, tick: u32) {
    // SAFETY: this CPU's slot (its own region of the array; an XDP program is not preempted
    // on its CPU, so nothing else writes it meanwhile). Non-overlapping copies, as in
    // `remember_probation`.
    unsafe {
        core::ptr::copy_nonoverlapping(key, &raw mut (*slot).key, 1);
        core::ptr::copy_nonoverlapping(value, &raw mut (*slot).value, 1);
        (*slot).value.last_seen = tick;
    }
}

/// Empties this CPU's cache slot of `key`, if it holds that flow: the established table is
/// about to change or drop its entry. (Other CPUs' slots follow within their second.)
#[inline(always)]
pub fn uncache(cfg: &LbConfig, key: &FlowKey) {
    if let Some(slot) = flow_cache(cfg, key) {
        empty_of(slot, key);
    }
}

/// Empties this CPU's cache slot `slot` (found for `key`) if it holds `key`'s flow.
#[inline(always)]
pub fn empty_of(slot: *mut FlowCacheSlot, key: &FlowKey) {
    // SAFETY: this CPU's slot, as in `cache_fill`.
    unsafe {
        if (*slot).holds(key) {
            (*slot).key.family = 0;
        }
    }
}

/// Next hops per backend id, per CPU, for `NEXTHOP_TTL_S` (see `encap`). Sized like
/// `LB_BACKENDS` by the agent; never pinned (a cache).
#[map(name = "LB_NEXTHOPS")]
pub static LB_NEXTHOPS: PerCpuArray<NextHopCache> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Full NAT, both directions (`lb_common::nat`). Plain hashes: full means refused, never
/// evicted.
#[map(name = "LB_NAT_FWD")]
pub static LB_NAT_FWD: HashMap<FlowKey, NatEntry> =
    HashMap::with_max_entries(DEFAULT_NAT_ENTRIES + DEFAULT_NAT_ENTRIES / 4, 0);

#[map(name = "LB_NAT_REV")]
pub static LB_NAT_REV: HashMap<FlowKey, NatEntry> =
    HashMap::with_max_entries(DEFAULT_NAT_ENTRIES + DEFAULT_NAT_ENTRIES / 4, 0);

/// Half-open NAT pairs' slots (`lb_common::NAT_HALF_MAP`).
#[map(name = "LB_NAT_HALF")]
pub static LB_NAT_HALF: Array<lb_common::NatHalfSlot> =
    Array::with_max_entries(DEFAULT_NAT_ENTRIES / 4, 0);

/// Index of the NAT program in [`LB_PROGS`].
pub const PROG_NAT: u32 = PROG_NAT_INDEX;
/// Index of the full path's program in [`LB_PROGS`].
pub const PROG_FULL: u32 = PROG_FULL_INDEX;
/// Index of the guard's program in [`LB_PROGS`].
pub const PROG_GUARD: u32 = lb_common::PROG_GUARD;

#[map(name = "LB_PROGS")]
pub static LB_PROGS: ProgramArray = ProgramArray::with_max_entries(3, 0);

#[map(name = "LB_NAT_ADDRS")]
pub static LB_NAT_ADDRS: Array<[u32; 4]> = Array::with_max_entries(lb_common::NAT_ADDRS_ENTRIES, 0);

/// New NAT connections refused per pool address and reason (`lb_common::NAT_REFUSED_MAP`).
#[map(name = "LB_NAT_REFUSED")]
pub static LB_NAT_REFUSED: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(lb_common::NAT_REFUSED_ENTRIES, 0);

#[map(name = "LB_TX_PORTS")]
pub static LB_TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);

/// Written by the agent before loading (`EbpfLoader::set_global`), constant to the verifier.
#[unsafe(no_mangle)]
static LB_CONFIG: LbConfig = LbConfig::DEFAULT;

/// The load-time configuration, in place. Its address goes through a volatile read, so the
/// compiler cannot tell which static it points at: each field a path uses is read from the
/// global the loader wrote, never folded from the compile-time default, and only those
/// fields are read (a volatile copy of the whole struct made an established packet's path
/// longer, as `cargo xtask bench` counts it).
#[inline(always)]
pub fn config() -> &'static LbConfig {
    let p: *const LbConfig = &raw const LB_CONFIG;
    // SAFETY: `p` is the address of an initialised static that nothing writes while the
    // program runs (the loader writes it before loading; the verifier sees it frozen).
    unsafe { &*core::ptr::read_volatile(&p) }
}

/// The established entry of `key`, in place (from the table the configuration selects), so
/// a hit can refresh its last-seen time without a second lookup.
#[inline(always)]
pub fn established(cfg: &LbConfig, key: &TableKey) -> Option<*mut FlowValue> {
    if cfg.flow_table == FLOW_TABLE_PER_CPU {
        LB_FLOWS_PERCPU.get_ptr_mut(key)
    } else {
        LB_FLOWS.get_ptr_mut(key)
    }
}

/// The established tables' key of `key` (`lb_common::TableKey::of`, as `trace` makes it).
/// Made once per packet by the caller and passed to the three functions around this one:
/// made inside each, its IPv6 branch was explored by the verifier at every call site and the
/// program went past the verifier's million-instruction budget.
#[inline(always)]
pub fn table_key(cfg: &LbConfig, key: &FlowKey) -> TableKey {
    TableKey::of(key, cfg.hash_seed)
}

/// Remembers `value` as established. Best effort: a full LRU evicts its oldest entry, and a
/// failed insert only costs a new placement next time.
#[inline(always)]
pub fn remember_established(cfg: &LbConfig, key: &TableKey, value: &FlowValue) {
    let _ = if cfg.flow_table == FLOW_TABLE_PER_CPU {
        LB_FLOWS_PERCPU.insert(key, value, 0)
    } else {
        LB_FLOWS.insert(key, value, 0)
    };
}

#[inline(always)]
pub fn forget_established(cfg: &LbConfig, key: &TableKey) {
    let _ = if cfg.flow_table == FLOW_TABLE_PER_CPU {
        LB_FLOWS_PERCPU.remove(key)
    } else {
        LB_FLOWS.remove(key)
    };
}

/// The slot a key of probation hash `h` occupies in the probation table.
#[inline(always)]
fn probation_place(cfg: &LbConfig, h: u64) -> Option<*mut ProbationSlot> {
    LB_FLOWS_NEW.get_ptr_mut(probation_slot(h, cfg.probation_slots))
}

/// The probation entry of `key` (of probation hash `h`), copied out: its slot holds this
/// key, whole (not torn by two writers).
#[inline(always)]
pub fn on_probation(cfg: &LbConfig, key: &FlowKey, h: u64) -> Option<FlowValue> {
    // SAFETY: map memory, compared in place and the value copied out; another CPU may
    // rewrite the slot meanwhile, which the check word catches.
    let slot = unsafe { &*probation_place(cfg, h)? };
    if !slot.key.same(key) {
        return None;
    }
    let value = slot.value;
    (slot.check == probation_check(h, &value)).then_some(value)
}

#[inline(always)]
pub fn remember_probation(cfg: &LbConfig, key: &FlowKey, h: u64, value: &FlowValue) {
    if let Some(slot) = probation_place(cfg, h) {
        // SAFETY: map memory of this slot; a racing writer is caught by the check word. The
        // copies are non-overlapping ones (map memory and the stack), which the compiler
        // expands inline: a plain assignment between these places became a `memmove` call.
        unsafe {
            core::ptr::copy_nonoverlapping(key, &raw mut (*slot).key, 1);
            core::ptr::copy_nonoverlapping(value, &raw mut (*slot).value, 1);
            (*slot).check = probation_check(h, value);
        }
    }
}

#[inline(always)]
pub fn forget_probation(cfg: &LbConfig, key: &FlowKey, h: u64) {
    if let Some(slot) = probation_place(cfg, h) {
        // SAFETY: map memory of this slot. Only this flow's own entry is emptied.
        unsafe {
            if (*slot).key.same(key) {
                (*slot).key.family = 0;
                (*slot).check = 0;
            }
        }
    }
}

/// False when no VIP has address `addr`; true when one may (the bitmap can collide).
#[inline(always)]
pub fn maybe_vip_addr(addr: &[u32; 4]) -> bool {
    let bit = vip_filter_bit(addr);
    match LB_VIP_FILTER.get(bit / 64) {
        Some(word) => word & (1u64 << (bit % 64)) != 0,
        None => false,
    }
}

/// The id of the VIP `key` is for: exact (address, port, protocol) first, then the address's
/// wildcard.
#[inline(always)]
pub fn find_vip_id(key: &FlowKey) -> Option<u32> {
    let mut vk = VipKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        family: key.family,
    };
    if let Some(id) = vip_id_of(&vk) {
        return Some(id);
    }
    vk.port = 0;
    vip_id_of(&vk)
}

/// The id bound to `vk`: from the index when it holds the key, else from the hash.
#[inline(always)]
fn vip_id_of(vk: &VipKey) -> Option<u32> {
    let first = vip_index_slot(vk);
    let mut i = 0;
    while i < VIP_INDEX_PROBES {
        if let Some(e) = LB_VIP_INDEX.get((first + i) & (VIP_INDEX_SLOTS - 1))
            && e.key == *vk
        {
            return Some(e.id);
        }
        i += 1;
    }
    // SAFETY: values are plain data copied out immediately.
    unsafe { LB_VIPS.get(vk) }.copied()
}

/// The state of VIP `id`, if that id is in use.
#[inline(always)]
pub fn present_vip(id: u32) -> Option<&'static VipInfo> {
    let v = LB_VIP_INFO.get(id)?;
    (v.flags & VIP_F_PRESENT != 0).then_some(v)
}

/// The guard's source lists (`lb_common::guard`): allow and deny, IPv4 and IPv6. The
/// declarations' `BPF_F_NO_PREALLOC` is added by `LpmTrie` itself.
#[map(name = "LB_ALLOW4")]
pub static LB_ALLOW4: LpmTrie<GuardSrc4, u64> = LpmTrie::with_max_entries(GUARD_ENTRIES, 0);

#[map(name = "LB_ALLOW6")]
pub static LB_ALLOW6: LpmTrie<GuardSrc6, u64> = LpmTrie::with_max_entries(GUARD_ENTRIES, 0);

#[map(name = "LB_DENY4")]
pub static LB_DENY4: LpmTrie<GuardSrc4, u64> = LpmTrie::with_max_entries(GUARD_ENTRIES, 0);

#[map(name = "LB_DENY6")]
pub static LB_DENY6: LpmTrie<GuardSrc6, u64> = LpmTrie::with_max_entries(GUARD_ENTRIES, 0);

/// Packets the guard dropped, per VIP id, per CPU.
#[map(name = "LB_VIP_GUARD_STATS")]
pub static LB_VIP_GUARD_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// New-flow limits and the VIP's bucket (`lb_common::VipRate`), by VIP id.
#[map(name = "LB_VIP_RATE")]
pub static LB_VIP_RATE: Array<lb_common::VipRate> = Array::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Each source's bucket per VIP (`lb_common::SOURCE_RATE_MAP`): shared by the CPUs, so a
/// source's flows are counted together wherever they land.
#[map(name = "LB_SOURCE_RATE")]
pub static LB_SOURCE_RATE: LruHashMap<lb_common::SourceRateKey, u64> =
    LruHashMap::with_max_entries(lb_common::SOURCE_RATE_ENTRIES, 0);

/// The guard's sampled drops by source, reason and time step (`lb_common::top_sources`).
#[map(name = "LB_TOP_SOURCES")]
pub static LB_TOP_SOURCES: LruHashMap<lb_common::TopKey, u64> =
    LruHashMap::with_max_entries(lb_common::TOP_SOURCES_ENTRIES, 0);

/// The longest entry of scope `scope` holding source `src` (of family `family`) in the IPv4
/// trie `t4` or the IPv6 trie `t6`.
#[inline(always)]
pub fn source_entry(
    t4: &'static LpmTrie<GuardSrc4, u64>,
    t6: &'static LpmTrie<GuardSrc6, u64>,
    scope: u32,
    src: &[u32; 4],
    v4: bool,
) -> Option<&'static u64> {
    if v4 {
        t4.get(Key::new(
            lb_common::guard_prefix_len(32),
            GuardSrc4 {
                scope,
                addr: src[0],
            },
        ))
    } else {
        t6.get(Key::new(
            lb_common::guard_prefix_len(128),
            GuardSrc6 { scope, addr: *src },
        ))
    }
}
