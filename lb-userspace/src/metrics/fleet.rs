//! Each VIP's slot-table digest and, in fleet mode, the link to the store.
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::Labels;
use crate::protocol::{StoreView, VipView};

/// Each VIP's slot-table digest (equal on nodes that agree), and the store link in fleet mode.
pub(super) fn fleet_metrics(reg: &mut Registry, list: &[VipView], store: Option<&StoreView>) {
    let digest = Family::<Labels, Gauge>::default();
    reg.register(
        "vip_ring_digest",
        "Always 1; the digest label is the live slot table's digest (compare across nodes)",
        digest.clone(),
    );
    for v in list {
        if let Some(d) = &v.digest {
            digest
                .get_or_create(&vec![
                    ("vip".to_string(), v.vip.to_string()),
                    ("digest".to_string(), d.clone()),
                ])
                .set(1);
        }
    }
    let Some(s) = store else { return };
    let gauge = |reg: &mut Registry, name: &str, help: &str, value: i64| {
        let g = Gauge::<i64>::default();
        reg.register(name, help, g.clone());
        g.set(value);
    };
    gauge(
        reg,
        "store_connected",
        "1 while etcd answers (0: forwarding with the last applied configuration)",
        i64::from(s.connected),
    );
    gauge(
        reg,
        "store_applied_revision",
        "The configuration revision this node applied",
        s.applied_revision.unwrap_or(0),
    );
    gauge(
        reg,
        "store_rejected_keys",
        "Keys whose value is not applied now (each keeps its last good value)",
        s.rejected.len() as i64,
    );
    for (name, help, value) in [
        (
            "store_rejected_values",
            "Malformed or invalid values seen in etcd",
            s.rejected_total,
        ),
        (
            "store_refused_revisions",
            "Revisions this node refused as a whole (e.g. beyond its capacity)",
            s.refused_revisions_total,
        ),
        (
            "store_reconnects",
            "Times the link to etcd was lost",
            s.reconnects_total,
        ),
        (
            "store_ignored_statuses",
            "Node status keys ignored for fleet health (no live short lease, named for another node, stale, unreadable)",
            s.ignored_statuses_total,
        ),
    ] {
        let c = Counter::<u64>::default();
        reg.register(name, help, c.clone());
        c.inc_by(value);
    }
}
