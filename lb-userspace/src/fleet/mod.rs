//! The fleet (`lb run --store etcd://... --cluster NAME`): the desired state lives in etcd,
//! every node follows it through the same reconciler path as the API, publishes what it has
//! applied, and takes its health verdicts from the fleet.
//!
//! - [`schema`]: key layout and per-key decoding (pure).
//! - [`status`]: node statuses, the fleet health rule and divergence (pure).
//! - [`store`]: etcd I/O with deadlines.
//! - [`access`]: TLS, credentials, and failures named by their cause.
//! - [`follow`]: the follower (a full read, then watch events applied in batches).
//! - here: the link to the store, the publisher and the writer.
//!
//! Faults: etcd unreachable keeps the last applied state forwarding and refuses changes,
//! each node back to its own health view; on return the node reads a full snapshot at one
//! revision and applies it whole (never half a revision); a restarted node serves its state
//! file and catches up the same way.
pub mod access;
pub mod deny;
mod follow;
pub mod schema;
pub mod status;
pub mod store;
mod write;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    Error,
    agent::Agent,
    fleet::{
        access::{Access, AccessArgs},
        schema::Keys,
        status::NodeStatus,
        store::Store,
    },
    protocol::{ClusterView, StoreView},
};

/// Seconds a node's status outlives its last write.
const STATUS_TTL_S: i64 = 5;
/// How often a node writes its status and reads the others'.
const STATUS_PERIOD: Duration = Duration::from_secs(1);
/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Where the fleet's store is, how to reach it, and who this node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetConfig {
    pub endpoints: Vec<String>,
    pub access: Access,
    pub cluster: String,
    pub node: String,
}

impl FleetConfig {
    /// From `--store etcd://HOST:PORT[,HOST:PORT...]` (or `https://...`), the TLS and
    /// credential options, `--cluster` and `--node`. Reads the files `access` names.
    pub fn new(
        store: &str,
        access: &AccessArgs,
        cluster: &str,
        node: &str,
    ) -> Result<Self, String> {
        let (tls, endpoints) = access::parse_store_url(store)?;
        Keys::new(cluster)?;
        schema::check_name("node", node)?;
        Ok(FleetConfig {
            endpoints,
            access: Access::load(access, tls)?,
            cluster: cluster.into(),
            node: node.into(),
        })
    }
}

/// Checked once when `lb run` starts, before anything is attached: a store that refuses this
/// node (TLS, certificate, credentials, permissions) ends the start with the cause; one that
/// does not answer yet is left to the follower, which serves the saved state meanwhile. An
/// etcd that hangs up at once is asked again before that is taken as a refusal.
pub async fn check_store(config: &FleetConfig) -> Result<(), crate::Error> {
    let keys = Keys::new(&config.cluster).map_err(crate::Error::Invalid)?;
    let mut last = None;
    for attempt in 0..2 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let res = match store::Store::connect(config, keys.clone()).await {
            Ok(store) => store.snapshot(None).await.map(|_| ()),
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => return Ok(()),
            Err(crate::Error::Store(mut e)) => {
                let hung_up = access::first_contact(e.cause.clone(), &config.access);
                if e.cause.is_setup() {
                    return Err(crate::Error::Store(e));
                }
                if hung_up.is_setup() {
                    e.cause = hung_up;
                    last = Some(crate::Error::Store(e));
                    continue;
                }
                last = Some(crate::Error::Store(e));
                break;
            }
            Err(e) => {
                last = Some(e);
                break;
            }
        }
    }
    match last {
        Some(crate::Error::Store(e)) if e.cause.is_setup() => Err(crate::Error::Store(e)),
        Some(e) => {
            log::warn!("{e}: serving the saved state until etcd answers");
            Ok(())
        }
        None => Ok(()),
    }
}

