//! The follower: a full read of the configuration at one revision, then the watch. Watch
//! events are gathered into batches and each batch is applied once, at its newest revision:
//! a bulk `lb deny add --file` arrives as one transaction per hundred prefixes, and applying
//! the whole desired state per transaction made a list of N prefixes cost each node
//! O(N²/100). The deny list is kept decoded between batches and edited by the events' puts
//! and deletes; the VIPs (few, and checked against this node's rules) are read at the
//! batch's revision when a VIP key changed. A lost or compacted watch ends the session, and
//! the next one starts from a full read again.
use std::{
    sync::{Arc, PoisonError},
    time::Duration,
};

use etcd_client::{EventType, WatchResponse, WatchStream};
use tokio::time::Instant;

use crate::{
    Error,
    agent::Agent,
    fleet::{
        Fleet,
        deny::{DenyEvent, DenyKeys},
        escaped, schema,
        store::{Snapshot, Store},
        value_hash,
    },
    model::DesiredState,
};

/// How long a batch keeps gathering after its first event. A single change is live within
/// 100 ms (etcd's commit, the watch and the apply take a few tens of milliseconds), so the
/// window adds at most this much to it and still keeps well inside that; a bulk writer
/// commits a transaction every few milliseconds (each waits for etcd's fsync), so one
/// window gathers several of them, and those committed while a batch is being applied wait
/// in the stream and make the next batch.
const COALESCE: Duration = Duration::from_millis(25);
/// Most watch messages in one batch (a deny message holds at most one transaction's
/// hundred-odd events), so a backlog is applied in steps of bounded memory.
const MAX_BATCH: usize = 1000;

/// What one batch of watch messages changed.
#[derive(Default)]
struct Batch {
    /// The newest revision of a VIP event (0: no VIP key changed).
    vips_at: i64,
    /// The newest revision of a deny event (0: none).
    deny_at: i64,
    /// The deny list's events, in order.
    deny: Vec<DenyEvent>,
    messages: usize,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.vips_at == 0 && self.deny.is_empty()
    }

    /// Takes one message of the VIP (`vips`) or deny stream.
    fn take(&mut self, msg: WatchResponse, vips: bool) -> Result<(), Error> {
        if msg.canceled() {
            // Compacted past our revision, or the server went away: start over.
            return Err(Error::Unavailable(format!(
                "etcd: watch cancelled ({})",
                msg.cancel_reason()
            )));
        }
        if msg.events().is_empty() {
            return Ok(());
        }
        self.messages += 1;
        let rev = msg.header().map_or(0, |h| h.revision());
        if vips {
            self.vips_at = self.vips_at.max(rev);
            return Ok(());
        }
        self.deny_at = self.deny_at.max(rev);
        for e in msg.events() {
            let Some(kv) = e.kv() else { continue };
            self.deny.push(DenyEvent {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: (e.event_type() == EventType::Put).then(|| kv.value().to_vec()),
                mod_revision: kv.mod_revision(),
            });
        }
        Ok(())
    }
}

/// The next message of either stream (`true`: the VIP stream's).
async fn next(
    store: &Store,
    watch: &mut WatchStream,
    denies: &mut WatchStream,
) -> Result<(WatchResponse, bool), Error> {
    let (msg, vips) = tokio::select! {
        m = watch.message() => (m, true),
        m = denies.message() => (m, false),
    };
    let msg = msg
        .map_err(store.error("watching the configuration"))?
        .ok_or_else(|| Error::Unavailable("etcd: the watch ended".into()))?;
    Ok((msg, vips))
}

/// The next batch: waits for a first change, then takes what is waiting and what comes
/// within [`COALESCE`] of it, up to [`MAX_BATCH`] messages.
async fn gather(
    store: &Store,
    watch: &mut WatchStream,
    denies: &mut WatchStream,
) -> Result<Batch, Error> {
    let mut batch = Batch::default();
    while batch.is_empty() {
        let (msg, vips) = next(store, watch, denies).await?;
        batch.take(msg, vips)?;
    }
    let deadline = Instant::now() + COALESCE;
    while batch.messages < MAX_BATCH {
        // A message already waiting is taken even past the deadline (the timeout polls
        // it first); the bound on messages ends a backlog's batch.
        match tokio::time::timeout_at(deadline, next(store, watch, denies)).await {
            Ok(m) => {
                let (msg, vips) = m?;
                batch.take(msg, vips)?;
            }
            Err(_) => break,
        }
    }
    Ok(batch)
}

