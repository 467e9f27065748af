//! A backend's address: `10.0.0.2`, `10.0.0.2:8000`, `2001:db8::2`, `[2001:db8::2]:8000`.
use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// Where a backend listens. `port == 0`: on the VIP's port (the only choice for direct server
/// return and encapsulation, which never change ports); another port needs `nat` forwarding.
/// The same address with two ports is two backends. Ordered by address, then port, so a VIP's
/// backends (and the Maglev input) are ordered the same whatever their arrival order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
}

impl BackendAddr {
    pub fn new(ip: IpAddr, port: u16) -> Self {
        BackendAddr { ip, port }
    }

    /// The port the backend is reached on for a VIP listening on `vip_port`.
    pub fn port_for(&self, vip_port: u16) -> u16 {
        if self.port == 0 { vip_port } else { self.port }
    }
}

impl From<IpAddr> for BackendAddr {
    fn from(ip: IpAddr) -> Self {
        BackendAddr { ip, port: 0 }
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ip, self.port) {
            (ip, 0) => write!(f, "{ip}"),
            (IpAddr::V4(ip), p) => write!(f, "{ip}:{p}"),
            (IpAddr::V6(ip), p) => write!(f, "[{ip}]:{p}"),
        }
    }
}

impl FromStr for BackendAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            format!(
                "invalid backend `{s}`: {why} (expected ADDRESS or ADDRESS:PORT, e.g. 10.0.0.2, 10.0.0.2:8000 or [2001:db8::2]:8000)"
            )
        };
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(ip.into());
        }
        let (ip, port) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("not an IPv4 or IPv6 address"))?;
        let bracketed = ip.strip_prefix('[').and_then(|i| i.strip_suffix(']'));
        if bracketed.is_none() && ip.contains(':') {
            return Err(bad(
                "an IPv6 address with a port needs brackets, e.g. [2001:db8::2]:8000",
            ));
        }
        let ip: IpAddr = bracketed
            .unwrap_or(ip)
            .parse()
            .map_err(|_| bad("not an IPv4 or IPv6 address"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("port must be 1-65535"))?;
        Ok(BackendAddr { ip, port })
    }
}

impl Serialize for BackendAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BackendAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_and_without_ports_round_trip() {
        for s in [
            "10.0.0.2",
            "10.0.0.2:8000",
            "2001:db8::2",
            "[2001:db8::2]:8000",
        ] {
            let b: BackendAddr = s.parse().unwrap();
            assert_eq!(b.to_string(), s);
        }
        let b: BackendAddr = "10.0.0.2:8001".parse().unwrap();
        assert_eq!(
            (b.port_for(80), BackendAddr::from(b.ip).port_for(80)),
            (8001, 80)
        );
        for (s, why) in [
            ("10.0.0.2:0", "port must be 1-65535"),
            ("10.0.0.2:http", "port must be 1-65535"),
            ("[2001:db8::zz]:80", "not an IPv4"),
            ("host:80", "not an IPv4"),
            ("fe80::1%eth0", "brackets"),
        ] {
            let e = s.parse::<BackendAddr>().unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
        // Ordered by address, then port.
        let mut v: Vec<BackendAddr> = ["10.0.0.2:8001", "10.0.0.1:9000", "10.0.0.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        v.sort();
        let s: Vec<String> = v.iter().map(|b| b.to_string()).collect();
        assert_eq!(s, ["10.0.0.1:9000", "10.0.0.2", "10.0.0.2:8001"]);
    }
}
