//! What a change of desired state does to the slot tables: per VIP, the share of slots that
//! move and each backend's new share. Pure; used by `lb apply` (and `--dry-run`).
use std::{collections::BTreeMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

use crate::{
    maglev::{self, MaglevBackend},
    model::{BackendAddr, DesiredState, VipAddr, VipSpec},
};

/// What happens to one VIP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipPlan {
    pub vip: VipAddr,
    /// `add`, `remove`, `change` or `keep`.
    pub action: String,
    /// Backends added, removed, and whose settings change.
    pub added: Vec<BackendAddr>,
    pub removed: Vec<BackendAddr>,
    pub changed: Vec<BackendAddr>,
    /// Percentage of the M slots that point at a different backend afterwards.
    pub slots_moved_pct: f64,
    /// Each backend's share of slots afterwards, in percent.
    pub shares: BTreeMap<BackendAddr, f64>,
}

/// The serving table of a VIP spec: backends with weight > 0, not drained and `healthy`.
/// Ids are indexes into the sorted backend list, so tables of two specs compare by address.
pub fn table_for(
    spec: &VipSpec,
    m: u32,
    healthy: impl Fn(&BackendAddr) -> bool,
) -> (Vec<u32>, Vec<BackendAddr>) {
    let addrs: Vec<BackendAddr> = spec.backends.keys().copied().collect();
    let backends: Vec<MaglevBackend> = spec
        .backends
        .iter()
        .enumerate()
        .filter(|(_, (addr, b))| b.weight > 0 && !b.drained && healthy(addr))
        .map(|(i, (addr, b))| MaglevBackend {
            id: i as u32,
            key: addr.to_string(),
            weight: b.weight,
        })
        .collect();
    (maglev::build(&backends, m), addrs)
}

fn shares(table: &[u32], addrs: &[BackendAddr]) -> BTreeMap<BackendAddr, f64> {
    let mut out: BTreeMap<BackendAddr, f64> = addrs.iter().map(|a| (*a, 0.0)).collect();
    for id in table {
        *out.entry(addrs[*id as usize]).or_default() += 100.0 / table.len() as f64;
    }
    out
}

/// Plans going from `old` to `new` with tables of `m` slots (health is not considered: the
/// plan shows configured shares).
pub fn plan(old: &DesiredState, new: &DesiredState, m: u32) -> Vec<VipPlan> {
    let mut out = Vec::new();
    let all: std::collections::BTreeSet<&VipAddr> =
        old.vips.keys().chain(new.vips.keys()).collect();
    for vip in all {
        let empty = VipSpec::default();
        let (o, n) = (old.vips.get(vip), new.vips.get(vip));
        let (os, ns) = (o.unwrap_or(&empty), n.unwrap_or(&empty));
        let (ot, oa) = table_for(os, m, |_| true);
        let (nt, na) = table_for(ns, m, |_| true);
        let moved = match (ot.is_empty(), nt.is_empty()) {
            (true, true) => 0,
            (true, false) | (false, true) => m as usize,
            (false, false) => ot
                .iter()
                .zip(&nt)
                .filter(|(a, b)| oa[**a as usize] != na[**b as usize])
                .count(),
        };
        let added = ns
            .backends
            .keys()
            .filter(|a| !os.backends.contains_key(a))
            .copied()
            .collect();
        let removed = os
            .backends
            .keys()
            .filter(|a| !ns.backends.contains_key(a))
            .copied()
            .collect();
        let changed: Vec<BackendAddr> = ns
            .backends
            .iter()
            .filter(|(a, b)| os.backends.get(a).is_some_and(|ob| ob != *b))
            .map(|(a, _)| *a)
            .collect();
        let action = match (o, n) {
            (None, Some(_)) => "add",
            (Some(_), None) => "remove",
            (Some(a), Some(b)) if a == b => "keep",
            _ => "change",
        };
        out.push(VipPlan {
            vip: *vip,
            action: action.to_string(),
            added,
            removed,
            changed,
            slots_moved_pct: 100.0 * moved as f64 / f64::from(m),
            shares: if n.is_some() {
                shares(&nt, &na)
            } else {
                BTreeMap::new()
            },
        });
    }
    out
}

/// Human-readable plan.
pub fn render(plan: &[VipPlan]) -> String {
    let mut s = String::new();
    if plan.iter().all(|p| p.action == "keep") {
        s.push_str("no changes\n");
    }
    for p in plan.iter().filter(|p| p.action != "keep") {
        let _ = writeln!(
            s,
            "{} {}: {:.1}% of slots move",
            p.action, p.vip, p.slots_moved_pct
        );
        for a in &p.added {
            let _ = writeln!(s, "  + backend {a}");
        }
        for a in &p.removed {
            let _ = writeln!(s, "  - backend {a}");
        }
        for a in &p.changed {
            let _ = writeln!(s, "  ~ backend {a}");
        }
        for (a, share) in &p.shares {
            let _ = writeln!(s, "    {a:<40} {share:>6.2}%");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_config;

    fn state(backends: &[(&str, u32)]) -> DesiredState {
        let mut text = String::from("[[vip]]\naddress = \"10.0.0.10:80/tcp\"\nbackend = [");
        for (a, w) in backends {
            let _ = write!(text, "{{ address = \"{a}\", weight = {w} }},");
        }
        text.push_str("]\n");
        parse_config(&text).unwrap()
    }

    #[test]
    fn adding_a_backend_moves_its_share() {
        let old = state(&[("10.0.0.2", 1), ("10.0.0.3", 1)]);
        let new = state(&[("10.0.0.2", 1), ("10.0.0.3", 1), ("10.0.0.4", 1)]);
        let p = plan(&old, &new, 65537);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].action, "change");
        assert_eq!(p[0].added, vec!["10.0.0.4".parse::<BackendAddr>().unwrap()]);
        // About a third moves to the new backend, little else.
        assert!(
            (p[0].slots_moved_pct - 33.3).abs() < 2.0,
            "{}",
            p[0].slots_moved_pct
        );
        for share in p[0].shares.values() {
            assert!((share - 33.3).abs() < 0.5);
        }
        assert!(render(&p).contains("+ backend 10.0.0.4"));
    }

    #[test]
    fn weights_show_in_shares_and_no_change_is_keep() {
        let s = state(&[("10.0.0.2", 1), ("10.0.0.3", 3)]);
        let p = plan(&DesiredState::default(), &s, 65537);
        assert_eq!(p[0].action, "add");
        assert!((p[0].shares[&"10.0.0.3".parse::<BackendAddr>().unwrap()] - 75.0).abs() < 1.0);
        let same = plan(&s, &s, 65537);
        assert_eq!(same[0].action, "keep");
        assert_eq!(same[0].slots_moved_pct, 0.0);
        assert!(render(&same).contains("no changes"));
        let gone = plan(&s, &DesiredState::default(), 65537);
        assert_eq!(
            (gone[0].action.as_str(), gone[0].slots_moved_pct),
            ("remove", 100.0)
        );
    }
}
