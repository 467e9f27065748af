//! The decap object's maps and load-time configuration, and its counters.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use lb_common::{Counter, DECAP_MAX_ADDRS, DecapAddr, DecapConfig, DecapStat};

/// The VIPs this backend serves (`lb decap --vip`).
#[map(name = "DECAP_VIPS")]
pub static DECAP_VIPS: HashMap<DecapAddr, u32> = HashMap::with_max_entries(DECAP_MAX_ADDRS, 0);

#[map(name = "DECAP_STATS")]
static DECAP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DecapStat::COUNT, 0);

/// Written by `lb decap` before loading.
#[unsafe(no_mangle)]
pub static DECAP_CONFIG: DecapConfig = DecapConfig::DEFAULT;

#[inline(always)]
pub fn count(stat: DecapStat, len: u64) {
    if let Some(c) = DECAP_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: this CPU's slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}

/// Whether `addr` is a configured VIP.
#[inline(always)]
pub fn is_vip(addr: &DecapAddr) -> bool {
    // SAFETY: a read-only lookup; the value is not used.
    unsafe { DECAP_VIPS.get(addr) }.is_some()
}
