//! Conversions between std addresses and the map ABI's network-order words, and interface
//! facts read from sysfs.
use std::net::IpAddr;

use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, VipKey};

/// Network-order address words, as the map ABI stores them (IPv4 in word 0).
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

pub fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }
}

/// The map key of VIP `ip:port/proto` (port 0 = every port).
pub fn vip_key(ip: IpAddr, port: u16, proto: u8) -> VipKey {
    VipKey {
        addr: addr_words(ip),
        port: port.to_be(),
        proto,
        family: family(ip),
    }
}

/// The flow key of client `src:sport` -> VIP `dst:dport`.
pub fn flow_key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: addr_words(src),
        dst: addr_words(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        family: family(src),
        _pad: [0; 2],
    }
}

/// The MAC address of interface `iface` (from sysfs).
pub fn interface_mac(iface: &str) -> Option<[u8; 6]> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).ok()?;
    // Parsed raw: `lo` and some virtual devices have an all-zero address.
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.trim().split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    for (i, p) in parts.iter().enumerate() {
        mac[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip() {
        let v6 = addr_words("2001:db8::1".parse().unwrap());
        assert_eq!(v6[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(v6[3].to_ne_bytes(), [0, 0, 0, 1]);
        // Network order: the first octet is the lowest-addressed byte of word 0.
        let w = addr_words("10.1.2.3".parse().unwrap());
        assert_eq!(w[0].to_ne_bytes(), [10, 1, 2, 3]);
    }
}
