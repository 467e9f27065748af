//! The NAT tables' value as ABI 13 pinned it, frozen, and its conversion to today's
//! [`NatEntry`]: what an upgrade that keeps the live NAT connections of an ABI-13 agent
//! needs (`LB_NAT_FWD` and `LB_NAT_REV` keep their names and keys; only the value changed).
//! Never edit [`NatEntryV13`]: it is the layout ABI-13 pins hold.
use crate::{
    NAT_F_ANSWERED, NAT_F_BACKEND_FIN, NAT_F_CLIENT_FIN, NAT_F_ESTABLISHED, NAT_F_REPLY, NAT_F_RST,
    NAT_HALF_NONE, NatEntry,
};

/// ABI 13's `NAT_F_FIN`: the entry's own direction saw a FIN.
pub const NAT_V13_F_FIN: u16 = 1;
/// ABI 13's `NAT_F_RST`: the entry's own direction saw a RST.
pub const NAT_V13_F_RST: u16 = 2;
/// ABI 13's `NAT_F_REPLY`: the reverse (backend-side) entry.
pub const NAT_V13_F_REPLY: u16 = 4;
/// ABI 13's `NAT_F_ANSWERED`: the backend has answered (set on the reverse entry).
pub const NAT_V13_F_ANSWERED: u16 = 8;

/// ABI 13's value of both NAT maps (76 bytes), field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntryV13 {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub backend_id: u32,
    pub backend_generation: u32,
    pub last_seen: u32,
    pub flags: u16,
    pub hop_ok_len: u16,
    pub idle_s: u32,
    pub hop_stamp: u32,
    pub hop_ifindex: u32,
    pub hop_dmac: [u8; 6],
    pub hop_smac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<NatEntryV13>() == 76);

/// Today's entry for an ABI-13 entry at `now_ns` (monotonic): addresses, ports, backend,
/// idle time, last-seen and the next-hop cache carried over. ABI 13 kept each direction's own
/// FIN/RST bits; today's flags describe the connection, so the direction decides which FIN
/// bit it becomes. An answered pair becomes established (ABI 13 had no handshake state: an
/// answered pair was one that lived 900 s); an unanswered one stays half-open. No sequence
/// state was kept, so none is known: the first packet either way sets it, and until then a
/// RST or FIN is checked as for a pair that has carried nothing (see `nat_seq_ok`). `now_ns`
/// is not needed by the conversion today (times are kept as coarse seconds of the same
/// clock); it is taken so the frame that calls every table's conversion is one shape.
pub fn from_v13(old: &NatEntryV13, now_ns: u64) -> NatEntry {
    let _ = now_ns;
    let reply = old.flags & NAT_V13_F_REPLY != 0;
    let mut flags = 0;
    if reply {
        flags |= NAT_F_REPLY;
    }
    if old.flags & NAT_V13_F_FIN != 0 {
        flags |= if reply {
            NAT_F_BACKEND_FIN
        } else {
            NAT_F_CLIENT_FIN
        };
    }
    if old.flags & NAT_V13_F_RST != 0 {
        flags |= NAT_F_RST;
    }
    if old.flags & NAT_V13_F_ANSWERED != 0 {
        flags |= NAT_F_ANSWERED | NAT_F_ESTABLISHED;
    }
    NatEntry {
        src: old.src,
        dst: old.dst,
        sport: old.sport,
        dport: old.dport,
        backend_id: old.backend_id,
        backend_generation: old.backend_generation,
        last_seen: old.last_seen,
        flags,
        hop_ok_len: old.hop_ok_len,
        idle_s: old.idle_s,
        hop_stamp: old.hop_stamp,
        hop_ifindex: old.hop_ifindex,
        hop_dmac: old.hop_dmac,
        hop_smac: old.hop_smac,
        seq_end: 0,
        ack: 0,
        half_slot: NAT_HALF_NONE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NAT_F_ACKED, NAT_F_SEEN};

    fn old(flags: u16) -> NatEntryV13 {
        NatEntryV13 {
            src: [0x0200_1f0a, 0, 0, 0],
            dst: [0x0200_290a, 0, 0, 0],
            sport: 0x8813,
            dport: 0x401f,
            backend_id: 3,
            backend_generation: 7,
            last_seen: 1234,
            flags,
            hop_ok_len: 1500,
            idle_s: 900,
            hop_stamp: 1200,
            hop_ifindex: 4,
            hop_dmac: [2, 0, 0, 0, 0, 1],
            hop_smac: [2, 0, 0, 0, 0, 2],
        }
    }

    #[test]
    fn every_field_is_carried_over() {
        let n = from_v13(&old(0), 99);
        let want = NatEntry {
            src: [0x0200_1f0a, 0, 0, 0],
            dst: [0x0200_290a, 0, 0, 0],
            sport: 0x8813,
            dport: 0x401f,
            backend_id: 3,
            backend_generation: 7,
            last_seen: 1234,
            flags: 0,
            hop_ok_len: 1500,
            idle_s: 900,
            hop_stamp: 1200,
            hop_ifindex: 4,
            hop_dmac: [2, 0, 0, 0, 0, 1],
            hop_smac: [2, 0, 0, 0, 0, 2],
            seq_end: 0,
            ack: 0,
            half_slot: NAT_HALF_NONE,
        };
        assert_eq!(n, want);
    }

    #[test]
    fn flags_become_connection_state() {
        // Forward entry with a FIN: the client's FIN; unanswered stays half-open.
        assert_eq!(from_v13(&old(NAT_V13_F_FIN), 0).flags, NAT_F_CLIENT_FIN);
        // Reverse entry, answered, FIN: the backend's FIN, established.
        assert_eq!(
            from_v13(
                &old(NAT_V13_F_REPLY | NAT_V13_F_ANSWERED | NAT_V13_F_FIN),
                0
            )
            .flags,
            NAT_F_REPLY | NAT_F_ANSWERED | NAT_F_ESTABLISHED | NAT_F_BACKEND_FIN
        );
        assert_eq!(
            from_v13(&old(NAT_V13_F_RST), 0).flags,
            NAT_F_RST,
            "a RST either way closes"
        );
        // No sequence state survives: neither direction counts as seen.
        let n = from_v13(&old(NAT_V13_F_REPLY | NAT_V13_F_ANSWERED), 0);
        assert_eq!(n.flags & (NAT_F_SEEN | NAT_F_ACKED), 0);
    }
}
