//! The established flow tables' key: a [`FlowKey`] in 16 bytes.
//!
//! The kernel's LRU hash hashes the whole key on every lookup, insert and delete (jhash, 12
//! bytes a round) and compares it whole in the bucket, on every SYN, every first ACK and every
//! packet the flow cache does not serve: a 16-byte key makes both cheaper than the 40-byte
//! [`FlowKey`] (measured in the "parsing + flow-table lookup" row of `cargo xtask bench`;
//! the kept changes in docs/experiments/). The other tables keep the
//! [`FlowKey`]: the probation table and the flow cache compare their slot's key word by word
//! without hashing it, and the NAT tables are looked up only for NAT VIPs.
use crate::{FAMILY_V4, FlowKey, LANE_K, finish, lane};

/// Key of [`crate::FLOWS_MAP`] and [`crate::FLOWS_PERCPU_MAP`], made only by
/// [`TableKey::of`] (the XDP program and the agent's `trace` alike).
///
/// - **IPv4**: exact. `addrs` holds the client address in its low half and the VIP address in
///   its high half (each as [`FlowKey`] holds it, network byte order in memory), `rest` is
///   [`FlowKey::words`]`[4]` (ports, protocol, family): every field of the 40-byte key that
///   can be non-zero for IPv4, so two IPv4 flows share a key only if they are the same flow.
/// - **IPv6**: `addrs` is a 64-bit fingerprint of the two addresses, seeded with the node's
///   hash seed (`--hash-seed`, kept with the pinned maps), `rest` as for IPv4. The family in
///   `rest` keeps it apart from every IPv4 key. Two IPv6 flows with the same ports and
///   protocol share an entry only if their address fingerprints collide (2^-64 for
///   unrelated flows; at a million entries, about one chance in 10^7 that any pair does):
///   they would then share a backend decision, and an RST of one would end the other's
///   entry, whose next packet is placed by the slot table again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TableKey {
    pub addrs: u64,
    pub rest: u64,
}
const _: () = assert!(core::mem::size_of::<TableKey>() == 16);
const _: () = assert!(core::mem::align_of::<TableKey>() == 8);
const _: () = assert!(core::mem::offset_of!(TableKey, rest) == 8);

impl TableKey {
    /// The table key of `key` on a node of hash seed `seed`.
    #[inline(always)]
    pub const fn of(key: &FlowKey, seed: u64) -> TableKey {
        let w = key.words();
        let addrs = if key.family == FAMILY_V4 {
            // The first word holds the IPv4 client address (its second half and the next
            // word are zero), the third the VIP address.
            w[0] | (w[2] << 32)
        } else {
            finish(
                lane(w[0], seed, LANE_K[0])
                    ^ lane(w[1], seed, LANE_K[1])
                    ^ lane(w[2], seed, LANE_K[2])
                    ^ lane(w[3], seed, LANE_K[3]),
            )
        };
        TableKey { addrs, rest: w[4] }
    }

    /// The IPv4 client address of an IPv4 key, as [`FlowKey::src`]`[0]` holds it; `None`
    /// for an IPv6 key (whose addresses are not in it).
    pub const fn v4_client(&self) -> Option<u32> {
        if (self.rest >> 40) as u8 == FAMILY_V4 {
            Some(self.addrs as u32)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::{FAMILY_V6, PROTO_TCP, PROTO_UDP};

    fn v4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> FlowKey {
        FlowKey {
            src: [u32::from_ne_bytes(src), 0, 0, 0],
            dst: [u32::from_ne_bytes(dst), 0, 0, 0],
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    fn v6(src_last: u32, dst_last: u32, sport: u16) -> FlowKey {
        FlowKey {
            src: [0x2001_0db8, 0, 0, src_last],
            dst: [0x2001_0db8, 0, 1, dst_last],
            sport: sport.to_be(),
            dport: 443u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V6,
            _pad: [0; 2],
        }
    }

    #[test]
    fn ipv4_keys_are_exact_and_hold_the_client() {
        let flows = [
            v4([10, 0, 0, 1], [10, 0, 0, 10], 40000, 80, PROTO_TCP),
            v4([10, 0, 0, 10], [10, 0, 0, 1], 40000, 80, PROTO_TCP),
            v4([10, 0, 0, 1], [10, 0, 0, 10], 80, 40000, PROTO_TCP),
            v4([10, 0, 0, 1], [10, 0, 0, 10], 40000, 80, PROTO_UDP),
            v4([255, 255, 255, 255], [0, 0, 0, 0], 65535, 0, PROTO_TCP),
            v4([0, 0, 0, 0], [255, 255, 255, 255], 0, 65535, PROTO_TCP),
        ];
        for (i, a) in flows.iter().enumerate() {
            let ka = TableKey::of(a, 1);
            // Exact: the seed plays no part, and the client comes back out.
            assert_eq!(ka, TableKey::of(a, 2));
            assert_eq!(ka.v4_client(), Some(a.src[0]));
            for b in &flows[i + 1..] {
                assert_ne!(ka, TableKey::of(b, 1), "{a:?} and {b:?}");
            }
        }
    }

    #[test]
    fn ipv6_keys_differ_by_address_and_from_every_ipv4_key() {
        let seed = 0x5eed;
        let mut seen = std::collections::HashSet::new();
        for i in 0..20_000u32 {
            for k in [v6(i, 1, 1000), v6(1, i, 1000)] {
                let t = TableKey::of(&k, seed);
                assert_eq!(t.v4_client(), None);
                seen.insert(t);
            }
        }
        // v6(1, 1) appears in both halves: 39,999 distinct flows, no two sharing a key.
        assert_eq!(seen.len(), 39_999);
        // The same flow has the same key; another seed gives another fingerprint.
        assert_eq!(
            TableKey::of(&v6(7, 8, 9), seed),
            TableKey::of(&v6(7, 8, 9), seed)
        );
        assert_ne!(
            TableKey::of(&v6(7, 8, 9), seed),
            TableKey::of(&v6(7, 8, 9), seed + 1)
        );
        // Ports and protocol stay exact.
        assert_ne!(
            TableKey::of(&v6(7, 8, 9), seed),
            TableKey::of(&v6(7, 8, 10), seed)
        );
    }
}
