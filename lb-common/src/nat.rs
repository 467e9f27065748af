//! Full NAT (`forward = "nat"`): the ABI of the translation tables and the pure rules both
//! the program and the agent apply (when an entry has expired, which port a flow tries, the
//! incremental checksum).
//!
//! Two hash maps hold every translated connection, one entry per direction, each keyed by the
//! packet's own 5-tuple as it arrives and holding the tuple to write instead:
//! - [`NAT_FWD_MAP`]: client -> VIP  becomes  LB address:NAT port -> backend:port;
//! - [`NAT_REV_MAP`]: backend:port -> LB address:NAT port  becomes  VIP -> client.
//!
//! A NAT port is taken by inserting the reverse entry with `BPF_NOEXIST`: its key is (backend
//! address and port, LB address, NAT port), so ports are allocated per (LB address, backend)
//! and a port in use is never handed out twice. Plain (not LRU) hashes: a full table refuses
//! new connections (counted) instead of evicting live ones. Entries expire by
//! [`nat_expired`]; the agent deletes expired pairs, and the program may take over an expired
//! port at once.
use crate::{FlowKey, PROTO_TCP};

/// Client-side translations: hash [`FlowKey`] (client -> VIP) -> [`NatEntry`].
pub const NAT_FWD_MAP: &str = "LB_NAT_FWD";
/// Backend-side translations: hash [`FlowKey`] (backend -> LB address) -> [`NatEntry`].
pub const NAT_REV_MAP: &str = "LB_NAT_REV";
/// This load balancer's NAT source addresses: array of two `[u32; 4]` (index
/// [`NAT_ADDR_V4`] and [`NAT_ADDR_V6`]; all zero: none), network byte order. Packets to them
/// are looked up in [`NAT_REV_MAP`].
pub const NAT_ADDRS_MAP: &str = "LB_NAT_ADDRS";
pub const NAT_ADDR_V4: u32 = 0;
pub const NAT_ADDR_V6: u32 = 1;
/// Programs the load balancer tail-calls: a program array; [`PROG_NAT`] holds `lb_nat`,
/// [`PROG_FULL`] holds `lb_full`, `PROG_GUARD` (`crate::guard`) holds `lb_guard`.
pub const PROGS_MAP: &str = "LB_PROGS";
pub const PROG_NAT: u32 = 0;
/// The NAT program's name in the object.
pub const NAT_PROGRAM: &str = "lb_nat";
/// Index of the full path's program (frames the express lane does not take) in [`PROGS_MAP`].
pub const PROG_FULL: u32 = 1;
/// The full path's program name in the object.
pub const FULL_PROGRAM: &str = "lb_full";
/// Default capacity of each NAT map (connections, counting closed ones still reserved).
pub const DEFAULT_NAT_ENTRIES: u32 = 65536;
/// Ports a new connection tries (from a random start) before it is refused
/// (`dropped_nat_no_port`): with a third of the range in use, all 16 are taken once in 40
/// million connections, and the client's retransmission tries 16 others.
pub const NAT_PORT_PROBES: u32 = 16;
/// Default NAT source port range: below Linux's ephemeral range (32768-60999), so the load
/// balancer's own connections never meet a NAT port.
pub const DEFAULT_NAT_PORT_MIN: u16 = 1024;
pub const DEFAULT_NAT_PORT_MAX: u16 = 32767;

/// A TCP connection that has not been answered (SYN only) is forgotten after this long.
pub const NAT_TCP_SYN_S: u32 = 30;
/// An answered TCP connection without a FIN or RST lives this long without a packet.
pub const NAT_TCP_ESTABLISHED_S: u32 = 900;
/// A closed TCP connection (RST, or FIN both ways) keeps its port this long: longer than the
/// backend's TIME_WAIT (60 s on Linux), so a new connection never lands on a port the backend
/// still remembers (a reused port with other timestamps is refused as PAWS there).
pub const NAT_TCP_CLOSED_S: u32 = 70;

/// This direction saw a FIN.
pub const NAT_F_FIN: u16 = 1;
/// This direction saw a RST.
pub const NAT_F_RST: u16 = 2;
/// The entry is the reverse one (backend side).
pub const NAT_F_REPLY: u16 = 4;
/// The reverse direction has carried a packet (the backend answered).
pub const NAT_F_ANSWERED: u16 = 8;

