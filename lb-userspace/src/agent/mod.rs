//! The agent: the desired state, the ids, health and MACs, kept in agreement with the state
//! file and the kernel maps.
//!
//! A change is validated and given ids ([`Core::prepare`], pure), saved to the state file
//! (blocking: callers run [`Agent::change`] on a blocking thread, with no state lock held,
//! so readers and health flips never wait for an fsync), then made live ([`Core::commit`]).
//! A failure before the file is written changes nothing; a kernel failure after it leaves the
//! change saved and in memory, reported as [`Error::NotConverged`] and retried by
//! [`Agent::retry`] until the kernel agrees.
pub mod core;
mod deny_change;
pub mod deny_file;
pub mod events;
mod fleet;
pub mod guard;
pub mod health;
pub mod kernel;
mod list;
mod nat;
pub mod neigh;
pub mod ops;
pub mod own_addrs;
pub mod probe;
mod prune;
pub mod reconcile;
pub mod second_chance;
pub mod state;
mod stats;
pub mod top_sources;
mod trace;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::{
    borrow::Cow,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

pub use self::{
    core::{Core, Prepared},
    fleet::ring_digest,
};
use crate::{
    Error,
    agent::{kernel::Kernel, neigh::Neighbours, state::StateStore},
    model::DesiredState,
    plan::VipPlan,
    protocol::Command,
};

pub struct Agent {
    core: Mutex<Core>,
    /// Serialises changes (and their state-file writes); never held by readers.
    writer: Mutex<()>,
    store: Box<dyn StateStore>,
    iface: String,
    neighbours: Mutex<Option<Box<dyn Neighbours>>>,
    events: Mutex<events::Events>,
    /// Store mode: the configuration revision the desired state was read at.
    store_revision: Mutex<Option<i64>>,
    /// NAT connections live at the last sweep (`u64::MAX`: no sweep has found any yet).
    nat_live: std::sync::atomic::AtomicU64,
    /// The NAT table's parts at the last sweep that found any connection.
    nat_table: Mutex<Option<crate::protocol::NatTableView>>,
    /// Each NAT pool address's connections at that sweep.
    nat_pool: Mutex<Vec<crate::protocol::NatAddrView>>,
    /// The version of the second-chance history last saved; held while saving, so an older
    /// snapshot never replaces a newer one.
    history_saved: Mutex<u64>,
}

/// What a change did.
#[derive(Clone, Debug, Default)]
pub struct Changed {
    pub plan: Vec<VipPlan>,
    /// Backends added by the change whose MAC is not known yet.
    pub no_mac: Vec<IpAddr>,
}

impl Agent {
    /// Loads the saved state and converges the kernel to it. A kernel that cannot be brought
    /// in line does not stop the start: the agent serves and retries (`lb stats` says so).
    pub fn start(
        kernel: Box<dyn Kernel>,
        store: Box<dyn StateStore>,
        iface: &str,
    ) -> Result<Self, Error> {
        let saved = store.load()?;
        let store_revision = saved.store_revision;
        let mut core = Core::new(kernel, saved)?;
        // The history is advisory: without it a restart adopts the kernel's previous
        // backends as long-serving (the rule before it existed).
        match store.load_history() {
            Ok(None) => {}
            Ok(Some(bytes)) => match second_chance::saved::decode(&bytes) {
                Ok(h) => core.restore_history(h),
                Err(e) => log::warn!("ignoring the saved second-chance history: {e}"),
            },
            Err(e) => log::warn!("ignoring the saved second-chance history: {e}"),
        }
        if let Err(e) = core.resync() {
            log::warn!("the data plane is not in line with the saved state yet: {e}");
        }
        Ok(Agent {
            core: Mutex::new(core),
            writer: Mutex::new(()),
            store,
            iface: iface.to_string(),
            neighbours: Mutex::new(None),
            events: Mutex::new(events::Events::default()),
            store_revision: Mutex::new(store_revision),
            nat_live: std::sync::atomic::AtomicU64::new(u64::MAX),
            nat_table: Mutex::new(None),
            nat_pool: Mutex::new(Vec::new()),
            history_saved: Mutex::new(0),
        })
    }

