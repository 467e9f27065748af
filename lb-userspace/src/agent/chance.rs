//! Second chance's pure core: which previous backend each slot carries (GLB's "secondary",
//! Unimog's "previous"), from each slot's ownership history.
//!
//! Rules (the README's "Second chance" section says the same):
//! - Every time a slot of a `gue` VIP with `second_chance_s > 0` changes hands, the owner that
//!   loses it has held it for some time (its *tenure*). The slot remembers, as its candidate
//!   previous backend, the owner with the longest tenure among those that lost the slot less
//!   than `second_chance_s` ago. Connections accumulate with time, so the longest-serving
//!   recent owner is the one most likely to hold them: after a burst of changes (a rollout, a
//!   series of `lb backend` commands), the owner from before the burst stays the previous one
//!   however many times the slot moves. A table found in the kernel at start counts as held
//!   for ever.
//! - A slot carries its previous backend for `second_chance_s` after that backend lost it,
//!   only when it differs from the slot's backend and is usable: in the desired state and not
//!   health-down, or removed from it (*retired*) but still held by the kernel and not down.
//!   Retired backends stay in the kernel, marked drained, while a slot names them; their ids are
//!   not reused meanwhile (the kernel holds them).
//! - An agent that restarts adopts the previous backends the kernel's tables carry, for a
//!   whole window from its start (how much of the old window had passed is not known).
//! - One previous backend per slot (the GUE format allows more hops; the tables carry one):
//!   connections of a short-lived owner between two changes are not covered when an older,
//!   longer-serving owner is; the same limit as GLB and Unimog.
use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::{BACKEND_F_DOWN, BACKEND_F_DRAINED};

use crate::{
    agent::reconcile::{BackendTarget, KernelView, Target},
    model::{DesiredState, Forward, VipAddr},
};

/// Times are deciseconds since [`Windows::base`], in `u32` (13 years), to keep a VIP's
/// history at 16 bytes per slot. `LONG_AGO` marks a tenure that started before we knew.
const LONG_AGO: u32 = 0;

/// One VIP's slot history.
#[derive(Clone, Debug)]
struct History {
    /// The table the history last saw (what each slot's owner is).
    current: Vec<u32>,
    /// When each slot's owner got it.
    since: Vec<u32>,
    /// Each slot's candidate previous backend (0: none), its tenure and when it lost the slot.
    best: Vec<u32>,
    tenure: Vec<u32>,
    ended: Vec<u32>,
}

impl History {
    fn new(current: Vec<u32>, since: u32) -> Self {
        let m = current.len();
        History {
            current,
            since: vec![since; m],
            best: vec![0; m],
            tenure: vec![0; m],
            ended: vec![0; m],
        }
    }

    /// A history adopted from the kernel at start: the live table has been there "for ever",
    /// and each slot's live previous backend (a previous run's choice) stays its candidate,
    /// carried for a whole window from `now` (how much of it had passed is not known).
    fn adopted(current: Vec<u32>, previous: &[u32], now: u32) -> Self {
        let mut h = History::new(current, LONG_AGO);
        if previous.len() == h.current.len() {
            for (s, p) in previous.iter().enumerate() {
                if *p != 0 && *p != h.current[s] {
                    h.best[s] = *p;
                    h.tenure[s] = u32::MAX;
                    h.ended[s] = now;
                    // The slot's owner got it within the last window: its tenure starts now,
                    // shorter than the previous one's, so a later change keeps the previous
                    // backend (a tie would hand the candidacy to the short-lived owner).
                    h.since[s] = now;
                }
            }
        }
        h
    }

    /// Records the table becoming `table` at `now`.
    fn observe(&mut self, table: &[u32], now: u32, window: u32) {
        if table.len() != self.current.len() {
            // No table before (or a different size): nothing to remember from.
            *self = History::new(table.to_vec(), now);
            return;
        }
        for (s, new) in table.iter().enumerate() {
            let old = self.current[s];
            if old == *new {
                continue;
            }
            let tenure = if self.since[s] == LONG_AGO {
                u32::MAX
            } else {
                now.saturating_sub(self.since[s])
            };
            let expired = now >= self.ended[s].saturating_add(window);
            // A slot coming back to its candidate previous owner gives it its old tenure back
            // (its connections from then are still there), without the time it was away.
            let back = self.best[s] == *new && !expired;
            let since = if !back {
                now
            } else if self.tenure[s] == u32::MAX {
                LONG_AGO
            } else {
                now.saturating_sub(self.tenure[s]).max(1)
            };
            if old != 0
                && (self.best[s] == 0
                    || expired
                    || tenure >= self.tenure[s]
                    || self.best[s] == *new)
            {
                self.best[s] = old;
                self.tenure[s] = tenure;
                self.ended[s] = now;
            }
            self.current[s] = *new;
            self.since[s] = since;
        }
    }
}

