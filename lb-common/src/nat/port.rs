//! Port choice and the pair's keys: which port a new connection tries, and the reverse
//! entry a forward translation stands for (and back).
#[allow(unused_imports)]
use super::*;

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
