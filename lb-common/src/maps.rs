//! The load balancer object's maps, each described once: its name, kind, key and value sizes,
//! where its capacity comes from, its flags and whether the agent pins it. What each map
//! holds is said on its name's constant. From this list the agent sizes the maps when it
//! loads the object and checks a pinned set before adopting it
//! (`lb-userspace/src/dataplane/pins.rs`); a test reads the compiled object and checks the
//! kernel's declarations (`lb-ebpf/src/maps.rs`) against it, so the three cannot drift apart.
use core::mem::size_of;

use crate::{
    ALLOW4_MAP, ALLOW6_MAP, BACKEND_STATS_MAP, BACKENDS_MAP, BPF_F_NO_PREALLOC, Backend, Counter,
    DEFAULT_FLOW_CACHE_SLOTS, DEFAULT_FLOW_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS,
    DEFAULT_NAT_ENTRIES, DEFAULT_RING_SIZE, DENY4_MAP, DENY6_MAP, FLOW_CACHE_MAP, FLOW_STATS_MAP,
    FLOWS_MAP, FLOWS_NEW_MAP, FLOWS_PERCPU_MAP, FlowCacheSlot, FlowEvent, FlowKey, FlowValue,
    GUARD_ENTRIES, GuardKey4, GuardKey6, HC_STATS_MAP, HcStat, MAX_TX_PORTS, NAT_ADDRS_MAP,
    NAT_FWD_MAP, NAT_REV_MAP, NEXTHOPS_MAP, NatEntry, NextHopCache, PROGS_MAP, ProbationSlot,
    SLOTS_MAP, SOURCE_RATE_ENTRIES, SOURCE_RATE_MAP, STATS_ENTRIES, STATS_MAP, Slot, SourceRateKey,
    TX_PORTS_MAP, TableKey, VIP_FILTER_MAP, VIP_FILTER_WORDS, VIP_INDEX_MAP, VIP_INDEX_SLOTS,
    VIP_INFO_MAP, VIP_RATE_MAP, VIP_STATS_MAP, VIPS_MAP, VipCounter, VipIndexEntry, VipInfo,
    VipKey, VipRate,
};

/// A map's kind: the kernel's `BPF_MAP_TYPE_*` number.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash = 1,
    Array = 2,
    ProgArray = 3,
    PerCpuArray = 6,
    LruHash = 9,
    LpmTrie = 11,
    DevMapHash = 25,
    RingBuf = 27,
}

/// Where a map's number of entries comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    /// A constant of the ABI.
    Fixed(u32),
    /// `--max-vips`.
    MaxVips,
    /// `--max-backends`.
    MaxBackends,
    /// Two slot tables (generations) of `--ring-size` slots per VIP.
    SlotTables,
    /// The shared established table's share of `--flow-entries` (one entry when per-CPU).
    SharedFlows,
    /// The per-CPU established table's share of `--flow-entries` (one entry when shared);
    /// the kernel rounds it up to a multiple of the possible CPUs.
    PerCpuFlows,
    /// The probation array (a quarter of the flow table, a power of two).
    Probation,
    /// `--flow-cache-slots` per possible CPU (one entry when off).
    FlowCache,
    /// NAT pairs: `--nat-entries` established plus the half-open slots.
    NatPairs,
    /// NAT half-open slots: a quarter of `--nat-entries`, a power of two.
    NatHalfOpen,
}

impl Capacity {
    /// The capacity the object declares (the default options'): what the agent overrides at
    /// load for every capacity that is not [`Capacity::Fixed`].
    pub const fn declared(self) -> u32 {
        match self {
            Capacity::Fixed(n) => n,
            Capacity::MaxVips => DEFAULT_MAX_VIPS,
            Capacity::MaxBackends => DEFAULT_MAX_BACKENDS,
            Capacity::SlotTables => DEFAULT_MAX_VIPS * 2 * DEFAULT_RING_SIZE,
            Capacity::SharedFlows | Capacity::PerCpuFlows => DEFAULT_FLOW_ENTRIES,
            Capacity::Probation => DEFAULT_FLOW_ENTRIES / 4,
            Capacity::FlowCache => DEFAULT_FLOW_CACHE_SLOTS,
            Capacity::NatPairs => DEFAULT_NAT_ENTRIES + DEFAULT_NAT_ENTRIES / 4,
            Capacity::NatHalfOpen => DEFAULT_NAT_ENTRIES / 4,
        }
    }
}

