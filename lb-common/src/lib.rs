//! Map ABI shared by the XDP program (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Everything here is `#[repr(C)]` plain data with explicit padding so both sides agree on
//! layout byte for byte; nothing in a map value is a `bool` or an enum. Map names and default
//! capacities are constants so the loader and the program can never disagree on them.
//!
//! Byte order: every address and port field holds the bytes exactly as they appear on the wire
//! (network order), stored in native integers with `from_ne_bytes`. IPv4 addresses use `[0]` of
//! a `[u32; 4]` and leave the rest zero.
//!
//! The flow hash lives here too: it is part of the contract, because the agent's `trace`
//! command and its tests must compute the very slot the kernel picks.
#![no_std]

#[macro_use]
mod counters;

mod abi;
mod cache;
mod capture;
mod encap;
mod flow;
mod guard;
mod maps;
/// How the previous ABI's pinned set becomes this one's, map by map.
pub mod migrate;
mod nat;
mod second_chance;
mod table_key;
mod top_sources;
pub use abi::*;
pub use cache::*;
pub use capture::*;
pub use encap::*;
pub use flow::*;
pub use guard::*;
pub use maps::*;
pub use nat::*;
pub use second_chance::*;
pub use table_key::*;
pub use top_sources::*;

// ---------------------------------------------------------------------------------------------
// Map names and default capacities.

/// Global counters: per-CPU array indexed by [`Stat`], value [`Counter`], plus one more
/// entry, [`STATS_CACHE_HITS`]; [`STATS_ENTRIES`] in all.
pub const STATS_MAP: &str = "LB_STATS";
/// The entry of [`STATS_MAP`] after the reasons: packets and bytes of flow-cache hits the
/// express lane forwarded, each of them a `forwarded` packet and a `flow_hit` event counted
/// once, here (one per-CPU lookup with a constant key where the two counters took two: an
/// established packet's counters are a quarter of its time). Readers add it to both
/// ([`Stat::Forwarded`]'s counter and [`FlowEvent::Hit`]'s packets); never shown alone.
pub const STATS_CACHE_HITS: u32 = Stat::COUNT;
/// Length of [`STATS_MAP`].
pub const STATS_ENTRIES: u32 = Stat::COUNT + 1;
/// Flow-table events: per-CPU array indexed by [`FlowEvent`], value `u64` (packets).
pub const FLOW_STATS_MAP: &str = "LB_FLOW_STATS";
/// VIPs: hash [`VipKey`] -> VIP id (`u32`).
pub const VIPS_MAP: &str = "LB_VIPS";
/// VIP state by id: array of [`VipInfo`], `max_vips` entries.
pub const VIP_INFO_MAP: &str = "LB_VIP_INFO";
/// Pre-filter: a bitmap (array of `u64` words) with the bit of every VIP address set, so
/// packets to other addresses pass after one inlined array read, without a hash lookup.
pub const VIP_FILTER_MAP: &str = "LB_VIP_FILTER";
/// Words in [`VIP_FILTER_MAP`] (64 bits each).
pub const VIP_FILTER_WORDS: u32 = 1024;
/// VIP index: an array of [`VipIndexEntry`] the agent fills from [`VIPS_MAP`], so the
/// program finds a VIP id with array reads and a few compares instead of a hash lookup (which
/// costs as much as the rest of a stateless packet's path). [`VIPS_MAP`] stays the authority:
/// a key the index does not hold is looked up there.
pub const VIP_INDEX_MAP: &str = "LB_VIP_INDEX";
/// Entries of [`VIP_INDEX_MAP`] (a power of two).
pub const VIP_INDEX_SLOTS: u32 = 1024;
/// Consecutive entries a key may occupy, from [`vip_index_slot`] on.
pub const VIP_INDEX_PROBES: u32 = 4;
/// Slot tables: array of [`Slot`] (backend id and previous backend ids), `2 * ring_size`
/// entries per VIP id (two generations).
pub const SLOTS_MAP: &str = "LB_SLOTS";
/// Backends: array indexed by backend id, value [`Backend`].
pub const BACKENDS_MAP: &str = "LB_BACKENDS";
/// Flow table: LRU hash [`TableKey`] (a [`FlowKey`] in 16 bytes) -> [`FlowValue`] shared by
/// all CPUs.
pub const FLOWS_MAP: &str = "LB_FLOWS";
/// Probation flow table: LRU hash [`FlowKey`] -> [`FlowValue`] for flows seen once (a
/// handshake's ACK, a first UDP datagram). A flow's next packet moves it to [`FLOWS_MAP`], so
/// a flood of spoofed first packets churns this table and never evicts established flows.
pub const FLOWS_NEW_MAP: &str = "LB_FLOWS_NEW";
/// Flow table used instead of [`FLOWS_MAP`] in [`FLOW_TABLE_PER_CPU`] mode: the same hash
/// table, with per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`).
pub const FLOWS_PERCPU_MAP: &str = "LB_FLOWS_PERCPU";
/// Per-VIP counters: per-CPU array indexed by VIP id, value [`VipCounter`].
pub const VIP_STATS_MAP: &str = "LB_VIP_STATS";
/// Per-backend counters: per-CPU array indexed by backend id, value [`Counter`].
pub const BACKEND_STATS_MAP: &str = "LB_BACKEND_STATS";
/// Egress devices for backends behind another interface: devmap-hash ifindex -> ifindex.
pub const TX_PORTS_MAP: &str = "LB_TX_PORTS";
/// The ABI record of a pinned map set: a one-entry array of [`AbiRecord`] the agent creates
/// and pins beside the program's maps (the program never reads it).
pub const ABI_MAP: &str = "LB_ABI";
/// Load-time configuration: a read-only global of type [`LbConfig`].
pub const CONFIG_GLOBAL: &str = "LB_CONFIG";

