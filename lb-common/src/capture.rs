//! Packet capture (`lb capture`): what the program saw and decided, as records the agent
//! streams to a client that writes pcapng.
//!
//! Off, the program pays one load of [`CAPTURE_ON_GLOBAL`] and one branch in `lb_xdp` (and
//! the same at the exit of `lb_nat`). On, `lb_xdp` copies the frame's first bytes as they
//! arrived to this CPU's [`CaptureCpu`] and sends the frame by the full path's captured copy
//! (`lb_full_capture`); where the verdict is made, the program tail-calls `lb_capture`
//! ([`CAPTURE_PROGS_MAP`]), which applies the filters, the sampling and the per-CPU rate
//! limit, and outputs the record(s) to [`CAPTURE_RING_MAP`]. The maps are new and unpinned:
//! a capture belongs to the program that runs it, and a restarted agent starts with capture
//! off.

/// The capture's settings: array of one [`CaptureConfig`]; `on == 0`: off.
pub const CAPTURE_CONFIG_MAP: &str = "LB_CAPTURE";
/// Per-CPU work space and counters: per-CPU array of one [`CaptureCpu`].
pub const CAPTURE_CPU_MAP: &str = "LB_CAPTURE_CPU";
/// The records: a ring buffer of [`CaptureRecord`]s.
pub const CAPTURE_RING_MAP: &str = "LB_CAPTURE_RING";
/// Size of [`CAPTURE_RING_MAP`] in bytes (a power of two of pages).
pub const CAPTURE_RING_BYTES: u32 = 1 << 20;
/// The capture's programs, entered by tail calls: [`CAPTURE_PROGRAM`] at
/// [`CAPTURE_RECORD`], [`CAPTURE_FULL_PROGRAM`] at [`CAPTURE_FULL`].
pub const CAPTURE_PROGS_MAP: &str = "LB_CAPTURE_PROGS";
/// The capture program's name in the object: records a verdict.
pub const CAPTURE_PROGRAM: &str = "lb_capture";
pub const CAPTURE_RECORD: u32 = 0;
/// The full path with the capture's hooks.
pub const CAPTURE_FULL_PROGRAM: &str = "lb_full_capture";
pub const CAPTURE_FULL: u32 = 1;
/// The flag the programs read on every packet: a mutable `u32` global, alone in the
/// object's `.bss` map (a map the loader makes of that section, per load, never pinned).
pub const CAPTURE_ON_GLOBAL: &str = "LB_CAPTURE_ON";
/// The loader's name of the map holding the object's mutable globals.
pub const BSS_MAP: &str = ".bss";

/// Largest snap length: the bytes of a frame a record holds.
pub const CAPTURE_MAX_SNAP: u32 = 256;
/// Default snap length: the headers (Ethernet, an outer IPv6 and UDP/GUE, IP, TCP).
pub const CAPTURE_DEFAULT_SNAP: u32 = 128;

/// [`CaptureConfig::flags`]: also record forwarded frames as they left.
pub const CAPTURE_F_BOTH: u32 = 1;

/// [`CaptureConfig::verdicts`] bits: which verdicts are recorded (0: all).
pub const CAPTURE_V_FORWARDED: u32 = 1;
pub const CAPTURE_V_PASSED: u32 = 2;
pub const CAPTURE_V_DROPPED: u32 = 4;

/// [`CaptureHeader::direction`]: the frame as it arrived.
pub const CAPTURE_ARRIVED: u32 = 0;
/// [`CaptureHeader::direction`]: the frame as it left (rewritten, encapsulated, translated).
pub const CAPTURE_LEFT: u32 = 1;

/// No VIP or backend was chosen for the packet.
pub const CAPTURE_NONE: u32 = u32::MAX;

/// What to capture. Filters that are 0 match everything; ids are stored plus one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Non-zero while a capture runs.
    pub on: u32,
    /// `CAPTURE_F_*`.
    pub flags: u32,
    /// Bytes of each frame recorded, 1..=[`CAPTURE_MAX_SNAP`].
    pub snaplen: u32,
    /// Record one matching packet in `sample` (0 or 1: every one).
    pub sample: u32,
    /// `CAPTURE_V_*` bits; 0: every verdict.
    pub verdicts: u32,
    /// `Stat` index + 1; 0: every reason.
    pub reason: u32,
    /// VIP id + 1; 0: every VIP (and packets for none).
    pub vip: u32,
    /// Backend id + 1; 0: every backend (and packets sent to none).
    pub backend: u32,
    /// Per CPU: nanoseconds between two records reaching the ring (0: no limit).
    pub interval_ns: u64,
    /// Per CPU: how far ahead of time the limit lets records go (a burst).
    pub burst_ns: u64,
    /// `bpf_ktime_get_ns` after which nothing is recorded: the agent renews it while its
    /// client listens, so a capture whose agent died stops by itself.
    pub until_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CaptureConfig>() == 56);

