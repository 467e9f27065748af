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

/// The address stored as `words` (network byte order, IPv4 in `[0]`) of family `fam`.
pub fn words_addr(words: [u32; 4], fam: u8) -> IpAddr {
    if fam == lb_common::FAMILY_V4 {
        IpAddr::V4(std::net::Ipv4Addr::from(words[0].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(std::net::Ipv6Addr::from(o))
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

/// The global unicast addresses of interface `iface`, IPv4 first, in the kernel's order.
pub fn interface_addrs(iface: &str) -> Vec<IpAddr> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free with freeifaddrs; each entry's sockaddr is read
    // according to its family.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return Vec::new();
        }
        let mut p = list;
        while !p.is_null() {
            let a = &*p;
            p = a.ifa_next;
            if a.ifa_addr.is_null()
                || std::ffi::CStr::from_ptr(a.ifa_name).to_bytes() != iface.as_bytes()
            {
                continue;
            }
            match i32::from((*a.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(a.ifa_addr as *const libc::sockaddr_in);
                    let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                    if !ip.is_loopback() && !ip.is_link_local() {
                        v4.push(IpAddr::V4(ip));
                    }
                }
                libc::AF_INET6 => {
                    let sin6 = &*(a.ifa_addr as *const libc::sockaddr_in6);
                    let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                    if !ip.is_loopback() && !ip.is_unicast_link_local() {
                        v6.push(IpAddr::V6(ip));
                    }
                }
                _ => {}
            }
        }
        libc::freeifaddrs(list);
    }
    v4.extend(v6);
    v4
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