/// Default slot-table size M (prime).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Default number of VIPs (the slot-table array holds `2 * M` ids for each).
pub const DEFAULT_MAX_VIPS: u32 = 64;
/// Number of backend ids (backend id 0 is never used, so ids are non-zero).
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
/// Default flow-table capacity.
pub const DEFAULT_FLOW_ENTRIES: u32 = 1 << 20;
/// Default seconds a TCP entry lives after a FIN once the flow goes quiet.
pub const DEFAULT_FIN_GRACE_S: u32 = 4;
/// Default seconds a UDP entry lives without a datagram (per VIP).
pub const DEFAULT_UDP_IDLE_S: u32 = 30;
/// Capacity of the egress device map.
pub const MAX_TX_PORTS: u32 = 64;

// ---------------------------------------------------------------------------------------------
// Counters.

counter_enum! {
    /// Why a packet got the action it got. Used as the index into [`STATS_MAP`]; never stored
    /// in a map value. Flow-table events are counted apart, by [`FlowEvent`].
    pub enum Stat {
        /// Rewritten and sent to a backend.
        Forwarded = "forwarded",
        /// Not for a VIP (or not IP at all): passed untouched.
        PassNotVip = "passed_not_vip",
        /// IPv4 fragment: passed untouched.
        PassFragment = "passed_fragment",
        /// IPv4 header with options, to a VIP address but for no VIP (another port or
        /// protocol): passed untouched.
        PassIpOptions = "passed_ip_options",
        /// IPv6 with an extension header before L4: passed untouched.
        PassIpv6Ext = "passed_ipv6_ext",
        /// Truncated or inconsistent headers: dropped.
        DropMalformed = "dropped_malformed",
        /// For a VIP that has no usable backend: dropped.
        DropNoBackend = "dropped_no_backend",
        /// The egress device for a backend could not be used (redirect failed): dropped.
        DropTxError = "dropped_tx_error",
        /// Encapsulated, but the FIB has no neighbour entry for the next hop yet: handed to the
        /// kernel, which resolves it and sends the packet.
        PassNoNeighbour = "passed_no_neighbour",
        /// Encapsulated, but the FIB has no usable route to the backend (unreachable,
        /// blackhole, prohibit, or an unsupported route): dropped.
        DropNoRoute = "dropped_no_route",
        /// Encapsulated, but forwarding is disabled on the receiving interface (the FIB lookup
        /// refuses): dropped. Set `net.ipv4.conf.IF.forwarding=1` / `net.ipv6.conf.IF.forwarding=1`.
        DropForwardingDisabled = "dropped_forwarding_disabled",
        /// Too big for the egress MTU once encapsulated: an ICMP "fragmentation needed" or ICMPv6
        /// "packet too big" went back to the client.
        IcmpTooBig = "icmp_too_big_sent",
        /// Too big for the egress MTU once encapsulated and not answerable (IPv4 without DF, or
        /// too short to quote): dropped.
        DropTooBig = "dropped_too_big",
        /// NAT: every port a new connection tried toward its backend is in use: dropped.
        DropNatNoPort = "dropped_nat_no_port",
        /// NAT: the translation table is full: dropped.
        DropNatTableFull = "dropped_nat_table_full",
        /// NAT: an answer to a NAT source address matching no translation (the load balancer's
        /// own traffic, or an expired one): passed to the kernel.
        PassNatUnknown = "passed_nat_unknown",
        /// NAT: an ICMP error about no known NAT connection, or quoting IPv4 options: passed to
        /// the kernel (not translated).
        PassNatIcmp = "passed_nat_icmp",
        /// A multi-buffer (jumbo) frame whose headers do not all sit in its first buffer, where
        /// the program can read them: passed to the kernel, which reassembles what it needs. Not
        /// malformed: the packet is whole, only split where the driver cut it.
        PassSplitHeaders = "passed_split_headers",
        /// The source matched a deny list (the VIP's or the node's, `lb deny`): dropped.
        DropSourceDenied = "dropped_source_denied",
        /// The VIP has an allow list and the source is not on it: dropped.
        DropSourceNotAllowed = "dropped_source_not_allowed",
        /// A new flow (a SYN, a first UDP datagram) over its VIP's new-flow limit: dropped.
        DropVipRate = "dropped_vip_rate",
        /// A new flow over its source's new-flow limit at that VIP: dropped.
        DropSourceRate = "dropped_source_rate",
        /// NAT: a TCP packet other than a SYN (or an answer) for no NAT connection: dropped,
        /// never given a port (only a connection's first packet allocates). Not answered by a
        /// RST: a spoofed flood would be reflected at its forged sources.
        DropNatNoEntry = "dropped_nat_no_entry",
        /// NAT: a RST, FIN or first answer outside the window the connection last saw (or not
        /// answering its SYN): dropped, and the connection's state is unchanged.
        DropNatOutOfWindow = "dropped_nat_out_of_window",
        /// NAT: a new connection found every half-open slot it may use (its source's share)
        /// held by a handshake younger than 100 ms: dropped; the client's SYN retransmission
        /// tries again.
        DropNatHalfOpenFull = "dropped_nat_half_open_full",
        /// NAT: a new connection took the half-open slot of an older unfinished one, whose
        /// port and entries were freed (counted beside the new connection's own reason).
        NatHalfOpenReplaced = "nat_half_open_replaced",
        /// NAT: the backend answered a new connection's SYN with an ACK of an earlier
        /// connection on the same port (its handshake or TIME_WAIT): dropped, and the pair
        /// removed so the client's SYN retransmission takes another port.
        DropNatStalePort = "dropped_nat_stale_port",
    }
}