/// What a record says about its packet, followed by `cap_len` bytes of the frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureHeader {
    /// `bpf_ktime_get_ns` (monotonic clock) when the verdict was made.
    pub ts_ns: u64,
    /// The frame's whole length.
    pub orig_len: u32,
    /// Bytes of the frame in the record.
    pub cap_len: u32,
    /// The reason counted (`Stat` index).
    pub stat: u32,
    /// The XDP action returned.
    pub action: u32,
    /// The VIP's id, or [`CAPTURE_NONE`].
    pub vip: u32,
    /// The backend's id, or [`CAPTURE_NONE`].
    pub backend: u32,
    /// [`CAPTURE_ARRIVED`] or [`CAPTURE_LEFT`].
    pub direction: u32,
    /// The CPU that ran the program.
    pub cpu: u32,
}
const _: () = assert!(core::mem::size_of::<CaptureHeader>() == 40);

/// One record in [`CAPTURE_RING_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CaptureRecord {
    pub hdr: CaptureHeader,
    pub data: [u8; CAPTURE_MAX_SNAP as usize],
}
const _: () = assert!(core::mem::size_of::<CaptureRecord>() == 296);

/// One CPU's capture state: counters, the rate limit's clock and the record being made.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CaptureCpu {
    /// Records output to the ring.
    pub emitted: u64,
    /// Matching packets not recorded: over the rate limit, or the ring was full.
    pub missed: u64,
    /// The rate limit's theoretical arrival time (ns).
    pub tat: u64,
    /// Matching packets `--sample` left out.
    pub sampled_out: u64,
    /// Non-zero from the arrival copy until the verdict's record is made.
    pub pending: u32,
    /// The tail call's hand-over: the action and reason of the verdict.
    pub action: u32,
    pub stat: u32,
    pub _pad: u32,
    pub rec: CaptureRecord,
}
const _: () = assert!(core::mem::size_of::<CaptureCpu>() == 344);

impl CaptureConfig {
    /// Whether a packet of this verdict, VIP and backend passes the filters (not counting
    /// the sampling and the rate limit).
    #[inline(always)]
    pub const fn matches(&self, stat: u32, action: u32, vip: u32, backend: u32) -> bool {
        if self.verdicts != 0 && self.verdicts & verdict_bit(action) == 0 {
            return false;
        }
        if self.reason != 0 && self.reason != stat.wrapping_add(1) {
            return false;
        }
        if self.vip != 0 && self.vip != vip.wrapping_add(1) {
            return false;
        }
        self.backend == 0 || self.backend == backend.wrapping_add(1)
    }
}

/// The `CAPTURE_V_*` bit of an XDP action: 3 (TX) and 4 (REDIRECT) forward, 2 passes,
/// anything else drops.
#[inline(always)]
pub const fn verdict_bit(action: u32) -> u32 {
    match action {
        2 => CAPTURE_V_PASSED,
        3 | 4 => CAPTURE_V_FORWARDED,
        _ => CAPTURE_V_DROPPED,
    }
}

/// The rate limit (GCRA): whether a record may go at `now` given the CPU's theoretical
/// arrival time `tat`, and the new one.
#[inline(always)]
pub const fn rate_allows(tat: u64, now: u64, interval_ns: u64, burst_ns: u64) -> Option<u64> {
    if interval_ns == 0 {
        return Some(tat);
    }
    let t = if tat > now { tat } else { now };
    if t - now > burst_ns {
        None
    } else {
        Some(t + interval_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_lets_a_burst_then_one_per_interval() {
        let (interval, burst) = (1_000, 4_000);
        let mut tat = 0;
        let mut sent = 0;
        // 100 packets at the same instant: the burst (burst / interval + 1) goes.
        for _ in 0..100 {
            if let Some(t) = rate_allows(tat, 10_000, interval, burst) {
                tat = t;
                sent += 1;
            }
        }
        assert_eq!(sent, 5);
        // One per interval after that: the burst is spent until 11,000 ns, then one at
        // each of 11,000 ... 19,000.
        let mut later = 0;
        for now in (10_000..20_000).step_by(100) {
            if let Some(t) = rate_allows(tat, now, interval, burst) {
                tat = t;
                later += 1;
            }
        }
        assert_eq!(later, 9);
    }

    #[test]
    fn filters_match_by_verdict_reason_vip_and_backend() {
        let all = CaptureConfig {
            on: 1,
            ..Default::default()
        };
        assert!(all.matches(5, 1, CAPTURE_NONE, CAPTURE_NONE));
        let dropped_malformed = CaptureConfig {
            verdicts: CAPTURE_V_DROPPED,
            reason: 5 + 1,
            ..all
        };
        assert!(dropped_malformed.matches(5, 1, CAPTURE_NONE, CAPTURE_NONE));
        assert!(!dropped_malformed.matches(6, 1, CAPTURE_NONE, CAPTURE_NONE));
        assert!(!dropped_malformed.matches(5, 2, CAPTURE_NONE, CAPTURE_NONE));
        let vip3 = CaptureConfig { vip: 4, ..all };
        assert!(vip3.matches(0, 3, 3, 7));
        assert!(!vip3.matches(0, 3, 2, 7));
        assert!(!vip3.matches(1, 2, CAPTURE_NONE, CAPTURE_NONE));
        let backend7 = CaptureConfig { backend: 8, ..all };
        assert!(backend7.matches(0, 4, 3, 7));
        assert!(!backend7.matches(0, 4, 3, 6));
    }
}
