//! What each node publishes about itself, how the fleet's health verdict is formed from it,
//! and how divergence between nodes is found. Pure.
use std::collections::BTreeMap;

use crate::model::{BackendAddr, VipAddr};

/// One node's status is a wire type (etcd holds it, `lb cluster status` shows it).
pub use crate::protocol::NodeStatus;

/// How far a status's `at_unix` may be from this node's clock: a node writes its status
/// every second, so one older than this is from a node that stopped (or a replay), and a
/// much newer one comes from a clock nobody should trust.
pub const MAX_STATUS_AGE_S: u64 = 15;

/// A node status key as etcd holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusKv {
    pub key: String,
    pub value: Vec<u8>,
    /// The lease the key is bound to (0: none).
    pub lease: i64,
}

/// Why a status key does not count: `kind` is stable (a key is logged and counted once per
/// kind), `why` says it in full.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ignored {
    pub kind: &'static str,
    pub why: String,
}

fn ignored(kind: &'static str, why: String) -> Ignored {
    Ignored { kind, why }
}

/// The status in `kv` if it counts for fleet health: bound to a lease (etcd deletes the key
/// when the lease ends, so a key read with its lease is bound to a live one) granted for at
/// most `max_ttl` seconds (`granted_ttl`: as etcd reports it, `None` when the lease is gone),
/// so a status outlives its writer by seconds, never longer; named as its key (the node
/// inside equals the key's last segment, a valid node name), so one writer cannot speak for
/// several nodes; and fresh (`at_unix` within [`MAX_STATUS_AGE_S`] of `now`). `prefix` is the
/// cluster's `nodes/` prefix.
pub fn accept_status(
    prefix: &str,
    kv: &StatusKv,
    granted_ttl: Option<i64>,
    max_ttl: i64,
    now: u64,
) -> Result<NodeStatus, Ignored> {
    let name = kv.key.strip_prefix(prefix).unwrap_or(&kv.key);
    super::schema::check_name("node", name).map_err(|e| ignored("name", e))?;
    if kv.lease == 0 {
        return Err(ignored(
            "lease",
            "not bound to a lease (a node writes its status under a lease, so it vanishes when the node stops)".into(),
        ));
    }
    match granted_ttl {
        None => {
            return Err(ignored(
                "lease",
                format!("its lease {:x} is not alive", kv.lease),
            ));
        }
        Some(ttl) if ttl > max_ttl => {
            return Err(ignored(
                "lease",
                format!(
                    "its lease was granted for {ttl} s, more than a node's {max_ttl} s: it would outlive its writer"
                ),
            ));
        }
        Some(_) => {}
    }
    let status: NodeStatus = serde_json::from_slice(&kv.value)
        .map_err(|e| ignored("value", format!("not a node status: {e}")))?;
    if status.node != name {
        return Err(ignored(
            "name",
            format!("names node `{}`, not `{name}` as its key does", status.node),
        ));
    }
    let age = now.abs_diff(status.at_unix);
    if age > MAX_STATUS_AGE_S {
        return Err(ignored(
            "stale",
            format!(
                "written at {} ({age} s from this node's clock, more than {MAX_STATUS_AGE_S} s)",
                status.at_unix
            ),
        ));
    }
    Ok(status)
}

/// The fleet's health verdict for every checked backend: down when more than half of the
/// live nodes (those with a status, and this one) say down, up otherwise. A node without a
/// verdict on a backend yet (its status predates the backend, or its probes have not run)
/// counts as up, as a backend without any verdict does: otherwise one node's first failed
/// probe of a just-added backend would be a majority of one and take it out on that node
/// alone until the others' statuses caught up (under load, the nodes' tables differed for
/// as long as that took).
/// `own` replaces this node's published view (it is fresher). Every node computes the same
/// verdict from the same statuses, so a backend that only some nodes cannot reach is in or
/// out on all of them, never in on some and out on others for longer than one status round.
pub fn fleet_health(
    me: &str,
    own: &BTreeMap<VipAddr, BTreeMap<BackendAddr, bool>>,
    nodes: &[NodeStatus],
) -> BTreeMap<(VipAddr, BackendAddr), bool> {
    let mut down_votes: BTreeMap<(VipAddr, BackendAddr), u32> = BTreeMap::new();
    let views: Vec<_> = nodes
        .iter()
        .filter(|n| n.node != me)
        .map(|n| &n.health)
        .chain(std::iter::once(own))
        .collect();
    let live = views.len() as u32;
    for view in views {
        for (vip, backends) in view {
            for (addr, up) in backends {
                *down_votes.entry((*vip, *addr)).or_default() += u32::from(!up);
            }
        }
    }
    down_votes
        .into_iter()
        .map(|(k, down)| (k, down * 2 <= live))
        .collect()
}

