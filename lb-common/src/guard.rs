//! The guard in front of a VIP: source allow and deny lists (per VIP and node-wide), held in
//! four LPM tries (allow and deny, IPv4 and IPv6). A VIP's `VipInfo::flags` say which lists
//! apply to it ([`VIP_F_GUARD`]), so a VIP without any pays one test of a word it already
//! read, and traffic not for a VIP pays nothing.
//!
//! Every trie key starts with a 32-bit scope, always matched whole: a VIP id for that VIP's
//! lists, [`SCOPE_NODE`] for the node-wide deny list. The address follows in wire order, so
//! the trie's prefix length is `32 + the prefix's own length`.

/// Allowed sources, IPv4: LPM trie of [`GuardKey4`] -> `u64` (unused, 0).
pub const ALLOW4_MAP: &str = "LB_ALLOW4";
/// Allowed sources, IPv6: LPM trie of [`GuardKey6`] -> `u64` (unused, 0).
pub const ALLOW6_MAP: &str = "LB_ALLOW6";
/// Denied sources, IPv4: LPM trie of [`GuardKey4`] -> `u64`, the entry's end in
/// `CLOCK_MONOTONIC` nanoseconds (0: never ends). A match whose end has passed denies
/// nothing (the agent deletes it afterwards).
pub const DENY4_MAP: &str = "LB_DENY4";
/// Denied sources, IPv6: as [`DENY4_MAP`], keys [`GuardKey6`].
pub const DENY6_MAP: &str = "LB_DENY6";
/// Capacity of each trie. Entries are allocated as written (LPM tries are never
/// preallocated), so a large bound costs nothing until used.
pub const GUARD_ENTRIES: u32 = 1 << 22;
/// `BPF_F_NO_PREALLOC`: required of LPM tries.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// Index of the guard's program (`lb_guard`) in `PROGS_MAP`: a VIP packet whose VIP has a
/// guard bit is handed to it, which checks the source and hands what it admits to the full
/// path marked as admitted ([`GUARD_ADMITTED`] in the frame's XDP metadata).
pub const PROG_GUARD: u32 = 2;
/// The guard's program name in the object.
pub const GUARD_PROGRAM: &str = "lb_guard";
/// The 4 bytes of XDP metadata the guard's program puts in front of a frame it admits: the
/// full path then serves the frame without asking again. Only XDP programs write metadata,
/// so a frame from the wire never carries it.
pub const GUARD_ADMITTED: u32 = 0x6775_6172;
/// The XDP metadata the full path puts in front of a frame it hands to the guard's program
/// from the slot table (no remembered flow decided it): such a UDP datagram opens a flow.
pub const GUARD_PLACED: u32 = 0x6e65_7766;

/// Scope of the node-wide deny list (no VIP id is this large).
pub const SCOPE_NODE: u32 = u32::MAX;

/// The VIP serves only sources its allow list holds.
pub const VIP_F_ALLOW: u32 = 1 << 2;
/// The VIP has a deny list of its own.
pub const VIP_F_DENY: u32 = 1 << 3;
/// The node-wide deny list is not empty (set on every VIP while it is not).
pub const VIP_F_NODE_DENY: u32 = 1 << 4;
/// Any of the source lists' bits: the one test a VIP's packet pays where a remembered flow is
/// decided.
pub const VIP_F_GUARD: u32 = VIP_F_ALLOW | VIP_F_DENY | VIP_F_NODE_DENY;
/// The VIP limits new flows (its own rate, or each source's): [`VIP_RATE_MAP`]. Tested with
/// [`VIP_F_GUARD`] where a flow is placed.
pub const VIP_F_RATE: u32 = 1 << 5;

/// Packets the guard dropped per VIP (any of its four reasons): per-CPU array indexed by VIP
/// id of `u64`.
pub const VIP_GUARD_STATS_MAP: &str = "LB_VIP_GUARD_STATS";

/// New-flow limits per VIP: array indexed by VIP id of [`VipRate`].
pub const VIP_RATE_MAP: &str = "LB_VIP_RATE";
/// Each source's bucket per VIP: LRU hash of [`SourceRateKey`] -> `u64` (the source's
/// theoretical arrival time, [`gcra`]). Bounded: a source not seen for a while loses its
/// bucket to a newer one, and starts again with a full burst.
pub const SOURCE_RATE_MAP: &str = "LB_SOURCE_RATE";
/// Entries of [`SOURCE_RATE_MAP`].
pub const SOURCE_RATE_ENTRIES: u32 = 1 << 16;

/// A VIP's new-flow limits as generic cell rate algorithm parameters (an interval between
/// flows and a tolerance: a token bucket of `rate` per second holding `burst`), and the
/// VIP's own bucket state. An interval of 0: no limit of that kind. Written whole by the
/// agent (which restarts the bucket); `tat` is then the program's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipRate {
    pub interval_ns: u64,
    pub tolerance_ns: u64,
    pub source_interval_ns: u64,
    pub source_tolerance_ns: u64,
    /// The VIP bucket's theoretical arrival time (monotonic ns).
    pub tat: u64,
}
const _: () = assert!(core::mem::size_of::<VipRate>() == 40);

