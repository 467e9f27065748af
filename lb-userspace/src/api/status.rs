//! The status page behind the metrics listener: `GET /` is one self-contained HTML page (no
//! external assets) that polls `GET /status.json` every second. Its data comes from the
//! shared snapshot ([`crate::api::snapshot`]); rates are computed between two consecutive
//! snapshots, so every viewer sees the same figures.
use std::time::Duration;

use crate::protocol::{Rates, StatsView};

/// The page itself.
pub const PAGE: &str = include_str!("status.html");

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
        out.vip_new_flows
            .insert(v.vip.to_string(), per_sec(old.new_flows, v.new_flows));
        out.vip_guard_dropped.insert(
            v.vip.to_string(),
            per_sec(old.guard_dropped, v.guard_dropped),
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{AgentStatus, BackendStats, VipStats};

    fn sample(packets: u64, backend: u64) -> StatsView {
        sample_guard(packets, backend, 0, 0)
    }

    fn sample_guard(packets: u64, backend: u64, new_flows: u64, dropped: u64) -> StatsView {
        StatsView {
            global: Default::default(),
            vips: vec![VipStats {
                vip: "10.0.0.10:80/tcp".parse().expect("vip"),
                packets,
                bytes: 0,
                new_flows,
                guard_dropped: dropped,
                backends: vec![BackendStats {
                    address: "10.0.0.2".parse().expect("ip"),
                    packets: backend,
                    bytes: 0,
                }],
            }],
            agent: AgentStatus::default(),
            store: None,
            announce: None,
            capture: None,
        }
    }

    #[test]
    fn rates_are_per_second_and_never_negative() {
        let r = rates(&sample(100, 50), &sample(300, 10), Duration::from_secs(2));
        assert_eq!(r.vips["10.0.0.10:80/tcp"], 100.0);
        assert_eq!(r.backends["10.0.0.10:80/tcp 10.0.0.2"], 0.0);
        let r = rates(
            &sample_guard(0, 0, 10, 100),
            &sample_guard(0, 0, 50, 700),
            Duration::from_secs(2),
        );
        assert_eq!(r.vip_new_flows["10.0.0.10:80/tcp"], 20.0);
        assert_eq!(r.vip_guard_dropped["10.0.0.10:80/tcp"], 300.0);
    }
}
