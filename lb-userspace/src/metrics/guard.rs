//! The guard's top dropped sources (`lb stats --top-sources`) as a bounded gauge family.
use prometheus_client::{
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use super::Labels;
use crate::protocol::TopSourcesView;

/// One gauge per source and reason among the ten sources the guard dropped most in the last
/// minute: at most ten sources times the guard's four reasons, so the label set stays small
/// however many sources a flood spoofs. A source leaves the page once it drops out of the ten
/// or its drops age out of the minute.
pub(super) fn top_source_metrics(reg: &mut Registry, top: &TopSourcesView) {
    let dropped = Family::<Labels, Gauge>::default();
    reg.register(
        "guard_top_source_dropped",
        format!(
            "Estimated drops in the last {} s of the sources the guard dropped most, by reason \
             (1 in {} drops sampled in the kernel; at most {} sources)",
            top.window_s,
            top.sample_every,
            crate::agent::top_sources::TOP_N
        ),
        dropped.clone(),
    );
    for s in &top.sources {
        for (reason, n) in &s.reasons {
            dropped
                .get_or_create(&vec![
                    ("source".to_string(), s.source.to_string()),
                    ("reason".to_string(), reason.clone()),
                ])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::protocol::{AgentStatus, StatsView, TopSource};

    #[test]
    fn the_top_sources_are_gauges_by_source_and_reason() {
        let stats = StatsView {
            global: BTreeMap::new(),
            vips: Vec::new(),
            agent: AgentStatus::default(),
            store: None,
            announce: None,
            capture: None,
        };
        let top = TopSourcesView {
            window_s: 60,
            sample_every: 16,
            sources: vec![
                TopSource {
                    source: "198.18.7.1".parse().unwrap(),
                    dropped: 320,
                    samples: 20,
                    reasons: BTreeMap::from([
                        ("dropped_source_rate".to_string(), 288),
                        ("dropped_vip_rate".to_string(), 32),
                    ]),
                },
                TopSource {
                    source: "2001:db8::7".parse().unwrap(),
                    dropped: 16,
                    samples: 1,
                    reasons: BTreeMap::from([("dropped_source_denied".to_string(), 16)]),
                },
            ],
        };
        let page = super::super::render(&stats, &[], Some(&top), 1).unwrap();
        for line in [
            "lb_guard_top_source_dropped{source=\"198.18.7.1\",reason=\"dropped_source_rate\"} 288",
            "lb_guard_top_source_dropped{source=\"198.18.7.1\",reason=\"dropped_vip_rate\"} 32",
            "lb_guard_top_source_dropped{source=\"2001:db8::7\",reason=\"dropped_source_denied\"} 16",
        ] {
            assert!(page.lines().any(|l| l == line), "{line} in\n{page}");
        }
        assert!(page.contains("# TYPE lb_guard_top_source_dropped gauge"));
        // Not read: no family at all.
        let page = super::super::render(&stats, &[], None, 1).unwrap();
        assert!(!page.contains("guard_top_source"), "{page}");
    }
}
