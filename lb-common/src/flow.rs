//! Flow-table semantics shared by the XDP program and the agent's `trace`: which events are
//! counted, what a packet tells the table, and whether a remembered entry still decides where
//! a packet goes. Pure functions on plain data, so both sides (and unit tests) agree.
use crate::{
    BACKEND_F_DOWN, BACKEND_F_DRAINED, BACKEND_F_PRESENT, Backend, FlowKey, FlowValue, PROTO_TCP,
    PROTO_UDP, VipInfo, flow_hash,
};

counter_enum! {
    /// Flow-table events, counted apart from the pass/drop reasons of [`crate::Stat`]: the index
    /// into [`crate::FLOW_STATS_MAP`].
    pub enum FlowEvent {
        /// Found in the established table and still valid.
        Hit = "flow_hit",
        /// Found in the probation table and moved to the established table (its second packet).
        Promoted = "flow_promoted",
        /// A TCP SYN placed by the slot table and not remembered: a SYN flood costs no entry.
        SynPlaced = "flow_syn_placed",
        /// A TCP packet without SYN that no table knew: a handshake's last ACK (one per real
        /// connection), or a flow that was evicted or never seen. Remembered on probation.
        MissNotSyn = "flow_miss_not_syn",
        /// A UDP datagram no table knew: a new flow (or one that aged out). Remembered on
        /// probation.
        NewUdp = "flow_new_udp",
        /// An entry was found but no longer decides: its backend is down, removed or recycled, a
        /// SYN met a drained backend or a closed connection, or it aged out. Placed again.
        Replaced = "flow_replaced",
        /// A TCP RST ended the entry.
        EndedRst = "flow_ended_rst",
    }
}

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A FIN was seen on the flow: the entry ends `fin_grace_s` after the flow's last packet, and
/// a SYN reusing the tuple is a new connection.
pub const FLOW_F_FIN: u32 = 1;

/// What one packet tells the flow table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketFacts {
    pub proto: u8,
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
    /// Coarse monotonic clock, seconds (`bpf_ktime_get_coarse_ns` / CLOCK_MONOTONIC_COARSE).
    pub now_s: u32,
}

impl PacketFacts {
    /// A connection's first packet: SYN without ACK.
    #[inline(always)]
    pub const fn is_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    #[inline(always)]
    pub const fn is_rst(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & TCP_RST != 0
    }

    #[inline(always)]
    pub const fn is_fin(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & TCP_FIN != 0
    }
}

/// Whether a remembered entry still decides where a packet of its flow goes. `backend` is the
/// entry at the remembered backend id (absent if the id is out of range).
///
/// - health-down, no MAC, removed or recycled backend, or recycled VIP: the flow moves now;
/// - drained (or weight 0): existing flows stay, but a SYN reusing the tuple is a new
///   connection and is placed again;
/// - a FIN was seen: a SYN is a new connection, and the entry ends `fin_grace_s` after the
///   flow's last packet;
/// - UDP: the entry ends `udp_idle_s` (per VIP) after the flow's last datagram.
#[inline(always)]
pub const fn entry_decides(
    flow: &FlowValue,
    vip: &VipInfo,
    backend: Option<&Backend>,
    pkt: &PacketFacts,
    fin_grace_s: u32,
) -> bool {
    let b = match live_backend(flow, vip, backend) {
        Some(b) => b,
        None => return false,
    };
    let idle = pkt.now_s.wrapping_sub(flow.last_seen);
    if pkt.is_syn() && (b.flags & BACKEND_F_DRAINED != 0 || flow.flags & FLOW_F_FIN != 0) {
        return false;
    }
    if flow.flags & FLOW_F_FIN != 0 && idle > fin_grace_s {
        return false;
    }
    if pkt.proto == PROTO_UDP && idle > vip.udp_idle_s {
        return false;
    }
    true
}

/// The entry's backend when the entry's VIP and backend are still the ones it remembers and
/// the backend may take packets: the first of [`entry_decides`]'s rules, the ones about
/// the tables rather than the packet.
#[inline(always)]
const fn live_backend<'a>(
    flow: &FlowValue,
    vip: &VipInfo,
    backend: Option<&'a Backend>,
) -> Option<&'a Backend> {
    if vip.generation != flow.vip_generation {
        return None;
    }
    let b = match backend {
        Some(b) => b,
        None => return None,
    };
    if b.flags & BACKEND_F_PRESENT == 0
        || b.generation != flow.backend_generation
        || b.flags & BACKEND_F_DOWN != 0
    {
        return None;
    }
    Some(b)
}