impl Fleet {
    pub(super) async fn session(&self, agent: &Arc<Agent>) -> Result<(), Error> {
        let store = Store::connect(&self.config, self.keys.clone()).await?;
        let snap = store.snapshot(None).await?;
        let mut watch = store.watch(snap.revision + 1).await?;
        let mut denies = store.watch_denies(snap.revision + 1).await?;
        let last = agent.with_core(|c| c.desired().deny.clone()).await?;
        let keys = self.keys.clone();
        let (mut config, deny) = tokio::task::spawn_blocking(move || {
            let deny = DenyKeys::from_snapshot(&keys, &snap, &last);
            let config = Snapshot {
                deny: Vec::new(),
                deny_revisions: Vec::new(),
                ..snap
            };
            (config, deny)
        })
        .await
        .map_err(|e| Error::Kernel(format!("decoding the deny list: {e}")))?;
        let mut deny = self.apply(agent, &config, deny, Vec::new()).await?;
        self.connected(store.clone());
        loop {
            let batch = gather(&store, &mut watch, &mut denies).await?;
            // The deny events are ours already; the VIPs, or only `meta` (bumped by `lb`'s
            // deny writes, deletes included), at the batch's revision, so the revision applied
            // is the one a full read there gives (the VIP stream's events may come in
            // fragments of one revision).
            let at = batch.vips_at.max(batch.deny_at);
            if batch.vips_at > 0 {
                config = store.config_at(Some(at)).await?;
            } else {
                config.meta = store.meta_at(at).await?;
            }
            log::debug!(
                "store: {} watch messages, {} deny changes in one batch",
                batch.messages,
                batch.deny.len()
            );
            deny = self.apply(agent, &config, deny, batch.deny).await?;
        }
    }

    /// Applies the VIPs of `config` and the deny list (`deny` edited by `events`) whole
    /// through the agent's change path, once; rejected keys keep their last value. A
    /// revision the agent refuses as a whole (e.g. beyond this node's capacity) is counted
    /// and logged; the node keeps the previous one. Returns the edited deny list (an error
    /// only when it is lost with a failed task: the session then starts over from a full
    /// read).
    async fn apply(
        &self,
        agent: &Arc<Agent>,
        config: &Snapshot,
        mut deny: DenyKeys,
        events: Vec<DenyEvent>,
    ) -> Result<DenyKeys, Error> {
        let started = std::time::Instant::now();
        // The addresses the VIPs are checked against, as they are now (outside the lock).
        agent.refresh_own_addrs().await;
        // Copied out under the lock (the VIPs only: the deny list comes from `deny`); decoded
        // on a blocking thread.
        let Ok((last, rules)) = agent
            .with_core(|core| {
                let last = DesiredState {
                    vips: core.desired().vips.clone(),
                    ..DesiredState::default()
                };
                (last, core.address_rules())
            })
            .await
        else {
            deny.edit(&self.keys, &events);
            return Ok(deny);
        };
        let (keys, vips) = (self.keys.clone(), config.vips.clone());
        let changes = events.len();
        let decoded = tokio::task::spawn_blocking(move || {
            deny.edit(&keys, &events);
            let mut d = schema::decode_checked(&keys, &vips, &last, &|v| rules.check(v.ip));
            d.state.deny = deny.list(crate::agent::guard::unix_now_s());
            // Each rejected key with a hash of its value, to log a value once.
            let mut rejected: Vec<(String, String, u64)> = d
                .rejected
                .drain(..)
                .map(|r| {
                    let hash = vips
                        .iter()
                        .find(|(k, _)| *k == r.key)
                        .map_or(0, |(_, v)| value_hash(v));
                    (r.key, r.why, hash)
                })
                .collect();
            rejected.extend(
                deny.rejected()
                    .map(|(k, why, hash)| (k.to_string(), why.to_string(), hash)),
            );
            (d.state, rejected, deny)
        })
        .await;
        let (state, rejected, deny) =
            decoded.map_err(|e| Error::Kernel(format!("decoding the store's revision: {e}")))?;
        let revision = config.config_revision().max(deny.newest());
        self.log_rejected(revision, &rejected);
        let entries = state.deny.len();
        let a = agent.clone();
        let done = tokio::task::spawn_blocking(move || a.apply_store(revision, state)).await;
        self.view_mut().applies_total += 1;
        match done {
            Ok(Ok(_)) | Ok(Err(Error::NotConverged(_))) => {
                // Saved and in memory (a kernel hiccup is retried by the agent).
                self.view_mut().applied_revision = Some(revision);
                self.applied.send_replace(revision);
                self.changed.notify_one();
                if changes >= 1000 {
                    log::info!(
                        "store revision {revision} applied: {changes} deny list changes at once ({entries} entries) in {:?}",
                        started.elapsed()
                    );
                }
            }
            Ok(Err(e)) => {
                self.view_mut().refused_revisions_total += 1;
                log::warn!("configuration revision {revision} not applied: {e}");
                agent.record(format!("store revision {revision} refused: {e}"));
            }
            Err(e) => log::warn!("applying revision {revision}: {e}"),
        }
        Ok(deny)
    }

    /// The rejected keys shown in `lb stats`; each key and value logged and counted once.
    fn log_rejected(&self, revision: i64, rejected: &[(String, String, u64)]) {
        let mut logged = self.logged.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v = self.view_mut();
        v.rejected = rejected
            .iter()
            .map(|(key, why, _)| format!("{key}: {why}"))
            .collect();
        for (key, why, hash) in rejected {
            if logged.insert((key.clone(), *hash)) {
                v.rejected_total += 1;
                log::warn!(
                    "etcd key {} rejected at revision {revision}: {} (a VIP or deny entry keeps its last good value unless its address is refused)",
                    escaped(key),
                    escaped(why)
                );
            }
        }
        logged.retain(|(k, _)| rejected.iter().any(|(key, _, _)| key == k));
    }
}