/// A hash of a store value, to tell a changed value from one already logged.
fn value_hash(v: &[u8]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// `s`, which came from the store, made safe for a terminal or a log line: control
/// characters (ESC, CR, BEL, ...), Unicode direction overrides and backslashes are shown as
/// escapes (`\x1b`, `\u{202e}`, `\\`) instead of being sent, so a name or value in etcd can
/// neither drive the operator's terminal nor forge a line.
pub fn escaped(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x80 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control()
                || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The node's link to the store, shared by the follower, the publisher and the API.
pub struct Fleet {
    pub config: FleetConfig,
    keys: Keys,
    /// The connected client while etcd answers.
    store: Mutex<Option<Store>>,
    view: Mutex<StoreView>,
    /// Rejected keys already logged (key and a hash of the value), so a bad key is logged
    /// once; a hash rather than the value, so values of megabytes are not kept.
    logged: Mutex<BTreeSet<(String, u64)>>,
    /// Status keys ignored and already logged (key and reason kind).
    ignored_logged: Mutex<BTreeSet<(String, &'static str)>>,
    /// Granted TTL of each lease a status key was bound to (`None`: not alive), asked once
    /// per lease: etcd deletes a key when its lease ends, so a key still read with the lease
    /// is bound to a live one.
    lease_ttls: Mutex<BTreeMap<i64, Option<i64>>>,
    /// The applied configuration revision, for writers waiting to see their change live.
    applied: tokio::sync::watch::Sender<i64>,
    /// Wakes the publisher when something it publishes changed (a revision applied, a health
    /// flip).
    changed: tokio::sync::Notify,
    /// `--announce-table`: what the node announces, published in its status.
    pub announcer: std::sync::OnceLock<Arc<crate::announce::Announcer>>,
}

impl Fleet {
    pub fn new(config: FleetConfig, applied: Option<i64>) -> Result<Arc<Self>, Error> {
        let keys = Keys::new(&config.cluster).map_err(Error::Invalid)?;
        let view = StoreView {
            endpoints: config.endpoints.clone(),
            cluster: config.cluster.clone(),
            node: config.node.clone(),
            applied_revision: applied,
            last_error: Some("not connected yet".into()),
            down_since_unix: Some(now_unix()),
            ..StoreView::default()
        };
        Ok(Arc::new(Fleet {
            config,
            keys,
            store: Mutex::new(None),
            view: Mutex::new(view),
            logged: Mutex::new(BTreeSet::new()),
            ignored_logged: Mutex::new(BTreeSet::new()),
            lease_ttls: Mutex::new(BTreeMap::new()),
            applied: tokio::sync::watch::channel(applied.unwrap_or(0)).0,
            changed: tokio::sync::Notify::new(),
            announcer: std::sync::OnceLock::new(),
        }))
    }

    fn view_mut(&self) -> std::sync::MutexGuard<'_, StoreView> {
        self.view.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What `lb stats` shows about the store.
    pub fn view(&self) -> StoreView {
        self.view_mut().clone()
    }

    /// The connected store, or why there is none.
    pub fn store(&self) -> Result<Store, Error> {
        if let Some(s) = self
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Ok(s);
        }
        let v = self.view();
        Err(Error::Unavailable(format!(
            "etcd is unreachable ({}): changes are refused until it answers; this node keeps forwarding with revision {}",
            v.last_error.unwrap_or_default(),
            v.applied_revision.map_or("none".into(), |r| r.to_string())
        )))
    }

    fn connected(&self, store: Store) {
        *self.store.lock().unwrap_or_else(PoisonError::into_inner) = Some(store);
        let mut v = self.view_mut();
        if !v.connected {
            log::info!("etcd {}: connected", self.config.endpoints.join(","));
        }
        v.connected = true;
        v.last_error = None;
        v.down_since_unix = None;
    }

    fn lost(&self, e: &Error) {
        *self.store.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let mut v = self.view_mut();
        if v.connected {
            log::warn!("etcd lost ({e}): forwarding continues with the last applied configuration");
            v.reconnects_total += 1;
        }
        v.connected = false;
        v.last_error = Some(e.to_string());
        v.down_since_unix.get_or_insert_with(now_unix);
    }

    /// Follows the store until the task is dropped: snapshot, apply, watch; on any error
    /// back to a fresh snapshot after a pause.
    pub async fn follow(self: Arc<Self>, agent: Arc<Agent>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            if let Err(e) = self.session(&agent).await {
                self.lost(&e);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            if self.view().connected {
                backoff = Duration::from_millis(200);
            }
        }
    }

    /// Something this node publishes changed (a health flip): publish now.
    pub fn changed(&self) {
        self.changed.notify_one();
    }

    /// Waits (bounded) until revision `rev` is applied on this node.
    async fn applied_at_least(&self, rev: i64, within: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(within, rx.wait_for(|r| *r >= rev))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Writes this node's status and takes the fleet's health verdict, every
    /// [`STATUS_PERIOD`] and at once after a revision is applied or a probe verdict flips, until
    /// the task is dropped. Without etcd (longer than a status lives) each node uses its own
    /// probes.
    pub async fn publish(self: Arc<Self>, agent: Arc<Agent>) {
        let mut lease: Option<i64> = None;
        // Another node's status written: its health view may have changed the verdict, so it
        // is taken at once (every node then moves within milliseconds of each other).
        let mut others: Option<etcd_client::WatchStream> = None;
        let mut last_verdict = Instant::now();
        loop {
            let other_wrote = tokio::select! {
                _ = tokio::time::sleep(STATUS_PERIOD) => None,
                _ = self.changed.notified() => None,
                m = async {
                    match others.as_mut() {
                        Some(w) => w.message().await.map(|m| m.is_some()).unwrap_or(false),
                        None => std::future::pending().await,
                    }
                } => Some(m),
            };
            if other_wrote == Some(false) {
                others = None;
            }
            let Ok(store) = self.store() else {
                lease = None;
                others = None;
                self.own_view_after(&agent, last_verdict).await;
                continue;
            };
            if others.is_none() {
                others = store.watch_nodes().await.ok();
            }
            let done = if other_wrote == Some(true) {
                self.take_verdict(&agent, &store).await
            } else {
                self.publish_once(&agent, &store, &mut lease).await
            };
            match done {
                Ok(()) => last_verdict = Instant::now(),
                Err(e) => {
                    log::debug!("publishing the node status: {e}");
                    lease = None;
                    others = None;
                    self.own_view_after(&agent, last_verdict).await;
                }
            }
        }
    }

    /// Without the others' statuses, the last verdict holds as long as the statuses it came
    /// from would (their lease), so a short loss of etcd moves nothing; then this node's own
    /// probes decide.
    async fn own_view_after(&self, agent: &Arc<Agent>, last_verdict: Instant) {
        if last_verdict.elapsed() >= Duration::from_secs(STATUS_TTL_S as u64) {
            self.set_fleet_health(agent, None).await;
        }
    }

    /// The fleet's health verdict from every node's status (this node's own view fresh).
    async fn take_verdict(&self, agent: &Arc<Agent>, store: &Store) -> Result<(), Error> {
        let nodes = self.live_statuses(store).await?;
        let own = agent.with_core(|c| c.own_health()).await?;
        let verdicts = status::fleet_health(&self.config.node, &own, &nodes);
        self.set_fleet_health(agent, Some(verdicts)).await;
        Ok(())
    }

    async fn publish_once(
        &self,
        agent: &Arc<Agent>,
        store: &Store,
        lease: &mut Option<i64>,
    ) -> Result<(), Error> {
        let (digests, health, not_converged) = agent
            .with_core(|core| {
                (
                    core.digests(),
                    core.own_health(),
                    core.not_converged().map(str::to_string),
                )
            })
            .await?;
        let status = NodeStatus {
            node: self.config.node.clone(),
            revision: self.view().applied_revision.unwrap_or(0),
            digests,
            health,
            not_converged,
            at_unix: now_unix(),
            announce: self.announcer.get().map(|a| a.view().published()),
        };
        let id = match *lease {
            Some(id) => id,
            None => store.grant(STATUS_TTL_S).await?,
        };
        let value = serde_json::to_vec(&status)
            .map_err(|e| Error::Invalid(format!("encoding the node status: {e}")))?;
        *lease = store
            .put_status(&self.config.node, id, value)
            .await?
            .then_some(id);
        self.take_verdict(agent, store).await
    }

    async fn set_fleet_health(
        &self,
        agent: &Arc<Agent>,
        verdicts: Option<
            std::collections::BTreeMap<(crate::model::VipAddr, crate::model::BackendAddr), bool>,
        >,
    ) {
        let a = agent.clone();
        let r = tokio::task::spawn_blocking(move || a.core().set_fleet_health(verdicts)).await;
        if let Ok(Err(e)) = r {
            log::warn!("applying the fleet's health verdict: {e}");
        }
    }

    /// `lb cluster status`: every live node's status, and what disagrees.
    pub async fn cluster(&self) -> Result<ClusterView, Error> {
        let store = self.store()?;
        let snap = store.snapshot(None).await?;
        let nodes = self.live_statuses(&store).await?;
        let v = self.view();
        Ok(ClusterView {
            cluster: self.config.cluster.clone(),
            revision: snap.config_revision(),
            divergence: status::divergence(&nodes),
            nodes,
            ignored: v.ignored_statuses,
            ignored_total: v.ignored_statuses_total,
        })
    }

    /// The node statuses that count ([`status::accept_status`]); the others are ignored,
    /// counted and logged once per key and reason.
    async fn live_statuses(&self, store: &Store) -> Result<Vec<NodeStatus>, Error> {
        let kvs = store.node_statuses().await?;
        let unknown: BTreeSet<i64> = {
            let ttls = self
                .lease_ttls
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            kvs.iter()
                .map(|kv| kv.lease)
                .filter(|l| *l != 0 && !ttls.contains_key(l))
                .collect()
        };
        let mut asked = Vec::new();
        for lease in unknown {
            asked.push((lease, store.lease_granted_ttl(lease).await?));
        }
        let ttls = {
            let mut ttls = self
                .lease_ttls
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            ttls.extend(asked);
            ttls.retain(|l, _| kvs.iter().any(|kv| kv.lease == *l));
            ttls.clone()
        };
        let (now, prefix) = (now_unix(), self.keys.nodes());
        let mut live = Vec::new();
        let mut ignored = Vec::new();
        for kv in &kvs {
            let ttl = ttls.get(&kv.lease).copied().flatten();
            match status::accept_status(&prefix, kv, ttl, STATUS_TTL_S, now) {
                Ok(s) => live.push(s),
                Err(i) => ignored.push((kv.key.clone(), i)),
            }
        }
        let mut logged = self
            .ignored_logged
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut v = self.view_mut();
        v.ignored_statuses = ignored
            .iter()
            .map(|(k, i)| format!("{k}: {}", i.why))
            .collect();
        for (key, i) in &ignored {
            if logged.insert((key.clone(), i.kind)) {
                v.ignored_statuses_total += 1;
                log::warn!(
                    "node status {} ignored for fleet health: {}",
                    escaped(key),
                    escaped(&i.why)
                );
            }
        }
        logged.retain(|(k, kind)| ignored.iter().any(|(key, i)| key == k && i.kind == *kind));
        Ok(live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_from_the_store_are_escaped() {
        assert_eq!(escaped("lb0"), "lb0");
        assert_eq!(escaped("\x1b[31mevil\x1b[0m"), "\\x1b[31mevil\\x1b[0m");
        assert_eq!(escaped("a\r\nb\x07\x7f"), "a\\x0d\\x0ab\\x07\\x7f");
        assert_eq!(escaped("\u{202e}txt\u{9b}"), "\\u{202e}txt\\u{9b}");
        // The backslash is escaped too, so `\x1b` typed into the store stays told apart.
        assert_eq!(escaped("a\\x1b"), "a\\\\x1b");
        assert_eq!(escaped("é ü ✓"), "é ü ✓");
        assert!(!escaped("\x1b\x00\u{9b}").chars().any(char::is_control));
    }

    #[test]
    fn store_urls_are_checked() {
        let none = AccessArgs::default();
        let c =
            FleetConfig::new("etcd://127.0.0.1:2379,10.0.0.1:2379", &none, "prod", "lb1").unwrap();
        assert_eq!(c.endpoints, ["127.0.0.1:2379", "10.0.0.1:2379"]);
        assert_eq!(c.access, Access::default());
        for (url, want) in [
            ("grpc://127.0.0.1:2379", "expected etcd://"),
            ("etcd://127.0.0.1", "not HOST:PORT"),
            ("etcd://127.0.0.1:0", "not HOST:PORT"),
            ("etcd://", "not HOST:PORT"),
        ] {
            let e = FleetConfig::new(url, &none, "prod", "lb1").unwrap_err();
            assert!(e.contains(want), "{url}: {e}");
        }
        assert!(
            FleetConfig::new("etcd://h:1", &none, "prod", "a/b")
                .unwrap_err()
                .contains("invalid node name")
        );
    }
}