/// Lines naming every disagreement between nodes: applied revisions that differ, and VIPs
/// whose digests differ between nodes at the same revision (or that a node lacks).
pub fn divergence(nodes: &[NodeStatus]) -> Vec<String> {
    let mut out = Vec::new();
    let newest = nodes.iter().map(|n| n.revision).max().unwrap_or(0);
    for n in nodes.iter().filter(|n| n.revision != newest) {
        out.push(format!(
            "node {} has applied revision {}, others {newest}",
            n.node, n.revision
        ));
    }
    if let Some(n) = nodes.iter().find(|n| n.not_converged.is_some()) {
        out.push(format!(
            "node {}: kernel not in line ({})",
            n.node,
            n.not_converged.as_deref().unwrap_or_default()
        ));
    }
    let current: Vec<&NodeStatus> = nodes.iter().filter(|n| n.revision == newest).collect();
    let vips: std::collections::BTreeSet<&VipAddr> =
        current.iter().flat_map(|n| n.digests.keys()).collect();
    for vip in vips {
        let seen: std::collections::BTreeSet<Option<&String>> =
            current.iter().map(|n| n.digests.get(vip)).collect();
        if seen.len() > 1 {
            let each: Vec<String> = current
                .iter()
                .map(|n| {
                    format!(
                        "{}={}",
                        n.node,
                        n.digests.get(vip).map_or("missing", |d| d.as_str())
                    )
                })
                .collect();
            out.push(format!(
                "VIP {vip}: slot tables differ ({})",
                each.join(" ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip() -> VipAddr {
        "10.0.0.10:80/tcp".parse().unwrap()
    }

    fn view(up: &[(&str, bool)]) -> BTreeMap<VipAddr, BTreeMap<BackendAddr, bool>> {
        BTreeMap::from([(
            vip(),
            up.iter().map(|(a, u)| (a.parse().unwrap(), *u)).collect(),
        )])
    }

    fn node(name: &str, revision: i64, up: &[(&str, bool)], digest: &str) -> NodeStatus {
        NodeStatus {
            node: name.into(),
            revision,
            digests: BTreeMap::from([(vip(), digest.into())]),
            health: view(up),
            ..NodeStatus::default()
        }
    }

    #[test]
    fn a_minority_cannot_take_a_backend_out_and_a_majority_can() {
        let b: BackendAddr = "10.0.0.2".parse().unwrap();
        let others = [
            node("a", 1, &[("10.0.0.2", true)], "x"),
            node("b", 1, &[("10.0.0.2", true)], "x"),
        ];
        // This node alone sees it down: the fleet keeps it up, on every node alike.
        let v = fleet_health("c", &view(&[("10.0.0.2", false)]), &others);
        assert!(v[&(vip(), b)]);
        let others = [
            node("a", 1, &[("10.0.0.2", false)], "x"),
            node("b", 1, &[("10.0.0.2", true)], "x"),
        ];
        let v = fleet_health("c", &view(&[("10.0.0.2", false)]), &others);
        assert!(!v[&(vip(), b)]);
        // Our own published (stale) status is replaced by the fresh view.
        let stale = [node("c", 1, &[("10.0.0.2", true)], "x")];
        assert!(!fleet_health("c", &view(&[("10.0.0.2", false)]), &stale)[&(vip(), b)]);
        // A tie keeps the backend: taking traffic away needs a majority.
        let one = [node("a", 1, &[("10.0.0.2", true)], "x")];
        assert!(fleet_health("c", &view(&[("10.0.0.2", false)]), &one)[&(vip(), b)]);
        // Nodes whose statuses do not name the backend yet (published before it was added)
        // count as up: one node's failed probe is not a majority of one.
        let before = [node("a", 1, &[], "x"), node("b", 1, &[], "x")];
        assert!(fleet_health("c", &view(&[("10.0.0.2", false)]), &before)[&(vip(), b)]);
        // Alone in the fleet, this node's view decides.
        assert!(!fleet_health("c", &view(&[("10.0.0.2", false)]), &[])[&(vip(), b)]);
    }

    #[test]
    fn only_leased_fresh_self_named_statuses_count() {
        const P: &str = "/xdp-lb/t/nodes/";
        let now = 1_000_000;
        let kv = |name: &str, lease: i64, at: u64| {
            let mut n = node(name, 1, &[], "x");
            n.at_unix = at;
            StatusKv {
                key: format!("{P}lb0"),
                value: serde_json::to_vec(&n).unwrap(),
                lease,
            }
        };
        let good = kv("lb0", 7, now - 2);
        assert_eq!(
            accept_status(P, &good, Some(5), 5, now).unwrap().node,
            "lb0"
        );
        let kind = |kv: &StatusKv, ttl: Option<i64>| accept_status(P, kv, ttl, 5, now).unwrap_err();
        assert_eq!(kind(&kv("lb0", 0, now), Some(5)).kind, "lease");
        assert_eq!(kind(&good, None).kind, "lease");
        let long = kind(&good, Some(3600));
        assert!(
            long.kind == "lease" && long.why.contains("3600"),
            "{long:?}"
        );
        let other = kind(&kv("lb1", 7, now), Some(5));
        assert!(
            other.kind == "name" && other.why.contains("`lb1`"),
            "{other:?}"
        );
        assert_eq!(kind(&kv("lb0", 7, now - 600), Some(5)).kind, "stale");
        assert_eq!(kind(&kv("lb0", 7, now + 600), Some(5)).kind, "stale");
        let mut junk = good.clone();
        junk.value = b"{".to_vec();
        assert_eq!(kind(&junk, Some(5)).kind, "value");
        let mut evil = good.clone();
        evil.key = format!("{P}\x1b[31mlb9");
        assert_eq!(kind(&evil, Some(5)).kind, "name");
    }

    #[test]
    fn divergence_names_revisions_and_digests() {
        let same = [node("a", 5, &[], "d1"), node("b", 5, &[], "d1")];
        assert!(divergence(&same).is_empty());
        let lag = [node("a", 5, &[], "d1"), node("b", 4, &[], "d0")];
        assert_eq!(
            divergence(&lag),
            ["node b has applied revision 4, others 5"]
        );
        let differ = [node("a", 5, &[], "d1"), node("b", 5, &[], "d2")];
        assert_eq!(
            divergence(&differ),
            ["VIP 10.0.0.10:80/tcp: slot tables differ (a=d1 b=d2)"]
        );
    }
}
