//! VIP address pools and the node's own addresses: which addresses a VIP may take on this
//! node. The pools come from the node's own configuration (`lb run --vip-prefix`), never from
//! the store, so whoever can write the store cannot put a VIP on an address the operator did
//! not set aside for VIPs (MetalLB's address pools and Cilium's LB IPAM work the same way).
//! An address the node itself uses for its own services is refused even inside a pool: a VIP
//! there (`NODE:*/tcp`) would take SSH and the node's etcd traffic before its stack saw them.
//! Pure: the addresses are read elsewhere (`node::own_addrs`) and handed in.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    str::FromStr,
};

/// An address prefix, `10.0.0.0/24` or `2001:db8::/64`, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

fn max_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The mask of the first `len` bits of an address `width` bits wide, as a `u128`.
fn mask(len: u8, width: u8) -> u128 {
    let all = if width == 32 {
        u128::from(u32::MAX)
    } else {
        u128::MAX
    };
    if len == 0 {
        0
    } else {
        all & !((1u128 << (width - len)) - 1)
    }
}

impl Prefix {
    /// Whether `ip` lies inside the prefix (same family, same leading bits).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let width = max_len(self.addr);
        ip.is_ipv4() == self.addr.is_ipv4()
            && bits(ip) & mask(self.len, width) == bits(self.addr) & mask(self.len, width)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid prefix `{s}`: {why}");
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| bad("expected ADDRESS/LENGTH, e.g. 192.0.2.0/24 or 2001:db8::/64"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| bad("not an IPv4 or IPv6 address"))?;
        let width = max_len(addr);
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= width)
            .ok_or_else(|| bad(&format!("the length must be 0-{width}")))?;
        if bits(addr) & !mask(len, width) & mask(width, width) != 0 {
            return Err(bad("host bits are set (give the network address)"));
        }
        Ok(Prefix { addr, len })
    }
}

impl serde::Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The pools, as one line names them.
pub fn pools_line(pools: &[Prefix]) -> String {
    pools
        .iter()
        .map(Prefix::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// This node's rules for VIP addresses, copied out of the agent's core so a whole snapshot
/// can be checked on a blocking thread without holding its lock.
#[derive(Clone, Debug, Default)]
pub struct AddressRules {
    pub pools: Vec<Prefix>,
    pub own: OwnAddrs,
    /// Its encapsulation/NAT sources.
    pub services: Vec<IpAddr>,
    /// Its NAT address pool (`lb run --nat-source`).
    pub nat_pool: Vec<IpAddr>,
}

impl AddressRules {
    /// [`check_vip_address`] and [`check_not_nat_source`] under these rules.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        check_not_nat_source(ip, &self.nat_pool)?;
        check_vip_address(ip, &self.pools, &self.own, &self.services)
    }
}

/// A VIP may never take an address of the NAT pool, not even one held as a host address:
/// the program takes every packet to a pool address for a backend's answer.
pub fn check_not_nat_source(ip: IpAddr, nat_pool: &[IpAddr]) -> Result<(), String> {
    if nat_pool.contains(&ip) {
        return Err(format!(
            "VIP address {ip} is one of this node's NAT source addresses (`lb run --nat-source`): packets to it are taken for backends' answers; give the VIP another address"
        ));
    }
    Ok(())
}

/// What the node's kernel says about its own addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnAddrs {
    /// Preferred sources (`src`) of its routes, the local table's left out: what the node's
    /// own connections leave from.
    pub route_sources: BTreeSet<IpAddr>,
    /// Every address on its interfaces with its prefix length.
    pub interface: BTreeMap<IpAddr, u8>,
}

impl OwnAddrs {
    /// Held on an interface as a host address (/32, /128): the L2 setup where the load
    /// balancer holds the VIP itself so that it answers ARP/ND for it.
    fn host_address(&self, ip: IpAddr) -> bool {
        self.interface.get(&ip) == Some(&max_len(ip))
    }
}

