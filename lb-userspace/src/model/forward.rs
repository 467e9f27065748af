//! How a VIP's packets reach its backends.
use std::{fmt, str::FromStr};

use lb_common::{ENCAP_GUE, ENCAP_IPIP, ENCAP_L2, ENCAP_NAT};
use serde::{Deserialize, Serialize};

/// A VIP's forwarding mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forward {
    /// L2 direct server return: the frame's MACs are rewritten; backends share the load
    /// balancer's segment.
    #[default]
    L2,
    /// IP-in-IP to the backend's address, next hop by the FIB: backends anywhere behind
    /// routers, of either family, running `lb decap`.
    Ipip,
    /// GUE (variant 1, UDP) to the backend's address: like `ipip`, with a per-flow UDP source
    /// port for the backends' RSS and the routers' ECMP.
    Gue,
    /// Full NAT: the destination becomes the backend's address and port, the source one of
    /// the load balancer's addresses and ports (SNAT), both ways through the load balancer;
    /// backends are ordinary hosts anywhere behind routers, on any port, of the VIP's family.
    Nat,
}

impl Forward {
    /// The data plane's `ENCAP_*` value.
    pub fn encap(self) -> u8 {
        match self {
            Forward::L2 => ENCAP_L2,
            Forward::Ipip => ENCAP_IPIP,
            Forward::Gue => ENCAP_GUE,
            Forward::Nat => ENCAP_NAT,
        }
    }

    /// Whether backends are reached through an outer header (`lb decap` on them, any family).
    pub fn encapsulates(self) -> bool {
        matches!(self, Forward::Ipip | Forward::Gue)
    }

    /// Whether backends are reached through routers (next hop by the FIB, no MAC, a source
    /// address of this load balancer's needed): every mode but `l2`.
    pub fn routed(self) -> bool {
        self != Forward::L2
    }

    /// Whether a backend may listen on another port than the VIP's.
    pub fn translates_ports(self) -> bool {
        self == Forward::Nat
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Forward::L2 => "l2",
            Forward::Ipip => "ipip",
            Forward::Gue => "gue",
            Forward::Nat => "nat",
        }
    }

    pub fn is_l2(&self) -> bool {
        *self == Forward::L2
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Forward {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "l2" => Ok(Forward::L2),
            "ipip" => Ok(Forward::Ipip),
            "gue" => Ok(Forward::Gue),
            "nat" => Ok(Forward::Nat),
            _ => Err(format!(
                "invalid forwarding mode `{s}`: expected l2, ipip, gue or nat"
            )),
        }
    }
}
