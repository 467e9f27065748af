//! What the agent reports: statistics and the agent's condition (`lb stats`), the status
//! page's view, and the guard's top dropped sources.
use std::{collections::BTreeMap, net::IpAddr};

use lb_common::Counter;
use serde::{Deserialize, Serialize};

use super::{StoreView, VipView};
use crate::model::{BackendAddr, VipAddr};

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
    /// The sources the guard dropped most in the last minute (`None`: not readable).
    #[serde(default)]
    pub top_sources: Option<TopSourcesView>,
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
