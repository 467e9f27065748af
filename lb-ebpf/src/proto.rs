//! Wire constants every program reads or writes (one definition for all of them).

/// Ethernet types, in network byte order as they sit in the frame.
pub const ETH_P_IP: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
pub const ETH_P_8021Q: u16 = 0x8100u16.to_be();
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
/// ICMP destination unreachable (includes "fragmentation needed", code 4).
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PKT_TOOBIG: u8 = 2;
/// ICMP and ICMPv6 headers are both 8 bytes before the quoted packet.
pub const ICMP_HDR_LEN: usize = 8;
/// IPv4 "don't fragment" bit of the flags/fragment-offset field (host order).
pub const IP_DF: u16 = 0x4000;
