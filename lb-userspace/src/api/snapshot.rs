//! The one snapshot `/metrics` and the status page are served from. Reading the counters is a
//! syscall per VIP and backend, so it is done at most once per [`MAX_AGE`] however many
//! clients scrape: the first request that finds the snapshot older takes it again on a
//! blocking thread while holding an async mutex; requests arriving meanwhile wait on that
//! mutex (parked tasks, not parked workers) and are answered from the fresh snapshot. The
//! page and the metrics are rendered once per snapshot, so a scrape costs a copy of bytes.
//!
//! Taken on demand rather than by a timer, so the first scrape after a quiet spell shows the
//! present, not a second-old view (scripts that change something and then scrape see it).
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::body::Bytes;
use tokio::sync::Mutex;

use crate::{
    Error,
    api::{SharedNode, status},
    metrics,
    protocol::{StatsView, StatusView},
};

/// The longest a scrape is answered from an earlier read of the counters.
pub const MAX_AGE: Duration = Duration::from_secs(1);

/// What one read of the agent rendered into, for every reader.
pub struct Snapshot {
    /// `/metrics`: Prometheus text, or why the counters could not be read.
    pub metrics: Result<Bytes, String>,
    /// `/status.json`, or why it could not be made.
    pub status: Result<Bytes, String>,
}

struct Latest {
    at: Instant,
    snapshot: Arc<Snapshot>,
}

struct State {
    latest: Option<Latest>,
    /// The counters at the previous read, for the page's rates.
    previous: Option<(Instant, StatsView)>,
}

/// The shared snapshot of one agent.
pub struct Snapshots {
    node: SharedNode,
    state: Mutex<State>,
    /// Reads of the counters so far (exported, so the once-a-second bound can be checked).
    refreshes: Arc<AtomicU64>,
}

impl Snapshots {
    pub fn new(node: SharedNode) -> Self {
        Snapshots {
            node,
            state: Mutex::new(State {
                latest: None,
                previous: None,
            }),
            refreshes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The snapshot, taken again first when it is older than [`MAX_AGE`].
    pub async fn get(&self) -> Arc<Snapshot> {
        let mut state = self.state.lock().await;
        if let Some(l) = &state.latest
            && l.at.elapsed() < MAX_AGE
        {
            return l.snapshot.clone();
        }
        let node = self.node.clone();
        // Cloned, not taken: a scraper that goes away mid-read drops this future, and the
        // next one still has the previous counters for the rates.
        let previous = state.previous.clone();
        let refreshes = self.refreshes.clone();
        let taken = tokio::task::spawn_blocking(move || take(&node, previous, &refreshes)).await;
        let (snapshot, previous) = match taken {
            Ok(t) => t,
            Err(e) => {
                let why = format!("reading the counters did not finish: {e}");
                let s = Snapshot {
                    metrics: Err(why.clone()),
                    status: Err(why),
                };
                (s, state.previous.clone())
            }
        };
        let snapshot = Arc::new(snapshot);
        // A failed read is kept as long as a good one, so a broken map is not read again by
        // every waiting scraper.
        state.latest = Some(Latest {
            at: Instant::now(),
            snapshot: snapshot.clone(),
        });
        state.previous = previous;
        snapshot
    }
}

/// Reads the agent once and renders both pages. Blocking (map reads).
fn take(
    node: &SharedNode,
    previous: Option<(Instant, StatsView)>,
    refreshes: &AtomicU64,
) -> (Snapshot, Option<(Instant, StatsView)>) {
    let n = refreshes.fetch_add(1, Ordering::Relaxed) + 1;
    let stats = match node.stats() {
        Ok(s) => s,
        Err(e) => {
            let why = e.to_string();
            let s = Snapshot {
                metrics: Err(why.clone()),
                status: Err(why),
            };
            return (s, previous);
        }
    };
    let at = Instant::now();
    let agent = node.agent();
    let list = agent.core().list();
    let rates = previous
        .as_ref()
        .map(|(t, before)| status::rates(before, &stats, at.duration_since(*t)))
        .unwrap_or_default();
    // A walk of the sampled drops (bounded by `lb_common::TOP_SOURCES_ENTRIES`), here with the
    // other map reads: once a snapshot, on this blocking thread, outside the core's lock.
    // Unreadable (no data plane in fakes, a map error), the page leaves the table out rather
    // than failing the whole snapshot.
    let top = agent.top_sources().ok();
    let metrics = metrics::render(&stats, &list, top.as_ref(), n)
        .map(Bytes::from)
        .map_err(|e| e.to_string());
    let view = StatusView {
        version: env!("CARGO_PKG_VERSION").to_string(),
        iface: agent.iface().to_string(),
        vips: list,
        stats,
        rates,
        events: agent.events(),
        top_sources: top,
    };
    let status = serde_json::to_vec(&view)
        .map(Bytes::from)
        .map_err(|e| Error::Invalid(e.to_string()).to_string());
    let stats = view.stats;
    (Snapshot { metrics, status }, Some((at, stats)))
}
