//! Second chance's pure core: which previous backends each slot carries (GLB's "secondary",
//! Unimog's "previous"; up to `lb_common::PREVIOUS_HOPS`), from each slot's ownership history.
//!
//! Rules (the README's "Second chance" section says the same):
//! - Every time a slot of a `gue` VIP with `second_chance_s > 0` changes hands, the owner that
//!   loses it has held it for some time (its *tenure*). The slot remembers, as its candidate
//!   previous backends, the `PREVIOUS_HOPS` owners with the longest tenures among those that
//!   lost the slot less than `second_chance_s` ago, the longest first. Connections accumulate
//!   with time, so the longest-serving recent owners are the likeliest to hold them: after a
//!   burst of changes (a rollout, a series of `lb backend` commands), the owner from before the
//!   burst stays a previous one however many times the slot moves, and up to two changes
//!   within a window lose nobody (a connection made on the owner between two changes is
//!   carried beside the owner before it). A table found in the kernel at start counts as held
//!   for ever.
//! - A slot carries each previous backend for `second_chance_s` after that backend lost it,
//!   only when it differs from the slot's backend and is usable: in the desired state and not
//!   health-down, or removed from it (*retired*) but still held by the kernel and not down;
//!   and when the kernel can carry it: the family of the slot's backend, another address.
//!   Retired backends stay in the kernel, marked drained, while a slot names them; their ids are
//!   not reused meanwhile (the kernel holds them).
//! - An agent that restarts resumes the history the previous run saved ([`saved`], written
//!   beside the state file after every change of it): each slot's owner, its start time, and
//!   the candidates with their tenures and when they lost the slot. A slot whose saved owner is
//!   what the kernel's table holds, and whose carried previous backends are saved candidates,
//!   keeps its times; any other slot (no saved history, a history older than the last table
//!   written before a kill -9) adopts the previous backends the kernel carries, for a whole
//!   window from the start, counted as its longest-serving recent owners (nothing says
//!   otherwise).
//! - `PREVIOUS_HOPS` previous backends per slot (the GUE format allows four hops): after more
//!   changes than that within a window, the connections of the shortest-serving owners are
//!   not covered.
use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::{BACKEND_F_DOWN, BACKEND_F_DRAINED, PREVIOUS_HOPS, Previous, VipKey};

use crate::{
    agent::reconcile::{BackendTarget, KernelView, Target, VipTarget},
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

/// An owner that lost a slot: its id (0: none), how long it had held the slot (its tenure,
/// `u32::MAX`: for ever) and when it lost it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Candidate {
    pub id: u32,
    pub tenure: u32,
    pub ended: u32,
}

/// A slot's candidate previous backends: the longest-serving first, empty ones (id 0) last.
pub type Candidates = [Candidate; PREVIOUS_HOPS];

/// One VIP's slot history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History {
    /// The table the history last saw (what each slot's owner is).
    current: Vec<u32>,
    /// When each slot's owner got it.
    since: Vec<u32>,
    /// Each slot's candidate previous backends.
    candidates: Vec<Candidates>,
}

impl History {
    fn new(current: Vec<u32>, since: u32) -> Self {
        let m = current.len();
        History {
            current,
            since: vec![since; m],
            candidates: vec![Candidates::default(); m],
        }
    }

