//! Who is who: this host's own addresses (tunnels to others pass untouched) and the trusted
//! senders (`lb decap --trusted-source`: the load balancers and the peer backends). A tunnel
//! from anyone else is dropped, and second chance forwards only to trusted hops: otherwise
//! any host reaching a backend could have it deliver inner packets with any source address
//! (past the network's source checks), or use it as a relay.
use aya_ebpf::{
    macros::map,
    maps::{LpmTrie, lpm_trie::Key},
};
use lb_common::{DECAP_MAX_LOCAL, DECAP_MAX_TRUSTED, DecapAddr, TrustedKey};

use crate::maps::DECAP_CONFIG;

/// The trusted prefixes of both families (the family is the key's first word).
#[map(name = "DECAP_TRUSTED")]
static DECAP_TRUSTED: LpmTrie<TrustedKey, u32> = LpmTrie::with_max_entries(DECAP_MAX_TRUSTED, 0);

/// Whether address `addr` of `family` (IPv4: word 0, the rest 0) lies in a trusted prefix.
#[inline(always)]
pub fn trusted(addr: &[u32; 4], family: u32) -> bool {
    let key = Key::new(
        TrustedKey::FAMILY_BITS + 128,
        TrustedKey {
            family,
            addr: *addr,
        },
    );
    DECAP_TRUSTED.get(&key).is_some()
}

/// Whether `a` (a tunnel's outer destination) is one of this host's addresses.
#[inline(always)]
pub fn is_local(a: &DecapAddr) -> bool {
    in_local_config(&a.addr, a.family)
}

/// [`is_local`] for a hop's address on the forwarding path. Not inlined: a BPF-to-BPF call (a
/// few instructions) where inlined copies made the program much longer and its hot paths
/// slower (the decap address check's note in docs/experiments/).
#[inline(never)]
pub fn is_local_addr(addr: &[u32; 4], family: u32) -> bool {
    in_local_config(addr, family)
}

/// Whether address `addr` of `family` (IPv4: word 0, the rest 0) is in the read-only
/// configuration's local addresses, read field by field in place (a copy of the configuration
/// would take 164 bytes of a stack the tc program has not got to spare).
#[inline(always)]
fn in_local_config(addr: &[u32; 4], family: u32) -> bool {
    // SAFETY: plain reads of an initialised global (volatile: the values written at load
    // time, not the compile-time defaults).
    let n = unsafe { core::ptr::read_volatile(&DECAP_CONFIG.n_local) } as usize;
    let mut i = 0;
    while i < DECAP_MAX_LOCAL {
        if i < n {
            let l = &DECAP_CONFIG.local[i];
            // SAFETY: as above.
            let (f, a) = unsafe {
                (
                    core::ptr::read_volatile(&l.family),
                    core::ptr::read_volatile(&l.addr),
                )
            };
            if f == family && a == *addr {
                return true;
            }
        }
        i += 1;
    }
    false
}
