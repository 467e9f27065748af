//! VIP addresses (`ADDR:PORT/PROTO`), their protocol and MACs: parsed with a message that
//! says what is wrong, and (de)serialized as those strings. Apart from the state's shape
//! because every command and the config file parse them.
use std::{fmt, net::IpAddr, str::FromStr};

use lb_common::{PROTO_TCP, PROTO_UDP, VipKey};
use serde::{Deserialize, Serialize};

/// Transport protocol of a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A VIP: `10.0.0.10:80/tcp`, `[2001:db8::10]:53/udp`; port 0 (`10.0.0.10:*/tcp` or `:0`)
/// means every port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipAddr {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl VipAddr {
    /// The key the data plane looks this VIP up by.
    pub fn key(&self) -> VipKey {
        crate::net::vip_key(self.ip, self.port, self.proto.number())
    }
}

impl fmt::Display for VipAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = if self.port == 0 {
            "*".to_string()
        } else {
            self.port.to_string()
        };
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{port}/{}", self.proto),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{port}/{}", self.proto),
        }
    }
}

impl FromStr for VipAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            format!(
                "invalid VIP `{s}`: {why} (expected ADDRESS:PORT/PROTO, e.g. 10.0.0.10:80/tcp or [2001:db8::10]:53/udp)"
            )
        };
        let (addr_port, proto) = s
            .rsplit_once('/')
            .ok_or_else(|| bad("missing /tcp or /udp"))?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(bad("protocol must be tcp or udp")),
        };
        let (ip, port) = addr_port
            .rsplit_once(':')
            .ok_or_else(|| bad("missing :PORT"))?;
        let bracketed = ip.strip_prefix('[').and_then(|i| i.strip_suffix(']'));
        if bracketed.is_none() && ip.contains(':') {
            return Err(bad(
                "an IPv6 VIP needs brackets around the address, e.g. [2001:db8::10]:80/tcp",
            ));
        }
        let ip = bracketed.unwrap_or(ip);
        let ip: IpAddr = ip.parse().map_err(|_| bad("not an IPv4 or IPv6 address"))?;
        let port = if port == "*" {
            0
        } else {
            port.parse::<u16>()
                .map_err(|_| bad("port must be 0-65535 or *"))?
        };
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(bad("the address must be a unicast address"));
        }
        Ok(VipAddr { ip, port, proto })
    }
}

impl Serialize for VipAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VipAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// An Ethernet address `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid MAC `{s}`: expected six hex bytes like 02:00:00:00:00:01");
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(bad());
            }
            mac[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if mac[0] & 1 == 1 || mac == [0; 6] {
            return Err(format!(
                "invalid MAC `{s}`: a backend needs a unicast, non-zero MAC"
            ));
        }
        Ok(Mac(mac))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}
