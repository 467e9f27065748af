//! Map ABI shared by the XDP program (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Everything here is `#[repr(C)]` plain data with explicit padding so both sides agree on
//! layout byte for byte; nothing in a map value is a `bool` or an enum. Map names and default
//! capacities are constants so the loader and the program can never disagree on them.
#![no_std]

/// Global counters: a per-CPU array indexed by [`Stat`], value [`Counter`].
pub const STATS_MAP: &str = "LB_STATS";

/// Why a packet got the action it got, or a flow-table event. Used as the index into
/// [`STATS_MAP`]; never stored in a map value.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Rewritten and sent to a backend.
    Forwarded = 0,
    /// Not for a VIP (or not IP at all): passed untouched.
    PassNotVip = 1,
    /// IPv4 fragment: passed untouched.
    PassFragment = 2,
    /// IPv4 header with options: passed untouched.
    PassIpOptions = 3,
    /// IPv6 with an extension header before L4: passed untouched.
    PassIpv6Ext = 4,
    /// Truncated or inconsistent headers: dropped.
    DropMalformed = 5,
    /// For a VIP that has no usable backend: dropped.
    DropNoBackend = 6,
    /// The flow table knew the flow.
    FlowHit = 7,
    /// The flow table did not know the flow (new flow or evicted).
    FlowMiss = 8,
}

impl Stat {
    /// Number of variants; the length of [`STATS_MAP`].
    pub const COUNT: u32 = 9;
    /// All variants in index order.
    pub const ALL: [Stat; Stat::COUNT as usize] = [
        Stat::Forwarded,
        Stat::PassNotVip,
        Stat::PassFragment,
        Stat::PassIpOptions,
        Stat::PassIpv6Ext,
        Stat::DropMalformed,
        Stat::DropNoBackend,
        Stat::FlowHit,
        Stat::FlowMiss,
    ];

    /// Stable snake_case name used in CLI output and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::Forwarded => "forwarded",
            Stat::PassNotVip => "passed_not_vip",
            Stat::PassFragment => "passed_fragment",
            Stat::PassIpOptions => "passed_ip_options",
            Stat::PassIpv6Ext => "passed_ipv6_ext",
            Stat::DropMalformed => "dropped_malformed",
            Stat::DropNoBackend => "dropped_no_backend",
            Stat::FlowHit => "flow_table_hit",
            Stat::FlowMiss => "flow_table_miss",
        }
    }
}

/// A packet and byte counter (per CPU in every map that holds it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with no padding holes.
    unsafe impl aya::Pod for super::Counter {}
}