/// A packet and byte counter (per CPU in every map that holds it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Per-VIP counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct VipCounter {
    pub packets: u64,
    pub bytes: u64,
    /// Flows first remembered (a TCP connection at its handshake's ACK, a UDP flow at its
    /// first datagram); SYNs placed without being remembered are not counted. NAT VIPs:
    /// connections given a NAT port.
    pub new_flows: u64,
}
const _: () = assert!(core::mem::size_of::<VipCounter>() == 24);

// ---------------------------------------------------------------------------------------------
// Configuration.

/// Load-time constants, written into the program's read-only data before it is verified.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbConfig {
    /// Slot-table size M (prime). Every VIP owns `2 * M` entries in [`SLOTS_MAP`].
    pub ring_size: u32,
    /// [`FLOW_TABLE_SHARED`], [`FLOW_TABLE_PER_CPU`] or [`FLOW_TABLE_OFF`].
    pub flow_table: u32,
    /// Seed of [`flow_hash`]: nodes with the same seed and tables pick the same backends.
    pub hash_seed: u64,
    /// Seconds a TCP flow entry lives after a FIN once its packets stop.
    pub fin_grace_s: u32,
    /// Outer UDP destination port of GUE packets, network byte order.
    pub gue_port: u16,
    pub _pad0: u16,
    /// IPIP over IPv4: outer source taken per flow from this /16 (network byte order; the
    /// low 16 bits are per flow, for the backends' RSS). 0: the backend's `outer_src`.
    pub ipip_src_prefix4: u32,
    /// Slots of the probation table ([`FLOWS_NEW_MAP`]), a power of two.
    pub probation_slots: u32,
    /// IPIP over IPv6: outer source taken per flow from this /64 (network byte order; words
    /// 2 and 3 are per flow). All zero: the backend's `outer_src`.
    pub ipip_src_prefix6: [u32; 4],
    /// NAT source ports, host byte order, inclusive.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// Slots per CPU of the flow cache ([`FLOW_CACHE_MAP`]), a power of two; 0: no cache.
    pub flow_cache_slots: u32,
    /// NAT: slots of the half-open array ([`NAT_HALF_MAP`]), a power of two.
    pub nat_half_slots: u32,
    /// NAT: how many of them one source address may hold (at least [`NAT_HALF_PROBES`]).
    pub nat_half_share: u32,
    /// NAT: seconds a half-open pair lives without a packet.
    pub nat_half_open_s: u32,
    /// NAT: seconds an established TCP connection lives without a packet.
    pub nat_tcp_idle_s: u32,
    /// NAT: seconds a closed connection the backend keeps no TIME_WAIT for holds its port.
    pub nat_grace_s: u32,
    pub _pad1: u32,
}
const _: () = assert!(core::mem::size_of::<LbConfig>() == 80);
const _: () = assert!(core::mem::offset_of!(LbConfig, nat_port_min) == 48);
const _: () = assert!(core::mem::offset_of!(LbConfig, hash_seed) == 8);
const _: () = assert!(core::mem::offset_of!(LbConfig, gue_port) == 20);
const _: () = assert!(core::mem::offset_of!(LbConfig, ipip_src_prefix6) == 32);

