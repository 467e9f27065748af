//! The per-CPU flow cache: a direct-mapped front of the established table ([`crate::FLOWS_MAP`]
//! or [`crate::FLOWS_PERCPU_MAP`]), so a packet of a busy flow costs an inlined array read and
//! a key compare where the LRU hash lookup hashes the key, walks a bucket and marks the entry
//! referenced (docs/benchmarks.md times both).
//!
//! The established table stays the authority; the cache only remembers, per CPU, what that
//! table decided for a flow within the current tick of the kernel's jiffies (a tick is 64
//! jiffies, under a second at any `CONFIG_HZ`: [`FLOW_CACHE_TICK_SHIFT`]):
//! - a slot serves only in the tick it was filled (see [`FlowCacheSlot`]), so every busy
//!   flow still meets the table at least once a second: its LRU position is refreshed as
//!   without the cache, its last-seen time is written at most once a second (for TCP too,
//!   which reads the clock for a fill), and UDP ages as before (a hit is less than a tick
//!   after the fill, which refreshed the entry's last-seen);
//! - a FIN entry (whose grace counts from its last packet) is never cached;
//! - every hit still checks the entry against the live VIP and backend (generations, down,
//!   present) with [`crate::entry_decides`], so a backend going down moves the flow at once;
//! - a SYN, FIN or RST never uses it and empties this CPU's slot of its flow, so the table
//!   sees every packet that can change or end an entry;
//! - what another CPU changes in the table (an RST that flow's packets took another CPU for,
//!   the agent's writes) reaches this CPU's slot within a tick.
//!
//! Jiffies rather than the coarse clock the tables use: the verifier inlines `bpf_jiffies64`
//! as one load, while `bpf_ktime_get_coarse_ns` is a helper call; a packet the cache serves
//! reads no other clock.
//!
//! Per CPU, so without locks or torn slots: an XDP program is not preempted on its CPU, and
//! each CPU reads and writes only its own region of the array ([`flow_cache_index`]).
//!
//! One plain array with a region per CPU rather than a per-CPU array: a per-CPU array's
//! lookup first loads the element's per-CPU pointer from a table of them, and its 8-aligned
//! elements straddle cache lines. The array is made `BPF_F_MMAPABLE`, for which the kernel
//! places the values page-aligned, so each 64-byte slot is exactly one cache line.
//!
//! A packet the cache cannot serve (a new flow's) pays the probe: the slot's key compare,
//! and no clock read (the tick is read only once the slot holds the flow). The probe's price
//! is the slot's line, which the default size keeps warm ([`DEFAULT_FLOW_CACHE_SLOTS`];
//! `BENCH_ONLY=cache` measures price and gain side by side, `BENCH_ONLY=newflow` the probe).
use crate::{FlowKey, FlowValue, PROTO_TCP, PROTO_UDP, PacketFacts, TCP_FIN, TCP_RST, TCP_SYN};

/// Array of [`FlowCacheSlot`], one region of [`LbConfig::flow_cache_slots`](crate::LbConfig)
/// slots per possible CPU, indexed by [`flow_cache_index`]. Never pinned: a restarted program
/// starts with an empty cache.
pub const FLOW_CACHE_MAP: &str = "LB_FLOW_CACHE";

/// Default slots per CPU (`--flow-cache-slots`): 1,024 x 64 bytes = 64 KiB a CPU, which
/// stays in a core's L2. A direct-mapped cache serves a flow's back-to-back packets (a
/// burst keeps its slot when few other flows' packets come between); a larger one serves
/// little more and makes every probe it cannot serve (a new flow's) a colder line, a cost that
/// grows with the size (`BENCH_ONLY=newflow` measures it; docs/benchmarks.md).
pub const DEFAULT_FLOW_CACHE_SLOTS: u32 = 1024;
/// The cache's clock is the kernel's jiffies in ticks of 2^6 = 64 jiffies: 0.64 s at the
/// lowest `CONFIG_HZ` (100), 0.256 s at 250, 64 ms at 1,000; under a second at any HZ, so a
/// slot never serves longer than the second-based rules allow.
pub const FLOW_CACHE_TICK_SHIFT: u32 = 6;

/// The cache tick of a jiffies count (`bpf_jiffies64`).
#[inline(always)]
pub const fn cache_tick(jiffies: u64) -> u32 {
    (jiffies >> FLOW_CACHE_TICK_SHIFT) as u32
}

/// Most slots per CPU the agent accepts.
pub const MAX_FLOW_CACHE_SLOTS: u32 = 1 << 20;

/// One slot, one cache line: a flow and the established entry the table gave it, as the
/// table left it when it decided (its last-seen refreshed to that second), except that the
/// slot's `value.last_seen` holds the [`cache_tick`] of the fill, which is what
/// [`FlowCacheSlot::filled_in`] compares (a hit checks the entry as of the fill: no idle
/// time). An empty slot has `key.family == 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCacheSlot {
    pub key: FlowKey,
    pub value: FlowValue,
}
const _: () = assert!(core::mem::size_of::<FlowCacheSlot>() == 64);
const _: () = assert!(core::mem::offset_of!(FlowCacheSlot, value) == 40);

