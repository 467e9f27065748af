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
/// This load balancer's NAT source addresses, the pool (`--nat-source`): array of
/// [`NAT_ADDRS_ENTRIES`] `[u32; 4]`, network byte order, the families interleaved (address `i`
/// of the pool is at [`nat_addr_index`]`(family, i)`; all zero: none, and the family's pool
/// ends at the first empty one). Packets to them are looked up in [`NAT_REV_MAP`].
///
/// Interleaved so that ABI 13's two entries ([`NAT_ADDR_V4`], [`NAT_ADDR_V6`]: one address
/// per family) are the first address of each family's pool as they are: the upgrade copies
/// them into the larger map unchanged.
pub const NAT_ADDRS_MAP: &str = "LB_NAT_ADDRS";
pub const NAT_ADDR_V4: u32 = 0;
pub const NAT_ADDR_V6: u32 = 1;
/// NAT source addresses per family at most: each is compared on every packet to a VIP (the
/// reply test) and the verifier walks that test on every path of the full program, so the
/// pool stays small; 4 addresses already give 4 x the ports.
pub const NAT_POOL_MAX: u32 = 4;
/// Entry of [`NAT_ADDRS_MAP`] after both pools holding each family's pool size (`[IPv4,
/// IPv6, 0, 0]`): a new connection picks its address by it. A size read from map memory is
/// one unknown to the verifier; a size counted by the program would be a known constant on
/// each of 17 paths, each verifying what follows again. Zero (as after an upgrade from
/// ABI 13): the backend's outer source, which is then the family's one NAT address.
pub const NAT_POOL_LENS: u32 = 2 * NAT_POOL_MAX;
/// Entries of [`NAT_ADDRS_MAP`]: both families' pools and [`NAT_POOL_LENS`].
pub const NAT_ADDRS_ENTRIES: u32 = 2 * NAT_POOL_MAX + 1;

/// Index in [`NAT_ADDRS_MAP`] of address `i` (below [`NAT_POOL_MAX`]) of the pool of the
/// family at `family_index` ([`NAT_ADDR_V4`] or [`NAT_ADDR_V6`]).
#[inline(always)]
pub const fn nat_addr_index(family_index: u32, i: u32) -> u32 {
    2 * i + family_index
}
/// New connections refused per pool address and reason: per-CPU array of `u64` counts at
/// [`nat_refused_index`] (the address's [`nat_addr_index`] and a `NAT_REFUSED_*` reason).
/// Only the two refusals that happen after a connection has picked its address are here;
/// the others (half-open slots full, no pair, out of window, stale port) are node-wide
/// counters, as no address is involved yet. Counted on the refusal path only.
pub const NAT_REFUSED_MAP: &str = "LB_NAT_REFUSED";
/// Every probed port of the picked address toward the backend was taken (`dropped_nat_no_port`).
pub const NAT_REFUSED_NO_PORT: u32 = 0;
/// The NAT tables were full (`dropped_nat_table_full`).
pub const NAT_REFUSED_TABLE_FULL: u32 = 1;
/// Reasons per address in [`NAT_REFUSED_MAP`].
pub const NAT_REFUSALS: u32 = 2;
/// Entries of [`NAT_REFUSED_MAP`]: every address of both pools, each reason.
pub const NAT_REFUSED_ENTRIES: u32 = 2 * NAT_POOL_MAX * NAT_REFUSALS;

/// Index in [`NAT_REFUSED_MAP`] of refusal `reason` on the address at `addr_index` (its
/// [`nat_addr_index`]).
#[inline(always)]
pub const fn nat_refused_index(addr_index: u32, reason: u32) -> u32 {
    addr_index * NAT_REFUSALS + reason
}

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
/// Default `--nat-entries`: established NAT connections (closed ones still holding their port
/// included); the tables hold a quarter more for half-open pairs.
pub const DEFAULT_NAT_ENTRIES: u32 = 65536;
/// Ports a new connection tries (from a random start) before it is refused
/// (`dropped_nat_no_port`): with a third of the range in use, all 16 are taken once in 40
/// million connections, and the client's retransmission tries 16 others.
pub const NAT_PORT_PROBES: u32 = 16;
/// Default NAT source port range: below Linux's ephemeral range (32768-60999), so the load
/// balancer's own connections never meet a NAT port.
pub const DEFAULT_NAT_PORT_MIN: u16 = 1024;
pub const DEFAULT_NAT_PORT_MAX: u16 = 32767;

