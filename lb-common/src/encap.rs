//! Encapsulation: forwarding modes, outer-header sizes and per-flow entropy (shared by the
//! load balancer's XDP and tc programs and the agent's `trace`), and the ABI of the backends'
//! decapsulation program (`lb decap`).
//!
//! Wire formats (both as Katran and GLB send them):
//! - IPIP: outer IPv4 (protocol 4 for an inner IPv4 packet, 41 for IPv6) or outer IPv6 (next
//!   header 4 or 41) directly before the inner IP header.
//! - GUE variant 1: outer IP, UDP to [`LbConfig::gue_port`](crate::LbConfig), then the inner
//!   IP header itself (variant 1 has no GUE header: the inner version nibble 4 or 6 is read as
//!   GUE's `01` variant bits). Outer UDP checksum 0 (RFC 6935 tunnel rule; our decap accepts it).
//!
//! Outer IPv4: DF set, ID 0, TTL 64, TOS copied from the inner packet. Outer IPv6: hop limit
//! 64, traffic class copied, flow label from the flow's entropy.
use crate::{Backend, FAMILY_V4, FlowKey, LbConfig};

/// L2 direct server return: MAC rewrite only.
pub const ENCAP_L2: u8 = 0;
/// IP-in-IP (IPv4 or IPv6 outer, following the backend's family).
pub const ENCAP_IPIP: u8 = 1;
/// GUE variant 1 over UDP.
pub const ENCAP_GUE: u8 = 2;
/// Full NAT (`lb_common::nat`): addresses and ports rewritten both ways, no outer header.
pub const ENCAP_NAT: u8 = 3;

/// Default GUE UDP port (Katran's).
pub const DEFAULT_GUE_PORT: u16 = 6080;
/// TTL / hop limit of outer headers.
pub const OUTER_TTL: u8 = 64;

pub const IPV4_HDR_LEN: usize = 20;
pub const IPV6_HDR_LEN: usize = 40;
pub const UDP_HDR_LEN: usize = 8;
/// IP protocol numbers of an IPIP payload.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;

/// Bytes an encapsulation adds in front of the inner IP header.
#[inline(always)]
pub const fn encap_overhead(encap: u8, outer_family: u8) -> usize {
    let ip = if outer_family == FAMILY_V4 {
        IPV4_HDR_LEN
    } else {
        IPV6_HDR_LEN
    };
    match encap {
        ENCAP_IPIP => ip,
        ENCAP_GUE => ip + UDP_HDR_LEN,
        _ => 0,
    }
}

/// 32 bits of per-flow entropy: the client address and ports, without the seed (a backend's
/// RSS only needs flows spread, and every LB node must send a flow the same way).
#[inline(always)]
pub const fn flow_entropy(key: &FlowKey) -> u32 {
    let a = key.src[0] ^ key.src[1] ^ key.src[2] ^ key.src[3];
    let p = ((key.sport as u32) << 16) | key.dport as u32;
    let h = ((a as u64) << 32 | p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> 32) as u32
}

/// Outer UDP source port of a GUE packet: in the ephemeral range 49152-65535, per flow.
/// Host byte order.
#[inline(always)]
pub const fn gue_source_port(key: &FlowKey) -> u16 {
    49152 | (flow_entropy(key) & 0x3fff) as u16
}

/// Outer IPv4 source from a /16 `prefix` (network byte order, as stored): the prefix's first
/// two bytes and two bytes of flow entropy.
#[inline(always)]
pub const fn ipip_source4(prefix: u32, key: &FlowKey) -> u32 {
    let e = flow_entropy(key).to_ne_bytes();
    let p = prefix.to_ne_bytes();
    u32::from_ne_bytes([p[0], p[1], e[0], e[1] | 1])
}

