//! The wire protocol: the requests the agent takes and the answers it gives (listings,
//! traces, statistics, events, node statuses), shared by the API server, its client, the
//! fleet and the agent itself. Types only, below the agent: it depends on the model and the
//! plan, nothing that runs.
//! Requests are parsed strictly (`deny_unknown_fields`): a misspelt field is an error, as in
//! the config file.
use std::{collections::BTreeMap, net::IpAddr};

use lb_common::Counter;
use serde::{Deserialize, Serialize};

use crate::{
    ErrorKind,
    model::{
        BackendAddr, DesiredState, FlowLimit, Forward, HealthCheck, Mac, Prefix, Serving, VipAddr,
    },
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

/// Something that happened, for the status page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub at_unix: u64,
    pub what: String,
}

/// Packets per second over the last second, per VIP and backend.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Rates {
    /// `VIP` -> packets/s.
    pub vips: BTreeMap<String, f64>,
    /// `VIP backend` -> packets/s.
    pub backends: BTreeMap<String, f64>,
    /// `VIP` -> new flows/s.
    #[serde(default)]
    pub vip_new_flows: BTreeMap<String, f64>,
    /// `VIP` -> packets/s the guard dropped.
    #[serde(default)]
    pub vip_guard_dropped: BTreeMap<String, f64>,
}

/// Everything the status page shows, in one read.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub iface: String,
    pub vips: Vec<VipView>,
    pub stats: StatsView,
    pub rates: Rates,
    pub events: Vec<Event>,
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

/// A backend as listed by the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub address: BackendAddr,
    pub id: u32,
    pub weight: u32,
    /// The MAC frames are sent to, or `no-mac`.
    pub mac: String,
    /// Where the MAC comes from: `configured`, `neighbour`, or `none`.
    pub mac_source: String,
    pub drained: bool,
    /// `up`, `down` or `unchecked`.
    pub health: String,
    pub last_check: String,
    /// Whether it takes new flows, and if not why.
    pub serving: Serving,
    /// Share of the live slot table, percent.
    pub share_pct: f64,
    /// Slots of the live table that name it as one of their previous backends (second
    /// chance).
    #[serde(default)]
    pub previous_slots: usize,
}

/// A VIP as listed by the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipView {
    pub vip: VipAddr,
    pub id: u32,
    pub source_hash: bool,
    /// Seconds a UDP flow is remembered without a datagram.
    pub udp_idle_s: u32,
    /// How packets reach the backends.
    #[serde(default)]
    pub forward: Forward,
    /// Second-chance drain window in seconds (0: off; only `gue` VIPs carry one).
    #[serde(default)]
    pub second_chance_s: u32,
    /// Seconds until the open drain window ends (none open: `None`).
    #[serde(default)]
    pub window_ends_in_s: Option<u64>,
    /// Backends removed from the VIP that slots still name as previous during the window.
    #[serde(default)]
    pub retired: Vec<RetiredView>,
    /// Digest of the slot table live in the kernel (backend addresses per slot, FNV-1a, hex):
    /// equal on every node that sends each flow to the same backend.
    #[serde(default)]
    pub digest: Option<String>,
    pub health_check: Option<HealthCheck>,
    pub backends: Vec<BackendView>,
    /// Serving backends the VIP needs to be announced (`None`: the node's option).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_min_serving: Option<u32>,
    /// The guard's lists and limits of the VIP (`None`: it has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardView>,
}

/// A VIP's guard as the status page shows it: how many prefixes each list holds, and the
/// new-flow limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardView {
    pub allow_sources: usize,
    pub deny_sources: usize,
    #[serde(default)]
    pub new_flow_limit: Option<crate::model::FlowLimit>,
    #[serde(default)]
    pub source_limit: Option<crate::model::FlowLimit>,
}

/// A backend removed from a VIP whose slots still name it as previous (second chance).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetiredView {
    pub address: BackendAddr,
    pub id: u32,
    pub previous_slots: usize,
}

