//! The incremental checksum (RFC 1624) the rewrite applies, and a full one for tests.
#[allow(unused_imports)]
use super::*;

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
