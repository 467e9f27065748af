//! What each node publishes about itself, how the fleet's health verdict is formed from it,
//! and how divergence between nodes is found. Pure.
use std::collections::BTreeMap;

use crate::model::{BackendAddr, VipAddr};

/// One node's status is a wire type (etcd holds it, `lb cluster status` shows it).
pub use crate::protocol::NodeStatus;

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
