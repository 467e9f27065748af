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
//! - An agent that restarts resumes the history the previous run saved ([`saved`], written
//!   beside the state file after every change of it): each slot's owner, its start time, the
//!   candidate previous backend, its tenure and when it lost the slot. A slot whose saved
//!   owner and previous backend are what the kernel's table holds keeps its times; any other
//!   slot (no saved history, a history older than the last table written before a kill -9)
//!   adopts the previous backend the kernel carries, for a whole window from the start, and
//!   counts as its longest-serving recent owner (nothing says otherwise).
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

pub mod saved;

/// Times are deciseconds in `u32` (13 years), to keep a VIP's history at 20 bytes per slot:
/// [`EPOCH_DS`] at [`Windows::base`], so that times restored from a previous run (earlier
/// than this run's base) stay representable. `LONG_AGO` marks a tenure that started before
/// we knew.
const LONG_AGO: u32 = 0;
/// The clock's value at [`Windows::base`]: 10^7 ds (11.6 days) of room for restored times;
/// older ones become 1 (long ago, but not "for ever").
const EPOCH_DS: u32 = 10_000_000;

/// One VIP's slot history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History {
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
    ///
    /// With `saved` (the previous run's history, its times in this run's clock), every slot
    /// whose saved owner and candidate are what the kernel holds keeps the saved times.
    fn adopted(current: Vec<u32>, previous: &[u32], now: u32, saved: Option<&History>) -> Self {
        let mut h = History::new(current, LONG_AGO);
        let saved = saved.filter(|o| o.current.len() == h.current.len());
        let carried = |s: usize| previous.get(s).copied().unwrap_or(0);
        for s in 0..h.current.len() {
            let p = carried(s);
            if let Some(o) = saved
                && o.current[s] == h.current[s]
                && (p == 0 || p == o.best[s])
            {
                h.since[s] = o.since[s];
                h.best[s] = o.best[s];
                h.tenure[s] = o.tenure[s];
                h.ended[s] = o.ended[s];
            } else if p != 0 && p != h.current[s] {
                h.best[s] = p;
                h.tenure[s] = u32::MAX;
                h.ended[s] = now;
                // The slot's owner got it within the last window: its tenure starts now,
                // shorter than the previous one's, so a later change keeps the previous
                // backend (a tie would hand the candidacy to the short-lived owner).
                h.since[s] = now;
            }
        }
        h
    }

    /// Each slot's candidate previous backend and its tenure (tests compare histories).
    #[cfg(test)]
    pub fn candidates(&self) -> (&[u32], &[u32]) {
        (&self.best, &self.tenure)
    }

    /// Records the table becoming `table` at `now`; says whether anything changed.
    fn observe(&mut self, table: &[u32], now: u32, window: u32) -> bool {
        if table.len() != self.current.len() {
            // No table before (or a different size): nothing to remember from.
            *self = History::new(table.to_vec(), now);
            return true;
        }
        let mut changed = false;
        for (s, new) in table.iter().enumerate() {
            let old = self.current[s];
            if old == *new {
                continue;
            }
            changed = true;
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
        changed
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
    /// The previous run's histories (times in this run's clock), each taken at its VIP's
    /// first sight.
    restored: BTreeMap<VipAddr, History>,
    /// Bumped by every change of a history: what was last saved is known by it.
    version: u64,
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            base: Instant::now(),
            vips: BTreeMap::new(),
            next_end: None,
            ends: BTreeMap::new(),
            restored: BTreeMap::new(),
            version: 0,
        }
    }
}

impl Windows {
    fn ds(&self, t: Instant) -> u32 {
        let since = t.saturating_duration_since(self.base).as_millis() / 100;
        (since + u128::from(EPOCH_DS)).min(u32::MAX as u128) as u32
    }

    fn at(&self, ds: u32) -> Instant {
        instant_at(self.base, ds)
    }

    /// The histories as of `now` (wall clock `now_unix_ms`), to be saved, with the version
    /// they are; `None` when version `saved` is already the latest.
    pub fn snapshot(
        &self,
        saved: u64,
        now: Instant,
        now_unix_ms: u64,
    ) -> Option<(u64, saved::Saved)> {
        (self.version != saved).then(|| {
            let vips = self.vips.clone();
            (
                self.version,
                saved::Saved {
                    unix_ms: now_unix_ms,
                    ds: self.ds(now),
                    vips,
                },
            )
        })
    }

    /// Takes the previous run's histories, saved at `from.unix_ms` (wall clock), into this
    /// run's clock as of `now` / `now_unix_ms`: each is resumed at its VIP's first sight
    /// where it agrees with the kernel.
    pub fn restore(&mut self, from: saved::Saved, now: Instant, now_unix_ms: u64) {
        // How far the old clock's save moment lies behind this clock's now.
        let elapsed =
            i64::try_from(now_unix_ms.saturating_sub(from.unix_ms) / 100).unwrap_or(i64::MAX / 4);
        let shift = i64::from(self.ds(now)) - elapsed - i64::from(from.ds);
        let moved = |t: u32| -> u32 {
            if t == LONG_AGO {
                LONG_AGO
            } else {
                (i64::from(t) + shift).clamp(1, i64::from(u32::MAX)) as u32
            }
        };
        self.restored = from
            .vips
            .into_iter()
            .map(|(vip, mut h)| {
                for t in h.since.iter_mut().chain(h.ended.iter_mut()) {
                    *t = moved(*t);
                }
                (vip, h)
            })
            .collect();
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
        let before = self.vips.len();
        self.vips.retain(|vip, _| on(vip).is_some());
        let mut changed = self.vips.len() != before;
        self.ends.clear();
        self.next_end = None;
        let t = self.ds(now);
        for vip in desired.vips.keys() {
            let Some(window) = on(vip) else { continue };
            let Some(vt) = target.vips.get(&vip.key()) else {
                continue;
            };
            let restored = self.restored.remove(vip);
            let history = self.vips.entry(*vip).or_insert_with(|| {
                changed = true;
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
                        History::adopted(table, &previous, t, restored.as_ref())
                    }
                    _ => History::new(Vec::new(), t),
                }
            });
            if !vt.table.is_empty() && history.observe(&vt.table, t, window) {
                changed = true;
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
                    let end_at = instant_at(self.base, end);
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
        // The first convergence took every restored history it could use.
        self.restored.clear();
        if changed {
            self.version += 1;
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

/// The moment clock value `ds` names, for a clock that read [`EPOCH_DS`] at `base`.
fn instant_at(base: Instant, ds: u32) -> Instant {
    let ms = |d: u32| Duration::from_millis(u64::from(d) * 100);
    if ds >= EPOCH_DS {
        base + ms(ds - EPOCH_DS)
    } else {
        base.checked_sub(ms(EPOCH_DS - ds)).unwrap_or(base)
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
mod tests;