    /// Saves the second-chance history when it changed since the last save. Blocking (a
    /// file write, outside the core's lock): call it from a blocking thread. Called after
    /// every change and every second (health flips and window ends change it too).
    pub fn save_history(&self) -> Result<(), Error> {
        let mut saved = self
            .history_saved
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some((version, history)) = self.core().history_snapshot(*saved) else {
            return Ok(());
        };
        self.store
            .save_history(&second_chance::saved::encode(&history))?;
        *saved = version;
        Ok(())
    }

    /// Notes a change or a health flip for the status page.
    pub fn record(&self, what: impl Into<String>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(now, what.into());
    }

    /// The recent events, oldest first.
    pub fn events(&self) -> Vec<crate::protocol::Event> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .list()
    }

    /// Connects the neighbour table: from now on it is told which MACs are needed.
    pub fn set_neighbours(&self, n: Box<dyn Neighbours>) {
        *self
            .neighbours
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(n);
        self.want_macs();
    }

    /// Tells the neighbour table which addresses need MACs.
    fn want_macs(&self) {
        let wanted = self.core().wanted_macs();
        if let Some(n) = self
            .neighbours
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            n.want(wanted);
        }
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// The core, locked. Hold it briefly: no I/O but map syscalls under it.
    pub fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `f` over the core, on a blocking thread: for async tasks. A change holds the core's
    /// lock while it builds its tables and writes the maps, and an async worker waiting on it
    /// would stall every other task scheduled there.
    pub async fn with_core<T: Send + 'static>(
        self: &std::sync::Arc<Self>,
        f: impl FnOnce(&Core) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let a = self.clone();
        tokio::task::spawn_blocking(move || f(&a.core()))
            .await
            .map_err(|e| Error::Kernel(format!("reading the agent's state: {e}")))
    }

    /// Applies `cmd`: validated, saved, then made live. Blocking (it writes the state file):
    /// call it from a blocking thread.
    pub fn execute(&self, cmd: &Command) -> Result<Changed, Error> {
        if let Command::Reconcile = cmd {
            return self.core().resync().map(|()| Changed::default());
        }
        if let Command::Apply {
            state,
            dry_run: true,
            ..
        } = cmd
        {
            return Ok(Changed {
                plan: self.plan(state.clone())?,
                no_mac: Vec::new(),
            });
        }
        // Only `lb deny` edits the node's deny list, on a path of its own; every other
        // command works on a state without it (see `Prepared::keep_deny`).
        if let Command::DenyAdd { .. } | Command::DenyRemove { .. } = cmd {
            let changed = self.change_deny(cmd)?;
            self.record(cmd.describe());
            return Ok(changed);
        }
        let changed = self.change_at(None, true, |d| {
            crate::agent::ops::edit(d, cmd).map(|n| n.unwrap_or_else(|| d.clone()))
        })?;
        self.record(cmd.describe());
        Ok(changed)
    }

    /// What making `new` the desired state would do, checked by this node's rules (validity,
    /// capacity, ids); changes nothing. The plan is made outside the core's lock.
    pub fn plan(&self, new: DesiredState) -> Result<Vec<VipPlan>, Error> {
        new.validate().map_err(Error::Invalid)?;
        let prepared = self.core().prepare(new)?;
        Ok(prepared.plan())
    }

    /// Makes `f(current)` the desired state. See the module documentation for what a failure
    /// at each step leaves behind.
    pub fn change(
        &self,
        f: impl FnOnce(&DesiredState) -> Result<DesiredState, Error>,
    ) -> Result<Changed, Error> {
        self.change_at(None, false, f)
    }

    /// Makes the VIPs of config `state` the desired state (`lb run --config` at start),
    /// keeping the node's deny list, which a config file does not carry (as `lb apply`).
    pub fn apply_config(&self, state: DesiredState) -> Result<Changed, Error> {
        self.change_at(None, true, |_| Ok(state))
    }

    /// Store mode: makes `state`, read at configuration revision `revision`, the desired
    /// state (saved with its revision, so a restart says what it serves). Same path as every
    /// other change.
    pub fn apply_store(&self, revision: i64, state: DesiredState) -> Result<Changed, Error> {
        // The node-wide deny list is the fleet's too (`deny/` keys), so `state` carries it.
        self.change_at(Some(revision), false, |_| Ok(state))
    }

    /// The configuration revision last applied from the store (or saved before a restart).
    pub fn store_revision(&self) -> Option<i64> {
        *self
            .store_revision
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// `keep_deny`: `f` leaves the node's deny list alone and is given a state without it.
    fn change_at(
        &self,
        revision: Option<i64>,
        keep_deny: bool,
        f: impl FnOnce(&DesiredState) -> Result<DesiredState, Error>,
    ) -> Result<Changed, Error> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        // The edit on a copy, outside the core's lock: adding a million prefixes builds a
        // list of a million; readers wait only for the copy. The writer's lock keeps the
        // state it copies.
        let current = {
            let core = self.core();
            match keep_deny {
                true => DesiredState {
                    vips: core.desired().vips.clone(),
                    deny: Default::default(),
                },
                false => core.desired().clone(),
            }
        };
        let new = f(&current)?;
        let deny_changes = match keep_deny {
            true => Vec::new(),
            false => deny_file::diff(&current.deny, &new.deny),
        };
        let (mut prepared, vips_unchanged, same_vip_lists, guard, skip, core_sources) = {
            let core = self.core();
            let mut p = core.prepare(new)?;
            p.keep_deny = keep_deny;
            let vips_unchanged = p.desired.vips == core.desired().vips && p.ids == *core.ids();
            let same_vip_lists =
                guard::same_vip_sources(core.desired(), core.ids(), &p.desired, &p.ids);
            // No deny changes: the node's entries are the core's (with `keep_deny` the
            // state at hand has no list to compare).
            if deny_changes.is_empty() && same_vip_lists {
                p.sources = Some(core.sources());
            }
            let skip = guard::scopes_changing_hands(
                p.ids.vips.iter().map(|(v, id)| (v.key(), *id)),
                core.ids()
                    .vips
                    .iter()
                    .map(|(v, id)| (v.key(), *id))
                    .chain(core.kernel().view().vips.iter().map(|(k, id)| (*k, *id))),
            );
            let guard = core.kernel().guard_writer();
            (
                p,
                vips_unchanged,
                same_vip_lists,
                guard,
                skip,
                core.sources(),
            )
        };
        // Laid out with the core unlocked, from the core's entries where they carry over.
        if prepared.sources.is_none() {
            prepared.sources = if keep_deny {
                // The VIPs' lists changed, the node's did not.
                Some(Arc::new(guard::with_node_entries(
                    &prepared.desired,
                    &prepared.ids,
                    &core_sources,
                )))
            } else if same_vip_lists {
                // Only the node's list changed: the core's entries with its changes (a copy
                // rather than a million entries laid out one by one).
                let mut s = (*core_sources).clone();
                guard::apply_deny_changes(&mut s, &deny_changes);
                Some(Arc::new(s))
            } else {
                None
            };
        }
        drop(core_sources);
        let unchanged = vips_unchanged && deny_changes.is_empty();
        // Plan with the core unlocked; the writer's lock keeps the state it replaces.
        let plan = prepared.plan();
        let added: Vec<IpAddr> = prepared
            .desired
            .vips
            .values()
            .flat_map(|v| v.backends.keys().map(|a| a.ip))
            .collect();
        self.save(&prepared, &current, &deny_changes, vips_unchanged, revision)?;
        drop(current);
        if !unchanged {
            prewrite_sources(&mut prepared, guard.as_deref(), &skip);
        }
        let result = self.make_live(prepared, unchanged);
        self.want_macs();
        if let Err(e) = self.save_history() {
            log::warn!("saving the second-chance history: {e}");
        }
        result?;
        let no_mac = self.core().no_mac();
        Ok(Changed {
            plan,
            no_mac: added.into_iter().filter(|a| no_mac.contains(a)).collect(),
        })
    }

    /// Saves change `p` from `current`: the deny list's `deny_changes` first, then the state
    /// file when the VIPs, ids or store revision changed. A failed state file puts the deny
    /// list back, so a failure changes nothing saved.
    fn save(
        &self,
        p: &Prepared,
        current: &DesiredState,
        deny_changes: &[deny_file::DenyChange],
        vips_unchanged: bool,
        revision: Option<i64>,
    ) -> Result<(), Error> {
        let t = std::time::Instant::now();
        if !deny_changes.is_empty() {
            self.store
                .save_deny(deny_changes, &|| Cow::Borrowed(&p.desired.deny))?;
        }
        let saved_revision = self.store_revision();
        let new_revision = revision.is_some() && revision != saved_revision;
        if !vips_unchanged || new_revision {
            let mut file = p.state_file();
            file.store_revision = revision.or(saved_revision);
            if let Err(e) = self.store.save(&file) {
                if !deny_changes.is_empty() {
                    let undo = deny_file::diff(&p.desired.deny, &current.deny);
                    if let Err(u) = self
                        .store
                        .save_deny(&undo, &|| Cow::Borrowed(&current.deny))
                    {
                        log::warn!("putting the saved deny list back: {u}");
                    }
                }
                return Err(e);
            }
            if revision.is_some() {
                *self
                    .store_revision
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = revision;
            }
        }
        // Outside the core's lock (readers go on); said when large lists make it slow.
        if t.elapsed() > std::time::Duration::from_millis(100) {
            log::info!("state saved in {:?}", t.elapsed());
        }
        Ok(())
    }

    fn make_live(&self, prepared: Prepared, unchanged: bool) -> Result<(), Error> {
        let mut core = self.core();
        if unchanged {
            // Nothing to save; still a chance to catch the kernel up.
            if core.not_converged().is_some() {
                core.converge()?;
            }
        } else {
            core.commit(prepared)?;
        }
        Ok(())
    }

    /// Converges again when the last attempt failed, or when a second-chance window has
    /// ended (its previous backends are cleared); called every second.
    pub fn retry(&self) -> Result<(), Error> {
        let mut core = self.core();
        if core.not_converged().is_some() {
            core.resync()?;
        } else if core
            .next_window_end()
            .is_some_and(|t| t <= std::time::Instant::now())
        {
            core.converge()?;
        }
        Ok(())
    }
}

/// Lays out the guard's entries of the saved change `p` and writes those the tries lack,
/// before the core's lock is taken to make it live: a deny list of a million prefixes takes
/// seconds to write, and readers of the core (`lb vip list`, the status page) would wait
/// that long. Safe ahead of the commit: entries only add (a VIP reads its lists once its
/// flag is set, at the commit; the node's list is wanted at once), deletions wait for the
/// commit; entries under ids that change hands at the commit (`skip`) wait for it too, since
/// until then the id's old VIP reads them. The tables keep what is written here through any
/// convergence of the state before the change (`GuardTables::prewrite`). A failure is left
/// to the commit's convergence, which writes what is missing.
fn prewrite_sources(
    p: &mut Prepared,
    guard: Option<&Mutex<crate::dataplane::guard::GuardTables>>,
    skip: &std::collections::BTreeSet<u32>,
) {
    // The lists unchanged: the entries the core holds, already written.
    let sources = match p.sources.take() {
        Some(s) => s,
        None => Arc::new(guard::sources(&p.desired, &p.ids)),
    };
    if let Some(g) = guard
        && let Err(e) = g
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .prewrite(&sources, skip)
    {
        log::warn!("writing the source lists ahead of the change: {e}");
    }
    p.sources = Some(sources);
}