/// Default seconds a TCP connection whose handshake has not completed (SYN, SYN-ACK, no
/// client ACK yet), or a UDP flow not yet answered, lives without a packet: the SYN timeout of
/// a real stack, not the established idle time (`--nat-half-open`).
pub const DEFAULT_NAT_HALF_OPEN_S: u32 = 5;
/// Default seconds an established TCP connection without a FIN or RST lives without a packet
/// (`--nat-tcp-idle`).
pub const DEFAULT_NAT_TCP_IDLE_S: u32 = 900;
/// A TCP connection the backend closed first keeps its port this long: longer than the
/// backend's TIME_WAIT (60 s on Linux), so a new connection never lands on a port the backend
/// still remembers (a reused port with other timestamps is refused as PAWS there).
pub const NAT_TCP_CLOSED_S: u32 = 70;
/// Default seconds a TCP connection keeps its port once it is over without a TIME_WAIT at
/// the backend: the client closed first and the backend's last ACK came back, or a RST
/// either way. Long enough for a lost last ACK's FIN to be retransmitted and still
/// translated (`--nat-close-grace`).
pub const DEFAULT_NAT_GRACE_S: u32 = 2;
/// Default share of the half-open slots one client address may hold, in percent
/// (`--nat-half-open-share`).
pub const DEFAULT_NAT_HALF_SHARE_PCT: u32 = 10;

/// Connection state bits, the same in both entries of a pair (written together):
/// the client sent a FIN the pair accepted (in window).
pub const NAT_F_CLIENT_FIN: u16 = 1;
/// A RST either way the pair accepted (in window).
pub const NAT_F_RST: u16 = 2;
/// Per entry: the entry is the reverse one (backend side).
pub const NAT_F_REPLY: u16 = 4;
/// The backend has answered.
pub const NAT_F_ANSWERED: u16 = 8;
/// TCP: the client's ACK completed the handshake; UDP: the backend answered. Until then the
/// pair is half-open: it lives [`DEFAULT_NAT_HALF_OPEN_S`] and holds a half-open slot.
pub const NAT_F_ESTABLISHED: u16 = 16;
/// The backend sent a FIN the pair accepted.
pub const NAT_F_BACKEND_FIN: u16 = 32;
/// The client's FIN came before the backend's (the backend will not be in TIME_WAIT).
pub const NAT_F_CLIENT_FIRST: u16 = 64;
/// The client closed first and has acknowledged the backend's FIN: the backend's socket is
/// gone, the port can be reused after the grace.
pub const NAT_F_LAST_ACK: u16 = 128;
/// Per entry: this direction's `seq_end` is known.
pub const NAT_F_SEEN: u16 = 256;
/// Per entry: this direction's `ack` is known.
pub const NAT_F_ACKED: u16 = 512;
/// The bits both entries of a pair share.
pub const NAT_F_STATE: u16 = NAT_F_CLIENT_FIN
    | NAT_F_RST
    | NAT_F_ANSWERED
    | NAT_F_ESTABLISHED
    | NAT_F_BACKEND_FIN
    | NAT_F_CLIENT_FIRST
    | NAT_F_LAST_ACK;
/// Any close: a tuple in this state that sends a SYN is a new connection.
pub const NAT_F_CLOSING: u16 = NAT_F_CLIENT_FIN | NAT_F_BACKEND_FIN | NAT_F_RST;

