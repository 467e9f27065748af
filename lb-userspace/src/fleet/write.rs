//! Changes in store mode: the command is applied to the configuration read from etcd and
//! written back in one transaction that only succeeds if nobody wrote in between. Edits
//! (`vip`, `backend`) are read again and retried on a conflict, so two operators' edits both
//! land; `apply` replaces the whole configuration, so it is refused instead (with
//! `if_revision`, also when anything changed since the operator's dry run).
use std::{sync::Arc, time::Duration};

use crate::{
    Error,
    agent::{Agent, Changed},
    fleet::{Fleet, schema, store::Snapshot},
    model::DesiredState,
    protocol::Command,
};

/// Attempts of an edit against a configuration that keeps changing.
const ATTEMPTS: usize = 8;
/// How long a writer waits to see its change applied on this node.
pub(super) const SEE_OWN_WRITE: Duration = Duration::from_secs(3);

impl Fleet {
    /// Executes the configuration command `cmd` against the store; returns what changed and
    /// the revision written (or planned against, for a dry run).
    pub async fn execute(
        &self,
        agent: &Arc<Agent>,
        cmd: &Command,
    ) -> Result<(Changed, Option<i64>), Error> {
        let store = self.store()?;
        for _ in 0..ATTEMPTS {
            let snap = store.snapshot(None).await?;
            let at = snap.config_revision();
            let (replace, dry_run, if_revision) = match cmd {
                Command::Apply {
                    dry_run,
                    if_revision,
                    ..
                } => (true, *dry_run, *if_revision),
                _ => (false, false, None),
            };
            if let Some(want) = if_revision
                && want != at
            {
                return Err(Error::Conflict(format!(
                    "the configuration is at revision {at}, not {want} as planned: run `lb apply --dry-run` again and review the new plan"
                )));
            }
            // Decoding, the edit, this node's rules (capacity, ids) and the plan (Maglev
            // tables for every touched VIP) take milliseconds on a large configuration: on a
            // blocking thread, so scrapes and probes keep their workers.
            let (keys, a, c) = (self.keys.clone(), agent.clone(), cmd.clone());
            let (snap, prepared) = tokio::task::spawn_blocking(move || {
                let r = prepare(&keys, &snap, &a, &c);
                (snap, r)
            })
            .await
            .map_err(|e| Error::Kernel(format!("planning the change: {e}")))?;
            let (changed, writes) = prepared?;
            if dry_run || writes.is_empty() {
                return Ok((changed, Some(at)));
            }
            match store.commit(&snap, &writes).await? {
                Some(rev) => {
                    if !self.applied_at_least(rev, SEE_OWN_WRITE).await {
                        log::warn!(
                            "revision {rev} written but not applied here within {SEE_OWN_WRITE:?}"
                        );
                    }
                    agent.record(format!("{} (store revision {rev})", cmd.describe()));
                    return Ok((changed, Some(rev)));
                }
                None if replace => {
                    return Err(Error::Conflict(format!(
                        "the configuration changed while this apply was planned at revision {at}: run it again to see the new plan"
                    )));
                }
                None => continue,
            }
        }
        Err(Error::Conflict(format!(
            "the configuration kept changing: gave up after {ATTEMPTS} attempts"
        )))
    }
}

/// `cmd` applied to the configuration in `snap`: what it changes on this node (checked by its
/// rules, against what it serves now) and the writes that make it. Blocking (CPU-bound).
fn prepare(
    keys: &schema::Keys,
    snap: &Snapshot,
    agent: &Agent,
    cmd: &Command,
) -> Result<(Changed, Vec<schema::Write>), Error> {
    // Decoded by this node's rules, as its follower does: a VIP it refuses (outside its pools,
    // on its own address) is in neither side, so it is neither "added" by this change nor
    // touched by its writes.
    let rules = agent.core().address_rules();
    let current = schema::decode_checked(keys, &snap.vips, &DesiredState::default(), &|v| {
        rules.check(v.ip)
    })
    .state;
    let new = crate::agent::ops::edit(&current, cmd)?.unwrap_or_else(|| current.clone());
    new.validate().map_err(Error::Invalid)?;
    let plan = agent.plan(new.clone())?;
    let writes = schema::encode(keys, &current, &new).map_err(Error::Invalid)?;
    Ok((
        Changed {
            plan,
            no_mac: Vec::new(),
        },
        writes,
    ))
}
