//! Packet capture (`lb capture`): what the program saw and decided, as records the agent
//! streams to a client that writes pcapng.
//!
//! Off, the program pays one load of [`CAPTURE_ON_GLOBAL`] and one branch in `lb_xdp` (and
//! the same at the exit of `lb_nat`, and where it finds a connection's backend). On, `lb_xdp` copies the frame's first bytes as they
//! arrived to this CPU's [`CaptureCpu`] and sends the frame by the full path's captured copy
//! (`lb_full_capture`); where the verdict is made, the program tail-calls `lb_capture`
//! ([`CAPTURE_PROGS_MAP`]), which applies the filters, the sampling and the rate limit (one
//! for every CPU, [`CAPTURE_RATE_MAP`]), and outputs the record(s) to [`CAPTURE_RING_MAP`].
//! The maps are new and unpinned: a capture belongs to the program that runs it, and a
//! restarted agent starts with capture off.

/// The capture's settings: array of one [`CaptureConfig`]; `on == 0`: off.
pub const CAPTURE_CONFIG_MAP: &str = "LB_CAPTURE";
/// Per-CPU work space and counters: per-CPU array of one [`CaptureCpu`].
pub const CAPTURE_CPU_MAP: &str = "LB_CAPTURE_CPU";
/// The rate limit every CPU shares: array of one [`CaptureRate`].
pub const CAPTURE_RATE_MAP: &str = "LB_CAPTURE_RATE";
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
    /// The rate limit's window in nanoseconds (0: no limit): at most `per_window` records
    /// reach the ring in each, from all CPUs together ([`rate_step`]).
    pub window_ns: u64,
    /// Records a window lets through.
    pub per_window: u64,
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
    /// Unused (the rate limit is shared: [`CaptureRate`]); kept for the layout.
    pub _unused: u64,
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

/// The rate limit's state, one for all CPUs: the window (`now / window_ns`) being counted
/// and the records it let through so far. CPUs update it without a lock ([`rate_step`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureRate {
    pub window: u64,
    pub taken: u64,
}
const _: () = assert!(core::mem::size_of::<CaptureRate>() == 16);

/// What a CPU does with the shared [`CaptureRate`] for a matching packet at `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateStep {
    /// No limit: record it.
    Unlimited,
    /// A newer window: start it (`window`, `taken` 1) and record the packet.
    Start(u64),
    /// Room in the window: count it (`taken` + 1) and record the packet.
    Take,
    /// The window is full: missed.
    Full,
}

/// The rate limit: fixed windows of `window_ns`, `per_window` records in each, counted for
/// every CPU together so the ring never gets more than the rate asked however many CPUs the
/// traffic lands on. The window moves forward: a CPU whose clock read is a little behind
/// (one window) counts against the newer window. A window further ahead than that was left
/// by an earlier capture with shorter windows (the map outlives captures, and the decap
/// program outlives `lb decap --capture` runs): it starts over, or that capture would
/// record nothing until the clock caught up.
#[inline(always)]
pub const fn rate_step(rate: &CaptureRate, now: u64, window_ns: u64, per_window: u64) -> RateStep {
    if window_ns == 0 {
        return RateStep::Unlimited;
    }
    let w = now / window_ns;
    if w > rate.window || w.saturating_add(1) < rate.window {
        RateStep::Start(w)
    } else if rate.taken < per_window {
        RateStep::Take
    } else {
        RateStep::Full
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_left_by_a_capture_with_shorter_windows_starts_over() {
        let ms = 1_000_000;
        let now = 3_600_000 * ms;
        // An earlier capture at 100 ms windows, this one at 500 ms.
        let left = CaptureRate {
            window: now / (100 * ms),
            taken: 100,
        };
        assert_eq!(
            rate_step(&left, now, 500 * ms, 1),
            RateStep::Start(now / (500 * ms))
        );
        // A CPU one window behind counts against the newer window, as before.
        let newer = CaptureRate {
            window: now / (100 * ms) + 1,
            taken: 100,
        };
        assert_eq!(rate_step(&newer, now, 100 * ms, 100), RateStep::Full);
    }

    /// Applies a step as the kernel does.
    fn step(rate: &mut CaptureRate, now: u64, window_ns: u64, per_window: u64) -> bool {
        match rate_step(rate, now, window_ns, per_window) {
            RateStep::Unlimited => true,
            RateStep::Start(w) => {
                *rate = CaptureRate {
                    window: w,
                    taken: 1,
                };
                true
            }
            RateStep::Take => {
                rate.taken += 1;
                true
            }
            RateStep::Full => false,
        }
    }

    #[test]
    fn the_rate_limit_lets_a_window_s_share_through_from_all_cpus() {
        let (window, per) = (1_000, 5);
        let mut rate = CaptureRate::default();
        // 100 packets at the same instant, from any CPU: one window's share goes.
        let sent = (0..100)
            .filter(|_| step(&mut rate, 10_000, window, per))
            .count();
        assert_eq!(sent, 5);
        // A clock read from before the window started counts against it: nothing more.
        assert!(!step(&mut rate, 9_990, window, per));
        // Over ten more windows, a packet every 10 ns: exactly five a window.
        let later = (11_000..21_000)
            .step_by(10)
            .filter(|&now| step(&mut rate, now, window, per))
            .count();
        assert_eq!(later, 50);
        // No limit.
        assert!((0..100).all(|_| step(&mut rate, 0, 0, 0)));
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