/// How far (bytes) a RST, FIN or data segment may lie beyond what the pair has seen and
/// still count as in the window: one unscaled TCP window. Beyond the bytes in flight, a
/// spoofed RST must guess within 2 x 64 KiB of the 4 GiB sequence space.
pub const NAT_SEQ_SLACK: u32 = 65535;

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
    /// `NAT_F_*` bits: the connection's state ([`NAT_F_STATE`], both entries alike) and this
    /// entry's own ([`NAT_F_REPLY`], [`NAT_F_SEEN`], [`NAT_F_ACKED`]).
    pub flags: u16,
    /// Next-hop cache of the answer direction (reverse entries; the forward direction uses
    /// the per-backend cache): the largest IP length known to fit, ...
    pub hop_ok_len: u16,
    /// Seconds an established connection lives without a packet (`--nat-tcp-idle`, or the
    /// VIP's UDP idle time).
    pub idle_s: u32,
    /// ... when the FIB was asked (coarse seconds; 0: never, stale after
    /// [`NEXTHOP_TTL_S`](crate::NEXTHOP_TTL_S)), the egress interface and both MACs.
    pub hop_stamp: u32,
    pub hop_ifindex: u32,
    pub hop_dmac: [u8; 6],
    pub hop_smac: [u8; 6],
    /// TCP, this direction: the sequence number after the furthest byte (SYN and FIN count
    /// one) it has sent in window, host order ([`NAT_F_SEEN`]).
    pub seq_end: u32,
    /// TCP, this direction: the furthest acknowledgement it has sent, host order
    /// ([`NAT_F_ACKED`]).
    pub ack: u32,
    /// Forward entries of half-open pairs: the index of the half-open slot
    /// ([`NAT_HALF_MAP`]) the pair holds; [`NAT_HALF_NONE`] otherwise.
    pub half_slot: u32,
}
const _: () = assert!(core::mem::size_of::<NatEntry>() == 88);
const _: () = assert!(core::mem::offset_of!(NatEntry, hop_stamp) == 56);
const _: () = assert!(core::mem::offset_of!(NatEntry, sport) == 32);
const _: () = assert!(core::mem::offset_of!(NatEntry, last_seen) == 44);
const _: () = assert!(core::mem::offset_of!(NatEntry, seq_end) == 76);

/// Half-open pairs: array of [`NatHalfSlot`], a power of two of them (a quarter of
/// `--nat-entries`). A new connection takes a slot before it takes a port; the pair gives it
/// back when it becomes established. Each half-open pair holds a slot, so there are never more
/// half-open pairs than slots, and the NAT tables keep `--nat-entries` for established ones.
pub const NAT_HALF_MAP: &str = "LB_NAT_HALF";
/// `half_slot` of an entry that holds no slot.
pub const NAT_HALF_NONE: u32 = u32::MAX;
/// Slots a new connection tries, in its source's share of the array.
pub const NAT_HALF_PROBES: u32 = 4;
/// A half-open pair younger than this (ms) is never replaced: a handshake completes in a
/// round trip, so a flood must fill every slot a client tries within this time to refuse it
/// (`dropped_nat_half_open_full`, and the client's SYN retransmission tries again), and can
/// never break a handshake in progress. Older half-open pairs are replaced by new connections
/// (`nat_half_open_replaced`).
pub const NAT_HALF_YOUNG_MS: u32 = 100;
/// Seed of the half-open slot hashes.
const NAT_HALF_SEED: u64 = 0x6e61_745f_6861_6c66;

/// One half-open slot: the client tuple of the pair holding it and when it took it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatHalfSlot {
    pub key: FlowKey,
    /// Coarse monotonic milliseconds (wrapping) when the slot was taken; 0: free.
    pub stamp_ms: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<NatHalfSlot>() == 48);

/// The `i`-th half-open slot a new connection `key` tries: in a window of `share` slots
/// (its source address's share, [`DEFAULT_NAT_HALF_SHARE_PCT`]) that starts where its
/// source hashes, so one source never holds more than `share` of the `slots` (a power of
/// two) however many connections it opens, spoofed or not.
#[inline(always)]
pub const fn nat_half_index(key: &FlowKey, i: u32, slots: u32, share: u32) -> u32 {
    nat_half_at(nat_half_hashes(key), i, slots, share)
}

