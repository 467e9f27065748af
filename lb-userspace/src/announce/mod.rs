//! VIPs announced by BGP (`lb run --announce-table N`). The agent decides what is announced
//! ([`gate`]) and keeps one route per announced address in a kernel routing table it owns
//! ([`routes`]); a BGP speaker installed beside it (bird, `packaging/bird/bird.conf`) exports
//! that table to the routers, adds the GRACEFUL_SHUTDOWN community to draining routes, and
//! runs BFD. The agent reads the speaker's sessions back ([`speaker`]) to show them.
//!
//! Routes live in the kernel, not in the agent: an agent killed with kill -9 leaves them (and
//! the pinned program keeps forwarding), so the routers keep sending; a dead node's routes go
//! with its BGP sessions, which BFD ends within a second.
pub mod drain;
pub mod gate;
pub mod metrics;
pub mod routes;
pub mod speaker;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    Error,
    agent::Agent,
    announce::{
        drain::Drain,
        gate::{Gate, Inputs, VipAnnounce},
        speaker::Session,
    },
    model::{Serving, VipAddr},
};

/// How often the gate runs.
const ROUND: Duration = Duration::from_millis(100);
/// How often the table is read back while nothing changes.
const RECHECK: Duration = Duration::from_secs(5);
/// How often the speaker is asked for its sessions.
const SPEAKER_PERIOD: Duration = Duration::from_secs(1);

/// `lb run`'s announce options.
#[derive(Clone, Debug)]
pub struct AnnounceConfig {
    /// The kernel routing table the agent owns.
    pub table: u32,
    /// Serving backends a VIP needs to be announced, unless it sets its own.
    pub min_serving: usize,
    /// How long an address must qualify again before it is announced after a withdrawal.
    pub hold_down: Duration,
    /// Default time a drain announces with the graceful-shutdown community.
    pub drain_time: Duration,
    /// The speaker's control socket (bird), for the sessions; `None`: not read.
    pub speaker: Option<PathBuf>,
    /// Where the drain is kept.
    pub drain_file: PathBuf,
}

/// The drain as shown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainView {
    pub since_unix: u64,
    pub withdraw_after_s: u64,
    /// `draining` (announced with the community) or `drained` (withdrawn).
    pub phase: String,
}

/// What the node announces, why, and its BGP sessions (`GET /v1/announce`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AnnounceView {
    pub table: u32,
    pub min_serving: usize,
    pub hold_down_ms: u64,
    #[serde(default)]
    pub drain: Option<DrainView>,
    pub vips: Vec<VipAnnounce>,
    /// As the speaker reports them (empty when it is not read).
    pub sessions: Vec<Session>,
    /// Why the speaker or the table could not be read or written, while so.
    #[serde(default)]
    pub speaker_error: Option<String>,
    #[serde(default)]
    pub table_error: Option<String>,
    /// Routes added or deleted in the table since the agent started.
    pub route_changes_total: u64,
}

impl AnnounceView {
    /// The part a fleet node publishes in its status: each VIP's state (with why) and each
    /// session's.
    pub fn published(&self) -> crate::protocol::NodeAnnounce {
        crate::protocol::NodeAnnounce {
            vips: self.vips.iter().map(|v| (v.vip, v.state_line())).collect(),
            sessions: self
                .sessions
                .iter()
                .map(|s| (s.peer.clone(), s.state.clone()))
                .collect(),
        }
    }
}

/// `lb node drain|undrain`, as sent to the agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    pub drain: bool,
    /// Seconds before the withdrawal (`None`: `--drain-time`).
    #[serde(default)]
    pub withdraw_after_s: Option<u64>,
}

/// The node's announcer: its options, the drain and the latest view.
pub struct Announcer {
    pub config: AnnounceConfig,
    drain: Mutex<Option<Drain>>,
    view: Mutex<AnnounceView>,
    /// Wakes the loop at once after a drain change.
    wake: tokio::sync::Notify,
}

impl Announcer {
    /// Reads the saved drain. Blocking (a file read).
    pub fn new(config: AnnounceConfig) -> Result<Arc<Self>, Error> {
        let drain = drain::load(&config.drain_file)?;
        let view = AnnounceView {
            table: config.table,
            min_serving: config.min_serving,
            hold_down_ms: u64::try_from(config.hold_down.as_millis()).unwrap_or(u64::MAX),
            ..AnnounceView::default()
        };
        Ok(Arc::new(Announcer {
            config,
            drain: Mutex::new(drain),
            view: Mutex::new(view),
            wake: tokio::sync::Notify::new(),
        }))
    }