/// One LRU hash with one LRU list for all CPUs (the default).
pub const FLOW_TABLE_SHARED: u32 = 0;
/// One LRU hash with an LRU list and free pool per CPU: inserts on different CPUs never
/// contend, lookups still see every CPU's flows; each CPU can hold `entries / CPUs` flows.
pub const FLOW_TABLE_PER_CPU: u32 = 1;
/// No flow table (`--flow-table off`): every packet is placed by the live slot table (a hash
/// and a slot read); nothing is remembered, nothing is evicted.
pub const FLOW_TABLE_OFF: u32 = 2;

impl LbConfig {
    pub const DEFAULT: LbConfig = LbConfig {
        ring_size: DEFAULT_RING_SIZE,
        flow_table: FLOW_TABLE_SHARED,
        hash_seed: 0x6c62_2d78_6470_5f31,
        fin_grace_s: DEFAULT_FIN_GRACE_S,
        gue_port: DEFAULT_GUE_PORT.to_be(),
        _pad0: 0,
        ipip_src_prefix4: 0,
        probation_slots: DEFAULT_FLOW_ENTRIES / 4,
        ipip_src_prefix6: [0; 4],
        nat_port_min: DEFAULT_NAT_PORT_MIN,
        nat_port_max: DEFAULT_NAT_PORT_MAX,
        flow_cache_slots: DEFAULT_FLOW_CACHE_SLOTS,
        nat_half_slots: DEFAULT_NAT_ENTRIES / 4,
        nat_half_share: DEFAULT_NAT_ENTRIES / 4 * DEFAULT_NAT_HALF_SHARE_PCT / 100,
        nat_half_open_s: DEFAULT_NAT_HALF_OPEN_S,
        nat_tcp_idle_s: DEFAULT_NAT_TCP_IDLE_S,
        nat_grace_s: DEFAULT_NAT_GRACE_S,
        _pad1: 0,
    };