/// [`entry_decides`] for a flow-cache hit (`crate::cache`): a cacheable packet
/// ([`PacketFacts::cacheable`]: no SYN) and an entry as filled (never a FIN entry, and no
/// idle time: its last-seen is the packet's second). Of the rules only those about the
/// tables can apply, so only they are checked (`cache_hits_decide_as_the_table_would`).
/// Returns the backend when the entry decides.
#[inline(always)]
pub const fn cached_entry_decides<'a>(
    flow: &FlowValue,
    vip: &VipInfo,
    backend: Option<&'a Backend>,
) -> Option<&'a Backend> {
    live_backend(flow, vip, backend)
}

/// The slot of a flow in a table of `ring_size` slots: the hash's high 32 bits scaled to the
/// ring (a multiply and a shift where a modulo is a 64-bit division); `None` for a zero ring
/// size (never loaded so).
#[inline(always)]
pub const fn slot_of(key: &FlowKey, seed: u64, src_only: bool, ring_size: u32) -> Option<u32> {
    if ring_size == 0 {
        return None;
    }
    Some((((flow_hash(key, seed, src_only) >> 32) * ring_size as u64) >> 32) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (FlowValue, VipInfo, Backend) {
        let flow = FlowValue {
            backend_id: 3,
            backend_generation: 7,
            vip_id: 1,
            vip_generation: 2,
            last_seen: 100,
            flags: 0,
        };
        let vip = VipInfo {
            generation: 2,
            udp_idle_s: 30,
            ..VipInfo::default()
        };
        let b = Backend {
            generation: 7,
            flags: BACKEND_F_PRESENT,
            ..Backend::default()
        };
        (flow, vip, b)
    }

    fn tcp(flags: u8, now_s: u32) -> PacketFacts {
        PacketFacts {
            proto: PROTO_TCP,
            tcp_flags: flags,
            now_s,
        }
    }

    /// Counts per tenth of a 65,537-slot ring for `n` flows made by `flow(i)`.
    fn spread(n: u32, seed: u64, src_only: bool, flow: impl Fn(u32) -> FlowKey) -> [u32; 10] {
        let mut buckets = [0u32; 10];
        for i in 0..n {
            let slot = slot_of(&flow(i), seed, src_only, 65_537).expect("ring");
            assert!(slot < 65_537);
            buckets[(slot as u64 * 10 / 65_537) as usize] += 1;
        }
        buckets
    }

    #[test]
    fn flows_spread_evenly_over_the_ring() {
        let n = 200_000;
        let v4 = |src: u32, sport: u16| FlowKey {
            src: [src.to_be(), 0, 0, 0],
            dst: [u32::from_be_bytes([10, 0, 0, 10]).to_be(), 0, 0, 0],
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: crate::PROTO_TCP,
            family: crate::FAMILY_V4,
            ..FlowKey::default()
        };
        type Case<'a> = (&'a str, bool, &'a dyn Fn(u32) -> FlowKey);
        let cases: [Case; 4] = [
            // One client, consecutive source ports (a busy NAT gateway).
            ("ports", false, &|i| {
                v4(0xc000_0207, 1024 + (i % 60_000) as u16)
            }),
            // Consecutive client addresses, one port.
            ("addresses", false, &|i| v4(0x0a01_0000 + i, 40_000)),
            // Client address only (source hashing), consecutive addresses.
            ("source hash", true, &|i| v4(0x0a01_0000 + i, 40_000)),
            // IPv6 clients differing in the last word.
            ("ipv6", false, &|i| FlowKey {
                src: [0x2001_0db8u32.to_be(), 0, 0, i.to_be()],
                dst: [0x2001_0db8u32.to_be(), 0, 0, 10u32.to_be()],
                sport: 40_000u16.to_be(),
                dport: 80u16.to_be(),
                proto: crate::PROTO_TCP,
                family: crate::FAMILY_V6,
                ..FlowKey::default()
            }),
        ];
        for seed in [crate::LbConfig::DEFAULT.hash_seed, 0x5eed, 0] {
            for (name, src_only, flow) in cases {
                let want = n / 10;
                for (tenth, got) in spread(n, seed, src_only, flow).into_iter().enumerate() {
                    // 3 % of 20,000 is ~4.7 standard deviations of a fair split.
                    assert!(
                        got.abs_diff(want) < want * 3 / 100,
                        "{name}, seed {seed:#x}: tenth {tenth} of the ring got {got} of {n} flows"
                    );
                }
            }
        }
    }

    #[test]
    fn rules() {
        let (f, v, b) = setup();
        assert!(entry_decides(&f, &v, Some(&b), &tcp(TCP_ACK, 5000), 4));
        // A SYN retransmit to a live backend sticks.
        assert!(entry_decides(&f, &v, Some(&b), &tcp(TCP_SYN, 101), 4));
        let drained = Backend {
            flags: BACKEND_F_PRESENT | BACKEND_F_DRAINED,
            ..b
        };
        assert!(entry_decides(&f, &v, Some(&drained), &tcp(TCP_ACK, 101), 4));
        assert!(!entry_decides(
            &f,
            &v,
            Some(&drained),
            &tcp(TCP_SYN, 101),
            4
        ));
        let down = Backend {
            flags: BACKEND_F_PRESENT | BACKEND_F_DOWN,
            ..b
        };
        assert!(!entry_decides(&f, &v, Some(&down), &tcp(TCP_ACK, 101), 4));
        let recycled = Backend { generation: 8, ..b };
        assert!(!entry_decides(
            &f,
            &v,
            Some(&recycled),
            &tcp(TCP_ACK, 101),
            4
        ));
        assert!(!entry_decides(&f, &v, None, &tcp(TCP_ACK, 101), 4));
        let fin = FlowValue {
            flags: FLOW_F_FIN,
            ..f
        };
        assert!(entry_decides(&fin, &v, Some(&b), &tcp(TCP_ACK, 104), 4));
        assert!(!entry_decides(&fin, &v, Some(&b), &tcp(TCP_ACK, 105), 4));
        assert!(!entry_decides(&fin, &v, Some(&b), &tcp(TCP_SYN, 101), 4));
        let udp = |now_s| PacketFacts {
            proto: PROTO_UDP,
            tcp_flags: 0,
            now_s,
        };
        assert!(entry_decides(&f, &v, Some(&b), &udp(130), 4));
        assert!(!entry_decides(&f, &v, Some(&b), &udp(131), 4));
        // TCP does not age.
        assert!(entry_decides(&f, &v, Some(&b), &tcp(TCP_ACK, 1_000_000), 4));
    }

    /// Whatever the tables hold, a cache hit's shortened rule agrees with the full one for
    /// every packet the cache serves and every entry it holds.
    #[test]
    fn cache_hits_decide_as_the_table_would() {
        let (f, v, b) = setup();
        let flags = [0, BACKEND_F_PRESENT, BACKEND_F_DRAINED, BACKEND_F_DOWN];
        for vip_gen in [2, 3] {
            for backend_gen in [7, 8] {
                for bf in 0..16u32 {
                    let bflags = flags.iter().enumerate().fold(0, |acc, (i, f)| {
                        if bf & (1 << i) != 0 { acc | f } else { acc }
                    });
                    let vip = VipInfo {
                        generation: vip_gen,
                        udp_idle_s: 0,
                        ..v
                    };
                    let be = Backend {
                        generation: backend_gen,
                        flags: bflags,
                        ..b
                    };
                    for backend in [Some(&be), None] {
                        for (proto, tcp_flags) in [
                            (PROTO_TCP, TCP_ACK),
                            (PROTO_TCP, TCP_ACK | 0x08),
                            (PROTO_UDP, 0),
                        ] {
                            let facts = PacketFacts {
                                proto,
                                tcp_flags,
                                now_s: f.last_seen,
                            };
                            assert!(facts.cacheable());
                            assert_eq!(
                                cached_entry_decides(&f, &vip, backend).is_some(),
                                entry_decides(&f, &vip, backend, &facts, 0),
                                "vip gen {vip_gen}, backend gen {backend_gen}, flags {bflags:#x}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The VIP-address bitmap's bit: consecutive VIP addresses (how operators number them)
    /// take distinct bits, and addresses that are not VIPs hit a set bit about as often as
    /// the share of bits set, so non-VIP traffic rarely goes on to the VIP lookup.
    #[test]
    fn vip_filter_bits_spread() {
        extern crate std;
        use crate::{VIP_FILTER_WORDS, vip_filter_bit};
        let bits = VIP_FILTER_WORDS * 64;
        let mut set = std::collections::HashSet::new();
        for i in 0..256u32 {
            let v4 = [
                u32::from_ne_bytes([10, 0, (i >> 8) as u8, i as u8]),
                0,
                0,
                0,
            ];
            let v6 = [0xb80d_0120, 0, 0, (i + 1).to_be()];
            for a in [v4, v6] {
                let bit = vip_filter_bit(&a);
                assert!(bit < bits);
                set.insert(bit);
            }
        }
        // 512 addresses into 65,536 bits: about 2 collisions expected.
        assert!(set.len() >= 500, "{} distinct bits of 512", set.len());
        let hits = (0..200_000u32)
            .filter(|i| {
                let other = [
                    u32::from_ne_bytes([192, 168, (i >> 8) as u8, *i as u8]),
                    0,
                    0,
                    0,
                ];
                set.contains(&vip_filter_bit(&other))
            })
            .count();
        // Expected 200,000 x 512 / 65,536 = 1,562 for an even spread.
        assert!(
            hits < 2_500,
            "{hits} of 200,000 non-VIP addresses hit the filter"
        );
        // An unmixed bit (the address word's low bits) fails the first check: the test can fail.
        let low: std::collections::HashSet<u32> = (0..256u32)
            .map(|i| u32::from_ne_bytes([10, 0, (i >> 8) as u8, i as u8]) & (bits - 1))
            .collect();
        assert!(low.len() < 250);
    }
}
