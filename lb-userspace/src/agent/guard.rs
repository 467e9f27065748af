//! The guard's source lists as the kernel should hold them (`lb_common::guard`): every VIP's
//! allow and deny prefixes under its id, the node-wide deny list under `SCOPE_NODE`, and the
//! `VIP_F_*` bits that tell the program which lists a VIP has. Pure: the tries are written by
//! [`super::kernel::Kernel::sync_sources`].
use std::collections::{BTreeMap, BTreeSet};

use lb_common::{SCOPE_NODE, VIP_F_ALLOW, VIP_F_DENY, VIP_F_NODE_DENY, VIP_F_RATE, VipRate};

use crate::{
    agent::reconcile::Ids,
    model::{DesiredState, Prefix, VipSpec},
};

/// One entry of the tries: which list, whose (a VIP id or `SCOPE_NODE`), which prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceRule {
    pub deny: bool,
    pub scope: u32,
    pub prefix: Prefix,
}

/// Every entry the tries should hold, each with its end (Unix seconds, 0: never; always 0
/// on allow entries).
pub type Sources = BTreeMap<SourceRule, u64>;

/// Every VIP's new-flow limits by VIP id (its bucket state zero).
pub type Rates = BTreeMap<u32, VipRate>;

/// The limits for `state` with VIP ids `ids`: only VIPs that have one.
pub fn rates(state: &DesiredState, ids: &Ids) -> Rates {
    let mut out = Rates::new();
    for (vip, spec) in &state.vips {
        let (Some(id), true) = (
            ids.vips.get(vip),
            spec.new_flow_limit.is_some() || spec.source_limit.is_some(),
        ) else {
            continue;
        };
        let params = |l: &Option<crate::model::FlowLimit>| {
            l.map_or((0, 0), |l| VipRate::params(l.rate, l.burst()))
        };
        let (interval_ns, tolerance_ns) = params(&spec.new_flow_limit);
        let (source_interval_ns, source_tolerance_ns) = params(&spec.source_limit);
        out.insert(
            *id,
            VipRate {
                interval_ns,
                tolerance_ns,
                source_interval_ns,
                source_tolerance_ns,
                tat: 0,
            },
        );
    }
    out
}

/// Wall-clock seconds since the Unix epoch.
pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The entries for `state` with VIP ids `ids` (a VIP without an id yet has none).
pub fn sources(state: &DesiredState, ids: &Ids) -> Sources {
    let mut out = Sources::new();
    for (vip, spec) in &state.vips {
        let Some(id) = ids.vips.get(vip) else {
            continue;
        };
        for (deny, list) in [(false, &spec.allow_sources), (true, &spec.deny_sources)] {
            out.extend(list.iter().map(|p| {
                let rule = SourceRule {
                    deny,
                    scope: *id,
                    prefix: *p,
                };
                (rule, 0)
            }));
        }
    }
    out.extend(state.deny.iter().map(|(p, end)| {
        let rule = SourceRule {
            deny: true,
            scope: SCOPE_NODE,
            prefix: *p,
        };
        (rule, *end)
    }));
    out
}

/// Whether `a` with ids `a_ids` and `b` with `b_ids` give the same entries
/// ([`sources`]): the same node list, and the same lists under the same id for every VIP
/// that has one. Cheaper than laying out a million entries again for a change that leaves
/// them alone.
pub fn same_sources(a: &DesiredState, a_ids: &Ids, b: &DesiredState, b_ids: &Ids) -> bool {
    a.deny == b.deny && same_vip_sources(a, a_ids, b, b_ids)
}

/// Whether the VIPs' lists give the same entries (the node's list aside).
pub fn same_vip_sources(a: &DesiredState, a_ids: &Ids, b: &DesiredState, b_ids: &Ids) -> bool {
    guarded(a, a_ids) == guarded(b, b_ids)
}

/// The entries for `state` (whose node list is left out) with VIP ids `ids`, and the node's
/// entries taken from `node`: a change of VIP lists that keeps the node's list.
pub fn with_node_entries(state: &DesiredState, ids: &Ids, node: &Sources) -> Sources {
    let mut out = sources(state, ids);
    out.extend(
        node.iter()
            .filter(|(r, _)| r.scope == SCOPE_NODE)
            .map(|(r, e)| (*r, *e)),
    );
    out
}

/// Applies changes of the node's deny list to its entries in `s` (a change list of
/// `deny_file::diff` or `ops::deny_delta` names each prefix once, so removing before adding
/// is its order).
pub fn apply_deny_changes(s: &mut Sources, changes: &[crate::agent::deny_file::DenyChange]) {
    let (add, remove) = node_delta(changes);
    edit_entries(s, &add, &remove);
}

