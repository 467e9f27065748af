//! The fleet's views: the link to the store, and the node statuses published there.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{BackendAddr, VipAddr};

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