/// Where CPU `cpu`'s slot for `key` is in the cache array of `slots` slots per CPU: its
/// region, then [`flow_cache_slot`] in it. The agent sizes the array so that this never
/// wraps for a possible CPU; an index past the end is no cache (the lookup fails).
#[inline(always)]
pub const fn flow_cache_index(cpu: u32, key: &FlowKey, slots: u32) -> u32 {
    flow_cache_index_of(cpu, key.words(), slots)
}

/// [`flow_cache_index`] of a key given as its [`FlowKey::words`] (the express lane's, built
/// from the frame with [`FlowKey::v4_words`]).
#[inline(always)]
pub const fn flow_cache_index_of(cpu: u32, words: &[u64; 5], slots: u32) -> u32 {
    cpu.wrapping_mul(slots)
        .wrapping_add(flow_cache_slot_of(words, slots))
}

/// The cache slot of `key` in a cache of `slots` slots (a power of two).
#[inline(always)]
pub const fn flow_cache_slot(key: &FlowKey, slots: u32) -> u32 {
    flow_cache_slot_of(key.words(), slots)
}

/// The cache slot of a key given as its five words. Cheaper than the flow hash (the slot is
/// only a hint: a full key compare decides, and a collision costs a table lookup): the words
/// folded to 64 bits by xor, the halves folded, then one multiply whose bits 32 and up
/// depend on every folded bit below them (multiply-shift hashing). It replaced a xor fold
/// and murmur3's 32-bit finaliser, which took 37 of an established packet's instructions
/// (the finaliser's 32-bit steps each need a mask on BPF's 64-bit registers).
#[inline(always)]
pub const fn flow_cache_slot_of(w: &[u64; 5], slots: u32) -> u32 {
    // The VIP address's words are spread by a multiply first: xor-ed as they are, a VIP's
    // last byte and a client port's high byte land on the same bits and cancel out.
    let x = w[0] ^ w[1] ^ (w[2] ^ w[3]).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ w[4];
    let x = (x ^ (x >> 32)) & 0xffff_ffff;
    ((x.wrapping_mul(0xd6e8_feb8_6659_fd93) >> 32) as u32) & slots.wrapping_sub(1)
}

impl PacketFacts {
    /// Whether the cache may decide this packet: UDP, or TCP without SYN, FIN or RST (those
    /// go to the table, which they may change).
    #[inline(always)]
    pub const fn cacheable(&self) -> bool {
        self.proto == PROTO_UDP
            || (self.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0)
    }
}

impl FlowCacheSlot {
    /// Whether this slot holds `key`'s flow (of any tick). A slot serves a packet of `key`
    /// in tick `tick` when it holds the flow and was [`filled_in`](Self::filled_in) that
    /// tick; the XDP program asks this first and reads the tick only for a slot that holds
    /// the flow, so a packet the cache cannot serve (a new flow's) pays no clock read for it.
    /// (Whether the entry still decides is [`crate::entry_decides`]'s, per hit.)
    #[inline(always)]
    pub const fn holds(&self, key: &FlowKey) -> bool {
        self.key.same(key)
    }

    /// [`holds`](Self::holds) for a key given as its [`FlowKey::words`].
    #[inline(always)]
    pub const fn holds_words(&self, words: &[u64; 5]) -> bool {
        self.key.has_words(words)
    }

