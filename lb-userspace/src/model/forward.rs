//! How a VIP's packets reach its backends.
use std::{fmt, str::FromStr};

use lb_common::{ENCAP_GUE, ENCAP_IPIP, ENCAP_L2};
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
}

impl Forward {
    /// The data plane's `ENCAP_*` value.
    pub fn encap(self) -> u8 {
        match self {
            Forward::L2 => ENCAP_L2,
            Forward::Ipip => ENCAP_IPIP,
            Forward::Gue => ENCAP_GUE,
        }
    }

    /// Whether backends are reached through an outer header (no MAC needed, any family).
    pub fn encapsulates(self) -> bool {
        self != Forward::L2
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Forward::L2 => "l2",
            Forward::Ipip => "ipip",
            Forward::Gue => "gue",
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
            _ => Err(format!(
                "invalid forwarding mode `{s}`: expected l2, ipip or gue"
            )),
        }
    }
}