/// Value of both NAT maps: the tuple the packet gets instead of its own, and the state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    /// New source address, network byte order; IPv4 in `[0]`.
    pub src: [u32; 4],
    /// New destination address.
    pub dst: [u32; 4],
    /// New source and destination ports, network byte order.
    pub sport: u16,
    pub dport: u16,
    /// The backend and its generation (forward entries; the reverse one repeats them).
    pub backend_id: u32,
    pub backend_generation: u32,
    /// Coarse monotonic seconds of this direction's last packet, written at most once a
    /// second (and whenever the flags change).
    pub last_seen: u32,
    /// `NAT_F_*` bits of this direction.
    pub flags: u16,
    /// Next-hop cache of the answer direction (reverse entries; the forward direction uses
    /// the per-backend cache): the largest IP length known to fit, ...
    pub hop_ok_len: u16,
    /// Seconds an answered connection lives without a packet ([`NAT_TCP_ESTABLISHED_S`], or
    /// the VIP's UDP idle time).
    pub idle_s: u32,
    /// ... when the FIB was asked (coarse seconds; 0: never, stale after
    /// [`NEXTHOP_TTL_S`](crate::NEXTHOP_TTL_S)), the egress interface and both MACs.
    pub hop_stamp: u32,
    pub hop_ifindex: u32,
    pub hop_dmac: [u8; 6],
    pub hop_smac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<NatEntry>() == 76);
const _: () = assert!(core::mem::offset_of!(NatEntry, hop_stamp) == 56);
const _: () = assert!(core::mem::offset_of!(NatEntry, sport) == 32);
const _: () = assert!(core::mem::offset_of!(NatEntry, last_seen) == 44);

/// Whether a connection whose directions carry `fwd` and `rev` (either may be missing) is
/// over at `now_s`: closed TCP after [`NAT_TCP_CLOSED_S`], unanswered TCP after
/// [`NAT_TCP_SYN_S`], otherwise after the entry's idle time since the last packet either way.
#[inline(always)]
pub const fn nat_expired(
    proto: u8,
    fwd: Option<&NatEntry>,
    rev: Option<&NatEntry>,
    now_s: u32,
) -> bool {
    let (mut last, mut idle) = (0u32, 0u32);
    let (mut fwd_flags, mut rev_flags) = (0u16, 0u16);
    if let Some(f) = fwd {
        last = f.last_seen;
        fwd_flags = f.flags;
        idle = f.idle_s;
    }
    if let Some(r) = rev {
        if r.last_seen > last {
            last = r.last_seen;
        }
        rev_flags = r.flags;
        if r.idle_s > idle {
            idle = r.idle_s;
        }
    }
    let flags = fwd_flags | rev_flags;
    let closed =
        flags & NAT_F_RST != 0 || (fwd_flags & NAT_F_FIN != 0 && rev_flags & NAT_F_FIN != 0);
    let limit = if proto != PROTO_TCP {
        idle
    } else if closed {
        NAT_TCP_CLOSED_S
    } else if flags & NAT_F_ANSWERED == 0 {
        NAT_TCP_SYN_S
    } else {
        idle
    };
    now_s.saturating_sub(last) > limit
}

/// The `i`-th port a connection with hash `h` tries in `min..=max` (host order). Successive
/// tries step by a large odd stride so neighbouring hashes do not chase each other.
#[inline(always)]
pub const fn nat_port(h: u32, i: u32, min: u16, max: u16) -> u16 {
    let range = (max as u32).saturating_sub(min as u32) + 1;
    let off = h.wrapping_add(i.wrapping_mul(0x9e37_79b1)) % range;
    (min as u32 + off) as u16
}

/// The reverse key and entry for a forward translation `to` of `from` (client -> VIP): the
/// backend's answer (backend -> LB address) and the tuple it gets back (VIP -> client).
#[inline(always)]
pub const fn nat_reverse(from: &FlowKey, to: &NatEntry) -> (FlowKey, NatEntry) {
    let key = FlowKey {
        src: to.dst,
        dst: to.src,
        sport: to.dport,
        dport: to.sport,
        proto: from.proto,
        family: from.family,
        _pad: [0; 2],
    };
    let entry = NatEntry {
        src: from.dst,
        dst: from.src,
        sport: from.dport,
        dport: from.sport,
        flags: NAT_F_REPLY,
        // Another direction, another next hop: asked on its first packet.
        hop_ok_len: 0,
        hop_stamp: 0,
        ..*to
    };
    (key, entry)
}

