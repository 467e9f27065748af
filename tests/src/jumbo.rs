//! Frames of a given total length, with a payload pattern that shows any byte out of place:
//! what the jumbo tests (`fixtures` and `dataplane`) send.
use etherparse::PacketBuilderStep;

use crate::frames::{v4, v6};

/// Frame lengths (Ethernet header included) every case is run at: up to a 9000-byte MTU's
/// largest frame, across the ~3.5k first-buffer boundary drivers and generic XDP use.
pub const SIZES: [usize; 6] = [1514, 3000, 3600, 4000, 8000, 9014];

/// `n` bytes of a pattern that differs from one 251-byte stretch to the next.
pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ seed).collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tcp4,
    Udp4,
    Tcp6,
    Udp6,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Tcp4, Kind::Udp4, Kind::Tcp6, Kind::Udp6];

    /// Ethernet + IP + L4 header bytes.
    pub fn headers(self) -> usize {
        match self {
            Kind::Tcp4 => 14 + 20 + 20,
            Kind::Udp4 => 14 + 20 + 8,
            Kind::Tcp6 => 14 + 40 + 20,
            Kind::Udp6 => 14 + 40 + 8,
        }
    }

    pub fn v4(self) -> bool {
        matches!(self, Kind::Tcp4 | Kind::Udp4)
    }

    pub fn tcp(self) -> bool {
        matches!(self, Kind::Tcp4 | Kind::Tcp6)
    }
}

/// A `len`-byte frame of `kind` from `src:sport` to `dst:dport` (addresses of the kind's
/// family), built by `eth`, checksums included.
pub fn frame(
    eth: PacketBuilderStep<etherparse::Ethernet2Header>,
    kind: Kind,
    (src, sport): (&str, u16),
    (dst, dport): (&str, u16),
    len: usize,
) -> Vec<u8> {
    let payload = pattern(len - kind.headers(), sport as u8);
    let mut out = Vec::with_capacity(len);
    let built = match kind {
        Kind::Tcp4 => eth
            .ipv4(v4(src), v4(dst), 64)
            .tcp(sport, dport, 1000, 64000)
            .ack(1)
            .write(&mut out, &payload),
        Kind::Udp4 => eth
            .ipv4(v4(src), v4(dst), 64)
            .udp(sport, dport)
            .write(&mut out, &payload),
        Kind::Tcp6 => eth
            .ipv6(v6(src), v6(dst), 64)
            .tcp(sport, dport, 1000, 64000)
            .ack(1)
            .write(&mut out, &payload),
        Kind::Udp6 => eth
            .ipv6(v6(src), v6(dst), 64)
            .udp(sport, dport)
            .write(&mut out, &payload),
    };
    built.expect("frame builds");
    assert_eq!(out.len(), len);
    // IPv4 frames leave with DF set, as a TCP stack sends them (a "too big" is answered
    // only for DF packets).
    if kind.v4() {
        edit_ipv4_header(&mut out[14..], |h| h.dont_fragment = true);
    }
    out
}

/// Changes the IPv4 header at the start of `ip` with `edit`, its checksum computed anew.
pub fn edit_ipv4_header(ip: &mut [u8], edit: impl FnOnce(&mut etherparse::Ipv4Header)) {
    let (mut h, _) = etherparse::Ipv4Header::from_slice(ip).expect("an IPv4 header");
    edit(&mut h);
    h.header_checksum = h.calc_header_checksum();
    let len = h.header_len();
    ip[..len].copy_from_slice(&h.to_bytes());
}
