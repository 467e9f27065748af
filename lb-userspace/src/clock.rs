//! The clocks the programs read, from userspace: `bpf_ktime_get_ns` is `CLOCK_MONOTONIC`,
//! `bpf_ktime_get_coarse_ns` its coarse reading (`CLOCK_MONOTONIC_COARSE`, same base).

fn ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// `CLOCK_MONOTONIC` in nanoseconds (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    ns(libc::CLOCK_MONOTONIC) as u64
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds (`bpf_ktime_get_coarse_ns`).
pub fn coarse_now_ns() -> u64 {
    ns(libc::CLOCK_MONOTONIC_COARSE) as u64
}

/// `CLOCK_MONOTONIC_COARSE` in seconds: the NAT tables' clock.
pub fn coarse_now_s() -> u32 {
    (coarse_now_ns() / 1_000_000_000) as u32
}

/// What to add to a monotonic time for Unix time.
pub fn mono_to_unix_ns() -> i128 {
    ns(libc::CLOCK_REALTIME) - ns(libc::CLOCK_MONOTONIC)
}