    /// The NAT timeouts not kept in the entries.
    pub const fn nat_times(&self) -> NatTimes {
        NatTimes {
            half_open_s: self.nat_half_open_s,
            grace_s: self.nat_grace_s,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// VIPs, backends, flows.

/// Address family tag used in keys.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
/// IP protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Key of [`VIPS_MAP`]. `port == 0` is the per-address wildcard (all ports of that protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    /// Network byte order; IPv4 in `[0]`, the rest zero.
    pub addr: [u32; 4],
    /// Network byte order; 0 = every port.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

/// Hash only the client's address (client affinity) instead of the 5-tuple.
pub const VIP_F_SRC_HASH: u32 = 1;
/// The VIP id is in use.
pub const VIP_F_PRESENT: u32 = 2;

/// Value of [`VIP_INFO_MAP`] at the VIP's id. A table switch is one aligned 4-byte store of
/// `active_gen` after the inactive generation of the slot table has been filled, so a packet
/// sees the old table or the new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// `VIP_F_*` bits.
    pub flags: u32,
    /// Which of the VIP's two slot-table generations is live (0 or 1).
    pub active_gen: u32,
    /// Number of distinct backends in the live table; 0 means drop (no backend).
    pub backend_count: u32,
    /// Bumped each time the id is given to a new VIP; flows remember it.
    pub generation: u32,
    /// Seconds a UDP flow entry lives without a datagram.
    pub udp_idle_s: u32,
}
const _: () = assert!(core::mem::size_of::<VipInfo>() == 20);
const _: () = assert!(core::mem::offset_of!(VipInfo, active_gen) == 4);

/// Bit index of `addr` in [`VIP_FILTER_MAP`] (word = bit / 64). Every packet pays this, the
/// traffic not for a VIP nothing else, so it is one multiply: the address's words folded by
/// xor (an IPv4 address is its first word, the others are zero, so the fold costs nothing)
/// and the top bits of one 64-bit product, which depend on every bit of the folded word
/// (Fibonacci hashing). A collision only sends a packet on to the VIP lookup, which decides.
#[inline(always)]
pub const fn vip_filter_bit(addr: &[u32; 4]) -> u32 {
    const SEED: u64 = 0x7669_705f_6669_6c74;
    const BITS: u32 = (VIP_FILTER_WORDS * 64).trailing_zeros();
    let folded = pair(addr[1] ^ addr[3], addr[0] ^ addr[2]);
    (lane(folded, SEED, LANE_K[0]) >> (64 - BITS)) as u32
}
const _: () = assert!(VIP_FILTER_WORDS.is_power_of_two());

/// Value of [`VIP_INDEX_MAP`]: a bound key and its id; `key.family == 0` is an empty entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipIndexEntry {
    pub key: VipKey,
    pub id: u32,
}
const _: () = assert!(core::mem::size_of::<VipIndexEntry>() == 24);

/// First entry of [`VIP_INDEX_MAP`] `key` may occupy.
#[inline(always)]
pub const fn vip_index_slot(key: &VipKey) -> u32 {
    const SEED: u64 = 0x7669_705f_6964_7800;
    let rest = ((key.port as u64) << 16) | ((key.proto as u64) << 8) | key.family as u64;
    let h = if key.family == FAMILY_V4 {
        // One address word: it shares a lane with the port, protocol and family.
        lane(pair(key.addr[0], rest as u32), SEED, LANE_K[0])
    } else {
        lane(pair(key.addr[0], key.addr[1]), SEED, LANE_K[0])
            ^ lane(pair(key.addr[2], key.addr[3]), SEED, LANE_K[1])
            ^ lane(rest, SEED, LANE_K[2])
    };
    ((finish(h) >> 32) as u32) & (VIP_INDEX_SLOTS - 1)
}

/// Index of `slot` of generation `generation` of VIP `vip_id` in [`SLOTS_MAP`].
#[inline(always)]
pub const fn slot_index(vip_id: u32, generation: u32, ring_size: u32, slot: u32) -> u32 {
    (vip_id * 2 + (generation & 1)) * ring_size + slot
}

/// The backend entry is in use.
pub const BACKEND_F_PRESENT: u32 = 1;
/// Drained (or weight 0): out of the slot table; its flows stay, a SYN is placed again.
pub const BACKEND_F_DRAINED: u32 = 2;
/// Health-down or without a MAC: out of the slot table, and its flows move at once.
pub const BACKEND_F_DOWN: u32 = 4;

/// Value of [`BACKENDS_MAP`]: where to send a flow's packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend address, network byte order (for tracing and later encapsulation modes).
    pub addr: [u32; 4],
    /// Destination MAC: the backend's.
    pub mac: [u8; 6],
    /// Source MAC: the egress interface's own.
    pub src_mac: [u8; 6],
    /// Egress interface. Equal to the receiving interface: XDP_TX; otherwise XDP_REDIRECT
    /// through [`TX_PORTS_MAP`].
    pub ifindex: u32,
    /// Bumped by the agent each time the id is given to a new backend; flows remember it so a
    /// recycled id never inherits another backend's flows.
    pub generation: u32,
    /// `BACKEND_F_*` bits.
    pub flags: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// How packets reach it: [`ENCAP_L2`] (MAC rewrite, `mac`/`src_mac`/`ifindex` used),
    /// [`ENCAP_IPIP`] or [`ENCAP_GUE`] (outer header to `addr`, next hop by FIB lookup). Its
    /// VIP's forwarding mode: a backend id belongs to one VIP.
    pub encap: u8,
    /// [`ENCAP_NAT`]: the port the backend listens on, network byte order; 0: the packet's
    /// destination port (the VIP's). Zero in the other modes, which never change ports.
    pub port: u16,
    /// Outer source address for encapsulation, or the source NAT address for
    /// [`ENCAP_NAT`] (the load balancer's, of the backend's family), network byte order;
    /// IPv4 in `[0]`.
    pub outer_src: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<Backend>() == 60);
