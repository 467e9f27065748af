//! The API's listing of every VIP and backend: what is desired, what the kernel's live table
//! gives each backend, and the health and MAC facts behind it. Read-only over the core.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use crate::{
    agent::{
        core::{BuiltTable, Core, CoreFacts, fleet_verdict},
        reconcile::{self, Facts, KernelView, Live},
    },
    model::{BackendAddr, BackendSpec, Forward, VipAddr, VipSpec},
    protocol::{BackendView, RetiredView, VipView},
};

impl Core {
    /// Every VIP and backend as the API lists them.
    pub fn list(&self) -> Vec<VipView> {
        let view = self.kernel.view();
        self.desired
            .vips
            .iter()
            .map(|(vip, spec)| self.vip_view(view, vip, spec))
            .collect()
    }

    fn vip_view(&self, view: &KernelView, vip: &VipAddr, spec: &VipSpec) -> VipView {
        let vip_id = self.ids.vips.get(vip).copied().unwrap_or(0);
        let live = view.published.get(&vip_id);
        // Shares of what is live: only when the live table is the one we built.
        let built = self.tables.get(vip).filter(|t| {
            live.is_some_and(|l| Arc::ptr_eq(&l.table, &t.table) || *l.table == *t.table)
        });
        let facts = self.facts();
        let backends = spec
            .backends
            .iter()
            .map(|(addr, b)| self.backend_view(&facts, vip, spec, (addr, b), built, live))
            .collect();
        VipView {
            vip: *vip,
            id: vip_id,
            source_hash: spec.source_hash,
            udp_idle_s: spec.udp_idle_s,
            forward: spec.forward,
            second_chance_s: if spec.forward == Forward::Gue {
                spec.second_chance_s
            } else {
                0
            },
            window_ends_in_s: self
                .windows
                .ends(vip)
                .map(|t| t.saturating_duration_since(Instant::now()).as_secs()),
            retired: self.retired(view, vip, live),
            digest: self.digest_hex(vip),
            health_check: spec.health.clone(),
            backends,
            announce_min_serving: spec.announce_min_serving,
            guard: guard_view(spec),
        }
    }

    /// Backends no longer configured that the live table still carries as some slots'
    /// previous backend (second chance), with how many slots each.
    fn retired(&self, view: &KernelView, vip: &VipAddr, live: Option<&Live>) -> Vec<RetiredView> {
        let known: BTreeSet<u32> = self
            .ids
            .backends
            .get(vip)
            .map(|m| m.values().copied().collect())
            .unwrap_or_default();
        let mut retired: BTreeMap<u32, usize> = BTreeMap::new();
        for p in live
            .map(|l| l.previous.iter().flatten())
            .into_iter()
            .flatten()
        {
            if *p != 0 && !known.contains(p) {
                *retired.entry(*p).or_insert(0) += 1;
            }
        }
        retired
            .into_iter()
            .filter_map(|(id, n)| {
                Some(RetiredView {
                    address: view.backends.get(&id)?.addr,
                    id,
                    previous_slots: n,
                })
            })
            .collect()
    }

    fn backend_view(
        &self,
        facts: &CoreFacts<'_>,
        vip: &VipAddr,
        spec: &VipSpec,
        (addr, b): (&BackendAddr, &BackendSpec),
        built: Option<&BuiltTable>,
        live: Option<&Live>,
    ) -> BackendView {
        let id = self.ids.backend(vip, addr).unwrap_or(0);
        let h = self.health.get(&(*vip, *addr));
        let slots = built.and_then(|t| t.slots.get(&id)).copied().unwrap_or(0);
        let total = built.map_or(0, |t| t.table.len());
        let mac = facts.mac(vip, &addr.ip);
        let routed = spec.forward.routed();
        BackendView {
            address: *addr,
            id,
            weight: b.weight,
            // Encapsulated backends have no MAC of their own: the FIB's next hop.
            mac: match (routed, mac) {
                (true, _) => "via-fib".into(),
                (false, Some(m)) => m.to_string(),
                (false, None) => "no-mac".into(),
            },
            mac_source: match (routed, b.mac, mac) {
                (true, _, _) => "fib",
                (false, Some(_), _) => "configured",
                (false, None, Some(_)) => "neighbour",
                (false, None, None) => "none",
            }
            .into(),
            drained: b.drained,
            health: health_word(
                spec.health.is_some(),
                h.is_none_or(|h| h.up),
                fleet_verdict(&self.fleet_health, vip, addr),
            )
            .into(),
            last_check: h.map(|h| h.last.clone()).unwrap_or_default(),
            serving: reconcile::serving(&self.desired, facts, vip, addr),
            share_pct: if total == 0 {
                0.0
            } else {
                100.0 * slots as f64 / total as f64
            },
            previous_slots: live
                .map_or(0, |l| l.previous.iter().filter(|p| p.contains(&id)).count()),
        }
    }
}

/// The health column: this node's probe verdict, or the fleet's where it overrides it.
fn health_word(checked: bool, own_up: bool, fleet: Option<bool>) -> &'static str {
    match (checked, fleet) {
        (false, _) => "unchecked",
        (true, Some(true)) if !own_up => "up (fleet)",
        (true, Some(false)) if own_up => "down (fleet)",
        (true, _) if own_up => "up",
        (true, _) => "down",
    }
}

/// The guard's part of a VIP's view, when it has lists or limits.
fn guard_view(spec: &VipSpec) -> Option<crate::protocol::GuardView> {
    let v = crate::protocol::GuardView {
        allow_sources: spec.allow_sources.len(),
        deny_sources: spec.deny_sources.len(),
        new_flow_limit: spec.new_flow_limit,
        source_limit: spec.source_limit,
    };
    (v != crate::protocol::GuardView::default()).then_some(v)
}
