//! The operator's vocabulary: VIP and backend addresses, MACs, health checks and the desired
//! state, with parsing that says exactly what is wrong. Pure: no I/O, unit-tested unprivileged.
//!
//! `mod.rs` holds the desired state's shape (`DesiredState`, `VipSpec`, `BackendSpec`);
//! `addr.rs` VIP addresses and MACs, `health.rs` health checks, `limit.rs` new-flow limits,
//! `validate.rs` the rules, `backend.rs`, `forward.rs`, `pool.rs`, `serving.rs` and
//! `config.rs` the rest.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Highest backend weight.
pub const MAX_WEIGHT: u32 = 65535;

/// A backend of one VIP, keyed by its address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// 0-65535; 0 takes no new flows (like drain, but kept in the plan's shares).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Backend MAC; resolved from the neighbour table when absent.
    #[serde(default)]
    pub mac: Option<Mac>,
    /// Draining: no new flows, established flows continue.
    #[serde(default)]
    pub drained: bool,
}

pub(crate) fn default_weight() -> u32 {
    100
}

pub(crate) fn default_udp_idle() -> u32 {
    lb_common::DEFAULT_UDP_IDLE_S
}

/// Longest UDP idle time accepted (a day): longer is a flow table that never forgets.
pub const MAX_UDP_IDLE_S: u32 = 86_400;

/// Default second-chance drain window of a `gue` VIP: a slot's previous backend is carried
/// for this long after it lost the slot.
pub const DEFAULT_SECOND_CHANCE_S: u32 = 300;
/// Longest drain window accepted (a day).
pub const MAX_SECOND_CHANCE_S: u32 = 86_400;

pub(crate) fn default_second_chance() -> u32 {
    DEFAULT_SECOND_CHANCE_S
}

fn is_default_second_chance(s: &u32) -> bool {
    *s == DEFAULT_SECOND_CHANCE_S
}

/// A VIP's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSpec {
    /// Hash the client address only (client affinity) instead of the 5-tuple.
    #[serde(default)]
    pub source_hash: bool,
    /// Seconds a UDP flow is remembered without a datagram.
    #[serde(default = "default_udp_idle")]
    pub udp_idle_s: u32,
    /// How packets reach the backends.
    #[serde(default, skip_serializing_if = "Forward::is_l2")]
    pub forward: Forward,
    /// Second-chance drain window in seconds (`gue` VIPs only; 0: off). See
    /// `agent::second_chance`.
    #[serde(
        default = "default_second_chance",
        skip_serializing_if = "is_default_second_chance"
    )]
    pub second_chance_s: u32,
    #[serde(default)]
    pub health: Option<HealthCheck>,
    #[serde(default)]
    pub backends: BTreeMap<BackendAddr, BackendSpec>,
    /// Sources the VIP serves (empty: every source); see `lb_common::guard`.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub allow_sources: BTreeSet<Prefix>,
    /// Sources the VIP never serves (a deny match always wins over the allow list).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub deny_sources: BTreeSet<Prefix>,
    /// New flows the VIP takes per second on this node, with a burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_flow_limit: Option<FlowLimit>,
    /// New flows each source (a /32, an IPv6 /64) opens at the VIP per second on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_limit: Option<FlowLimit>,
    /// Serving backends the VIP needs to be announced by BGP (`None`: the node's
    /// `--announce-min-serving`). See `announce::gate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_min_serving: Option<u32>,
}

impl Default for VipSpec {
    fn default() -> Self {
        VipSpec {
            source_hash: false,
            udp_idle_s: default_udp_idle(),
            forward: Forward::L2,
            second_chance_s: default_second_chance(),
            health: None,
            backends: BTreeMap::new(),
            allow_sources: BTreeSet::new(),
            deny_sources: BTreeSet::new(),
            new_flow_limit: None,
            source_limit: None,
            announce_min_serving: None,
        }
    }
}

/// Everything the operator asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    #[serde(default)]
    pub vips: BTreeMap<VipAddr, VipSpec>,
    /// The node-wide deny list (`lb deny`): prefix -> when it ends, Unix seconds (0: never).
    /// Kept apart from the VIPs: `lb apply` of a config leaves it as it is.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deny: BTreeMap<Prefix, u64>,
}

impl DesiredState {
    /// Checks every rule a single operation also checks.
    pub fn validate(&self) -> Result<(), String> {
        for (vip, spec) in &self.vips {
            if let Some(h) = &spec.health {
                h.validate(vip)?;
            }
            validate_udp_idle(vip, spec.udp_idle_s)?;
            validate_second_chance(vip, spec.second_chance_s)?;
            for (addr, b) in &spec.backends {
                validate_backend(vip, spec.forward, addr, b)?;
            }
            validate_sources(vip, spec)?;
            if let Some(n) = spec.announce_min_serving {
                validate_announce_min_serving(vip, i64::from(n))?;
            }
        }
        Ok(())
    }
}

mod addr;
mod backend;
mod config;
mod forward;
mod health;
mod limit;
pub mod pool;
mod serving;
mod validate;
pub use addr::{Mac, Proto, VipAddr};
pub use backend::BackendAddr;
pub use config::{parse_config, render_config};
pub use forward::Forward;
pub use health::{HealthCheck, HealthKind, MAX_PATH};
pub use limit::{FlowLimit, MAX_FLOW_RATE};
pub use pool::{OwnAddrs, Prefix};
pub use serving::Serving;
pub use validate::{
    MAX_ANNOUNCE_MIN_SERVING, MAX_VIP_SOURCES, second_chance_needs_gue,
    validate_announce_min_serving, validate_backend, validate_second_chance, validate_sources,
    validate_udp_idle,
};

#[cfg(test)]
mod tests;
