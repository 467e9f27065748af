//! Second chance (GLB/Unimog style): each slot names its backend and, during a drain window
//! after the slot changed hands, the backends before it (up to [`PREVIOUS_HOPS`]). In `gue`
//! mode the load balancer puts the previous backends in the GUE header's private data; the
//! backend's decap program keeps a packet it owns (a SYN, a packet of one of its sockets, a
//! valid syncookie ACK) and sends any other to the next hop. Connections therefore survive
//! table changes without per-flow state on the load balancer.
//!
//! # Wire format (GUE variant 0 with private data)
//!
//! ```text
//!  0                   1                   2                   3
//! +---+-+---------+---------------+-------------------------------+
//! |0 0|0|  hlen   | proto (4/41)  |          flags = 0            |  GUE base header
//! +---+-+---------+---------------+-------------------------------+
//! |  version = 1  |     next      |     count     | family (4/6)  |  private data, word 0
//! +---------------+---------------+---------------+---------------+
//! |        hop[0]: 4 (IPv4) or 16 (IPv6) bytes, network order     |  count hops
//! +---------------------------------------------------------------+
//! ```
//!
//! `hlen` counts the 32-bit words after the base header (no flag fields, so all of them are
//! private data); the inner IP header follows them. `proto` is the inner packet's protocol
//! (4 for IPv4, 41 for IPv6). `next` indexes the hop a backend that does not own the packet
//! sends it to; that backend rewrites the outer destination to `hop[next]` and increments
//! `next`, so the hops still to try are `count - next`. A backend with no hop left keeps the
//! packet. The hops share the outer header's family. The load balancer sends variant 1 (no GUE
//! header) when a slot has no previous backend, so a steady table costs nothing extra.
use crate::{FAMILY_V4, IPPROTO_IPIP, IPPROTO_IPV6};

/// Most previous backends a slot carries: one per change of owner within a window, so that
/// a connection made on an owner that lost the slot two or three changes ago is still found.
/// Three keep [`Slot`] at 16 bytes (an array map rounds values up to 8 bytes, so 12 would cost
/// the same) and the hop list within [`GUE_MAX_HOPS`].
pub const PREVIOUS_HOPS: usize = 3;

/// A slot's previous backends: ids, the most likely owner of old connections first (the
/// longest-serving), then 0s. Zeros only trail: `previous[0] == 0` means none.
pub type Previous = [u32; PREVIOUS_HOPS];

/// Value of [`crate::SLOTS_MAP`]: the slot's backend id and its previous ones (see
/// [`Previous`]; all 0: none, or the windows are over).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Slot {
    pub backend: u32,
    pub previous: Previous,
}
const _: () = assert!(core::mem::size_of::<Slot>() == 16);
const _: () = assert!(core::mem::offset_of!(Slot, previous) == 4);
const _: () = assert!(PREVIOUS_HOPS <= GUE_MAX_HOPS as usize);

impl Slot {
    /// Whether the slot carries a previous backend (is in a drain window).
    #[inline(always)]
    pub const fn in_window(&self) -> bool {
        self.previous[0] != 0
    }
}

/// Private-data format version.
pub const GUE_HOPS_VERSION: u8 = 1;
/// Bytes of the GUE base header (variant 0).
pub const GUE_BASE_LEN: usize = 4;
/// Bytes of the private data's first word.
pub const GUE_HOPS_WORD_LEN: usize = 4;
/// Most hops a packet may carry (the decap program reads up to this many).
pub const GUE_MAX_HOPS: u8 = 4;

/// Length of a hop address of `family`.
#[inline(always)]
pub const fn hop_addr_len(family: u8) -> usize {
    if family == FAMILY_V4 { 4 } else { 16 }
}

/// Bytes the GUE header with `count` hops of `family` adds after the UDP header.
#[inline(always)]
pub const fn gue_hops_len(family: u8, count: u8) -> usize {
    GUE_BASE_LEN + GUE_HOPS_WORD_LEN + count as usize * hop_addr_len(family)
}

/// The GUE base header's word for a header carrying `count` hops of `family` before an inner
/// packet of `inner_v4`'s family, as stored (bytes in wire order).
#[inline(always)]
pub const fn gue_base_word(inner_v4: bool, family: u8, count: u8) -> u32 {
    let words = (gue_hops_len(family, count) - GUE_BASE_LEN) / 4;
    let proto = if inner_v4 { IPPROTO_IPIP } else { IPPROTO_IPV6 };
    u32::from_ne_bytes([words as u8, proto, 0, 0])
}

/// The private data's first word for `count` hops of `family`, none tried yet.
#[inline(always)]
pub const fn gue_hops_word(family: u8, count: u8) -> u32 {
    u32::from_ne_bytes([GUE_HOPS_VERSION, 0, count, family])
}

/// What the decap program decided for a packet that carried hops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HopsHeader {
    /// Private data this program does not know (another version): the packet is kept.
    Unknown,
    /// `count` hops of `family`, the next to try at index `next`.
    Hops { next: u8, count: u8, family: u8 },
}

/// Reads the private data's first word.
#[inline(always)]
pub const fn parse_hops_word(w: [u8; 4]) -> HopsHeader {
    if w[0] != GUE_HOPS_VERSION || w[2] > GUE_MAX_HOPS || w[1] > w[2] {
        return HopsHeader::Unknown;
    }
    if w[3] != FAMILY_V4 && w[3] != crate::FAMILY_V6 {
        return HopsHeader::Unknown;
    }
    HopsHeader::Hops {
        next: w[1],
        count: w[2],
        family: w[3],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FAMILY_V6;

    #[test]
    fn one_hop_header_bytes() {
        let base = gue_base_word(true, FAMILY_V4, 1).to_ne_bytes();
        assert_eq!(base, [2, 4, 0, 0], "hlen 2 words: private word + IPv4 hop");
        assert_eq!(gue_hops_word(FAMILY_V4, 1).to_ne_bytes(), [1, 0, 1, 4]);
        assert_eq!(gue_hops_len(FAMILY_V4, 1), 12);
        let base6 = gue_base_word(false, FAMILY_V6, 1).to_ne_bytes();
        assert_eq!(
            base6,
            [5, 41, 0, 0],
            "hlen 5 words: private word + IPv6 hop"
        );
        assert_eq!(gue_hops_len(FAMILY_V6, 1), 24);
    }

    #[test]
    fn hop_word_is_checked() {
        assert_eq!(
            parse_hops_word([1, 0, 1, 4]),
            HopsHeader::Hops {
                next: 0,
                count: 1,
                family: 4
            }
        );
        assert_eq!(parse_hops_word([2, 0, 1, 4]), HopsHeader::Unknown);
        assert_eq!(parse_hops_word([1, 2, 1, 4]), HopsHeader::Unknown);
        assert_eq!(parse_hops_word([1, 0, 9, 4]), HopsHeader::Unknown);
        assert_eq!(parse_hops_word([1, 0, 1, 5]), HopsHeader::Unknown);
    }
}