/// NAT's per-CPU scratch record (`Scratch` in `lb-ebpf/src/nat.rs`): the two entries and two
/// keys a new connection's translation builds, kept in map memory because the program's
/// 512-byte stack is full at that point; one entry, never pinned.
pub const NAT_SCRATCH_MAP: &str = "LB_NAT_SCRATCH";
/// Size of the NAT scratch record: two [`NatEntry`], two [`FlowKey`] and the packet's
/// [`TcpSeg`](crate::TcpSeg).
pub const NAT_SCRATCH_SIZE: u32 =
    (2 * size_of::<NatEntry>() + 2 * size_of::<FlowKey>() + size_of::<crate::TcpSeg>()) as u32;

/// `BPF_F_NO_COMMON_LRU`: an LRU hash with per-CPU LRU lists.
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
/// `BPF_F_MMAPABLE`: an array whose values the kernel places page-aligned.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// One map of the load balancer's object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub capacity: Capacity,
    /// Creation flags (`BPF_F_*`).
    pub flags: u32,
    /// Pinned by the agent (kept across restarts); caches are not.
    pub pinned: bool,
}

const fn spec<K, V>(name: &'static str, kind: MapKind, capacity: Capacity, flags: u32) -> MapSpec {
    MapSpec {
        name,
        kind,
        key_size: size_of::<K>() as u32,
        value_size: size_of::<V>() as u32,
        capacity,
        flags,
        pinned: true,
    }
}

/// A map the agent does not pin: a cache a restarted program starts empty.
const fn unpinned(s: MapSpec) -> MapSpec {
    MapSpec { pinned: false, ..s }
}

use Capacity::{FlowCache, MaxBackends, MaxVips, PerCpuFlows, Probation, SharedFlows, SlotTables};
use MapKind::{Array, DevMapHash, Hash, LpmTrie, LruHash, PerCpuArray, ProgArray};

