//! Prometheus text exposition of the counters and backend state (prometheus-client), on an
//! optional read-only TCP listener with the API's connection limits and timeouts. A fresh
//! registry is filled from the maps for each snapshot ([`crate::api::snapshot`]: at most one
//! read of the counters per second, whatever the number of scrapers), so the counters carry
//! the kernel's absolute values; the agent's lock is held only while copying the listing and
//! the ids, never across the map reads.
mod agent;
mod fleet;
mod guard;
mod serve;
mod traffic;

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

pub use self::serve::{bind, serve};
use crate::{
    Error,
    protocol::{StatsView, TopSourcesView, VipView},
};

type Labels = Vec<(String, String)>;

fn family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

/// The metrics page for `stats`, the listing `list` and the guard's top dropped sources
/// `top` (`None`: not read), read in the `refreshes`th snapshot. Families are registered in
/// the order the page lists them.
pub fn render(
    stats: &StatsView,
    list: &[VipView],
    top: Option<&TopSourcesView>,
    refreshes: u64,
) -> Result<String, Error> {
    let mut reg = Registry::with_prefix("lb");
    traffic::outcome_metrics(&mut reg, &stats.global);
    traffic::traffic_metrics(&mut reg, &stats.vips);
    if let Some(top) = top {
        guard::top_source_metrics(&mut reg, top);
    }
    let backends = traffic::BackendGauges::register(&mut reg);
    agent::agent_metrics(&mut reg, &stats.agent);
    agent::nat_pool_metrics(&mut reg, &stats.agent);
    fleet::fleet_metrics(&mut reg, list, stats.store.as_ref());
    if let Some(a) = &stats.announce {
        crate::announce::metrics::register(&mut reg, a);
    }
    if let Some(c) = &stats.capture {
        traffic::capture_metrics(&mut reg, c);
    }
    backends.fill(list);
    let reads = Counter::<u64>::default();
    reg.register(
        "snapshot_reads",
        "Reads of the counter maps for /metrics and the status page (at most one a second)",
        reads.clone(),
    );
    reads.inc_by(refreshes);
    let mut out = String::new();
    encode(&mut out, &reg).map_err(|e| Error::Invalid(format!("encoding metrics: {e}")))?;
    Ok(out)
}