/// The outer source of `b`'s packets for flow `key`: per flow from a configured prefix for
/// IPIP (Katran's trick, so the backends' RSS spreads flows that all come from one load
/// balancer), else the backend entry's `outer_src`.
#[inline(always)]
pub const fn outer_source(cfg: &LbConfig, b: &Backend, key: &FlowKey) -> [u32; 4] {
    if b.encap != ENCAP_IPIP {
        return b.outer_src;
    }
    if b.family == FAMILY_V4 {
        if cfg.ipip_src_prefix4 != 0 {
            return [ipip_source4(cfg.ipip_src_prefix4, key), 0, 0, 0];
        }
    } else if cfg.ipip_src_prefix6[0] | cfg.ipip_src_prefix6[1] != 0 {
        let e = flow_entropy(key);
        // Words 2 and 3 are the interface id; the `| 1` keeps it from being all zero.
        return [
            cfg.ipip_src_prefix6[0],
            cfg.ipip_src_prefix6[1],
            e,
            e.rotate_left(16) | 0x0100_0000,
        ];
    }
    b.outer_src
}

/// Folds a one's-complement sum into a 16-bit Internet checksum (host order of the sum).
#[inline(always)]
pub const fn csum_fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Per-CPU next-hop cache of the XDP program (`LB_NEXTHOPS`, indexed by backend id, not
/// pinned): a FIB lookup with its neighbour costs more than the rest of an encapsulated
/// packet's path, so its answer is reused for up to a second per CPU.
pub const NEXTHOPS_MAP: &str = "LB_NEXTHOPS";
/// Seconds a cached next hop is used before the FIB is asked again.
pub const NEXTHOP_TTL_S: u32 = 1;

/// Value of [`NEXTHOPS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHopCache {
    pub ifindex: u32,
    /// Largest outer IP length the FIB accepted (packets up to it need no MTU check).
    pub ok_len: u16,
    /// The path MTU the FIB reported for longer packets (0: none reported).
    pub mtu: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The backend entry's generation the answer was for (a recycled id never reuses it).
    pub generation: u32,
    /// Coarse seconds of the lookup; 0: empty.
    pub stamp_s: u32,
}
const _: () = assert!(core::mem::size_of::<NextHopCache>() == 28);

// ---------------------------------------------------------------------------------------------
// Health checks through the tunnel.

/// A probe socket marked `HC_MARK_BASE | id` is encapsulated to backend `id` by the load
/// balancer's tc egress program, so the probe to the VIP takes the clients' path.
pub const HC_MARK_BASE: u32 = 0x4c42_0000;
pub const HC_MARK_MASK: u32 = 0xffff_0000;

counter_enum! {
    /// Counters of the health-check encapsulation program (per-CPU array `LB_HC_STATS`).
    pub enum HcStat {
        /// A marked probe packet was encapsulated and sent to its backend.
        Encapsulated = "hc_encapsulated",
        /// Marked for a backend id that is absent or not encapsulated: passed unchanged.
        NoBackend = "hc_no_backend",
        /// The packet could not be rewritten: dropped.
        Failed = "hc_failed",
        /// The FIB has no usable route to the backend: dropped. (An unresolved next hop is no
        /// failure: `bpf_redirect_neigh` resolves it.)
        NoRoute = "hc_no_route",
    }
}

/// Health-check encapsulation counters: per-CPU array indexed by [`HcStat`], value `u64`.
pub const HC_STATS_MAP: &str = "LB_HC_STATS";
/// Name of the tc egress program in the load balancer's object.
pub const HC_PROGRAM: &str = "lb_hc_encap";

// ---------------------------------------------------------------------------------------------
// The backends' decapsulation program.

/// An address the decap program matches: the host's own (outer destination) or a VIP (inner
/// destination). Network byte order; IPv4 in `[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DecapAddr {
    pub addr: [u32; 4],
    /// [`FAMILY_V4`] or [`crate::FAMILY_V6`].
    pub family: u32,
}
const _: () = assert!(core::mem::size_of::<DecapAddr>() == 20);

/// Most local (outer destination) addresses the decap program matches.
pub const DECAP_MAX_LOCAL: usize = 8;

/// Load-time constants of the decap program. The host's own addresses are here rather than in
/// a map: `lb decap` loads a fresh program on every run anyway, and a compare against
/// read-only data costs a few nanoseconds where a hash lookup costs tens.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecapConfig {
    /// GUE UDP port, network byte order.
    pub gue_port: u16,
    /// Entries of `local` in use.
    pub n_local: u16,
    /// The host's outer addresses (tunnels to others pass untouched).
    pub local: [DecapAddr; DECAP_MAX_LOCAL],
}
const _: () = assert!(core::mem::size_of::<DecapConfig>() == 4 + 20 * DECAP_MAX_LOCAL);