/// Every second-chance VIP's history.
#[derive(Debug)]
pub struct Windows {
    base: Instant,
    vips: BTreeMap<VipAddr, History>,
    /// The earliest moment a carried previous backend expires (the agent converges then).
    next_end: Option<Instant>,
    /// Per VIP, when its last carried previous backend expires.
    ends: BTreeMap<VipAddr, Instant>,
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            base: Instant::now(),
            vips: BTreeMap::new(),
            next_end: None,
            ends: BTreeMap::new(),
        }
    }
}

impl Windows {
    fn ds(&self, t: Instant) -> u32 {
        // Never LONG_AGO: 1 decisecond after the base at the earliest.
        (t.saturating_duration_since(self.base).as_millis() / 100).clamp(1, u32::MAX as u128) as u32
    }

    fn at(&self, ds: u32) -> Instant {
        self.base + Duration::from_millis(u64::from(ds) * 100)
    }

    /// Records each second-chance VIP's table as of `now` and fills `target` in: the previous
    /// column of each VIP, and the retired backends those columns name.
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        view: &KernelView,
        target: &mut Target,
        now: Instant,
        kernel_slots: impl Fn(u32) -> Option<crate::agent::kernel::LiveSlots>,
    ) {
        let on = |vip: &VipAddr| {
            desired
                .vips
                .get(vip)
                .filter(|s| s.forward == Forward::Gue && s.second_chance_s > 0)
                .map(|s| s.second_chance_s * 10)
        };
        self.vips.retain(|vip, _| on(vip).is_some());
        self.ends.clear();
        self.next_end = None;
        let t = self.ds(now);
        for vip in desired.vips.keys() {
            let Some(window) = on(vip) else { continue };
            let Some(vt) = target.vips.get(&vip.key()) else {
                continue;
            };
            let history = self.vips.entry(*vip).or_insert_with(|| {
                // First sight: a live table in the kernel has been there "for ever" and keeps
                // the previous backends it carries (an agent restart loses no second chance);
                // a VIP without one starts from nothing.
                // After a restart the view has not read the tables: ask the kernel.
                let bound = view.vips.get(&vip.key()) == Some(&vt.id);
                let live = match view.published.get(&vt.id) {
                    Some(l) => Some((l.table.to_vec(), l.previous.to_vec())),
                    None if bound => kernel_slots(vt.id),
                    None => None,
                };
                match live.filter(|_| bound) {
                    Some((table, previous)) if !table.is_empty() => {
                        History::adopted(table, &previous, t)
                    }
                    _ => History::new(Vec::new(), t),
                }
            });
            if !vt.table.is_empty() {
                history.observe(&vt.table, t, window);
            }
            let mut column = vec![0u32; vt.table.len()];
            let mut any = false;
            let mut last_end = 0u32;
            for (s, cur) in vt.table.iter().enumerate() {
                let prev = history.best.get(s).copied().unwrap_or(0);
                let end = history
                    .ended
                    .get(s)
                    .copied()
                    .unwrap_or(0)
                    .saturating_add(window);
                if prev == 0 || prev == *cur || t >= end {
                    continue;
                }
                if usable(prev, view, &mut target.backends) {
                    column[s] = prev;
                    any = true;
                    last_end = last_end.max(end);
                    let end_at = self.base + Duration::from_millis(u64::from(end) * 100);
                    self.next_end = Some(self.next_end.map_or(end_at, |n| n.min(end_at)));
                }
            }
            if any {
                self.ends.insert(*vip, self.at(last_end));
            }
            if let Some(vt) = target.vips.get_mut(&vip.key()) {
                vt.previous = Arc::new(if any { column } else { Vec::new() });
            }
        }
    }

    /// When the earliest carried previous backend expires (the agent converges then).
    pub fn next_end(&self) -> Option<Instant> {
        self.next_end
    }

    /// When `vip`'s last carried previous backend expires, if it carries any.
    pub fn ends(&self, vip: &VipAddr) -> Option<Instant> {
        self.ends.get(vip).copied()
    }
}