/// What `trace` reports for a 5-tuple.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub vip: VipAddr,
    pub vip_id: u32,
    pub slot: u32,
    /// Backend the slot table gives a new flow.
    pub slot_backend: Option<BackendAddr>,
    /// The slot's previous backends during a drain window, in hop order: the next hops a
    /// `gue` packet carries (each backend sends it on unless it owns the flow).
    #[serde(default)]
    pub previous_backends: Vec<BackendAddr>,
    /// Backend remembered in the flow table, if the flow is known.
    pub flow_backend: Option<BackendAddr>,
    /// Where the next packet goes.
    pub next_packet_to: Option<BackendAddr>,
    /// How it gets there, and for encapsulation the outer header.
    #[serde(default)]
    pub forward: Forward,
    #[serde(default)]
    pub outer: Option<OuterView>,
}

/// The outer header of an encapsulated packet, as `trace` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OuterView {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// GUE only: UDP source and destination ports.
    pub udp: Option<(u16, u16)>,
}

/// Counters of one backend.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStats {
    pub address: BackendAddr,
    pub packets: u64,
    pub bytes: u64,
}

/// Counters of one VIP.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipStats {
    pub vip: VipAddr,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Packets the guard dropped (source lists and new-flow limits).
    #[serde(default)]
    pub guard_dropped: u64,
    pub backends: Vec<BackendStats>,
}

/// The agent's own condition.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Empty when the kernel matches the desired state; otherwise why it does not (yet).
    pub not_converged: Option<String>,
    /// Backends without a known MAC.
    pub no_mac: Vec<IpAddr>,
    /// NAT connections live at the last sweep, and the table's capacity (once NAT is used).
    #[serde(default)]
    pub nat_connections: Option<(u64, u64)>,
    /// How full each part of the NAT table was at the last sweep (once NAT is used).
    #[serde(default)]
    pub nat_table: Option<NatTableView>,
    /// Each NAT pool address's connections at the last sweep (once NAT is used).
    #[serde(default)]
    pub nat_pool: Vec<NatAddrView>,
    /// The migration that brought the pinned maps to this build's map ABI, if one did.
    #[serde(default)]
    pub migration: Option<MigrationView>,
    /// Prefixes on the node-wide deny list (`lb deny`; in a fleet, the fleet's), ended ones
    /// not yet removed included.
    #[serde(default)]
    pub deny_entries: usize,
}

/// The NAT table's parts at the last sweep: the `NAT table` line of `lb stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatTableView {
    /// Established connections, of `capacity` (`--nat-entries`).
    pub established: u64,
    pub capacity: u64,
    /// Half-open pairs, of `half_slots`.
    pub half_open: u64,
    pub half_slots: u64,
    /// Closed connections still holding their port (counted among the established room).
    pub closing: u64,
}

/// One NAT pool address's connections at the last sweep (`lb stats`' `NAT address` lines).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatAddrView {
    pub address: IpAddr,
    /// Connections holding a port of this address (half-open and closing ones included).
    pub connections: u64,
    pub half_open: u64,
    pub closing: u64,
    /// Ports of this address in use toward each backend (address:port), as `connections`
    /// counts them: the ports are per (address, backend), so this is how full each range is.
    #[serde(default)]
    pub ports_by_backend: Vec<NatBackendPorts>,
    /// New connections refused on this address since the program was loaded, by reason: every
    /// probed port toward the backend taken, the NAT tables full.
    #[serde(default)]
    pub refused_no_port: u64,
    #[serde(default)]
    pub refused_table_full: u64,
}

/// One backend's ports in use on one NAT address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatBackendPorts {
    pub backend: std::net::SocketAddr,
    pub ports: u64,
}

/// What the last migration of the pinned maps did (kept in their record, so it is shown
/// until the next one).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationView {
    /// Map ABI it migrated from and to.
    pub from: u32,
    pub to: u32,
    /// Maps made new (converted, grown, added, the program array).
    pub maps: u32,
    /// Entries copied across.
    pub entries: u64,
    /// Load to commit, in microseconds.
    pub took_us: u64,
    /// When it committed (seconds since the epoch).
    pub at_unix: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatsView {
    pub global: BTreeMap<String, Counter>,
    pub vips: Vec<VipStats>,
    #[serde(default)]
    pub agent: AgentStatus,
    /// Store mode only.
    #[serde(default)]
    pub store: Option<StoreView>,
    /// `--announce-table` only: what the node announces, and its BGP sessions.
    #[serde(default)]
    pub announce: Option<crate::announce::AnnounceView>,
    /// `lb capture`: whether one runs, and the kernel's counts of the running or last one
    /// (`None`: no data plane to capture).
    #[serde(default)]
    pub capture: Option<crate::capture::wire::CaptureStatus>,
}