/// The node's entries a change of its deny list adds (with their ends) and removes. A change
/// list made by `ops::deny_delta` never adds and removes one prefix at once.
pub type NodeDelta = (Vec<(SourceRule, u64)>, Vec<SourceRule>);

/// The node's entries `changes` add and remove.
pub fn node_delta(changes: &[crate::agent::deny_file::DenyChange]) -> NodeDelta {
    use crate::agent::deny_file::DenyChange;
    let rule = |prefix: &Prefix| SourceRule {
        deny: true,
        scope: SCOPE_NODE,
        prefix: *prefix,
    };
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    for c in changes {
        match c {
            DenyChange::Add { end, prefixes } => {
                add.extend(prefixes.iter().map(|p| (rule(p), *end)))
            }
            DenyChange::Remove { prefixes } => remove.extend(prefixes.iter().map(rule)),
        }
    }
    (add, remove)
}

/// Edits `s` by `add` and `remove` (see [`node_delta`]).
pub fn edit_entries(s: &mut Sources, add: &[(SourceRule, u64)], remove: &[SourceRule]) {
    remove.iter().for_each(|r| {
        s.remove(r);
    });
    s.extend(add.iter().copied());
}

/// The VIP ids a change's entries must not be written under ahead of its commit: ids that
/// `current` (the core's ids, the kernel's) give another VIP than `next` does. Such an id
/// changes hands at the commit; until then the other VIP's flags say it reads that scope,
/// so entries written there early would apply to the wrong VIP.
pub fn scopes_changing_hands<'a, K: Ord + 'a>(
    next: impl IntoIterator<Item = (K, u32)>,
    current: impl IntoIterator<Item = (K, u32)>,
) -> BTreeSet<u32> {
    let owner: BTreeMap<u32, K> = current.into_iter().map(|(k, id)| (id, k)).collect();
    next.into_iter()
        .filter(|(k, id)| owner.get(id).is_some_and(|o| o != k))
        .map(|(_, id)| id)
        .collect()
}

/// The entries a write toward `want` adds to `held` (missing, or held with another end),
/// leaving out scopes in `skip`, and entries a pending change ([`Pending`]) has written
/// with another end: that change is newer than `want`.
pub fn to_write(
    held: &Sources,
    want: &Sources,
    skip: &BTreeSet<u32>,
    pending: Option<&Pending>,
) -> Vec<(SourceRule, u64)> {
    want.iter()
        .filter(|(r, e)| held.get(r) != Some(e))
        .filter(|(r, _)| !skip.contains(&r.scope))
        .filter(|(r, e)| pending.is_none_or(|p| p.want.get(r).is_none_or(|pe| pe == *e)))
        .map(|(r, e)| (*r, *e))
        .collect()
}

/// The entries a prune toward `want` deletes from `held`: those not wanted, but for those a
/// pending change has written (it is saved and about to commit; a convergence from the
/// state before it must not take them out).
pub fn to_delete(held: &Sources, want: &Sources, pending: Option<&Pending>) -> Vec<SourceRule> {
    held.keys()
        .filter(|r| !want.contains_key(r))
        .filter(|r| pending.is_none_or(|p| !p.want.contains_key(r)))
        .copied()
        .collect()
}

/// A saved change's entries written ahead of its commit, kept until the commit's
/// convergence passes the same entries as its own.
#[derive(Clone, Debug)]
pub struct Pending {
    pub want: std::sync::Arc<Sources>,
}

/// The VIPs with source lists: each one's id and lists.
type Guarded<'a> = Vec<(Option<u32>, &'a BTreeSet<Prefix>, &'a BTreeSet<Prefix>)>;

fn guarded<'a>(s: &'a DesiredState, ids: &Ids) -> Guarded<'a> {
    s.vips
        .iter()
        .filter(|(_, v)| !v.allow_sources.is_empty() || !v.deny_sources.is_empty())
        .map(|(vip, v)| {
            (
                ids.vips.get(vip).copied(),
                &v.allow_sources,
                &v.deny_sources,
            )
        })
        .collect()
}

/// The guard's `VIP_F_*` bits of a VIP with `spec` on a node whose deny list is
/// `node_deny` (its entries, ended or not: the program judges the end).
pub fn vip_flags(spec: &VipSpec, node_deny: bool) -> u32 {
    let mut f = 0;
    if !spec.allow_sources.is_empty() {
        f |= VIP_F_ALLOW;
    }
    if !spec.deny_sources.is_empty() {
        f |= VIP_F_DENY;
    }
    if node_deny {
        f |= VIP_F_NODE_DENY;
    }
    if spec.new_flow_limit.is_some() || spec.source_limit.is_some() {
        f |= VIP_F_RATE;
    }
    f
}

