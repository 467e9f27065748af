//! One guard drop in `TOP_SAMPLE_EVERY`, at random, counted by source, reason and time step
//! (`lb_common::top_sources`) for `lb stats --top-sources`. At random rather than every Nth
//! drop of a CPU: a counter would sample whichever sources happen to line up with it, a
//! random draw samples every source at the same rate, so samples x N estimates each one.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns};
use lb_common::{FlowKey, Stat, TOP_SAMPLE_EVERY, TopKey, top_step};

use crate::maps::LB_TOP_SOURCES;

/// Samples a drop of `key`'s source for `reason`.
#[inline(always)]
pub fn sample(key: &FlowKey, reason: Stat) {
    // SAFETY: helper without arguments.
    if unsafe { bpf_get_prandom_u32() } & (TOP_SAMPLE_EVERY - 1) != 0 {
        return;
    }
    let k = TopKey {
        addr: key.src,
        family: key.family,
        reason: reason as u8,
        // SAFETY: helper without arguments.
        cpu: unsafe { bpf_get_smp_processor_id() } as u16,
        // SAFETY: helper without arguments.
        step: top_step(unsafe { bpf_ktime_get_coarse_ns() }),
    };
    if let Some(n) = LB_TOP_SOURCES.get_ptr_mut(k) {
        // SAFETY: map memory of an entry only this CPU writes (its number is in the key), and
        // the program is not preempted on it.
        unsafe { *n += 1 };
        return;
    }
    // Best effort: a full LRU evicts its least recent entry.
    let _ = LB_TOP_SOURCES.insert(k, 1u64, 0);
}