/// The agent's link to the fleet's store (`lb run --store`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreView {
    pub endpoints: Vec<String>,
    pub cluster: String,
    pub node: String,
    /// Whether etcd answers; when it does not, the node keeps forwarding with the last
    /// applied configuration and refuses changes.
    pub connected: bool,
    /// The configuration revision applied (from the store, or the state file after a restart).
    pub applied_revision: Option<i64>,
    /// The last error talking to etcd, and since when (seconds since the epoch) it is down.
    pub last_error: Option<String>,
    pub down_since_unix: Option<u64>,
    /// Keys whose values are not applied, with the reason (each keeps its last good value).
    pub rejected: Vec<String>,
    /// Counters: rejected key values seen, revisions refused as a whole, reconnections.
    pub rejected_total: u64,
    pub refused_revisions_total: u64,
    pub reconnects_total: u64,
    /// Node status keys that do not count for fleet health (no live short lease, named for
    /// another node, stale, unreadable), with the reason, as last read.
    #[serde(default)]
    pub ignored_statuses: Vec<String>,
    /// Counter: node status keys ignored (each key once per reason while it stays).
    #[serde(default)]
    pub ignored_statuses_total: u64,
    /// Counter: times the node applied the store's configuration (a full read, or one batch
    /// of watch events however many transactions it holds).
    #[serde(default)]
    pub applies_total: u64,
}

/// `lb cluster status`: every live node's published status and what disagrees.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterView {
    pub cluster: String,
    /// The configuration revision in the store now.
    pub revision: i64,
    pub nodes: Vec<NodeStatus>,
    pub divergence: Vec<String>,
    /// Status keys that do not count, with the reason (their contents came from the store:
    /// escape before printing).
    #[serde(default)]
    pub ignored: Vec<String>,
    /// Counter: status keys ignored by this node since it started.
    #[serde(default)]
    pub ignored_total: u64,
}

/// One node's status, published under `nodes/<node>` with a lease.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    /// The store revision whose configuration this node has applied.
    pub revision: i64,
    /// Per VIP: the agent's `ring_digest` of the slot table live in this node's kernel (hex).
    pub digests: BTreeMap<VipAddr, String>,
    /// Per VIP and backend: this node's own probe verdict (true: up). Only checked backends.
    pub health: BTreeMap<VipAddr, BTreeMap<BackendAddr, bool>>,
    /// Why this node's kernel does not match its configuration, while it does not.
    #[serde(default)]
    pub not_converged: Option<String>,
    /// Seconds since the epoch when this status was written.
    pub at_unix: u64,
    /// `--announce-table` only: per VIP, `announced`, `draining` or `withdrawn` (with why),
    /// and per BGP session its state.
    #[serde(default)]
    pub announce: Option<NodeAnnounce>,
}

/// What a node announces, as published in its status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAnnounce {
    pub vips: BTreeMap<VipAddr, String>,
    pub sessions: BTreeMap<String, String>,
}

/// Error body: what went wrong, and its kind (the CLI's exit code follows it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub error: String,
}

/// `lb stats --top-sources`: the sources the guard dropped most in the last minute, from the
/// kernel's samples (`lb_common::top_sources`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TopSourcesView {
    /// The span summed, in seconds (the last minute, in the program's 10 s steps).
    pub window_s: u64,
    /// One drop in this many is sampled; `dropped` is samples times this.
    pub sample_every: u32,
    /// At most ten, most dropped first.
    pub sources: Vec<TopSource>,
}

/// One source of [`TopSourcesView`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopSource {
    pub source: IpAddr,
    /// Estimated drops (samples x `sample_every`).
    pub dropped: u64,
    /// Samples behind the estimate (its error is about its square root, times `sample_every`).
    pub samples: u64,
    /// Estimated drops by reason (`lb stats`'s counter names).
    pub reasons: BTreeMap<String, u64>,
}