impl DecapConfig {
    pub const DEFAULT: DecapConfig = DecapConfig {
        gue_port: DEFAULT_GUE_PORT.to_be(),
        n_local: 0,
        local: [DecapAddr {
            addr: [0; 4],
            family: 0,
        }; DECAP_MAX_LOCAL],
    };
}
/// The VIPs this backend serves: hash [`DecapAddr`] -> `u32` (1).
pub const DECAP_VIPS_MAP: &str = "DECAP_VIPS";
/// Decap counters: per-CPU array indexed by [`DecapStat`], value [`crate::Counter`].
pub const DECAP_STATS_MAP: &str = "DECAP_STATS";
/// Load-time configuration global of the decap object.
pub const DECAP_CONFIG_GLOBAL: &str = "DECAP_CONFIG";
/// Capacity of each decap address map.
pub const DECAP_MAX_ADDRS: u32 = 1024;
/// Who may send this backend tunnels (`lb decap --trusted-source`): an LPM trie keyed by
/// [`TrustedKey`] (with the trie's prefix length in front), value `u32` (1). The load
/// balancers' addresses and `--ipip-source-prefix` ranges, and the peer backends second chance
/// forwards from; also the hops second chance may forward to.
pub const DECAP_TRUSTED_MAP: &str = "DECAP_TRUSTED";
/// Capacity of [`DECAP_TRUSTED_MAP`].
pub const DECAP_MAX_TRUSTED: u32 = 1024;

/// The data of a [`DECAP_TRUSTED_MAP`] key: the family first, so one trie holds both families
/// (the trie's prefix length counts the family's 32 bits plus the address prefix), then the
/// address as in [`DecapAddr`] (network byte order; IPv4 in `[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustedKey {
    /// [`FAMILY_V4`] or [`crate::FAMILY_V6`].
    pub family: u32,
    pub addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<TrustedKey>() == 20);

impl TrustedKey {
    /// Bits of the trie's prefix length taken by the family.
    pub const FAMILY_BITS: u32 = 32;
}

// SAFETY: `#[repr(C)]` integers, no padding.
#[cfg(feature = "user")]
unsafe impl aya::Pod for TrustedKey {}

counter_enum! {
    /// What the decap program did with a packet.
    pub enum DecapStat {
        /// IPIP or GUE to this host for a configured VIP: the outer headers were removed.
        Decapsulated = "decapsulated",
        /// Not IPIP/GUE (or not IP): passed untouched.
        PassNotEncap = "passed_not_encapsulated",
        /// Encapsulated but the outer destination is not this host: passed untouched.
        PassNotLocal = "passed_not_local",
        /// Encapsulated to this host, but the inner destination is not a configured VIP: passed
        /// untouched (the stack drops it: no tunnel device).
        PassNotVip = "passed_not_vip",
        /// Truncated or inconsistent outer or inner headers: passed untouched.
        PassMalformed = "passed_malformed",
        /// An outer IPv4 fragment: passed untouched.
        PassFragment = "passed_fragment",
        /// Second chance (the packet carried hops, see `second_chance`): a SYN, kept and decapsulated.
        KeptSyn = "kept_syn",
        /// Second chance: a socket of this host owns the flow (TCP not listening, connected UDP).
        KeptSocket = "kept_socket",
        /// Second chance: an ACK whose syncookie a listener accepts.
        KeptSyncookie = "kept_syncookie",
        /// Second chance: not ours, but no hop left (or hops we cannot read): kept.
        KeptLastHop = "kept_last_hop",
        /// Second chance: not ours; sent on to the next hop (XDP_TX, redirect, or tc redirect).
        Forwarded = "forwarded",
        /// Second chance: not ours; the next hop's neighbour is unresolved, so the rewritten
        /// packet goes to the stack, which forwards it (needs `ip_forward`).
        ForwardedByStack = "forwarded_by_stack",
        /// Second chance: not ours, but no route to the next hop: kept.
        KeptNoRoute = "kept_no_route",
        /// A multi-buffer (jumbo) frame whose outer or inner headers do not all sit in its first
        /// buffer: passed untouched (not malformed; the stack has no tunnel to take it either).
        PassSplitHeaders = "passed_split_headers",
        /// A tunnel to this host whose outer source is not in `--trusted-source` (not a load
        /// balancer nor a peer backend): dropped, neither decapsulated nor forwarded.
        UntrustedSource = "decap_untrusted_source",
        /// Second chance: the next hop is not in `--trusted-source`, so the packet is not sent
        /// there (this host is no relay to arbitrary addresses): kept, as with no hop left.
        HopUntrusted = "decap_hop_untrusted",
    }
}

