//! The node: the composition root of a running agent. It owns the [`Agent`], the link to the
//! fleet's store in store mode (the agent knows nothing of the fleet) and the background tasks
//! that keep both in line with the world ([`tasks`]). The API server and the metrics page
//! answer from it; `lb run` only wires it to the data plane, the listeners and the signals.
pub mod tasks;

use std::sync::{Arc, OnceLock};

use crate::{
    Error,
    agent::{Agent, Changed, probe::OnFlip},
    announce::Announcer,
    fleet::{Fleet, FleetConfig},
    protocol::{ClusterView, Command, StatsView},
};

pub use tasks::Tasks;

/// A running node: its agent and, in store mode, its fleet.
pub struct Node {
    agent: Arc<Agent>,
    fleet: Option<Arc<Fleet>>,
    /// `--announce-table`: the VIP routes for the BGP speaker.
    announce: OnceLock<Arc<Announcer>>,
    /// The migration that made the pinned maps, from their record (set once at start).
    migration: std::sync::OnceLock<crate::protocol::MigrationView>,
}

impl Node {
    /// A node around `agent`, following the fleet's store at `store` when given (serving the
    /// revision the agent saved until it has caught up).
    pub fn new(agent: Agent, store: Option<FleetConfig>) -> Result<Arc<Self>, Error> {
        let fleet = match store {
            None => None,
            Some(cfg) => Some(Fleet::new(cfg, agent.store_revision())?),
        };
        Ok(Arc::new(Node {
            agent: Arc::new(agent),
            fleet,
            announce: OnceLock::new(),
            migration: std::sync::OnceLock::new(),
        }))
    }

    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    /// The fleet's store link in store mode.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref()
    }

    /// Announces the VIPs through `announcer` (set once, before [`Node::start`]).
    pub fn set_announcer(&self, announcer: Arc<Announcer>) {
        if let Some(f) = &self.fleet {
            let _ = f.announcer.set(announcer.clone());
        }
        let _ = self.announce.set(announcer);
    }

    /// The announcer, when the node announces its VIPs.
    pub fn announcer(&self) -> Option<&Arc<Announcer>> {
        self.announce.get()
    }

    /// What the health probes call after a flip: in a fleet the verdict is the majority's,
    /// so the others are told now, not at the next status round.
    pub fn on_flip(&self) -> OnFlip {
        let fleet = self.fleet.clone();
        Arc::new(move || {
            if let Some(f) = &fleet {
                f.changed();
            }
        })
    }

    /// `lb stats`: the agent's counters and state, and the store link in store mode. Map
    /// reads: call it from a blocking thread.
    pub fn stats(&self) -> Result<StatsView, Error> {
        let mut stats = self.agent.stats()?;
        stats.store = self.fleet.as_ref().map(|f| f.view());
        stats.announce = self.announcer().map(|a| a.view());
        stats.agent.migration = self.migration.get().cloned();
        Ok(stats)
    }

    /// Says which migration made the pinned maps (`lb stats`, the status page).
    pub fn set_migration(&self, m: crate::protocol::MigrationView) {
        let _ = self.migration.set(m);
    }

    /// Executes `cmd` and says at which store revision. In store mode the change goes to
    /// etcd and every node (this one too) applies it from there; `reconcile` is about this
    /// node's kernel and stays local, as does every command without a store.
    pub async fn execute(&self, cmd: Command) -> (Result<Changed, Error>, Option<i64>) {
        // VIPs are checked against the node's addresses as they are now.
        self.agent.refresh_own_addrs().await;
        match &self.fleet {
            // The deny list in store mode is the fleet's: its own keys, written without
            // the whole configuration's compare.
            Some(fleet) if matches!(cmd, Command::DenyAdd { .. } | Command::DenyRemove { .. }) => {
                match fleet.execute_deny(&self.agent, &cmd).await {
                    Ok((c, rev)) => (Ok(c), rev),
                    Err(e) => (Err(e), None),
                }
            }
            Some(fleet) if !matches!(cmd, Command::Reconcile) => {
                match fleet.execute(&self.agent, &cmd).await {
                    Ok((c, rev)) => (Ok(c), rev),
                    Err(e) => (Err(e), None),
                }
            }
            _ => {
                // It writes the state file: on a blocking thread.
                let a = self.agent.clone();
                let r = match tokio::task::spawn_blocking(move || a.execute(&cmd)).await {
                    Ok(r) => r,
                    Err(e) => Err(Error::Kernel(format!("the change did not finish: {e}"))),
                };
                (r, None)
            }
        }
    }

    /// `lb cluster status`: every live node's status, and what disagrees.
    pub async fn cluster(&self) -> Result<ClusterView, Error> {
        match &self.fleet {
            None => Err(Error::Invalid(
                "this agent runs without --store: there is no cluster to show".into(),
            )),
            Some(f) => f.cluster().await,
        }
    }
}