/// What the node-wide deny list shows: each prefix with the seconds it has left (`None`:
/// never ends), without those that ended.
pub fn live_denies(state: &DesiredState, now: u64) -> Vec<(Prefix, Option<u64>)> {
    state
        .deny
        .iter()
        .filter(|(_, end)| **end == 0 || **end > now)
        .map(|(p, end)| (*p, (*end != 0).then(|| end - now)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VipAddr;

    #[test]
    fn lists_go_under_the_vips_id_and_the_node_scope() {
        let mut state = DesiredState::default();
        let vip: VipAddr = "10.0.0.10:80/tcp".parse().unwrap();
        let mut spec = VipSpec::default();
        spec.allow_sources.insert("192.0.2.0/24".parse().unwrap());
        spec.deny_sources.insert("192.0.2.7/32".parse().unwrap());
        state.vips.insert(vip, spec.clone());
        state.deny.insert("2001:db8::/64".parse().unwrap(), 99);
        let mut ids = Ids::default();
        ids.vips.insert(vip, 3);
        let s = sources(&state, &ids);
        assert_eq!(s.len(), 3);
        assert!(s.keys().filter(|r| r.scope == 3).count() == 2);
        assert_eq!(
            s.iter()
                .find(|(r, _)| r.scope == SCOPE_NODE)
                .map(|(_, e)| *e),
            Some(99)
        );
        assert_eq!(vip_flags(&spec, false), VIP_F_ALLOW | VIP_F_DENY);
        assert_eq!(vip_flags(&VipSpec::default(), true), VIP_F_NODE_DENY);
        assert_eq!(vip_flags(&VipSpec::default(), false), 0);
        // The same lists under the same ids: the same entries; a list or an id changed: not.
        let mut other = state.clone();
        other.vips.get_mut(&vip).unwrap().backends.clear();
        assert!(same_sources(&state, &ids, &other, &ids));
        let mut moved = ids.clone();
        moved.vips.insert(vip, 4);
        assert!(!same_sources(&state, &ids, &state, &moved));
        other.deny.clear();
        assert!(!same_sources(&state, &ids, &other, &ids));
        assert_eq!(
            sources(&state, &ids) == sources(&other, &ids),
            same_sources(&state, &ids, &other, &ids)
        );
    }

    #[test]
    fn deny_commands_edit_the_node_list_and_apply_keeps_it() {
        use crate::{agent::ops::edit, protocol::Command};
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        let start = DesiredState::default();
        let add = Command::DenyAdd {
            prefixes: vec![p("192.0.2.0/24"), p("2001:db8::/64")],
            expires_s: Some(60),
        };
        let d = edit(&start, &add).unwrap().unwrap();
        let end = d.deny[&p("192.0.2.0/24")];
        assert!(end >= unix_now_s() + 59 && end <= unix_now_s() + 60);
        let forever = Command::DenyAdd {
            prefixes: vec![p("192.0.2.0/24")],
            expires_s: None,
        };
        let d = edit(&d, &forever).unwrap().unwrap();
        assert_eq!(d.deny[&p("192.0.2.0/24")], 0, "added again: the new end");
        // A config applied leaves the deny list as it is.
        let mut other = DesiredState::default();
        other
            .vips
            .insert("10.0.0.10:80/tcp".parse().unwrap(), VipSpec::default());
        let apply = Command::Apply {
            state: other,
            dry_run: false,
            if_revision: None,
        };
        let d = edit(&d, &apply).unwrap().unwrap();
        assert_eq!(d.deny.len(), 2);
        assert_eq!(d.vips.len(), 1);
        // Removing what is not there changes nothing and says so.
        let missing = Command::DenyRemove {
            prefixes: vec![p("192.0.2.0/24"), p("198.51.100.0/24")],
        };
        let e = edit(&d, &missing).unwrap_err().to_string();
        assert!(e.contains("198.51.100.0/24 is not on the deny list"), "{e}");
        let remove = Command::DenyRemove {
            prefixes: vec![p("192.0.2.0/24")],
        };
        let d = edit(&d, &remove).unwrap().unwrap();
        assert_eq!(d.deny.len(), 1);
        assert!(
            edit(
                &d,
                &Command::DenyAdd {
                    prefixes: vec![],
                    expires_s: None
                }
            )
            .is_err()
        );
        let zero = Command::DenyAdd {
            prefixes: vec![p("192.0.2.0/24")],
            expires_s: Some(0),
        };
        assert!(edit(&d, &zero).is_err());
    }

    #[test]
    fn source_lists_round_trip_through_the_config_file() {
        let text = r#"
[[vip]]
address = "10.0.0.10:80/tcp"
allow_sources = ["192.0.2.0/24", "2001:db8::/48"]
deny_sources = ["192.0.2.7/32"]
backend = [ { address = "10.0.0.2" } ]
"#;
        let state = crate::model::parse_config(text).unwrap();
        let spec = state.vips.values().next().unwrap();
        assert_eq!(spec.allow_sources.len(), 2);
        assert_eq!(spec.deny_sources.len(), 1);
        let again = crate::model::parse_config(&crate::model::render_config(&state)).unwrap();
        assert_eq!(again, state);
        let bad = text.replace("192.0.2.7/32", "192.0.2.7/24");
        let e = crate::model::parse_config(&bad).unwrap_err();
        assert!(e.contains("host bits are set"), "{e}");
    }

    #[test]
    fn ended_denies_are_not_listed() {
        let mut state = DesiredState::default();
        state.deny.insert("192.0.2.1/32".parse().unwrap(), 100);
        state.deny.insert("192.0.2.2/32".parse().unwrap(), 0);
        state.deny.insert("192.0.2.3/32".parse().unwrap(), 150);
        let l = live_denies(&state, 120);
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].1, Some(30));
    }

    #[test]
    fn a_convergence_of_the_state_before_keeps_a_pending_changes_entries() {
        let rule = |scope: u32, p: &str| SourceRule {
            deny: true,
            scope,
            prefix: p.parse().unwrap(),
        };
        let (kept, new_deny, old_only) = (
            rule(SCOPE_NODE, "192.0.2.0/24"),
            rule(SCOPE_NODE, "198.51.100.7/32"),
            rule(2, "203.0.113.0/24"),
        );
        let old: Sources = [(kept, 0), (old_only, 0)].into();
        let new: Sources = [(kept, 0), (new_deny, 50)].into();
        // The change's prewrite: the tries hold both states' entries.
        let held: Sources = [(kept, 0), (old_only, 0), (new_deny, 50)].into();
        let pending = Pending {
            want: std::sync::Arc::new(new.clone()),
        };
        // A retry converging the core's old entries meanwhile deletes nothing the change
        // wrote, and does not write its old end over the change's new one.
        assert_eq!(
            to_delete(&held, &old, Some(&pending)),
            Vec::<SourceRule>::new()
        );
        assert_eq!(
            to_delete(&held, &old, None),
            vec![new_deny],
            "the flap it prevents"
        );
        let mut older = old.clone();
        older.insert(new_deny, 10);
        assert!(to_write(&held, &older, &BTreeSet::new(), Some(&pending)).is_empty());
        assert_eq!(
            to_write(&held, &older, &BTreeSet::new(), None),
            vec![(new_deny, 10)]
        );
        // The commit (no change pending any more) deletes what the change took out.
        assert_eq!(to_delete(&held, &new, None), vec![old_only]);
    }

    #[test]
    fn ids_changing_hands_are_not_written_ahead() {
        let (a, b, c): (VipAddr, VipAddr, VipAddr) = (
            "10.0.0.1:80/tcp".parse().unwrap(),
            "10.0.0.2:80/tcp".parse().unwrap(),
            "10.0.0.3:80/tcp".parse().unwrap(),
        );
        // A (id 3) removed and B added in one change, given the freed id 3; C keeps id 1; a
        // new VIP on a free id 5 is nobody's yet.
        let d: VipAddr = "10.0.0.4:80/tcp".parse().unwrap();
        let current = [(a, 3), (c, 1)];
        let next = [(b, 3), (c, 1), (d, 5)];
        let skip = scopes_changing_hands(next, current);
        assert_eq!(skip, BTreeSet::from([3]));
        // The kernel's view counts too (a VIP removed whose removal has not converged yet).
        let kernel = [(d, 5)];
        assert!(scopes_changing_hands([(d, 5)], kernel).is_empty());
        assert_eq!(scopes_changing_hands([(b, 5)], kernel), BTreeSet::from([5]));
        // B's entries under 3 wait for the commit; the node's and C's go ahead.
        let rule = |scope: u32| SourceRule {
            deny: false,
            scope,
            prefix: "192.0.2.0/24".parse().unwrap(),
        };
        let want: Sources = [(rule(3), 0), (rule(1), 0), (rule(SCOPE_NODE), 0)].into();
        let w = to_write(&Sources::new(), &want, &skip, None);
        assert_eq!(w, vec![(rule(1), 0), (rule(SCOPE_NODE), 0)]);
    }
}