const _: () = assert!(core::mem::offset_of!(Backend, ifindex) == 28);
const _: () = assert!(core::mem::offset_of!(Backend, family) == 40);
const _: () = assert!(core::mem::offset_of!(Backend, encap) == 41);
const _: () = assert!(core::mem::offset_of!(Backend, port) == 42);
const _: () = assert!(core::mem::offset_of!(Backend, outer_src) == 44);

/// Key of [`FLOWS_MAP`]: the client-to-VIP 5-tuple. 8-aligned and without implicit padding,
/// so the XDP program compares and folds it as five 8-byte words ([`FlowKey::words`]).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client address, network byte order.
    pub src: [u32; 4],
    /// VIP address, network byte order.
    pub dst: [u32; 4],
    /// Client port, network byte order.
    pub sport: u16,
    /// VIP port, network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::align_of::<FlowKey>() == 8);
const _: () = assert!(core::mem::offset_of!(FlowKey, sport) == 32);
const _: () = assert!(core::mem::offset_of!(FlowKey, _pad) == 38);

impl FlowKey {
    /// The all-zero key (an empty slot's, before a parse fills it).
    pub const ZERO: FlowKey = FlowKey {
        src: [0; 4],
        dst: [0; 4],
        sport: 0,
        dport: 0,
        proto: 0,
        family: 0,
        _pad: [0; 2],
    };

    /// The key as five 8-byte words: every byte is a field (asserted above), so this is the
    /// key's plain bytes, read with five loads where the field-wise compare takes thirteen.
    #[inline(always)]
    pub const fn words(&self) -> &[u64; 5] {
        // SAFETY: `FlowKey` is 40 bytes, 8-aligned, every byte part of an integer field (no
        // implicit padding: sizes and offsets asserted above), so it is valid as [u64; 5].
        unsafe { &*(self as *const FlowKey as *const [u64; 5]) }
    }

