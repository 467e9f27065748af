//! Half-open pairs' slots: how many a new connection tries and where, so one source never
//! holds more than its share.
#[allow(unused_imports)]
use super::*;

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
