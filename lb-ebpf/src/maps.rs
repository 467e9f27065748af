//! The program's maps and load-time configuration. Names and sizes come from `lb-common`; the
//! agent resizes them (`set_max_entries`) and fills `LB_CONFIG` before loading.
use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap},
};
use lb_common::{
    Backend, DEFAULT_FLOW_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, DEFAULT_RING_SIZE,
    FlowKey, FlowValue, LbConfig, MAX_TX_PORTS, VipInfo, VipKey,
};

#[map(name = "LB_VIPS")]
pub static LB_VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Two generations of M backend ids per VIP; see `lb_common::slot_index`.
#[map(name = "LB_SLOTS")]
pub static LB_SLOTS: Array<u32> =
    Array::with_max_entries(DEFAULT_MAX_VIPS * 2 * DEFAULT_RING_SIZE, 0);

#[map(name = "LB_BACKENDS")]
pub static LB_BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Shared (not per-CPU) LRU: a flow must find its entry whichever CPU its next packet lands
/// on (RSS changes, generic mode and veth run on the sender's CPU).
#[map(name = "LB_FLOWS")]
pub static LB_FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

#[map(name = "LB_TX_PORTS")]
pub static LB_TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);

/// Written by the agent before loading (`EbpfLoader::set_global`), constant to the verifier.
#[unsafe(no_mangle)]
static LB_CONFIG: LbConfig = LbConfig::DEFAULT;

#[inline(always)]
pub fn config() -> LbConfig {
    // SAFETY: a plain read of an initialised global; volatile so the value written at load
    // time is used instead of the compile-time default.
    unsafe { core::ptr::read_volatile(&LB_CONFIG) }
}

/// The VIP `key` is for: exact (address, port, protocol) first, then the address's wildcard.
#[inline(always)]
pub fn find_vip(key: &FlowKey) -> Option<VipInfo> {
    let mut vk = VipKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        family: key.family,
    };
    // SAFETY: values are plain data copied out immediately.
    if let Some(v) = unsafe { LB_VIPS.get(vk) } {
        return Some(*v);
    }
    vk.port = 0;
    unsafe { LB_VIPS.get(vk) }.copied()
}
