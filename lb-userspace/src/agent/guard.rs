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
    a.deny == b.deny && guarded(a, a_ids) == guarded(b, b_ids)
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
}