    /// A history adopted from the kernel at start: the live table has been there "for ever",
    /// and each slot's live previous backends (a previous run's choice) stay its candidates,
    /// carried for a whole window from `now` (how much of it had passed is not known).
    ///
    /// With `saved` (the previous run's history, its times in this run's clock), every slot
    /// whose saved owner is what the kernel holds and whose carried previous backends are
    /// among the saved candidates keeps the saved times (a candidate the previous run did not
    /// carry, being down or expired, is still in the history).
    fn adopted(
        current: Vec<u32>,
        previous: &[Previous],
        now: u32,
        saved: Option<&History>,
    ) -> Self {
        let mut h = History::new(current, LONG_AGO);
        let saved = saved.filter(|o| o.current.len() == h.current.len());
        for s in 0..h.current.len() {
            let carried = previous.get(s).copied().unwrap_or_default();
            let carried = carried
                .iter()
                .copied()
                .filter(|p| *p != 0 && *p != h.current[s]);
            if let Some(o) = saved
                && o.current[s] == h.current[s]
                && carried
                    .clone()
                    .all(|p| o.candidates[s].iter().any(|c| c.id == p))
            {
                h.since[s] = o.since[s];
                h.candidates[s] = o.candidates[s];
                continue;
            }
            for (i, p) in carried.enumerate() {
                h.candidates[s][i] = Candidate {
                    id: p,
                    tenure: u32::MAX,
                    ended: now,
                };
                // The slot's owner got it within the last window: its tenure starts now,
                // shorter than the previous ones', so a later change keeps them (a tie would
                // hand a candidacy to the short-lived owner).
                h.since[s] = now;
            }
        }
        h
    }

    /// Each slot's candidate previous backends (tests compare histories).
    #[cfg(test)]
    pub fn candidates(&self) -> &[Candidates] {
        &self.candidates
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
            let c = &mut self.candidates[s];
            for x in c.iter_mut() {
                if x.id != 0 && now >= x.ended.saturating_add(window) {
                    *x = Candidate::default();
                }
            }
            // A slot coming back to a candidate previous owner gives it its old tenure back
            // (its connections from then are still there), without the time it was away.
            let since = match c.iter_mut().find(|x| x.id == *new) {
                Some(x) => {
                    let t = x.tenure;
                    *x = Candidate::default();
                    if t == u32::MAX {
                        LONG_AGO
                    } else {
                        now.saturating_sub(t).max(1)
                    }
                }
                None => now,
            };
            if old != 0 {
                remember(
                    c,
                    Candidate {
                        id: old,
                        tenure,
                        ended: now,
                    },
                );
            }
            self.current[s] = *new;
            self.since[s] = since;
        }
        changed
    }
}

/// Takes `lost` among a slot's candidates: in a free place, else in place of the candidate
/// with the shortest tenure if `lost` served at least as long (connections accumulate with
/// time: the longest-serving recent owners are the likeliest to hold them). Keeps the order:
/// longest tenure first, empty places last.
fn remember(c: &mut Candidates, lost: Candidate) {
    for x in c.iter_mut() {
        if x.id == lost.id {
            *x = Candidate::default();
        }
    }
    c.sort_by_key(|x| (x.id == 0, std::cmp::Reverse(x.tenure)));
    let last = &mut c[PREVIOUS_HOPS - 1];
    if last.id == 0 || lost.tenure >= last.tenure {
        *last = lost;
    }
    // Stable: of equal tenures the one that lost the slot earlier stays first.
    c.sort_by_key(|x| (x.id == 0, std::cmp::Reverse(x.tenure)));
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
                for t in h.since.iter_mut() {
                    *t = moved(*t);
                }
                for c in h.candidates.iter_mut().flatten() {
                    c.ended = moved(c.ended);
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
                first_sight(view, &vip.key(), vt, restored.as_ref(), t, &kernel_slots)
            });
            if !vt.table.is_empty() && history.observe(&vt.table, t, window) {
                changed = true;
            }
            let table = vt.table.clone();
            let column = previous_column(history, &table, view, &mut target.backends, window, t);
            if let Some(end) = column.earliest_end {
                let end_at = instant_at(self.base, end);
                self.next_end = Some(self.next_end.map_or(end_at, |n| n.min(end_at)));
            }
            let any = column.last_end.is_some();
            if let Some(end) = column.last_end {
                self.ends.insert(*vip, self.at(end));
            }
            let column = column.previous;
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