    /// Whether this slot was filled in cache tick `tick` ([`cache_tick`]).
    #[inline(always)]
    pub const fn filled_in(&self, tick: u32) -> bool {
        self.value.last_seen == tick
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::TCP_ACK;

    fn key(sport: u16) -> FlowKey {
        FlowKey {
            src: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
            dst: [u32::from_ne_bytes([10, 0, 0, 100]), 0, 0, 0],
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            family: crate::FAMILY_V4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn only_plain_tcp_and_udp_packets_use_the_cache() {
        let tcp = |flags| PacketFacts {
            proto: PROTO_TCP,
            tcp_flags: flags,
            now_s: 5,
        };
        assert!(tcp(TCP_ACK).cacheable());
        assert!(tcp(TCP_ACK | 0x08).cacheable());
        for f in [
            TCP_SYN,
            TCP_SYN | TCP_ACK,
            TCP_FIN | TCP_ACK,
            TCP_RST,
            TCP_RST | TCP_ACK,
        ] {
            assert!(!tcp(f).cacheable(), "flags {f:#x}");
        }
        let udp = PacketFacts {
            proto: PROTO_UDP,
            tcp_flags: 0,
            now_s: 5,
        };
        assert!(udp.cacheable());
        let icmp = PacketFacts {
            proto: 1,
            tcp_flags: 0,
            now_s: 5,
        };
        assert!(!icmp.cacheable());
    }

    /// The cache's rule as the XDP program applies it (`select::from_cache`, the tick read
    /// between the two steps).
    fn serves(slot: &FlowCacheSlot, key: &FlowKey, tick: u32) -> bool {
        slot.holds(key) && slot.filled_in(tick)
    }

    #[test]
    fn a_tick_is_under_a_second_at_any_hz() {
        for hz in [100u64, 250, 300, 1000] {
            assert!((1u64 << FLOW_CACHE_TICK_SHIFT) < hz, "HZ {hz}");
        }
        // Jiffies of one tick share it; the next jiffy after a tick's last is the next tick.
        let t = cache_tick(64 * 1000);
        assert_eq!(cache_tick(64 * 1000 + 63), t);
        assert_eq!(cache_tick(64 * 1001), t + 1);
        // A 64-bit count past 2^38 wraps the 32-bit tick, which is only compared for equality.
        assert_eq!(cache_tick((1u64 << 38) + 64), 1);
    }

    #[test]
    fn a_slot_serves_its_flow_only_in_the_tick_it_was_filled() {
        let slot = FlowCacheSlot {
            key: key(40000),
            value: crate::FlowValue {
                last_seen: 7,
                ..Default::default()
            },
        };
        assert!(serves(&slot, &key(40000), 7));
        assert!(!serves(&slot, &key(40000), 8));
        assert!(!serves(&slot, &key(40001), 7));
        assert!(!serves(&FlowCacheSlot::default(), &key(40000), 0));
        // The program's two steps (the tick is read between them).
        assert!(slot.holds(&key(40000)) && !slot.holds(&key(40001)));
        assert!(slot.filled_in(7) && !slot.filled_in(8));
    }

    #[test]
    fn cache_slots_spread_over_ports_and_addresses() {
        let slots = 4096;
        let spread = |keys: &mut dyn Iterator<Item = FlowKey>| {
            let set: std::collections::HashSet<u32> =
                keys.map(|k| flow_cache_slot(&k, slots)).collect();
            assert!(set.iter().all(|s| *s < slots));
            set.len()
        };
        // 4,096 flows into 4,096 slots: about 63% distinct (2,590) for an even spread.
        let ports = spread(&mut (0..4096u16).map(|p| key(20000 + p)));
        assert!(ports > 2_400, "{ports} distinct slots");
        let v4 = spread(&mut (0..4096u32).map(|i| FlowKey {
            src: [
                u32::from_ne_bytes([10, 1, (i >> 8) as u8, i as u8]),
                0,
                0,
                0,
            ],
            ..key(40000)
        }));
        assert!(v4 > 2_400, "{v4} distinct slots");
        let v6 = spread(&mut (0..4096u32).map(|i| FlowKey {
            src: [0xb80d_0120, 0, i.to_be(), 1],
            ..key(40000)
        }));
        assert!(v6 > 2_400, "{v6} distinct slots");
        // Clients behind one address, many ports, towards two VIPs.
        let two = spread(&mut (0..4096u32).map(|i| FlowKey {
            dst: [u32::from_ne_bytes([10, 0, 0, 100 + (i & 1) as u8]), 0, 0, 0],
            sport: ((30000 + (i >> 1)) as u16).to_be(),
            ..key(0)
        }));
        assert!(two > 2_400, "{two} distinct slots");
    }

    #[test]
    fn words_of_v4_keys_are_the_keys_words() {
        for (src, dst, sport, dport, proto) in [
            ([10, 0, 0, 1], [10, 0, 0, 100], 40000u16, 80u16, PROTO_TCP),
            ([192, 168, 7, 254], [10, 9, 8, 7], 1, 65535, PROTO_UDP),
            ([255, 255, 255, 255], [0, 0, 0, 1], 65535, 0, PROTO_TCP),
        ] {
            let key = FlowKey {
                src: [u32::from_ne_bytes(src), 0, 0, 0],
                dst: [u32::from_ne_bytes(dst), 0, 0, 0],
                sport: sport.to_be(),
                dport: dport.to_be(),
                proto,
                family: crate::FAMILY_V4,
                _pad: [0; 2],
            };
            let (sp, dp) = (key.sport.to_ne_bytes(), key.dport.to_ne_bytes());
            let ports = u32::from_ne_bytes([sp[0], sp[1], dp[0], dp[1]]);
            let w = FlowKey::v4_words(key.src[0], key.dst[0], ports, key.proto);
            assert_eq!(&w, key.words());
            assert_eq!(FlowKey::from_words(w), key);
            assert!(key.has_words(&w));
            assert_eq!(
                flow_cache_index_of(3, &w, 1024),
                flow_cache_index(3, &key, 1024)
            );
            let other = FlowKey {
                sport: sport.wrapping_add(1).to_be(),
                ..key
            };
            assert!(!other.has_words(&w));
        }
    }

    #[test]
    fn each_cpu_has_its_own_region() {
        let k = key(40000);
        let slot = flow_cache_slot(&k, 4096);
        assert_eq!(flow_cache_index(0, &k, 4096), slot);
        assert_eq!(flow_cache_index(3, &k, 4096), 3 * 4096 + slot);
        for cpu in 0..64 {
            let i = flow_cache_index(cpu, &k, 1024);
            assert_eq!(i / 1024, cpu, "CPU {cpu}'s slot is in its region");
        }
    }
}
