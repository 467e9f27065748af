//! The pinned map set's record: what an agent checks before adopting maps pinned by another
//! run (or another build).
use crate::{
    Backend, Counter, FlowEvent, FlowKey, FlowValue, HcStat, LbConfig, NatEntry, Slot,
    VIP_FILTER_WORDS, VIP_INDEX_SLOTS, VipCounter, VipIndexEntry, VipInfo, VipKey, fmix64, mix,
};

/// Frozen layouts of earlier ABIs, each with what its migration needs.
pub mod v14;
/// The ABI the agent migrates from (`lb-userspace/src/dataplane/migrate.rs`): always
/// [`ABI_VERSION`] - 1, with its frozen map list and record.
pub use v14 as previous;

/// Bumped whenever the pinned set changes: a map added or removed, or a map's layout or
/// meaning changed (15: the NAT address pool, `LB_NAT_ADDRS` of nine entries, and its refusal
/// counts, `LB_NAT_REFUSED`).
pub const ABI_VERSION: u32 = 15;
/// "xdp-lb\0\0" in little endian: marks an [`AbiRecord`].
pub const ABI_MAGIC: u64 = 0x0000_626c_2d70_6478;

/// Sizes of every map key and value type, folded into one number: a struct that changes size
/// changes it, so maps pinned by another build are refused instead of misread.
pub const fn abi_layout() -> u64 {
    let sizes = [
        core::mem::size_of::<Counter>(),
        core::mem::size_of::<VipCounter>(),
        core::mem::size_of::<LbConfig>(),
        core::mem::size_of::<VipKey>(),
        core::mem::size_of::<VipInfo>(),
        core::mem::size_of::<Backend>(),
        core::mem::size_of::<FlowKey>(),
        core::mem::size_of::<crate::TableKey>(),
        core::mem::size_of::<FlowValue>(),
        core::mem::size_of::<VipIndexEntry>(),
        core::mem::size_of::<Slot>(),
        core::mem::size_of::<NatEntry>(),
        core::mem::size_of::<crate::NatHalfSlot>(),
        VIP_INDEX_SLOTS as usize,
        crate::STATS_ENTRIES as usize,
        HcStat::COUNT as usize,
        FlowEvent::COUNT as usize,
        VIP_FILTER_WORDS as usize,
        core::mem::size_of::<crate::GuardKey4>(),
        core::mem::size_of::<crate::GuardKey6>(),
        core::mem::size_of::<crate::VipRate>(),
        core::mem::size_of::<crate::SourceRateKey>(),
    ];
    let mut h = 0x6c62_5f61_6269_u64;
    let mut i = 0;
    while i < sizes.len() {
        h = mix(h, sizes[i] as u64);
        i += 1;
    }
    fmix64(h)
}

/// Value of [`ABI_MAP`]: what the pinned maps were made by and for. An agent adopts pinned
/// maps only when every field matches its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AbiRecord {
    /// [`ABI_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub version: u32,
    /// [`FLOW_TABLE_SHARED`] or [`FLOW_TABLE_PER_CPU`].
    pub flow_table: u32,
    /// [`abi_layout`].
    pub layout: u64,
    pub ring_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    pub flow_entries: u32,
    pub hash_seed: u64,
    /// `--nat-entries`: the NAT tables' size (established connections).
    pub nat_entries: u32,
    /// The ABI the set was migrated from by the last upgrade (0: made by this ABI). The
    /// fields up to `hash_seed` are every ABI's record (a reader tells versions apart by
    /// them); these say what the last migration did, for `lb stats` and the status page.
    pub migrated_from: u32,
    /// Maps created new by that migration (converted, grown, added).
    pub migrated_maps: u32,
    pub _pad: u32,
    /// Entries it copied across.
    pub migrated_entries: u64,
    /// How long it took, load to commit, in microseconds.
    pub migrated_us: u64,
    /// When it committed (seconds since the epoch).
    pub migrated_at_unix: u64,
}
const _: () = assert!(core::mem::size_of::<AbiRecord>() == 88);
const _: () = assert!(core::mem::offset_of!(AbiRecord, layout) == 16);
const _: () = assert!(core::mem::offset_of!(AbiRecord, hash_seed) == 40);
