//! The pool of NAT addresses (`LB_NAT_ADDRS`): whether a packet is for one of them, and how
//! many a family holds. Its own module because every VIP packet asks it (`path.rs`), not only
//! NAT's.
use lb_common::{FAMILY_V4, NAT_ADDR_V4, NAT_ADDR_V6, NAT_POOL_LENS, NAT_POOL_MAX, nat_addr_index};

use crate::{maps::LB_NAT_ADDRS, parse::Parsed};

/// The index of the packet's family in the pool's layout (`lb_common::nat_addr_index`).
#[inline(always)]
pub(super) fn family_index(family: u8) -> u32 {
    if family == FAMILY_V4 {
        NAT_ADDR_V4
    } else {
        NAT_ADDR_V6
    }
}

/// Whether the packet's destination (of its family) is one of this load balancer's NAT
/// addresses (the pool).
#[inline(always)]
pub fn is_nat_addr(pkt: &Parsed) -> bool {
    let f = family_index(pkt.key.family);
    // The first entry decides for every VIP packet of a node without NAT addresses (it is
    // empty, and a family's pool ends at its first empty entry); with a pool, a VIP packet
    // (never a NAT address) reads on to the first empty entry.
    let Some(a) = LB_NAT_ADDRS.get(nat_addr_index(f, 0)) else {
        return false;
    };
    if a[0] | a[1] | a[2] | a[3] == 0 {
        return false;
    }
    if same_addr(a, &pkt.key.dst) {
        return true;
    }
    pool_rest_has(f, &pkt.key.dst)
}

/// `a` is `d` and not empty. Compared word by word: as one array compare, LLVM loaded and
/// compared all four words on every VIP packet, where only the first word's test is needed.
#[inline(always)]
fn same_addr(a: &[u32; 4], d: &[u32; 4]) -> bool {
    a[0] == d[0] && a[1] == d[1] && a[2] == d[2] && a[3] == d[3] && a[0] | a[1] | a[2] | a[3] != 0
}

/// Whether `d` is one of the pool's addresses after the first (a family's pool ends at its
/// first empty entry).
#[inline(always)]
fn pool_rest_has(f: u32, d: &[u32; 4]) -> bool {
    let mut i = 1;
    while i < NAT_POOL_MAX {
        match LB_NAT_ADDRS.get(nat_addr_index(f, i)) {
            Some(a) if a[0] | a[1] | a[2] | a[3] != 0 => {
                if same_addr(a, d) {
                    return true;
                }
            }
            _ => return false,
        }
        i += 1;
    }
    false
}

/// How many NAT addresses the pool of family index `f` holds (`lb_common::NAT_POOL_LENS`).
#[inline(always)]
pub(super) fn pool_len(f: u32) -> u32 {
    LB_NAT_ADDRS
        .get(NAT_POOL_LENS)
        .map_or(0, |l| if f == NAT_ADDR_V4 { l[0] } else { l[1] })
        .min(NAT_POOL_MAX)
}
