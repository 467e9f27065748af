//! The status page behind the metrics listener: `GET /` is one self-contained HTML page (no
//! external assets) that polls `GET /status.json` every second. Rates are computed here from
//! one-second samples of the counter maps, so every viewer sees the same figures.
use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use crate::{
    Error,
    api::server::SharedNode,
    protocol::{Rates, StatsView, StatusView},
};

/// The page itself.
pub const PAGE: &str = include_str!("status.html");

/// The latest rates, shared by the sampler and the page.
pub type SharedRates = Arc<Mutex<Rates>>;

/// Packets per second between two samples `elapsed` apart. Counters that went down (an id
/// reused for a new backend starts from zero) count as zero, not as a huge rate.
pub fn rates(before: &StatsView, after: &StatsView, elapsed: Duration) -> Rates {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let per_sec = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    let mut out = Rates::default();
    for v in &after.vips {
        let Some(old) = before.vips.iter().find(|o| o.vip == v.vip) else {
            continue;
        };
        out.vips
            .insert(v.vip.to_string(), per_sec(old.packets, v.packets));
        for b in &v.backends {
            if let Some(ob) = old.backends.iter().find(|o| o.address == b.address) {
                out.backends.insert(
                    format!("{} {}", v.vip, b.address),
                    per_sec(ob.packets, b.packets),
                );
            }
        }
    }
    out
}

/// Samples the counters every second into `shared` until the task is dropped. Map reads run
/// on a blocking thread.
pub async fn sample(node: SharedNode, shared: SharedRates) {
    let mut prev: Option<(Instant, StatsView)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let n = node.clone();
        let Ok(Ok(now)) = tokio::task::spawn_blocking(move || n.stats()).await else {
            continue;
        };
        let at = Instant::now();
        if let Some((t, before)) = &prev {
            let r = rates(before, &now, at.duration_since(*t));
            *shared.lock().unwrap_or_else(PoisonError::into_inner) = r;
        }
        prev = Some((at, now));
    }
}

/// What the page shows.
pub fn view(node: &SharedNode, shared: &SharedRates) -> Result<StatusView, Error> {
    let stats = node.stats()?;
    let agent = node.agent();
    let vips = agent.core().list();
    Ok(StatusView {
        version: env!("CARGO_PKG_VERSION").to_string(),
        iface: agent.iface().to_string(),
        vips,
        stats,
        rates: shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
        events: agent.events(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{AgentStatus, BackendStats, VipStats};

    fn sample(packets: u64, backend: u64) -> StatsView {
        StatsView {
            global: Default::default(),
            vips: vec![VipStats {
                vip: "10.0.0.10:80/tcp".parse().expect("vip"),
                packets,
                bytes: 0,
                new_flows: 0,
                backends: vec![BackendStats {
                    address: "10.0.0.2".parse().expect("ip"),
                    packets: backend,
                    bytes: 0,
                }],
            }],
            agent: AgentStatus::default(),
            store: None,
        }
    }

    #[test]
    fn rates_are_per_second_and_never_negative() {
        let r = rates(&sample(100, 50), &sample(300, 10), Duration::from_secs(2));
        assert_eq!(r.vips["10.0.0.10:80/tcp"], 100.0);
        assert_eq!(r.backends["10.0.0.10:80/tcp 10.0.0.2"], 0.0);
    }
}