    /// The key whose [`words`](Self::words) are `w` (written as five 8-byte stores).
    #[inline(always)]
    pub const fn from_words(w: [u64; 5]) -> FlowKey {
        // SAFETY: as in `words`: every bit pattern of the 40 bytes is a valid key.
        unsafe { core::mem::transmute::<[u64; 5], FlowKey>(w) }
    }

    /// Whether two keys are equal, compared word by word without branches.
    #[inline(always)]
    pub const fn same(&self, other: &FlowKey) -> bool {
        self.has_words(other.words())
    }

    /// Whether this key's [`words`](Self::words) are `b` (a key built in registers, as the
    /// XDP program's express lane builds an IPv4 one with [`FlowKey::v4_words`]).
    #[inline(always)]
    pub const fn has_words(&self, b: &[u64; 5]) -> bool {
        let a = self.words();
        ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4])) == 0
    }

    /// The [`words`](Self::words) of the IPv4 key of addresses `src` and `dst` (as the key
    /// holds them), ports `ports` (the four bytes of the L4 header's two port fields as one
    /// native word: client port then VIP port, as the key lays them out) and protocol
    /// `proto`, built without the key: what the XDP program's express lane compares a cache
    /// slot with, straight from the frame (`words_of_v4_keys_are_the_keys_words` checks it
    /// against the key's own). Little-endian, like the program and the hosts it runs on.
    #[inline(always)]
    pub const fn v4_words(src: u32, dst: u32, ports: u32, proto: u8) -> [u64; 5] {
        [
            src as u64,
            0,
            dst as u64,
            0,
            ports as u64 | (proto as u64) << 32 | (FAMILY_V4 as u64) << 40,
        ]
    }
}

/// Value of [`FLOWS_MAP`]. The flow is only used while both its VIP and its backend still
/// carry the generations remembered here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub backend_id: u32,
    /// [`Backend::generation`] when the flow was placed.
    pub backend_generation: u32,
    pub vip_id: u32,
    /// [`VipInfo::generation`] when the flow was placed.
    pub vip_generation: u32,
    /// Coarse monotonic seconds of the flow's last packet, written at most once a second.
    pub last_seen: u32,
    /// `FLOW_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 24);
const _: () = assert!(core::mem::offset_of!(FlowValue, last_seen) == 16);

// ---------------------------------------------------------------------------------------------
// The flow hash.

