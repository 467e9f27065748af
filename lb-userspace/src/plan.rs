//! What a change of desired state does to the slot tables: per VIP, the share of slots that
//! move and each backend's new share, for the VIPs a change touches. Pure; used by `lb apply`
//! (and `--dry-run`).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use serde::{Deserialize, Serialize};

use crate::{
    maglev::{self, MaglevBackend},
    model::{BackendAddr, DesiredState, Serving, VipAddr, VipSpec},
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

/// The serving table of a VIP spec: the backends [`Serving::of`] lets serve when `healthy`
/// (and their MACs known: the plan shows configured shares). Ids are indexes into the sorted
/// backend list, so tables of two specs compare by address.
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
        .filter(|(_, (addr, b))| Serving::of(b, || true, || healthy(addr)) == Serving::Serving)
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

/// What a change replaces: the previous spec (`None`: the VIP is new) of every VIP whose spec
/// it alters. Owned, so the plan is made without holding the state it was taken from.
pub type Replaced = BTreeMap<VipAddr, Option<VipSpec>>;

/// The VIPs going from `old` to `new` touches, with their specs in `old`. A comparison, no
/// tables: cheap enough to take under the agent's lock.
pub fn replaced(old: &DesiredState, new: &DesiredState) -> Replaced {
    let mut out: Replaced = old
        .vips
        .iter()
        .filter(|(vip, spec)| new.vips.get(vip) != Some(*spec))
        .map(|(vip, spec)| (*vip, Some(spec.clone())))
        .collect();
    for vip in new.vips.keys().filter(|v| !old.vips.contains_key(v)) {
        out.insert(*vip, None);
    }
    out
}

/// Plans going from `old` to `new` with tables of `m` slots (health is not considered: the
/// plan shows configured shares).
pub fn plan(old: &DesiredState, new: &DesiredState, m: u32) -> Vec<VipPlan> {
    plan_change(&replaced(old, new), new, m)
}

/// Plans the change to `new` that replaces `replaced`. Only the VIPs it touches get tables
/// built (two Maglev tables each); the others are listed as `keep`, without shares.
pub fn plan_change(replaced: &Replaced, new: &DesiredState, m: u32) -> Vec<VipPlan> {
    let all: BTreeSet<&VipAddr> = replaced.keys().chain(new.vips.keys()).collect();
    all.into_iter()
        .map(|vip| match replaced.get(vip) {
            None => keep(*vip),
            Some(old) => plan_vip(*vip, old.as_ref(), new.vips.get(vip), m),
        })
        .collect()
}

/// An untouched VIP.
fn keep(vip: VipAddr) -> VipPlan {
    VipPlan {
        vip,
        action: "keep".to_string(),
        added: Vec::new(),
        removed: Vec::new(),
        changed: Vec::new(),
        slots_moved_pct: 0.0,
        shares: BTreeMap::new(),
    }
}

/// What happens to `vip`, whose spec goes from `o` to `n`.
fn plan_vip(vip: VipAddr, o: Option<&VipSpec>, n: Option<&VipSpec>, m: u32) -> VipPlan {
    let empty = VipSpec::default();
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
    VipPlan {
        vip,
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
    }
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

    #[test]
    fn only_the_vips_a_change_touches_are_planned() {
        let two = |weight: u32| {
            parse_config(&format!(
                "[[vip]]\naddress = \"10.0.0.10:80/tcp\"\nbackend = [{{ address = \"10.0.0.2\" }}]\n\
                 [[vip]]\naddress = \"10.0.0.11:80/tcp\"\nbackend = [{{ address = \"10.0.0.3\", weight = {weight} }}]\n"
            ))
            .unwrap()
        };
        let (old, new) = (two(1), two(2));
        let touched: Vec<VipAddr> = replaced(&old, &new).into_keys().collect();
        assert_eq!(touched, ["10.0.0.11:80/tcp".parse::<VipAddr>().unwrap()]);
        let p = plan(&old, &new, 13);
        assert_eq!(p.len(), 2);
        // The untouched VIP is kept without a table being built for it.
        assert_eq!((p[0].action.as_str(), p[0].shares.len()), ("keep", 0));
        assert_eq!((p[1].action.as_str(), p[1].changed.len()), ("change", 1));
        // A VIP the change removes is planned from its replaced spec.
        let gone = plan(&old, &DesiredState::default(), 13);
        assert!(gone.iter().all(|g| g.action == "remove"));
    }
}