/// A VIP's history at its first sight: a live table in the kernel has been there "for ever"
/// and keeps the previous backends it carries (an agent restart loses no second chance); a
/// VIP without one starts from nothing. After a restart the view has not read the tables, so
/// the kernel is asked.
fn first_sight(
    view: &KernelView,
    key: &VipKey,
    vt: &VipTarget,
    restored: Option<&History>,
    t: u32,
    kernel_slots: &impl Fn(u32) -> Option<crate::agent::kernel::LiveSlots>,
) -> History {
    let bound = view.vips.get(key) == Some(&vt.id);
    let live = match view.published.get(&vt.id) {
        Some(l) => Some((l.table.to_vec(), l.previous.to_vec())),
        None if bound => kernel_slots(vt.id),
        None => None,
    };
    match live.filter(|_| bound) {
        Some((table, previous)) if !table.is_empty() => {
            History::adopted(table, &previous, t, restored)
        }
        _ => History::new(Vec::new(), t),
    }
}

/// One VIP's previous column as of `t`.
struct Column {
    previous: Vec<Previous>,
    /// When the last carried previous backend expires, if any is carried.
    last_end: Option<u32>,
    /// When the earliest candidate kept in the kernel expires, if any is.
    earliest_end: Option<u32>,
}

/// The previous backends each slot of `table` carries: its history's candidates still within
/// their window, kept in `backends` so that their ids are not given to another backend while
/// the history names them, and carried when usable.
fn previous_column(
    history: &History,
    table: &[u32],
    view: &KernelView,
    backends: &mut BTreeMap<u32, BackendTarget>,
    window: u32,
    t: u32,
) -> Column {
    let mut column = Column {
        previous: vec![Previous::default(); table.len()],
        last_end: None,
        earliest_end: None,
    };
    for (s, cur) in table.iter().enumerate() {
        let Some(owner) = backends.get(cur).map(|b| b.addr.ip) else {
            continue;
        };
        let mut n = 0;
        let mut hops = [owner; PREVIOUS_HOPS + 1];
        for c in history.candidates.get(s).into_iter().flatten() {
            let end = c.ended.saturating_add(window);
            if c.id == 0 || c.id == *cur || t >= end {
                continue;
            }
            // Every candidate within its window stays in the kernel, so that its id is not
            // given to another backend while the history names it.
            let Some(b) = retained(c.id, view, backends) else {
                continue;
            };
            column.earliest_end = Some(column.earliest_end.map_or(end, |e| e.min(end)));
            // Carried when usable (not down) and the kernel can carry it
            // (`encap::second_chance_hops`): the owner's family, an address neither the
            // owner's nor one already in the list (one host, one hop).
            let ip = b.addr.ip;
            if b.flags & BACKEND_F_DOWN != 0
                || ip.is_ipv4() != owner.is_ipv4()
                || hops[..=n].contains(&ip)
            {
                continue;
            }
            column.previous[s][n] = c.id;
            n += 1;
            hops[n] = ip;
            column.last_end = Some(column.last_end.map_or(end, |e| e.max(end)));
        }
    }
    column
}

/// Backend `id`, a candidate within its window, as the target holds it: in the target
/// already, or retired (only the kernel holds it), in which case it is kept in the target,
/// drained (or down, if it is), so the kernel keeps its entry and its id is not reused while
/// the history names it. `None`: the kernel does not hold it either.
fn retained(
    id: u32,
    view: &KernelView,
    backends: &mut BTreeMap<u32, BackendTarget>,
) -> Option<BackendTarget> {
    if let Some(b) = backends.get(&id) {
        return Some(*b);
    }
    let b = view.backends.get(&id)?;
    let kept = BackendTarget {
        flags: if b.flags & BACKEND_F_DOWN != 0 {
            BACKEND_F_DOWN
        } else {
            BACKEND_F_DRAINED
        },
        ..*b
    };
    backends.insert(id, kept);
    Some(kept)
}

#[cfg(test)]
mod tests;