    pub fn view(&self) -> AnnounceView {
        self.view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn drain(&self) -> Option<Drain> {
        *self.drain.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drains or undrains the node, saved before it takes effect. Blocking (fsync).
    pub fn set_drain(&self, req: &DrainRequest) -> Result<Option<Drain>, Error> {
        let new = req.drain.then(|| Drain {
            since_unix_ms: drain::now_unix_ms(),
            withdraw_after_s: req
                .withdraw_after_s
                .unwrap_or(self.config.drain_time.as_secs()),
        });
        // A drain already under way keeps its start: asking twice does not restart the clock.
        let new = match (self.drain(), new) {
            (Some(old), Some(_)) if req.withdraw_after_s.is_none() => Some(old),
            (_, n) => n,
        };
        drain::save(&self.config.drain_file, new.as_ref())?;
        *self.drain.lock().unwrap_or_else(PoisonError::into_inner) = new;
        self.wake.notify_one();
        Ok(new)
    }

    /// Runs until dropped: every round decides and syncs the table, every second reads the
    /// speaker's sessions.
    pub async fn run(self: Arc<Self>, agent: Arc<Agent>) {
        let handle = match rtnetlink::new_connection() {
            Ok((conn, handle, _)) => {
                tokio::spawn(conn);
                handle
            }
            Err(e) => {
                log::error!("announcing: opening a netlink socket: {e}");
                self.set_error(|v| v.table_error = Some(format!("opening netlink: {e}")));
                return;
            }
        };
        let table = self.config.table;
        let found = match routes::dump(&handle, table).await {
            Ok(r) => r.keys().copied().collect(),
            Err(e) => {
                log::warn!("{e}");
                BTreeSet::new()
            }
        };
        if !found.is_empty() {
            log::info!(
                "keeping the {} route(s) found in table {table} through the start grace",
                found.len()
            );
        }
        let mut gate = Gate::new(
            self.config.min_serving,
            self.config.hold_down,
            &found,
            Instant::now(),
            self.config.hold_down,
        );
        let mut last_speaker: Option<Instant> = None;
        let mut synced = None;
        loop {
            self.round(&agent, &handle, &mut gate, &mut synced).await;
            if self.config.speaker.is_some()
                && last_speaker.is_none_or(|t| t.elapsed() >= SPEAKER_PERIOD)
            {
                last_speaker = Some(Instant::now());
                self.read_speaker().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(ROUND) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    fn set_error(&self, f: impl FnOnce(&mut AnnounceView)) {
        f(&mut self.view.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// One round: decide, bring the table in line, update the view. `synced`: what the table
    /// was last made to hold, and when.
    async fn round(
        &self,
        agent: &Arc<Agent>,
        handle: &rtnetlink::Handle,
        gate: &mut Gate,
        synced: &mut Option<(BTreeMap<std::net::IpAddr, gate::Want>, Instant)>,
    ) {
        let a = agent.clone();
        // The core's lock may be held by a change writing maps: read it on a blocking thread.
        let read = tokio::task::spawn_blocking(move || {
            let core = a.core();
            let ready = core.not_converged().map(str::to_string);
            let vips = core.list();
            let serving: BTreeMap<VipAddr, usize> = vips
                .iter()
                .map(|v| {
                    let n = v
                        .backends
                        .iter()
                        .filter(|b| b.serving == Serving::Serving)
                        .count();
                    (v.vip, n)
                })
                .collect();
            let min_serving: BTreeMap<VipAddr, usize> = vips
                .iter()
                .filter_map(|v| Some((v.vip, v.announce_min_serving? as usize)))
                .collect();
            (ready, serving, min_serving)
        })
        .await;
        let Ok((ready, serving, min_serving)) = read else {
            return;
        };
        let drain = self.drain();
        let phase = drain.map(|d| d.phase(drain::now_unix_ms()).0);
        let inputs = Inputs {
            ready: match &ready {
                None => Ok(()),
                Some(w) => Err(w.as_str()),
            },
            serving: &serving,
            min_serving: &min_serving,
            drain: phase,
        };
        let (want, vips) = gate.decide(Instant::now(), &inputs);
        let table = self.config.table;
        // The table is read again only when the wish changes or every few seconds (a route
        // deleted by hand is put back): a dump walks every table of the node.
        let stale = synced
            .as_ref()
            .is_none_or(|(w, at)| *w != want || at.elapsed() >= RECHECK);
        let result = if stale {
            let r = match routes::dump(handle, table).await {
                Ok(have) => routes::sync(handle, table, &have, &want).await,
                Err(e) => Err(e),
            };
            *synced = r.is_ok().then(|| (want.clone(), Instant::now()));
            r
        } else {
            Ok(0)
        };
        self.record(result, vips, drain, phase);
    }

    /// The round's outcome into the view.
    fn record(
        &self,
        synced: Result<usize, Error>,
        vips: Vec<VipAnnounce>,
        drain: Option<Drain>,
        phase: Option<gate::DrainPhase>,
    ) {
        let mut v = self.view.lock().unwrap_or_else(PoisonError::into_inner);
        match synced {
            Ok(n) => {
                v.route_changes_total += n as u64;
                v.table_error = None;
            }
            Err(e) => {
                if v.table_error.as_deref() != Some(e.to_string().as_str()) {
                    log::warn!("{e}");
                }
                v.table_error = Some(e.to_string());
            }
        }
        v.vips = vips;
        v.drain = drain.map(|d| DrainView {
            since_unix: d.since_unix_ms / 1000,
            withdraw_after_s: d.withdraw_after_s,
            phase: match phase {
                Some(gate::DrainPhase::Drained) => "drained",
                _ => "draining",
            }
            .into(),
        });
    }

    async fn read_speaker(&self) {
        let Some(socket) = &self.config.speaker else {
            return;
        };
        let r = speaker::sessions(socket).await;
        let mut v = self.view.lock().unwrap_or_else(PoisonError::into_inner);
        match r {
            Ok(s) => {
                v.sessions = s;
                v.speaker_error = None;
            }
            Err(e) => {
                // Unknown, not down: a session the agent cannot see is shown as such.
                v.sessions.clear();
                v.speaker_error = Some(e.to_string());
            }
        }
    }
}