impl VipRate {
    /// The interval and tolerance of `rate` flows per second with a burst of `burst` (at
    /// least 1): `burst` flows pass at once after a quiet spell, then one per interval.
    pub const fn params(rate: u32, burst: u32) -> (u64, u64) {
        if rate == 0 {
            return (0, 0);
        }
        let interval = 1_000_000_000 / rate as u64;
        let burst = if burst == 0 { 1 } else { burst as u64 };
        (
            if interval == 0 { 1 } else { interval },
            interval * (burst - 1),
        )
    }
}

/// Key of [`SOURCE_RATE_MAP`]: the VIP and the source's /32 (IPv4, `addr[0]`) or /64
/// (IPv6, its first two words).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceRateKey {
    pub vip_id: u32,
    pub family: u32,
    pub addr: [u32; 2],
}
const _: () = assert!(core::mem::size_of::<SourceRateKey>() == 16);

/// The generic cell rate algorithm: a flow arriving at `now` at a bucket whose theoretical
/// arrival time is `tat` passes unless it is more than `tolerance` early; passing, the bucket
/// moves to the returned time. `None`: over the limit (the bucket is left as it was).
#[inline(always)]
pub const fn gcra(tat: u64, now: u64, interval: u64, tolerance: u64) -> Option<u64> {
    let t = if tat > now { tat } else { now };
    if t - now > tolerance {
        None
    } else {
        Some(t + interval)
    }
}

/// The data of an IPv4 trie key (after the kernel's 32-bit prefix length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct GuardSrc4 {
    /// VIP id or [`SCOPE_NODE`].
    pub scope: u32,
    /// Network byte order, as `FlowKey::src[0]`.
    pub addr: u32,
}
const _: () = assert!(core::mem::size_of::<GuardSrc4>() == 8);

/// The data of an IPv6 trie key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct GuardSrc6 {
    pub scope: u32,
    /// Network byte order, as `FlowKey::src`.
    pub addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<GuardSrc6>() == 20);

/// A whole IPv4 trie key: the kernel's prefix length (32 scope bits plus the prefix's), then
/// the data. Packed as the kernel's `struct bpf_lpm_trie_key`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuardKey4 {
    pub prefix_len: u32,
    pub data: GuardSrc4,
}
const _: () = assert!(core::mem::size_of::<GuardKey4>() == 12);

/// A whole IPv6 trie key.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuardKey6 {
    pub prefix_len: u32,
    pub data: GuardSrc6,
}
const _: () = assert!(core::mem::size_of::<GuardKey6>() == 24);

/// The trie prefix length of an address prefix of `len` bits (the scope is matched whole).
#[inline(always)]
pub const fn guard_prefix_len(len: u32) -> u32 {
    32 + len
}

/// Whether a deny entry ending at `end_ns` (0: never) still denies at `now_ns`.
#[inline(always)]
pub const fn deny_live(end_ns: u64, now_ns: u64) -> bool {
    end_ns == 0 || now_ns < end_ns
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]` integers without holes.
    unsafe impl aya::Pod for super::GuardSrc4 {}
    unsafe impl aya::Pod for super::GuardSrc6 {}
    unsafe impl aya::Pod for super::VipRate {}
    unsafe impl aya::Pod for super::SourceRateKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_passes_the_burst_then_one_per_interval() {
        let (i, tol) = VipRate::params(10, 5);
        assert_eq!(i, 100_000_000);
        let mut tat = 0;
        let now = 1_000_000_000;
        for _ in 0..5 {
            tat = gcra(tat, now, i, tol).expect("inside the burst");
        }
        assert_eq!(gcra(tat, now, i, tol), None, "the sixth at once");
        assert_eq!(gcra(tat, now + i - 1, i, tol), None, "just before a token");
        assert!(gcra(tat, now + i, i, tol).is_some(), "a token refilled");
        // A quiet spell refills the whole burst, no more.
        let later = now + 10 * 1_000_000_000;
        let mut t = tat;
        for _ in 0..5 {
            t = gcra(t, later, i, tol).expect("full burst again");
        }
        assert_eq!(gcra(t, later, i, tol), None);
        assert_eq!(VipRate::params(0, 5), (0, 0));
        assert_eq!(VipRate::params(10, 0).1, 0, "a burst of 0 is 1");
    }

    #[test]
    fn expiry() {
        assert!(deny_live(0, u64::MAX));
        assert!(deny_live(10, 9));
        assert!(!deny_live(10, 10));
    }

    #[test]
    fn guard_bits_are_apart_from_the_others() {
        assert_eq!(
            VIP_F_GUARD & (crate::VIP_F_SRC_HASH | crate::VIP_F_PRESENT),
            0
        );
    }
}
