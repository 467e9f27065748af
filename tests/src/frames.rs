//! The one frame builder of the tests and the bench: Ethernet frames through etherparse with
//! the MACs of the scene, and address literals as the byte arrays etherparse wants.
use etherparse::{Ethernet2Header, PacketBuilder, PacketBuilderStep};

/// An IPv4 literal as bytes; panics on a non-literal (test constants only).
pub fn v4(s: &str) -> [u8; 4] {
    s.parse::<std::net::Ipv4Addr>()
        .unwrap_or_else(|e| panic!("IPv4 literal {s:?}: {e}"))
        .octets()
}

/// An IPv6 literal as bytes; panics on a non-literal (test constants only).
pub fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>()
        .unwrap_or_else(|e| panic!("IPv6 literal {s:?}: {e}"))
        .octets()
}

/// Frames from `src` to `dst` MAC.
#[derive(Clone, Copy, Debug)]
pub struct Frames {
    pub src: [u8; 6],
    pub dst: [u8; 6],
}

impl Frames {
    pub fn new(src: [u8; 6], dst: [u8; 6]) -> Self {
        Frames { src, dst }
    }

    /// The Ethernet step, to go on with any etherparse builder.
    pub fn eth(&self) -> PacketBuilderStep<Ethernet2Header> {
        PacketBuilder::ethernet2(self.src, self.dst)
    }

    /// A TCP segment over IPv4 with `flags` ("S" SYN, "A" ACK, "R" RST, "F" FIN, any mix)
    /// carrying `payload`.
    pub fn tcp4(
        &self,
        (src, sport): ([u8; 4], u16),
        (dst, dport): ([u8; 4], u16),
        flags: &str,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut b = self.eth().ipv4(src, dst, 64).tcp(sport, dport, 1000, 64000);
        for f in flags.chars() {
            b = match f {
                'S' => b.syn(),
                'A' => b.ack(1),
                'R' => b.rst(),
                'F' => b.fin(),
                other => panic!("TCP flag {other:?}"),
            };
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).expect("frame builds");
        out
    }

    /// A UDP datagram over IPv4.
    pub fn udp4(&self, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        self.eth()
            .ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut out, b"query")
            .expect("frame builds");
        out
    }
}
