//! The wire protocol: the requests the agent takes and the answers it gives (listings,
//! traces, statistics, events, node statuses), shared by the API server, its client, the
//! fleet and the agent itself. Types only, below the agent: it depends on the model and the
//! plan, nothing that runs.
//! Requests are parsed strictly (`deny_unknown_fields`): a misspelt field is an error, as in
//! the config file. Here the commands and their answers; the listings in `listing`, the
//! statistics and the status page's view in `stats`, the fleet's views in `fleet`, all
//! re-exported here.
mod fleet;
mod listing;
mod stats;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use self::{
    fleet::{ClusterView, NodeAnnounce, NodeStatus, StoreView},
    listing::{BackendView, GuardView, OuterView, RetiredView, Trace, VipView},
    stats::{
        AgentStatus, BackendStats, Event, MigrationView, NatAddrView, NatBackendPorts,
        NatTableView, Rates, StatsView, StatusView, TopSource, TopSourcesView, VipStats,
    },
};
use crate::{
    ErrorKind,
    model::{BackendAddr, DesiredState, FlowLimit, Forward, HealthCheck, Mac, Prefix, VipAddr},
    plan::VipPlan,
};

/// Largest request body the agent reads (a config with thousands of backends fits).
pub const MAX_BODY: usize = 4 << 20;
/// Largest command the agent reads: `lb deny add --file` of a million prefixes, each spelt
/// at its longest (an IPv6 /128, about 45 bytes of JSON), fits.
pub const MAX_COMMAND_BODY: usize = 64 << 20;

/// A change, as sent by the CLI.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    AddVip {
        vip: VipAddr,
        source_hash: bool,
        /// Seconds a UDP flow is remembered without a datagram.
        #[serde(default = "default_udp_idle")]
        udp_idle_s: u32,
        /// How packets reach the backends.
        #[serde(default)]
        forward: Forward,
        /// Second-chance drain window in seconds (`gue` only); `None`: the default.
        #[serde(default)]
        second_chance_s: Option<u32>,
        health: Option<HealthCheck>,
        /// Sources the VIP serves (empty: every source).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        allow_sources: Vec<Prefix>,
        /// Sources the VIP never serves.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        deny_sources: Vec<Prefix>,
        /// New flows per second the VIP takes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        new_flow_limit: Option<FlowLimit>,
        /// New flows per second each source opens at the VIP.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source_limit: Option<FlowLimit>,
        /// Serving backends needed to announce the VIP by BGP (`None`: the node's option).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        announce_min_serving: Option<u32>,
    },
    RemoveVip {
        vip: VipAddr,
    },
    AddBackend {
        vip: VipAddr,
        address: BackendAddr,
        weight: u32,
        mac: Option<Mac>,
    },
    RemoveBackend {
        vip: VipAddr,
        address: BackendAddr,
    },
    SetWeight {
        vip: VipAddr,
        address: BackendAddr,
        weight: u32,
    },
    Drain {
        vip: VipAddr,
        address: BackendAddr,
        drained: bool,
    },
    Apply {
        state: DesiredState,
        dry_run: bool,
        /// Store mode: refuse unless the configuration is still at this revision (the one
        /// the operator's dry run showed), so nobody's change is overwritten unseen.
        #[serde(default)]
        if_revision: Option<i64>,
    },
    /// Read the kernel maps again and converge them to the desired state.
    Reconcile,
    /// Adds `prefixes` to the node-wide deny list, ending after `expires_s` seconds (`None`:
    /// never); a prefix already there takes the new end.
    DenyAdd {
        prefixes: Vec<Prefix>,
        #[serde(default)]
        expires_s: Option<u64>,
    },
    /// Removes `prefixes` from the node-wide deny list.
    DenyRemove {
        prefixes: Vec<Prefix>,
    },
}

impl Command {
    /// One line for the status page's recent changes.
    pub fn describe(&self) -> String {
        match self {
            Command::AddVip { vip, .. } => format!("added VIP {vip}"),
            Command::RemoveVip { vip } => format!("removed VIP {vip}"),
            Command::AddBackend {
                vip,
                address,
                weight,
                ..
            } => format!("added backend {address} to {vip} (weight {weight})"),
            Command::RemoveBackend { vip, address } => {
                format!("removed backend {address} from {vip}")
            }
            Command::SetWeight {
                vip,
                address,
                weight,
            } => format!("weight of {address} in {vip} set to {weight}"),
            Command::Drain {
                vip,
                address,
                drained,
            } => format!(
                "{} {address} in {vip}",
                if *drained { "drained" } else { "undrained" }
            ),
            Command::Apply { state, .. } => {
                format!("applied a config of {} VIP(s)", state.vips.len())
            }
            Command::Reconcile => "reconciled the kernel maps".to_string(),
            Command::DenyAdd { prefixes, .. } => {
                format!("denied {}", prefixes_line(prefixes))
            }
            Command::DenyRemove { prefixes } => {
                format!("removed the deny of {}", prefixes_line(prefixes))
            }
        }
    }
}

/// `prefixes` as one line: the first few, then how many more.
fn prefixes_line(prefixes: &[Prefix]) -> String {
    let shown: Vec<String> = prefixes.iter().take(3).map(Prefix::to_string).collect();
    match prefixes.len() {
        n if n > 3 => format!("{} and {} more", shown.join(", "), n - 3),
        _ => shown.join(", "),
    }
}

fn default_udp_idle() -> u32 {
    lb_common::DEFAULT_UDP_IDLE_S
}

/// Answer to a command.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CommandResult {
    /// For `Apply`: what changes.
    #[serde(default)]
    pub plan: Vec<VipPlan>,
    /// Nanoseconds from receiving the command to the kernel maps being updated.
    pub took_ns: u64,
    /// Backends of this change whose MAC is not known yet (kept out of their tables until
    /// their neighbour entry resolves).
    #[serde(default)]
    pub no_mac: Vec<IpAddr>,
    /// Store mode: the configuration revision the change was written at (or, for a dry run,
    /// planned against).
    #[serde(default)]
    pub revision: Option<i64>,
}

/// Error body: what went wrong, and its kind (the CLI's exit code follows it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub error: String,
}
