//! What the agent lists: VIPs and their backends as the API shows them, and `trace`.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::{BackendAddr, Forward, HealthCheck, Serving, VipAddr};

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