/// The two hashes [`nat_half_at`] takes: the source's, the connection's.
#[inline(always)]
pub const fn nat_half_hashes(key: &FlowKey) -> (u32, u32) {
    (
        (crate::flow_hash(key, NAT_HALF_SEED, true) >> 32) as u32,
        (crate::flow_hash(key, NAT_HALF_SEED, false) >> 32) as u32,
    )
}

/// [`nat_half_index`] from hashes made once per connection.
#[inline(always)]
pub const fn nat_half_at((base, h): (u32, u32), i: u32, slots: u32, share: u32) -> u32 {
    let w = if share == 0 { 1 } else { share };
    base.wrapping_add(h.wrapping_add(i) % w) & slots.wrapping_sub(1)
}

/// Timeouts of a pair that are not in its entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatTimes {
    /// Half-open pairs ([`DEFAULT_NAT_HALF_OPEN_S`]).
    pub half_open_s: u32,
    /// Closed pairs the backend keeps no TIME_WAIT for ([`DEFAULT_NAT_GRACE_S`]).
    pub grace_s: u32,
}

impl NatTimes {
    pub const DEFAULT: NatTimes = NatTimes {
        half_open_s: DEFAULT_NAT_HALF_OPEN_S,
        grace_s: DEFAULT_NAT_GRACE_S,
    };
}

/// Why a pair is still alive, or how it ended: what `lb stats` counts per part of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatPhase {
    /// TCP before the client's handshake ACK; UDP before the backend's answer.
    HalfOpen,
    Established,
    /// Closed and holding its port: 70 s (backend closed first) or the grace.
    Closing,
}

/// The phase of a pair whose entries carry flags `flags` (both ORed) and the seconds it may
/// stay quiet in it.
#[inline(always)]
pub const fn nat_phase(proto: u8, flags: u16, idle_s: u32, t: &NatTimes) -> (NatPhase, u32) {
    if proto != PROTO_TCP {
        return if flags & (NAT_F_ANSWERED | NAT_F_ESTABLISHED) != 0 {
            (NatPhase::Established, idle_s)
        } else {
            (NatPhase::HalfOpen, t.half_open_s)
        };
    }
    if flags & NAT_F_RST != 0 {
        return (NatPhase::Closing, t.grace_s);
    }
    if flags & NAT_F_CLIENT_FIN != 0 && flags & NAT_F_BACKEND_FIN != 0 {
        // The backend closed first (it is in TIME_WAIT), or the client's last ACK is not
        // seen (the backend may still be in LAST_ACK, retransmitting its FIN).
        let done = flags & NAT_F_CLIENT_FIRST != 0 && flags & NAT_F_LAST_ACK != 0;
        return (
            NatPhase::Closing,
            if done { t.grace_s } else { NAT_TCP_CLOSED_S },
        );
    }
    if flags & NAT_F_ESTABLISHED == 0 {
        return (NatPhase::HalfOpen, t.half_open_s);
    }
    (NatPhase::Established, idle_s)
}

/// Whether a connection whose directions carry `fwd` and `rev` (either may be missing) is
/// over at `now_s`: [`nat_phase`]'s time since the last packet either way.
#[inline(always)]
pub const fn nat_expired(
    proto: u8,
    fwd: Option<&NatEntry>,
    rev: Option<&NatEntry>,
    now_s: u32,
    t: &NatTimes,
) -> bool {
    let (mut last, mut idle, mut flags) = (0u32, 0u32, 0u16);
    if let Some(f) = fwd {
        last = f.last_seen;
        flags = f.flags;
        idle = f.idle_s;
    }
    if let Some(r) = rev {
        if r.last_seen > last {
            last = r.last_seen;
        }
        flags |= r.flags;
        if r.idle_s > idle {
            idle = r.idle_s;
        }
    }
    let (_, limit) = nat_phase(proto, flags, idle, t);
    now_s.saturating_sub(last) > limit
}