#[inline(always)]
pub(crate) const fn mix(h: u64, v: u64) -> u64 {
    let h = (h ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^ (h >> 29)
}

#[inline(always)]
pub(crate) const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[inline(always)]
const fn pair(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// One slot of the probation table ([`FLOWS_NEW_MAP`], an array): a flow seen once. Slots are
/// written without a lock by whichever CPU sees a flow's first packet, so a slot two CPUs
/// write at once can mix two flows: `check` ([`probation_check`]) over the key and the value
/// tells a whole slot from a torn one. An empty slot has `key.family == 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbationSlot {
    pub key: FlowKey,
    pub value: FlowValue,
    pub check: u64,
}
const _: () = assert!(core::mem::size_of::<ProbationSlot>() == 72);
const _: () = assert!(core::mem::offset_of!(ProbationSlot, value) == 40);
const _: () = assert!(core::mem::offset_of!(ProbationSlot, check) == 64);

/// Seed of the probation slot index (any constant: the slot only has to be the same for a
/// flow's first and second packets on every CPU).
const PROBATION_SEED: u64 = 0x7072_6f62_6174_696f;

/// The probation hash of `key`: it picks the slot ([`probation_slot`]) and seeds the check
/// word ([`probation_check`]), so a packet hashes its key once.
#[inline(always)]
pub const fn probation_hash(key: &FlowKey) -> u64 {
    flow_hash(key, PROBATION_SEED, false)
}

/// The probation slot of a key of probation hash `h` in a table of `slots` slots (a power of
/// two).
#[inline(always)]
pub const fn probation_slot(h: u64, slots: u32) -> u32 {
    (h >> 32) as u32 & slots.wrapping_sub(1)
}

/// The check word of a probation slot holding `value` for a key of probation hash `h`.
#[inline(always)]
pub const fn probation_check(h: u64, value: &FlowValue) -> u64 {
    finish(
        h ^ lane(pair(value.backend_id, value.vip_id), 0, LANE_K[1])
            ^ lane(
                pair(value.backend_generation, value.vip_generation),
                0,
                LANE_K[2],
            )
            ^ lane(pair(value.last_seen, value.flags), 0, LANE_K[3]),
    )
}

/// Odd multipliers of the hash lanes (from splitmix64, murmur3, xxh64 and wyhash).
pub(crate) const LANE_K: [u64; 5] = [
    0x9E37_79B9_7F4A_7C15,
    0xff51_afd7_ed55_8ccd,
    0xc4ce_b9fe_1a85_ec53,
    0xC2B2_AE3D_27D4_EB4F,
    0xa076_1d64_78bd_642f,
];

/// One input word of a packet hash: `(v ^ seed) * k`. Lanes do not depend on each other, so
/// the CPU multiplies them in parallel; a chain of mixes (`mix`) costs a multiply's latency
/// per word on every packet.
#[inline(always)]
pub(crate) const fn lane(v: u64, seed: u64, k: u64) -> u64 {
    (v ^ seed).wrapping_mul(k)
}

/// Folds the xor of lanes: the high half (which depends on every input bit below it) is
/// brought down and multiplied up again, twice, so the result's high bits depend on every
/// input bit (one round left consecutive IPv4 ports measurably uneven over the ring).
#[inline(always)]
pub(crate) const fn finish(h: u64) -> u64 {
    let h = (h ^ (h >> 32)).wrapping_mul(0xd6e8_feb8_6659_fd93);
    let h = (h ^ (h >> 29)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 32)
}

/// Hash of a flow: the 5-tuple, or the client address alone when `src_only`
/// ([`VIP_F_SRC_HASH`]). Its high 32 bits pick the flow's slot ([`flow::slot_of`]).
///
/// Shape: one independent multiply per 64-bit input word (two for IPv4, both addresses in
/// one; five for IPv6) and a two-multiply finish, for the latency of three multiplies. The
/// serial chain it replaced (a multiply per word, then murmur3's finaliser, then a 64-bit
/// division) was slower per VIP packet in `cargo xtask bench` (the placement row).
#[inline(always)]
pub const fn flow_hash(key: &FlowKey, seed: u64, src_only: bool) -> u64 {
    let ports = ((key.sport as u64) << 24) | ((key.dport as u64) << 8) | key.proto as u64;
    if key.family == FAMILY_V4 {
        // IPv4 addresses are one word each: both in one lane, ports and protocol in another.
        let h = if src_only {
            lane(key.src[0] as u64, seed, LANE_K[0])
        } else {
            lane(pair(key.src[0], key.dst[0]), seed, LANE_K[0]) ^ lane(ports, seed, LANE_K[4])
        };
        return finish(h);
    }
    let mut h = lane(pair(key.src[0], key.src[1]), seed, LANE_K[0])
        ^ lane(pair(key.src[2], key.src[3]), seed, LANE_K[1]);
    if !src_only {
        h ^= lane(pair(key.dst[0], key.dst[1]), seed, LANE_K[2])
            ^ lane(pair(key.dst[2], key.dst[3]), seed, LANE_K[3])
            ^ lane(ports, seed, LANE_K[4]);
    }
    finish(h)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are `#[repr(C)]` integers and byte arrays with explicit padding, no holes.
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::VipCounter {}
    unsafe impl aya::Pod for super::LbConfig {}
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::TableKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::AbiRecord {}
    unsafe impl aya::Pod for super::DecapAddr {}
    unsafe impl aya::Pod for super::VipIndexEntry {}
    unsafe impl aya::Pod for super::DecapConfig {}
    unsafe impl aya::Pod for super::Slot {}
    unsafe impl aya::Pod for super::NatEntry {}
    unsafe impl aya::Pod for super::NatHalfSlot {}
    unsafe impl aya::Pod for super::ProbationSlot {}
    unsafe impl aya::Pod for super::FlowCacheSlot {}
    unsafe impl aya::Pod for super::CaptureConfig {}
    unsafe impl aya::Pod for super::CaptureCpu {}
}