/// Every map of the load balancer's object (`lb_xdp`, `lb_nat`, `lb_hc_encap`).
pub const LB_MAPS: &[MapSpec] = &[
    spec::<VipKey, u32>(VIPS_MAP, Hash, MaxVips, 0),
    spec::<u32, VipInfo>(VIP_INFO_MAP, Array, MaxVips, 0),
    spec::<u32, u64>(VIP_FILTER_MAP, Array, Capacity::Fixed(VIP_FILTER_WORDS), 0),
    spec::<u32, VipIndexEntry>(VIP_INDEX_MAP, Array, Capacity::Fixed(VIP_INDEX_SLOTS), 0),
    spec::<u32, Slot>(SLOTS_MAP, Array, SlotTables, 0),
    spec::<u32, Backend>(BACKENDS_MAP, Array, MaxBackends, 0),
    spec::<TableKey, FlowValue>(FLOWS_MAP, LruHash, SharedFlows, 0),
    spec::<TableKey, FlowValue>(FLOWS_PERCPU_MAP, LruHash, PerCpuFlows, BPF_F_NO_COMMON_LRU),
    spec::<u32, ProbationSlot>(FLOWS_NEW_MAP, Array, Probation, 0),
    unpinned(spec::<u32, FlowCacheSlot>(
        FLOW_CACHE_MAP,
        Array,
        FlowCache,
        BPF_F_MMAPABLE,
    )),
    unpinned(spec::<u32, NextHopCache>(
        NEXTHOPS_MAP,
        PerCpuArray,
        MaxBackends,
        0,
    )),
    // Devmap values are `struct bpf_devmap_val` (ifindex and a program fd).
    spec::<u32, u64>(TX_PORTS_MAP, DevMapHash, Capacity::Fixed(MAX_TX_PORTS), 0),
    spec::<u32, u64>(HC_STATS_MAP, PerCpuArray, Capacity::Fixed(HcStat::COUNT), 0),
    spec::<u32, u64>(
        FLOW_STATS_MAP,
        PerCpuArray,
        Capacity::Fixed(FlowEvent::COUNT),
        0,
    ),
    spec::<u32, Counter>(STATS_MAP, PerCpuArray, Capacity::Fixed(STATS_ENTRIES), 0),
    spec::<u32, VipCounter>(VIP_STATS_MAP, PerCpuArray, MaxVips, 0),
    spec::<u32, Counter>(BACKEND_STATS_MAP, PerCpuArray, MaxBackends, 0),
    spec::<FlowKey, NatEntry>(NAT_FWD_MAP, Hash, Capacity::NatPairs, 0),
    spec::<FlowKey, NatEntry>(NAT_REV_MAP, Hash, Capacity::NatPairs, 0),
    spec::<u32, crate::NatHalfSlot>(crate::NAT_HALF_MAP, Array, Capacity::NatHalfOpen, 0),
    spec::<u32, [u32; 4]>(
        NAT_ADDRS_MAP,
        Array,
        Capacity::Fixed(crate::NAT_ADDRS_ENTRIES),
        0,
    ),
    spec::<u32, u64>(
        crate::NAT_REFUSED_MAP,
        PerCpuArray,
        Capacity::Fixed(crate::NAT_REFUSED_ENTRIES),
        0,
    ),
    unpinned(MapSpec {
        value_size: NAT_SCRATCH_SIZE,
        ..spec::<u32, ()>(NAT_SCRATCH_MAP, PerCpuArray, Capacity::Fixed(1), 0)
    }),
    spec::<u32, u32>(PROGS_MAP, ProgArray, Capacity::Fixed(3), 0),
    // The guard's source lists (`crate::guard`).
    spec::<GuardKey4, u64>(
        ALLOW4_MAP,
        LpmTrie,
        Capacity::Fixed(GUARD_ENTRIES),
        BPF_F_NO_PREALLOC,
    ),
    spec::<GuardKey6, u64>(
        ALLOW6_MAP,
        LpmTrie,
        Capacity::Fixed(GUARD_ENTRIES),
        BPF_F_NO_PREALLOC,
    ),
    spec::<GuardKey4, u64>(
        DENY4_MAP,
        LpmTrie,
        Capacity::Fixed(GUARD_ENTRIES),
        BPF_F_NO_PREALLOC,
    ),
    spec::<GuardKey6, u64>(
        DENY6_MAP,
        LpmTrie,
        Capacity::Fixed(GUARD_ENTRIES),
        BPF_F_NO_PREALLOC,
    ),
    spec::<u32, VipRate>(VIP_RATE_MAP, Array, MaxVips, 0),
    spec::<u32, u64>(crate::VIP_GUARD_STATS_MAP, PerCpuArray, MaxVips, 0),
    spec::<SourceRateKey, u64>(
        SOURCE_RATE_MAP,
        LruHash,
        Capacity::Fixed(SOURCE_RATE_ENTRIES),
        0,
    ),
    // Packet capture (`crate::capture`): a capture belongs to the program that runs it.
    unpinned(spec::<u32, crate::CaptureConfig>(
        crate::CAPTURE_CONFIG_MAP,
        Array,
        Capacity::Fixed(1),
        0,
    )),
    unpinned(spec::<u32, crate::CaptureCpu>(
        crate::CAPTURE_CPU_MAP,
        PerCpuArray,
        Capacity::Fixed(1),
        0,
    )),
    unpinned(spec::<u32, crate::CaptureRate>(
        crate::CAPTURE_RATE_MAP,
        Array,
        Capacity::Fixed(1),
        0,
    )),
    unpinned(spec::<(), ()>(
        crate::CAPTURE_RING_MAP,
        MapKind::RingBuf,
        Capacity::Fixed(crate::CAPTURE_RING_BYTES),
        0,
    )),
    unpinned(spec::<u32, u32>(
        crate::CAPTURE_PROGS_MAP,
        ProgArray,
        Capacity::Fixed(2),
        0,
    )),
    // The guard's sampled drops (`crate::top_sources`): the last minute only, so a restarted
    // program may start it empty.
    unpinned(spec::<crate::TopKey, u64>(
        crate::TOP_SOURCES_MAP,
        LruHash,
        Capacity::Fixed(crate::TOP_SOURCES_ENTRIES),
        0,
    )),
];

/// The description of map `name`, if the object has it.
pub fn lb_map(name: &str) -> Option<&'static MapSpec> {
    LB_MAPS.iter().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_map_is_described_once() {
        for (i, m) in LB_MAPS.iter().enumerate() {
            assert!(
                LB_MAPS[i + 1..].iter().all(|o| o.name != m.name),
                "{} twice",
                m.name
            );
        }
    }
}
