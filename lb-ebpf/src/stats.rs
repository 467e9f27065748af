//! Per-CPU counters: global by [`Stat`], per VIP and per backend.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use lb_common::{
    Counter, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, FlowEvent, STATS_CACHE_HITS, STATS_ENTRIES,
    Stat, VipCounter,
};

#[map(name = "LB_STATS")]
static LB_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STATS_ENTRIES, 0);

#[map(name = "LB_FLOW_STATS")]
static LB_FLOW_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FlowEvent::COUNT, 0);

/// Counts one flow-table event.
#[inline(always)]
pub fn count_flow(event: FlowEvent) {
    if let Some(c) = LB_FLOW_STATS.get_ptr_mut(event as u32) {
        // SAFETY: this CPU's slot; nothing else writes it concurrently.
        unsafe { *c += 1 };
    }
}

#[map(name = "LB_VIP_STATS")]
static LB_VIP_STATS: PerCpuArray<VipCounter> = PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

#[map(name = "LB_BACKEND_STATS")]
static LB_BACKEND_STATS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Adds one packet of `bytes` bytes to `stat`.
#[inline(always)]
pub fn count(stat: Stat, bytes: u64) {
    if let Some(c) = LB_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: this CPU's slot; nothing else writes it concurrently.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// A flow-cache hit the express lane forwarded: counted as reason `forwarded` and flow event
/// `flow_hit` by one entry (`lb_common::STATS_CACHE_HITS`, which readers add to both).
#[inline(always)]
pub fn count_cache_hit(bytes: u64) {
    if let Some(c) = LB_STATS.get_ptr_mut(STATS_CACHE_HITS) {
        // SAFETY: as in `count`.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_vip(vip_id: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = LB_VIP_STATS.get_ptr_mut(vip_id) {
        // SAFETY: as in `count`.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flow as u64;
        }
    }
}

/// A new flow of VIP `vip_id` counted apart from its packet (NAT: a connection given a port).
#[inline(always)]
pub fn count_new_flow(vip_id: u32) {
    if let Some(c) = LB_VIP_STATS.get_ptr_mut(vip_id) {
        // SAFETY: as in `count`.
        unsafe { (*c).new_flows += 1 };
    }
}

#[inline(always)]
pub fn count_backend(backend_id: u32, bytes: u64) {
    if let Some(c) = LB_BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as in `count`.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