/// What the pair needs of one TCP segment (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSeg {
    pub seq: u32,
    pub ack: u32,
    /// `seq` plus the payload's length, plus one for a SYN and one for a FIN.
    pub end: u32,
    /// `TCP_*` flags.
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// Whether `x` lies in the serial-number range `lo..=hi` (RFC 1982 arithmetic).
#[inline(always)]
pub const fn seq_between(x: u32, lo: u32, hi: u32) -> bool {
    x.wrapping_sub(lo) <= hi.wrapping_sub(lo)
}

/// Whether a RST or FIN `seg` from the direction of entry `own` is in the window the pair
/// last saw (`peer`: the other direction's entry): from what the other side has acknowledged
/// of this direction, less one window, to the furthest byte this direction has sent, plus one
/// window (conntrack's check, with the bytes in flight as seen and an unscaled window for the
/// unknown). A direction that has sent nothing yet may only refuse what the other sent: a
/// RST whose ACK is exactly the other's end, or whose sequence number is exactly the other's
/// ACK.
#[inline(always)]
pub const fn nat_seq_ok(seg: &TcpSeg, own: &NatEntry, peer: &NatEntry) -> bool {
    if own.flags & NAT_F_SEEN == 0 {
        // RFC 793's reset for an unacceptable segment: with the ACK of what it refuses, or
        // (refusing a segment that carried an ACK) at that ACK.
        return if seg.flags & crate::TCP_ACK != 0 {
            peer.flags & NAT_F_SEEN != 0 && seg.ack == peer.seq_end
        } else {
            peer.flags & NAT_F_ACKED != 0 && seg.seq == peer.ack
        };
    }
    let base = if peer.flags & NAT_F_ACKED != 0 {
        peer.ack
    } else {
        own.seq_end
    };
    seq_between(
        seg.seq,
        base.wrapping_sub(NAT_SEQ_SLACK),
        own.seq_end.wrapping_add(NAT_SEQ_SLACK),
    )
}

