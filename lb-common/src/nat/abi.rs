//! The NAT maps' names and layout (the pool, the refusals per address, the tail-called
//! programs), the defaults of the NAT options, the connection state bits and [`NatEntry`].
#[allow(unused_imports)]
use super::*;

/// Client-side translations: hash [`FlowKey`] (client -> VIP) -> [`NatEntry`].
pub const NAT_FWD_MAP: &str = "LB_NAT_FWD";
/// Backend-side translations: hash [`FlowKey`] (backend -> LB address) -> [`NatEntry`].
pub const NAT_REV_MAP: &str = "LB_NAT_REV";
/// This load balancer's NAT source addresses, the pool (`--nat-source`): array of
/// [`NAT_ADDRS_ENTRIES`] `[u32; 4]`, network byte order, the families interleaved (address `i`
/// of the pool is at [`nat_addr_index`]`(family, i)`; all zero: none, and the family's pool
/// ends at the first empty one). Packets to them are looked up in [`NAT_REV_MAP`].
///
/// Interleaved so that ABI 14's two entries ([`NAT_ADDR_V4`], [`NAT_ADDR_V6`]: one address
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
/// ABI 14): the backend's outer source, which is then the family's one NAT address.
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
