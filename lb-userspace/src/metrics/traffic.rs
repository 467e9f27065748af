//! Packets and bytes by outcome and per VIP and backend, the backends' state from the
//! listing, and `lb capture`'s counts.
use std::collections::BTreeMap;

use prometheus_client::{
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{Labels, family};
use crate::{model::Serving, protocol::VipStats, protocol::VipView};

/// Packets and bytes by outcome, flow-table events and health-probe encapsulation.
pub(super) fn outcome_metrics(reg: &mut Registry, global: &BTreeMap<String, lb_common::Counter>) {
    let packets = family(reg, "packets", "Packets by outcome");
    let bytes = family(reg, "bytes", "Bytes by outcome");
    let flow_events = family(
        reg,
        "flow_events",
        "Flow-table events (see the README's Flow table section)",
    );
    let hc = family(
        reg,
        "hc_packets",
        "Health-probe packets by what the tunnel encapsulation (tc egress) did",
    );
    let flow_names: Vec<&str> = lb_common::FlowEvent::ALL.iter().map(|e| e.name()).collect();
    let hc_names: Vec<&str> = lb_common::HcStat::ALL.iter().map(|e| e.name()).collect();
    for (name, c) in global {
        if flow_names.contains(&name.as_str()) {
            flow_events
                .get_or_create(&vec![("event".into(), name.clone())])
                .inc_by(c.packets);
            continue;
        }
        if hc_names.contains(&name.as_str()) {
            hc.get_or_create(&vec![("outcome".into(), name.clone())])
                .inc_by(c.packets);
            continue;
        }
        packets
            .get_or_create(&vec![("reason".into(), name.clone())])
            .inc_by(c.packets);
        bytes
            .get_or_create(&vec![("reason".into(), name.clone())])
            .inc_by(c.bytes);
    }
}

/// `lb capture`: whether one runs, and the kernel's counts of the running or last one (they
/// start from zero when a capture starts).
pub(super) fn capture_metrics(reg: &mut Registry, c: &crate::capture::wire::CaptureStatus) {
    let running = Gauge::<i64>::default();
    reg.register(
        "capture_running",
        "1 while an `lb capture` runs",
        running.clone(),
    );
    running.set(i64::from(c.running));
    let packets = family(
        reg,
        "capture_packets",
        "Packets of the running or last capture: captured (records output), missed (over \
         --max-rate or the ring full), sampled_out (left out by --sample)",
    );
    for (what, n) in [
        ("captured", c.counts.emitted),
        ("missed", c.counts.missed),
        ("sampled_out", c.counts.sampled_out),
    ] {
        packets
            .get_or_create(&vec![("outcome".into(), what.into())])
            .inc_by(n);
    }
}

/// Packets, bytes and new flows per VIP; packets and bytes per backend.
pub(super) fn traffic_metrics(reg: &mut Registry, vips: &[VipStats]) {
    let vip_packets = family(reg, "vip_packets", "Packets forwarded per VIP");
    let vip_bytes = family(reg, "vip_bytes", "Bytes forwarded per VIP");
    let vip_flows = family(
        reg,
        "vip_new_flows",
        "Flows first remembered per VIP (a TCP connection once, at its handshake ACK)",
    );
    let vip_guard = family(
        reg,
        "vip_guard_dropped",
        "Packets the guard dropped per VIP (source lists and new-flow limits)",
    );
    let be_packets = family(reg, "backend_packets", "Packets forwarded per backend");
    let be_bytes = family(reg, "backend_bytes", "Bytes forwarded per backend");
    for v in vips {
        let l = vec![("vip".to_string(), v.vip.to_string())];
        vip_packets.get_or_create(&l).inc_by(v.packets);
        vip_bytes.get_or_create(&l).inc_by(v.bytes);
        vip_flows.get_or_create(&l).inc_by(v.new_flows);
        vip_guard.get_or_create(&l).inc_by(v.guard_dropped);
        for b in &v.backends {
            let l = vec![
                ("vip".to_string(), v.vip.to_string()),
                ("backend".to_string(), b.address.to_string()),
            ];
            be_packets.get_or_create(&l).inc_by(b.packets);
            be_bytes.get_or_create(&l).inc_by(b.bytes);
        }
    }
}

/// Each backend's state from the listing: up, weight, serving.
pub(super) struct BackendGauges {
    up: Family<Labels, Gauge>,
    weight: Family<Labels, Gauge>,
    serving: Family<Labels, Gauge>,
}

impl BackendGauges {
    pub(super) fn register(reg: &mut Registry) -> Self {
        let g = BackendGauges {
            up: Family::default(),
            weight: Family::default(),
            serving: Family::default(),
        };
        reg.register(
            "backend_up",
            "1 when the backend passes its health check (or has none)",
            g.up.clone(),
        );
        reg.register(
            "backend_weight",
            "Configured weight (0 while drained)",
            g.weight.clone(),
        );
        reg.register(
            "backend_serving",
            "1 when the backend takes new flows (up, not drained, weight > 0, MAC known)",
            g.serving.clone(),
        );
        g
    }

    pub(super) fn fill(&self, list: &[VipView]) {
        for v in list {
            for b in &v.backends {
                let l = vec![
                    ("vip".to_string(), v.vip.to_string()),
                    ("backend".to_string(), b.address.to_string()),
                ];
                // "down" (own probes) or "down (fleet)" (the fleet's majority).
                self.up
                    .get_or_create(&l)
                    .set(i64::from(!b.health.starts_with("down")));
                self.serving
                    .get_or_create(&l)
                    .set(i64::from(b.serving == Serving::Serving));
                self.weight
                    .get_or_create(&l)
                    .set(if b.drained { 0 } else { i64::from(b.weight) });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::wire::{CaptureStatus, Progress};
    use crate::protocol::{AgentStatus, StatsView};

    #[test]
    fn the_capture_counts_are_on_the_page() {
        let stats = StatsView {
            global: BTreeMap::new(),
            vips: Vec::new(),
            agent: AgentStatus::default(),
            store: None,
            announce: None,
            capture: Some(CaptureStatus {
                running: true,
                counts: Progress {
                    emitted: 7,
                    missed: 3,
                    sampled_out: 11,
                },
            }),
        };
        let page = super::super::render(&stats, &[], None, 1).unwrap();
        for line in [
            "lb_capture_running 1",
            "lb_capture_packets_total{outcome=\"captured\"} 7",
            "lb_capture_packets_total{outcome=\"missed\"} 3",
            "lb_capture_packets_total{outcome=\"sampled_out\"} 11",
        ] {
            assert!(page.lines().any(|l| l == line), "{line} in\n{page}");
        }
    }
}