/// Records segment `seg` in its direction's entry: the furthest byte sent and the furthest
/// acknowledgement, advanced only by a segment that starts within a window of what was seen
/// (a spoofed segment elsewhere moves nothing, so it cannot widen the RST window); the first
/// segment sets both. Writes only what moves.
#[inline(always)]
pub const fn nat_track(e: &mut NatEntry, seg: &TcpSeg) {
    if e.flags & NAT_F_SEEN == 0 {
        e.seq_end = seg.end;
        e.flags |= NAT_F_SEEN;
    } else if seq_between(
        seg.seq,
        e.seq_end.wrapping_sub(NAT_SEQ_SLACK),
        e.seq_end.wrapping_add(NAT_SEQ_SLACK),
    ) {
        if (seg.end.wrapping_sub(e.seq_end) as i32) > 0 {
            e.seq_end = seg.end;
        }
    } else {
        return;
    }
    if seg.flags & crate::TCP_ACK != 0
        && (e.flags & NAT_F_ACKED == 0 || (seg.ack.wrapping_sub(e.ack) as i32) > 0)
    {
        e.ack = seg.ack;
        e.flags |= NAT_F_ACKED;
    }
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
        // The connection's state, this direction's own sequence state (none yet).
        flags: NAT_F_REPLY | (to.flags & NAT_F_STATE),
        // Another direction, another next hop: asked on its first packet.
        hop_ok_len: 0,
        hop_stamp: 0,
        seq_end: 0,
        ack: 0,
        half_slot: NAT_HALF_NONE,
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

    const T: NatTimes = NatTimes {
        half_open_s: 5,
        grace_s: 2,
    };

    #[test]
    fn expiry_follows_the_state() {
        let e = NatEntry {
            last_seen: 100,
            idle_s: 900,
            ..NatEntry::default()
        };
        let tcp =
            |f: u16, now| nat_expired(PROTO_TCP, Some(&NatEntry { flags: f, ..e }), None, now, &T);
        // Half-open (SYN, even answered): the half-open time.
        assert!(!tcp(0, 105));
        assert!(tcp(0, 106), "unanswered SYN");
        assert!(tcp(NAT_F_ANSWERED, 106), "SYN-ACK without the client's ACK");
        let est = NAT_F_ANSWERED | NAT_F_ESTABLISHED;
        assert!(!tcp(est, 1000));
        assert!(tcp(est, 1001));
        // A RST: the grace.
        assert!(!tcp(est | NAT_F_RST, 102));
        assert!(tcp(est | NAT_F_RST, 103));
        // One FIN is a half-close (still established).
        assert!(!tcp(est | NAT_F_CLIENT_FIN | NAT_F_CLIENT_FIRST, 1000));
        assert!(!tcp(est | NAT_F_BACKEND_FIN, 1000));
        // The backend closed first: 70 s (its TIME_WAIT).
        let both = est | NAT_F_CLIENT_FIN | NAT_F_BACKEND_FIN;
        assert!(!tcp(both, 170));
        assert!(tcp(both, 171));
        // The client closed first: 70 s until the backend's FIN is acknowledged, then the grace.
        assert!(!tcp(both | NAT_F_CLIENT_FIRST, 170));
        assert!(!tcp(both | NAT_F_CLIENT_FIRST | NAT_F_LAST_ACK, 102));
        assert!(tcp(both | NAT_F_CLIENT_FIRST | NAT_F_LAST_ACK, 103));
        // The last ACK alone (backend first) changes nothing.
        assert!(!tcp(both | NAT_F_LAST_ACK, 170));
        // Flags of either entry count, and the later last-seen.
        let rev = NatEntry {
            flags: NAT_F_REPLY | est,
            last_seen: 200,
            ..e
        };
        assert!(!nat_expired(PROTO_TCP, Some(&e), Some(&rev), 1100, &T));
        assert!(nat_expired(PROTO_TCP, Some(&e), Some(&rev), 1101, &T));
        // UDP: half-open until answered, then the idle time.
        let udp = NatEntry { idle_s: 30, ..e };
        assert!(nat_expired(crate::PROTO_UDP, Some(&udp), None, 106, &T));
        let answered = NatEntry {
            flags: NAT_F_ANSWERED,
            ..udp
        };
        assert!(!nat_expired(
            crate::PROTO_UDP,
            Some(&answered),
            None,
            130,
            &T
        ));
        assert!(nat_expired(
            crate::PROTO_UDP,
            Some(&answered),
            None,
            131,
            &T
        ));
    }

    fn seg(seq: u32, ack: u32, len: u32, flags: u8) -> TcpSeg {
        let extra = u32::from(flags & (crate::TCP_SYN | crate::TCP_FIN) != 0);
        TcpSeg {
            seq,
            ack,
            end: seq.wrapping_add(len + extra),
            flags,
            _pad: [0; 3],
        }
    }

    #[test]
    fn only_in_window_rst_and_fin_count() {
        use crate::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
        let (mut c, mut b) = (NatEntry::default(), NatEntry::default());
        // Handshake: client ISN 1000, backend ISN u32::MAX - 10 (wraps).
        nat_track(&mut c, &seg(1000, 0, 0, TCP_SYN));
        assert_eq!((c.seq_end, c.flags & NAT_F_ACKED), (1001, 0));
        let isn_b = u32::MAX - 10;
        // Before the backend has sent anything, only a RST answering the SYN is accepted.
        assert!(nat_seq_ok(&seg(0, 1001, 0, TCP_RST | TCP_ACK), &b, &c));
        assert!(!nat_seq_ok(&seg(0, 1002, 0, TCP_RST | TCP_ACK), &b, &c));
        assert!(!nat_seq_ok(&seg(0, 1001, 0, TCP_RST), &b, &c));
        // A backend meeting a mid-connection segment (a re-placed connection) resets it at
        // the segment's ACK.
        let mut moved = c;
        nat_track(&mut moved, &seg(1001, 5555, 10, TCP_ACK));
        assert!(nat_seq_ok(&seg(5555, 0, 0, TCP_RST), &b, &moved));
        assert!(!nat_seq_ok(&seg(5556, 0, 0, TCP_RST), &b, &moved));
        nat_track(&mut b, &seg(isn_b, 1001, 0, TCP_SYN | TCP_ACK));
        assert_eq!((b.seq_end, b.ack), (isn_b.wrapping_add(1), 1001));
        nat_track(&mut c, &seg(1001, isn_b.wrapping_add(1), 100, TCP_ACK));
        nat_track(&mut b, &seg(isn_b.wrapping_add(1), 1101, 5000, TCP_ACK));
        assert_eq!(b.seq_end, isn_b.wrapping_add(5001), "wrapped past zero");
        // The backend's RST: at its next byte, or within a window either side.
        let next_b = b.seq_end;
        for s in [
            next_b,
            next_b + NAT_SEQ_SLACK,
            next_b.wrapping_sub(5000 + NAT_SEQ_SLACK),
        ] {
            assert!(nat_seq_ok(&seg(s, 0, 0, TCP_RST), &b, &c), "{s}");
        }
        // The client has acknowledged nothing of the backend's 5000 bytes: they are in flight.
        for s in [
            next_b + NAT_SEQ_SLACK + 1,
            next_b.wrapping_sub(5001 + NAT_SEQ_SLACK),
            next_b ^ 0x8000_0000,
        ] {
            assert!(!nat_seq_ok(&seg(s, 0, 0, TCP_RST), &b, &c), "{s}");
        }
        // Once the client acknowledges them, the window's low end moves up.
        nat_track(&mut c, &seg(1101, next_b, 0, TCP_ACK));
        assert!(!nat_seq_ok(
            &seg(next_b.wrapping_sub(5000 + NAT_SEQ_SLACK), 0, 0, TCP_RST),
            &b,
            &c
        ));
        assert!(nat_seq_ok(
            &seg(next_b.wrapping_sub(NAT_SEQ_SLACK), 0, 0, TCP_FIN),
            &b,
            &c
        ));
        // The client's FIN the same way.
        assert!(nat_seq_ok(&seg(1101, next_b, 0, TCP_FIN | TCP_ACK), &c, &b));
        assert!(!nat_seq_ok(
            &seg(900_000, next_b, 0, TCP_FIN | TCP_ACK),
            &c,
            &b
        ));
    }

    #[test]
    fn spoofed_segments_move_nothing() {
        use crate::TCP_ACK;
        let mut c = NatEntry::default();
        nat_track(&mut c, &seg(1000, 0, 0, crate::TCP_SYN));
        let before = c;
        // Far from the window: neither the end nor the acknowledgement moves.
        nat_track(&mut c, &seg(1000 + 10 * NAT_SEQ_SLACK, 77, 10, TCP_ACK));
        assert_eq!(c, before);
        // In the window: both move; an older segment moves neither back.
        nat_track(&mut c, &seg(1001, 77, 10, TCP_ACK));
        assert_eq!((c.seq_end, c.ack), (1011, 77));
        nat_track(&mut c, &seg(1001, 50, 5, TCP_ACK));
        assert_eq!((c.seq_end, c.ack), (1011, 77));
    }

    #[test]
    fn half_open_slots_stay_in_the_source_share() {
        let mut key = FlowKey {
            src: [0x0100_000a, 0, 0, 0],
            dst: [0x0a00_000a, 0, 0, 0],
            sport: 0,
            dport: 80,
            proto: PROTO_TCP,
            family: crate::FAMILY_V4,
            _pad: [0; 2],
        };
        let (slots, share) = (1024u32, 16u32);
        let mut seen = [false; 1024];
        for port in 0..2000u16 {
            key.sport = port;
            for i in 0..NAT_HALF_PROBES {
                seen[nat_half_index(&key, i, slots, share) as usize] = true;
            }
        }
        let used = seen.iter().filter(|s| **s).count();
        assert_eq!(
            used, share as usize,
            "one source, 2000 connections: its share only"
        );
        // Another source lands elsewhere (with these two addresses: checked, not assumed).
        key.src[0] = 0x0200_000a;
        let other = nat_half_index(&key, 0, slots, share) as usize;
        assert!(!seen[other] || used < slots as usize);
        // Successive probes of one connection differ.
        let a = nat_half_index(&key, 0, slots, share);
        let b = nat_half_index(&key, 1, slots, share);
        assert_ne!(a, b);
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
