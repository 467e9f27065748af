//! The sources the guard dropped most (`lb stats --top-sources`), sampled in the kernel: one
//! drop in [`TOP_SAMPLE_EVERY`] (chosen at random, so every source is sampled at the same
//! rate) adds 1 to its source's, reason's and time step's entry of [`TOP_SOURCES_MAP`]. The
//! agent reads the map only when asked and sums the steps of the last minute; nothing goes to
//! userspace per packet, and nothing runs in the agent between questions. Old steps are never
//! deleted: they are left out by the reader and give way to newer entries in the LRU hash.

/// Sampled guard drops: LRU hash of [`TopKey`] -> `u64` (samples). Each CPU adds only to
/// keys holding its own number, so its plain add needs no atomic (the BPF target's core
/// library has no atomic add, and a lost update would undercount a flood); the reader sums
/// the CPUs.
pub const TOP_SOURCES_MAP: &str = "LB_TOP_SOURCES";
/// Entries of [`TOP_SOURCES_MAP`]. Under a flood from random sources the entries of
/// one-sample sources churn; a source that keeps sending keeps its entry fresh.
pub const TOP_SOURCES_ENTRIES: u32 = 8192;
/// One drop in this many is sampled (a power of two: the test is a mask).
pub const TOP_SAMPLE_EVERY: u32 = 16;
/// Length of one time step of [`TopKey::step`], in nanoseconds of `CLOCK_MONOTONIC_COARSE`.
pub const TOP_STEP_NS: u64 = 10_000_000_000;
/// Steps the "last minute" sums: the current one and the five before it (50 to 60 s).
pub const TOP_WINDOW_STEPS: u32 = 6;

/// Key of [`TOP_SOURCES_MAP`]: a dropped source (the whole address), why it was dropped (a
/// `Stat` index) and the time step it was dropped in (monotonic ns / [`TOP_STEP_NS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopKey {
    /// Network byte order, as `FlowKey::src` (IPv4: the first word, the rest 0).
    pub addr: [u32; 4],
    pub family: u8,
    /// The drop's `Stat` as its index.
    pub reason: u8,
    /// The CPU that counted it (see [`TOP_SOURCES_MAP`]).
    pub cpu: u16,
    pub step: u32,
}
const _: () = assert!(core::mem::size_of::<TopKey>() == 24);

/// The time step of monotonic time `now_ns`.
#[inline(always)]
pub const fn top_step(now_ns: u64) -> u32 {
    (now_ns / TOP_STEP_NS) as u32
}

/// Whether an entry of step `step` is inside the last minute as seen at step `now`.
#[inline(always)]
pub const fn top_in_window(step: u32, now: u32) -> bool {
    step <= now && now - step < TOP_WINDOW_STEPS
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]` integers without holes.
    unsafe impl aya::Pod for super::TopKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_the_last_six_steps() {
        let now = top_step(3_600 * 1_000_000_000);
        assert_eq!(now, 360);
        assert!(top_in_window(now, now));
        assert!(top_in_window(now - 5, now));
        assert!(!top_in_window(now - 6, now), "more than a minute ago");
        assert!(
            !top_in_window(now + 1, now),
            "a step from another clock's future"
        );
        assert_eq!(TOP_SAMPLE_EVERY & (TOP_SAMPLE_EVERY - 1), 0);
    }
}
