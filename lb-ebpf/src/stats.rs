//! Per-CPU counters by [`Stat`] reason.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use lb_common::{Counter, Stat};

#[map(name = "LB_STATS")]
static LB_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

/// Adds one packet of `bytes` bytes to `stat`.
#[inline(always)]
pub fn count(stat: Stat, bytes: u64) {
    if let Some(c) = LB_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