/// Whether backend `id` may be carried as previous: in the target and not down, or retired
/// (only the kernel holds it) and not down, in which case it is kept, drained.
fn usable(id: u32, view: &KernelView, backends: &mut BTreeMap<u32, BackendTarget>) -> bool {
    match backends.get(&id) {
        Some(b) => b.flags & BACKEND_F_DOWN == 0,
        None => match view.backends.get(&id) {
            Some(b) if b.flags & BACKEND_F_DOWN == 0 => {
                backends.insert(
                    id,
                    BackendTarget {
                        flags: BACKEND_F_DRAINED,
                        ..*b
                    },
                );
                true
            }
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{
        agent::reconcile::{BackendTarget, Live, VipParams, VipTarget},
        model::{BackendSpec, Mac, VipSpec},
    };

    fn vip() -> VipAddr {
        "10.0.0.10:80/tcp".parse().unwrap()
    }

    fn backend(i: u8, flags: u32) -> BackendTarget {
        BackendTarget {
            addr: IpAddr::from([10, 42, 0, i]).into(),
            mac: Mac([0; 6]),
            encap: lb_common::ENCAP_GUE,
            flags,
        }
    }

    fn desired(window: u32, backends: &[u8]) -> DesiredState {
        let mut spec = VipSpec {
            forward: Forward::Gue,
            second_chance_s: window,
            ..VipSpec::default()
        };
        for b in backends {
            let b0 = BackendSpec {
                weight: 100,
                mac: None,
                drained: false,
            };
            spec.backends
                .insert(IpAddr::from([10, 42, 0, *b]).into(), b0);
        }
        let mut d = DesiredState::default();
        d.vips.insert(vip(), spec);
        d
    }

    /// A kernel holding `live` for VIP id 0 and backends `ids` (id i = address .i).
    fn view(live: &[u32], ids: &[(u32, u32)]) -> KernelView {
        let mut v = KernelView::default();
        v.vips.insert(vip().key(), 0);
        v.published.insert(
            0,
            Live {
                params: VipParams::default(),
                table: Arc::new(live.to_vec()),
                previous: Arc::new(Vec::new()),
            },
        );
        for (id, flags) in ids {
            v.backends.insert(*id, backend(*id as u8, *flags));
        }
        v
    }

    fn target(table: &[u32], ids: &[(u32, u32)]) -> Target {
        let mut t = Target::default();
        t.vips.insert(
            vip().key(),
            VipTarget {
                id: 0,
                params: VipParams::default(),
                table: Arc::new(table.to_vec()),
                previous: Arc::new(Vec::new()),
            },
        );
        for (id, flags) in ids {
            t.backends.insert(*id, backend(*id as u8, *flags));
        }
        t
    }

    #[test]
    fn the_longest_serving_recent_owner_is_the_previous_one() {
        let mut w = Windows::default();
        let now = Instant::now();
        let d = desired(60, &[1, 2, 3]);
        // 1 1 2 2 -> 1 3 3 2: slots 1 and 2 change hands.
        let mut t = target(&[1, 3, 3, 2], &[(1, 0), (2, 0), (3, 0)]);
        w.apply(
            &d,
            &view(&[1, 1, 2, 2], &[(1, 0), (2, 0)]),
            &mut t,
            now,
            |_| None,
        );
        assert_eq!(*t.vips[&vip().key()].previous, vec![0, 1, 2, 0]);
        let end = w.next_end().expect("an end");
        // Deciseconds: within one of 60 s.
        let after = end.duration_since(now).as_secs_f64();
        assert!((59.8..=60.2).contains(&after), "{after}");
        // Slot 1 moves again 10 s later (3 -> 2, a short tenure), slot 0 for the first time:
        // slot 1 keeps backend 1 (held it far longer), slot 0 gets backend 1 too.
        let all = [(1, 0), (2, 0), (3, 0)];
        let mut t2 = target(&[3, 2, 3, 2], &all);
        w.apply(
            &d,
            &view(&[1, 3, 3, 2], &all),
            &mut t2,
            now + Duration::from_secs(10),
            |_| None,
        );
        assert_eq!(*t2.vips[&vip().key()].previous, vec![1, 1, 2, 0]);
        // 61 s: slots 1 and 2 lost their previous owner over 60 s ago; slot 0 did not.
        let mut t3 = target(&[3, 2, 3, 2], &all);
        w.apply(
            &d,
            &view(&[3, 2, 3, 2], &all),
            &mut t3,
            now + Duration::from_secs(61),
            |_| None,
        );
        assert_eq!(*t3.vips[&vip().key()].previous, vec![1, 0, 0, 0]);
        // 71 s: nothing left.
        let mut t4 = target(&[3, 2, 3, 2], &all);
        w.apply(
            &d,
            &view(&[3, 2, 3, 2], &all),
            &mut t4,
            now + Duration::from_secs(71),
            |_| None,
        );
        assert!(t4.vips[&vip().key()].previous.is_empty());
        assert_eq!(w.next_end(), None);
        // After the window a change takes the owner it replaces, however short its tenure.
        let mut t5 = target(&[1, 2, 3, 2], &all);
        w.apply(
            &d,
            &view(&[3, 2, 3, 2], &all),
            &mut t5,
            now + Duration::from_secs(72),
            |_| None,
        );
        assert_eq!(*t5.vips[&vip().key()].previous, vec![3, 0, 0, 0]);
    }

    #[test]
    fn down_backends_are_never_previous_and_removed_ones_are_kept_drained() {
        let now = Instant::now();
        let d = desired(60, &[2, 3]);
        // Backend 1 was removed (the kernel still holds it), backend 2 is down.
        let live = view(&[1, 2, 3], &[(1, 0), (2, 0), (3, 0)]);
        let mut t = target(&[3, 3, 3], &[(2, BACKEND_F_DOWN), (3, 0)]);
        let mut w = Windows::default();
        w.apply(&d, &live, &mut t, now, |_| None);
        assert_eq!(*t.vips[&vip().key()].previous, vec![1, 0, 0]);
        assert_eq!(t.backends[&1].flags, BACKEND_F_DRAINED, "retired, drained");
        // A removed backend that was down is not kept.
        let live = view(&[1, 2, 3], &[(1, BACKEND_F_DOWN), (2, 0), (3, 0)]);
        let mut t = target(&[3, 3, 3], &[(2, 0), (3, 0)]);
        let mut w = Windows::default();
        w.apply(&d, &live, &mut t, now, |_| None);
        assert_eq!(*t.vips[&vip().key()].previous, vec![0, 2, 0]);
        assert!(!t.backends.contains_key(&1));
    }

    #[test]
    fn a_restarted_agent_keeps_the_previous_backends_the_kernel_carries() {
        let now = Instant::now();
        let d = desired(60, &[2, 3]);
        // The kernel (from the previous run): slots 0 and 1 carry 1 (now retired) and 2.
        let all = [(1, 0), (2, 0), (3, 0)];
        let mut live = view(&[3, 3, 2], &all);
        live.published.get_mut(&0).unwrap().previous = Arc::new(vec![1, 2, 0]);
        let mut t = target(&[3, 3, 2], &[(2, 0), (3, 0)]);
        let mut w = Windows::default();
        w.apply(&d, &live, &mut t, now, |_| None);
        assert_eq!(*t.vips[&vip().key()].previous, vec![1, 2, 0]);
        assert_eq!(
            t.backends[&1].flags, BACKEND_F_DRAINED,
            "retired, still held"
        );
        // Carried for a whole window from the restart, then dropped.
        let end = w
            .next_end()
            .expect("an end")
            .duration_since(now)
            .as_secs_f64();
        assert!((59.8..=60.2).contains(&end), "{end}");
        let mut t2 = target(&[3, 3, 2], &[(2, 0), (3, 0)]);
        w.apply(&d, &live, &mut t2, now + Duration::from_secs(61), |_| None);
        assert!(t2.vips[&vip().key()].previous.is_empty());
        // Right after a start the view has read no tables: the kernel's live slots are asked.
        let mut fresh = live.clone();
        fresh.published.clear();
        let mut t3 = target(&[3, 3, 2], &[(2, 0), (3, 0)]);
        let mut w = Windows::default();
        w.apply(&d, &fresh, &mut t3, now, |id| {
            (id == 0).then(|| (vec![3, 3, 2], vec![1, 2, 0]))
        });
        assert_eq!(*t3.vips[&vip().key()].previous, vec![1, 2, 0]);
        // A change after the restart moves slots 0 and 1 from 3 to 2 and slot 2 from 2 to 3:
        // slot 0 keeps its adopted previous backend 1 (the short-lived owner 3 does not take
        // its place); slot 1 comes back to its previous owner 2, so 3 becomes its previous;
        // slot 2 had none, its "for ever" owner 2 becomes one.
        let mut t4 = target(&[2, 2, 3], &[(2, 0), (3, 0)]);
        let mut moved = view(&[3, 3, 2], &all);
        moved.published.get_mut(&0).unwrap().previous = Arc::new(vec![1, 2, 0]);
        w.apply(&d, &moved, &mut t4, now + Duration::from_secs(5), |_| None);
        assert_eq!(*t4.vips[&vip().key()].previous, vec![1, 3, 2]);
    }

    #[test]
    fn no_window_when_off_or_not_gue() {
        let now = Instant::now();
        let live = view(&[1, 2], &[(1, 0), (2, 0)]);
        for d in [desired(0, &[1, 2]), {
            let mut d = desired(60, &[1, 2]);
            d.vips.get_mut(&vip()).unwrap().forward = Forward::Ipip;
            d
        }] {
            let mut t = target(&[2, 2], &[(1, 0), (2, 0)]);
            let mut w = Windows::default();
            w.apply(&d, &live, &mut t, now, |_| None);
            assert!(t.vips[&vip().key()].previous.is_empty());
            assert_eq!(w.next_end(), None);
        }
    }
}
