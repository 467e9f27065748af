//! Second chance's pure core: drain windows per VIP, and the previous-backend column of each
//! slot table (GLB's "primary and secondary", Unimog's "current and previous").
//!
//! Rules (the README's "Second chance" section says the same):
//! - A `gue` VIP with `second_chance_s > 0` opens a window when its live table is about to be
//!   replaced and none is open: the live table becomes the window's *previous* table, and the
//!   window ends `second_chance_s` later.
//! - Changes inside an open window keep that previous table: connections that existed when the
//!   window opened survive any number of changes during it. (A connection opened during the
//!   window on a slot that changes again before the window ends is not covered; the same limit
//!   as GLB and Unimog, which carry one previous backend per slot.)
//! - A slot's previous backend is carried only when it differs from the slot's backend and is
//!   still usable: in the desired state and not health-down, or removed from it (*retired*) but
//!   still held by the kernel and not down. Retired backends stay in the kernel, marked
//!   drained, until the window ends; their ids are not reused meanwhile (the kernel holds them).
//! - When the window ends the previous column is cleared and retired backends are removed.
use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::{BACKEND_F_DOWN, BACKEND_F_DRAINED};

use crate::{
    agent::reconcile::{KernelView, Target},
    model::{DesiredState, Forward, VipAddr},
};

/// One VIP's open window.
#[derive(Clone, Debug)]
struct Window {
    previous: Arc<Vec<u32>>,
    until: Instant,
}

/// Every open window.
#[derive(Debug, Default)]
pub struct Windows {
    open: BTreeMap<VipAddr, Window>,
}

impl Windows {
    /// Opens, keeps or closes each VIP's window at `now` and fills `target` in: the previous
    /// column of each VIP in a window, and the retired backends those columns name.
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        view: &KernelView,
        target: &mut Target,
        now: Instant,
    ) {
        self.open.retain(|vip, w| {
            desired
                .vips
                .get(vip)
                .is_some_and(|s| s.forward == Forward::Gue && s.second_chance_s > 0)
                && w.until > now
        });
        for (vip, spec) in &desired.vips {
            if spec.forward != Forward::Gue || spec.second_chance_s == 0 {
                continue;
            }
            let Some(t) = target.vips.get(&vip.key()) else {
                continue;
            };
            let live = view
                .published
                .get(&t.id)
                .filter(|_| view.vips.get(&vip.key()) == Some(&t.id));
            if !self.open.contains_key(vip)
                && let Some(live) = live
                && !live.table.is_empty()
                && live.table != t.table
            {
                self.open.insert(
                    *vip,
                    Window {
                        previous: live.table.clone(),
                        until: now + Duration::from_secs(u64::from(spec.second_chance_s)),
                    },
                );
            }
        }
        for (vip, w) in &self.open {
            let Some(t) = target.vips.get(&vip.key()) else {
                continue;
            };
            let mut column = vec![0u32; t.table.len()];
            let mut any = false;
            for (s, (cur, prev)) in t.table.iter().zip(w.previous.iter()).enumerate() {
                if *prev == 0 || prev == cur {
                    continue;
                }
                let usable = match target.backends.get(prev) {
                    Some(b) => b.flags & BACKEND_F_DOWN == 0,
                    None => match view.backends.get(prev) {
                        Some(b) if b.flags & BACKEND_F_DOWN == 0 => {
                            // Retired: kept, drained (its remembered flows stay).
                            target.backends.insert(
                                *prev,
                                crate::agent::reconcile::BackendTarget {
                                    flags: BACKEND_F_DRAINED,
                                    ..*b
                                },
                            );
                            true
                        }
                        _ => false,
                    },
                };
                if usable {
                    column[s] = *prev;
                    any = true;
                }
            }
            if let Some(t) = target.vips.get_mut(&vip.key()) {
                t.previous = if any {
                    Arc::new(column)
                } else {
                    Arc::new(Vec::new())
                };
            }
        }
    }

    /// When the earliest open window ends (the agent converges then).
    pub fn next_end(&self) -> Option<Instant> {
        self.open.values().map(|w| w.until).min()
    }

    /// When `vip`'s window ends, if one is open.
    pub fn ends(&self, vip: &VipAddr) -> Option<Instant> {
        self.open.get(vip).map(|w| w.until)
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
            addr: IpAddr::from([10, 42, 0, i]),
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
            spec.backends.insert(IpAddr::from([10, 42, 0, *b]), b0);
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
    fn a_change_opens_a_window_that_keeps_the_table_before_it() {
        let mut w = Windows::default();
        let now = Instant::now();
        let d = desired(60, &[1, 2, 3]);
        // 1 1 2 2 -> 1 3 3 2: slots 1 and 2 change hands.
        let mut t = target(&[1, 3, 3, 2], &[(1, 0), (2, 0), (3, 0)]);
        w.apply(&d, &view(&[1, 1, 2, 2], &[(1, 0), (2, 0)]), &mut t, now);
        assert_eq!(*t.vips[&vip().key()].previous, vec![0, 1, 2, 0]);
        assert_eq!(w.next_end(), Some(now + Duration::from_secs(60)));
        // A second change inside the window keeps the table from before the first.
        let mut t2 = target(&[3, 3, 3, 2], &[(1, 0), (2, 0), (3, 0)]);
        let live = view(&[1, 3, 3, 2], &[(1, 0), (2, 0), (3, 0)]);
        w.apply(&d, &live, &mut t2, now + Duration::from_secs(10));
        assert_eq!(*t2.vips[&vip().key()].previous, vec![1, 1, 2, 0]);
        // When the window ends the column is cleared.
        let mut t3 = target(&[3, 3, 3, 2], &[(1, 0), (2, 0), (3, 0)]);
        let live = view(&[3, 3, 3, 2], &[(1, 0), (2, 0), (3, 0)]);
        w.apply(&d, &live, &mut t3, now + Duration::from_secs(61));
        assert!(t3.vips[&vip().key()].previous.is_empty());
        assert_eq!(w.next_end(), None);
    }

    #[test]
    fn down_backends_are_never_previous_and_removed_ones_are_kept_drained() {
        let now = Instant::now();
        let d = desired(60, &[2, 3]);
        // Backend 1 was removed (the kernel still holds it), backend 2 is down.
        let live = view(&[1, 2, 3], &[(1, 0), (2, 0), (3, 0)]);
        let mut t = target(&[3, 3, 3], &[(2, BACKEND_F_DOWN), (3, 0)]);
        let mut w = Windows::default();
        w.apply(&d, &live, &mut t, now);
        assert_eq!(*t.vips[&vip().key()].previous, vec![1, 0, 0]);
        assert_eq!(t.backends[&1].flags, BACKEND_F_DRAINED, "retired, drained");
        // A removed backend that was down is not kept.
        let live = view(&[1, 2, 3], &[(1, BACKEND_F_DOWN), (2, 0), (3, 0)]);
        let mut t = target(&[3, 3, 3], &[(2, 0), (3, 0)]);
        let mut w = Windows::default();
        w.apply(&d, &live, &mut t, now);
        assert_eq!(*t.vips[&vip().key()].previous, vec![0, 2, 0]);
        assert!(!t.backends.contains_key(&1));
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
            w.apply(&d, &live, &mut t, now);
            assert!(t.vips[&vip().key()].previous.is_empty());
            assert_eq!(w.next_end(), None);
        }
    }
}
