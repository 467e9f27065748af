//! Map ABI 14, frozen: the pinned set the release before ABI 15 makes, as the migration to
//! the current ABI meets it. Literal sizes and names, never the current types, so a later
//! change to a shared type cannot change what this says the old set looks like. Nothing here
//! is used by the program; only the agent's migration (and `lb upgrade --check`) reads it.
use crate::{
    BPF_F_NO_PREALLOC,
    maps::{
        BPF_F_NO_COMMON_LRU, Capacity,
        Capacity::{
            Fixed, MaxBackends, MaxVips, NatHalfOpen, NatPairs, PerCpuFlows, Probation,
            SharedFlows, SlotTables,
        },
        MapKind::{self, Array, DevMapHash, Hash, LpmTrie, LruHash, PerCpuArray, ProgArray},
        MapSpec,
    },
};

/// This ABI's version.
pub const VERSION: u32 = 14;
/// Its `abi_layout()`: a pinned record of version 14 with another layout was made by a build
/// this migration does not know.
pub const LAYOUT: u64 = 0xdffc_d00e_7e4a_3349;

/// Its record (`LB_ABI`). Its first 48 bytes are every ABI's since 13.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub magic: u64,
    pub version: u32,
    pub flow_table: u32,
    pub layout: u64,
    pub ring_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    pub flow_entries: u32,
    pub hash_seed: u64,
    pub nat_entries: u32,
    pub migrated_from: u32,
    pub migrated_maps: u32,
    pub _pad: u32,
    pub migrated_entries: u64,
    pub migrated_us: u64,
    pub migrated_at_unix: u64,
}
const _: () = assert!(core::mem::size_of::<Record>() == 88);

/// `LB_STATS` index of the express lane's combined count in ABI 14 (its `Stat::COUNT`).
pub const STATS_CACHE_HITS: u32 = 27;

const fn m(
    name: &'static str,
    kind: MapKind,
    key_size: u32,
    value_size: u32,
    capacity: Capacity,
    flags: u32,
) -> MapSpec {
    MapSpec {
        name,
        kind,
        key_size,
        value_size,
        capacity,
        flags,
        pinned: true,
    }
}

/// The maps ABI 14 pins (its unpinned caches are made new by every load and are not listed).
pub const MAPS: &[MapSpec] = &[
    m("LB_VIPS", Hash, 20, 4, MaxVips, 0),
    m("LB_VIP_INFO", Array, 4, 20, MaxVips, 0),
    m("LB_VIP_FILTER", Array, 4, 8, Fixed(1024), 0),
    m("LB_VIP_INDEX", Array, 4, 24, Fixed(1024), 0),
    m("LB_SLOTS", Array, 4, 16, SlotTables, 0),
    m("LB_BACKENDS", Array, 4, 60, MaxBackends, 0),
    m("LB_FLOWS", LruHash, 16, 24, SharedFlows, 0),
    m(
        "LB_FLOWS_PERCPU",
        LruHash,
        16,
        24,
        PerCpuFlows,
        BPF_F_NO_COMMON_LRU,
    ),
    m("LB_FLOWS_NEW", Array, 4, 72, Probation, 0),
    m("LB_TX_PORTS", DevMapHash, 4, 8, Fixed(64), 0),
    m("LB_HC_STATS", PerCpuArray, 4, 8, Fixed(4), 0),
    m("LB_FLOW_STATS", PerCpuArray, 4, 8, Fixed(7), 0),
    m("LB_STATS", PerCpuArray, 4, 16, Fixed(28), 0),
    m("LB_VIP_STATS", PerCpuArray, 4, 24, MaxVips, 0),
    m("LB_BACKEND_STATS", PerCpuArray, 4, 16, MaxBackends, 0),
    m("LB_NAT_FWD", Hash, 40, 88, NatPairs, 0),
    m("LB_NAT_REV", Hash, 40, 88, NatPairs, 0),
    m("LB_NAT_HALF", Array, 4, 48, NatHalfOpen, 0),
    m("LB_NAT_ADDRS", Array, 4, 16, Fixed(2), 0),
    m("LB_PROGS", ProgArray, 4, 4, Fixed(3), 0),
    m(
        "LB_ALLOW4",
        LpmTrie,
        12,
        8,
        Fixed(4_194_304),
        BPF_F_NO_PREALLOC,
    ),
    m(
        "LB_ALLOW6",
        LpmTrie,
        24,
        8,
        Fixed(4_194_304),
        BPF_F_NO_PREALLOC,
    ),
    m(
        "LB_DENY4",
        LpmTrie,
        12,
        8,
        Fixed(4_194_304),
        BPF_F_NO_PREALLOC,
    ),
    m(
        "LB_DENY6",
        LpmTrie,
        24,
        8,
        Fixed(4_194_304),
        BPF_F_NO_PREALLOC,
    ),
    m("LB_VIP_RATE", Array, 4, 40, MaxVips, 0),
    m("LB_VIP_GUARD_STATS", PerCpuArray, 4, 8, MaxVips, 0),
    m("LB_SOURCE_RATE", LruHash, 16, 8, Fixed(65_536), 0),
];

/// Where an `LB_STATS` entry of ABI 14 goes in the current map: counters keep their index
/// (new ones are appended), the express lane's count moves to the current end.
pub const fn stats_index(old: u32) -> u32 {
    if old == STATS_CACHE_HITS {
        crate::STATS_CACHE_HITS
    } else {
        old
    }
}