// ---------------------------------------------------------------------------------------------
// `lb decap --capture`: the decap program's capture (`lb_common::capture`'s types, maps of
// its own, unpinned; the capturing `lb decap` finds them through the attached program).

/// The decap capture's settings: array of one `CaptureConfig`.
pub const DECAP_CAPTURE_CONFIG_MAP: &str = "DECAP_CAP";
/// Per-CPU work space and counters: per-CPU array of one `CaptureCpu`.
pub const DECAP_CAPTURE_CPU_MAP: &str = "DECAP_CAP_CPU";
/// The rate limit every CPU shares: array of one `CaptureRate`.
pub const DECAP_CAPTURE_RATE_MAP: &str = "DECAP_CAP_RATE";
/// The records: a ring buffer of `CaptureRecord`s.
pub const DECAP_CAPTURE_RING_MAP: &str = "DECAP_CAP_RING";
/// The flag the decap program reads on every packet, alone in the object's `.bss`.
pub const DECAP_CAPTURE_ON_GLOBAL: &str = "DECAP_CAPTURE_ON";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_known_ipv4_header() {
        // RFC 1071 style example: 45 00 00 73 00 00 40 00 40 11 [b8 61] c0 a8 00 01 c0 a8 00 c7
        let words: [u16; 10] = [
            0x4500, 0x0073, 0x0000, 0x4000, 0x4011, 0, 0xc0a8, 0x0001, 0xc0a8, 0x00c7,
        ];
        let sum: u64 = words.iter().map(|w| *w as u64).sum();
        assert_eq!(csum_fold(sum), 0xb861);
    }

    #[test]
    fn ipip_sources_come_from_the_prefix_per_flow() {
        let mut cfg = LbConfig::DEFAULT;
        let b = Backend {
            encap: ENCAP_IPIP,
            family: FAMILY_V4,
            outer_src: [u32::from_ne_bytes([10, 31, 0, 2]), 0, 0, 0],
            ..Backend::default()
        };
        let key = |sport: u16| FlowKey {
            src: [u32::from_ne_bytes([192, 0, 2, 7]), 0, 0, 0],
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            ..FlowKey::default()
        };
        // No prefix: the backend's source.
        assert_eq!(outer_source(&cfg, &b, &key(1)), b.outer_src);
        cfg.ipip_src_prefix4 = u32::from_ne_bytes([172, 31, 0, 0]);
        let mut seen = [false; 16];
        for sport in 1000..1100 {
            let s = outer_source(&cfg, &b, &key(sport))[0].to_ne_bytes();
            assert_eq!(&s[..2], &[172, 31]);
            assert_ne!(s[3], 0, "never the network address");
            seen[(s[2] & 15) as usize] = true;
        }
        assert!(seen.iter().filter(|x| **x).count() > 10);
        // GUE keeps the backend's source (its entropy is the UDP port).
        let gue = Backend {
            encap: ENCAP_GUE,
            ..b
        };
        assert_eq!(outer_source(&cfg, &gue, &key(1)), b.outer_src);
    }

    #[test]
    fn gue_ports_are_ephemeral_and_spread() {
        let mut seen = [false; 64];
        for sport in 1000..1400u16 {
            let key = FlowKey {
                src: [0x0100_000a, 0, 0, 0],
                sport: sport.to_be(),
                dport: 80u16.to_be(),
                ..FlowKey::default()
            };
            let p = gue_source_port(&key);
            assert!(p >= 49152);
            seen[(p % 64) as usize] = true;
        }
        assert!(seen.iter().filter(|s| **s).count() > 48);
    }
}