/// Whether a VIP may take address `ip` on this node: inside one of `pools` (no pools: any
/// address), and not an address the node uses itself: a preferred source of its routes, an
/// interface address with a subnet, or one of `services` (its encapsulation/NAT sources),
/// unless held as a host address added for the VIP. The error is one line naming the
/// address and why.
pub fn check_vip_address(
    ip: IpAddr,
    pools: &[Prefix],
    own: &OwnAddrs,
    services: &[IpAddr],
) -> Result<(), String> {
    if !pools.is_empty() && !pools.iter().any(|p| p.contains(ip)) {
        return Err(format!(
            "VIP address {ip} is outside this node's VIP pools ({}): give an address inside them, or add a pool with `lb run --vip-prefix`",
            pools_line(pools)
        ));
    }
    let own_use = |why: &str| {
        format!(
            "VIP address {ip} is this node's own address ({why}): a VIP there would take the node's own traffic (SSH, etcd) before its stack sees it; give the VIP an address of its own (a /32 or /128 added for it is fine)"
        )
    };
    if own.route_sources.contains(&ip) {
        return Err(own_use("the preferred source of its routes"));
    }
    if let Some(len) = own.interface.get(&ip)
        && *len != max_len(ip)
    {
        return Err(own_use(&format!("on an interface as /{len}")));
    }
    if services.contains(&ip) && !own.host_address(ip) {
        return Err(own_use("its encapsulation/NAT source"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_parse_and_contain() {
        let p: Prefix = "10.0.0.0/24".parse().unwrap();
        assert!(p.contains(ip("10.0.0.0")) && p.contains(ip("10.0.0.255")));
        assert!(!p.contains(ip("10.0.1.0")) && !p.contains(ip("::ffff:10.0.0.1")));
        let h: Prefix = "10.0.0.7/32".parse().unwrap();
        assert!(h.contains(ip("10.0.0.7")) && !h.contains(ip("10.0.0.6")));
        let all: Prefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("192.0.2.1")) && !all.contains(ip("2001:db8::1")));
        let v6: Prefix = "2001:db8::/64".parse().unwrap();
        assert!(v6.contains(ip("2001:db8::10")) && !v6.contains(ip("2001:db8:0:1::10")));
        assert_eq!(v6.to_string(), "2001:db8::/64");
        for (bad, why) in [
            ("10.0.0.1/24", "host bits"),
            ("10.0.0.0/33", "0-32"),
            ("2001:db8::/129", "0-128"),
            ("10.0.0.0", "ADDRESS/LENGTH"),
            ("ten/8", "not an IPv4"),
        ] {
            let e = bad.parse::<Prefix>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    fn own() -> OwnAddrs {
        OwnAddrs {
            route_sources: BTreeSet::from([ip("10.30.0.2"), ip("192.0.2.9")]),
            interface: BTreeMap::from([
                (ip("10.30.0.2"), 24),
                (ip("10.0.0.10"), 32),
                (ip("10.0.0.20"), 32),
                (ip("2001:db8::2"), 64),
            ]),
        }
    }

    #[test]
    fn pools_bound_every_vip_address() {
        let pools = ["10.0.0.0/24".parse().unwrap()];
        assert!(check_vip_address(ip("10.0.0.99"), &pools, &own(), &[]).is_ok());
        let e = check_vip_address(ip("10.9.0.1"), &pools, &own(), &[]).unwrap_err();
        assert!(
            e.contains("10.9.0.1") && e.contains("outside") && e.contains("10.0.0.0/24"),
            "{e}"
        );
        // No pools (a single box without a store): any address that is not the node's own.
        assert!(check_vip_address(ip("10.9.0.1"), &[], &own(), &[]).is_ok());
    }

    #[test]
    fn the_nodes_own_addresses_are_refused_even_inside_a_pool() {
        let pools = ["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
        for (addr, why) in [
            ("10.30.0.2", "preferred source"),
            ("192.0.2.9", "preferred source"),
            ("2001:db8::2", "/64"),
        ] {
            let e = check_vip_address(ip(addr), &pools, &own(), &[]).unwrap_err();
            assert!(e.contains(addr) && e.contains(why), "{addr}: {e}");
        }
        // The encapsulation/NAT source is the node's own unless it is a host address added
        // for the VIP.
        let e = check_vip_address(ip("198.51.100.1"), &pools, &own(), &[ip("198.51.100.1")])
            .unwrap_err();
        assert!(e.contains("encapsulation/NAT source"), "{e}");
        // A host address held for the VIP (L2: the load balancer answers ARP for it).
        assert!(check_vip_address(ip("10.0.0.10"), &pools, &own(), &[ip("10.0.0.10")]).is_ok());
        assert!(check_vip_address(ip("10.0.0.20"), &pools, &own(), &[]).is_ok());
    }
}