/// The forward key a reverse entry stands for (what [`nat_reverse`] was given).
#[inline(always)]
pub const fn nat_forward_key(rev: &NatEntry, proto: u8, family: u8) -> FlowKey {
    FlowKey {
        src: rev.dst,
        dst: rev.src,
        sport: rev.dport,
        dport: rev.sport,
        proto,
        family,
        _pad: [0; 2],
    }
}

/// Adds the change of one 32-bit word (wire bytes in a native integer) to an RFC 1624
/// checksum delta.
#[inline(always)]
pub const fn csum_delta(acc: u64, old: u32, new: u32) -> u64 {
    let o = !old;
    acc + (o & 0xffff) as u64 + (o >> 16) as u64 + (new & 0xffff) as u64 + (new >> 16) as u64
}

/// Applies a delta to a checksum field read with `from_ne_bytes` (RFC 1624: HC' = ~(~HC +
/// ~m + m')). One's-complement sums do not depend on byte order, so the field, the words and
/// the result all stay in wire order.
#[inline(always)]
pub const fn csum_apply(csum: u16, delta: u64) -> u16 {
    let mut s = (!csum) as u64 + delta;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The full one's-complement checksum of `bytes` (for tests and fixtures: the program only
/// updates checksums).
pub fn csum_full(bytes: &[u8], seed: u32) -> u16 {
    let mut s: u64 = seed as u64;
    let mut i = 0;
    while i + 1 < bytes.len() {
        s += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u64;
        i += 2;
    }
    if i < bytes.len() {
        s += (bytes[i] as u64) << 8;
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_equals_full() {
        // An IPv4 header, checksummed, then its addresses changed both ways.
        let mut h = [
            0x45u8, 0, 0, 60, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 20, 0, 2, 10, 0, 0, 10,
        ];
        let c = csum_full(&h, 0);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let (os, od) = (word(&h[12..16]), word(&h[16..20]));
        h[12..16].copy_from_slice(&[10, 30, 0, 2]);
        h[16..20].copy_from_slice(&[10, 41, 0, 2]);
        let d = csum_delta(csum_delta(0, os, word(&h[12..16])), od, word(&h[16..20]));
        let old = u16::from_ne_bytes([h[10], h[11]]);
        let new = csum_apply(old, d);
        h[10..12].copy_from_slice(&new.to_ne_bytes());
        assert_eq!(csum_full(&h, 0), 0, "a valid header sums to zero");
    }

    #[test]
    fn expiry_follows_the_state() {
        let e = NatEntry {
            last_seen: 100,
            idle_s: 900,
            ..NatEntry::default()
        };
        let answered = NatEntry {
            flags: NAT_F_ANSWERED | NAT_F_REPLY,
            ..e
        };
        assert!(!nat_expired(PROTO_TCP, Some(&e), None, 130));
        assert!(
            nat_expired(PROTO_TCP, Some(&e), None, 131),
            "unanswered SYN"
        );
        assert!(!nat_expired(PROTO_TCP, Some(&e), Some(&answered), 1000));
        assert!(nat_expired(PROTO_TCP, Some(&e), Some(&answered), 1001));
        let rst = NatEntry {
            flags: NAT_F_RST,
            ..e
        };
        assert!(!nat_expired(PROTO_TCP, Some(&rst), Some(&answered), 170));
        assert!(nat_expired(PROTO_TCP, Some(&rst), Some(&answered), 171));
        // FIN one way is a half-close (still established); both ways, closed.
        let fin = NatEntry {
            flags: NAT_F_FIN,
            ..e
        };
        assert!(!nat_expired(PROTO_TCP, Some(&fin), Some(&answered), 171));
        let fin_back = NatEntry {
            flags: NAT_F_FIN | NAT_F_ANSWERED | NAT_F_REPLY,
            ..e
        };
        assert!(nat_expired(PROTO_TCP, Some(&fin), Some(&fin_back), 171));
        // UDP: the idle time, whatever the flags.
        let udp = NatEntry { idle_s: 30, ..e };
        assert!(!nat_expired(crate::PROTO_UDP, Some(&udp), None, 130));
        assert!(nat_expired(crate::PROTO_UDP, Some(&udp), None, 131));
    }

    #[test]
    fn ports_stay_in_range_and_differ_between_tries() {
        let mut seen = [false; 16];
        for i in 0..NAT_PORT_PROBES {
            let p = nat_port(0xdead_beef, i, 1000, 1015);
            assert!((1000..=1015).contains(&p));
            seen[(p - 1000) as usize] = true;
        }
        assert!(seen.iter().filter(|s| **s).count() >= 6);
        assert_eq!(nat_port(5, 0, 7, 7), 7);
    }
}
