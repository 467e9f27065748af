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

/// Each slot's carried previous backends (empty lists: no window anywhere).
fn carried(t: &Target) -> Vec<Vec<u32>> {
    t.vips[&vip().key()]
        .previous
        .iter()
        .map(|p| p.iter().copied().take_while(|id| *id != 0).collect())
        .collect()
}

/// A kernel column from lists of ids.
fn column(slots: &[&[u32]]) -> Vec<lb_common::Previous> {
    slots
        .iter()
        .map(|ids| {
            let mut p = lb_common::Previous::default();
            p[..ids.len()].copy_from_slice(ids);
            p
        })
        .collect()
}

#[test]
fn the_longest_serving_recent_owners_are_the_previous_ones() {
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
    assert_eq!(carried(&t), [vec![], vec![1], vec![2], vec![]]);
    let end = w.next_end().expect("an end");
    // Deciseconds: within one of 60 s.
    let after = end.duration_since(now).as_secs_f64();
    assert!((59.8..=60.2).contains(&after), "{after}");
    // Slot 1 moves again 10 s later (3 -> 2, a short tenure), slot 0 for the first time:
    // slot 1 carries backend 1 (held it far longer) first, then 3; slot 0 gets backend 1.
    let all = [(1, 0), (2, 0), (3, 0)];
    let mut t2 = target(&[3, 2, 3, 2], &all);
    w.apply(
        &d,
        &view(&[1, 3, 3, 2], &all),
        &mut t2,
        now + Duration::from_secs(10),
        |_| None,
    );
    assert_eq!(carried(&t2), [vec![1], vec![1, 3], vec![2], vec![]]);
    // 61 s: slots 1 and 2 lost their first previous owner over 60 s ago; slot 0 did not, nor
    // did slot 1 its second.
    let mut t3 = target(&[3, 2, 3, 2], &all);
    w.apply(
        &d,
        &view(&[3, 2, 3, 2], &all),
        &mut t3,
        now + Duration::from_secs(61),
        |_| None,
    );
    assert_eq!(carried(&t3), [vec![1], vec![3], vec![], vec![]]);
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
    assert_eq!(carried(&t5), [vec![3], vec![], vec![], vec![]]);
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
    assert_eq!(carried(&t), [vec![1], vec![], vec![]]);
    assert_eq!(t.backends[&1].flags, BACKEND_F_DRAINED, "retired, drained");
    // A removed backend that was down is not carried, but stays in the kernel, down, while
    // the history names it: its id is not given to another backend meanwhile.
    let live = view(&[1, 2, 3], &[(1, BACKEND_F_DOWN), (2, 0), (3, 0)]);
    let mut t = target(&[3, 3, 3], &[(2, 0), (3, 0)]);
    let mut w = Windows::default();
    w.apply(&d, &live, &mut t, now, |_| None);
    assert_eq!(carried(&t), [vec![], vec![2], vec![]]);
    assert_eq!(t.backends[&1].flags, BACKEND_F_DOWN, "kept, down");
}

/// A backend removed and added again gets a new id; the old id, a candidate whose address is
/// the owner's (so not carried), stays in the kernel while the history names it: freed, its
/// id went to the next backend added and the slot later carried that backend's address in
/// place of the real previous owner's (seen as a broken connection in the 100-changes test).
/// Two candidates on one address make one hop.
#[test]
fn a_candidate_keeps_its_id_and_an_address_is_one_hop() {
    let now = Instant::now();
    let s = |secs: u64| now + Duration::from_secs(secs);
    let d = desired(60, &[1, 2]);
    let at = |id: u32, last: u8| {
        (
            id,
            BackendTarget {
                addr: IpAddr::from([10, 42, 0, last]).into(),
                ..backend(last, 0)
            },
        )
    };
    // Ids 1 and 3 are the same address (.1, removed and added again), 2 is .2.
    let (a, a2, b) = (at(1, 1), at(3, 1), at(2, 2));
    let mut w = Windows::default();
    let mut v = view(&[1], &[]);
    v.backends = [a, b].into_iter().collect();
    // 0 s: 1 -> 2 (1 removed: retired).
    let mut t = target(&[2], &[]);
    t.backends = [b].into_iter().collect();
    w.apply(&d, &v, &mut t, s(0), |_| None);
    assert_eq!(carried(&t), [vec![1]]);
    // 10 s: .1 added again as id 3, which takes the slot: id 1 shares the owner's address.
    v.published.get_mut(&0).unwrap().table = Arc::new(vec![2]);
    v.backends = [a, b].into_iter().collect();
    let mut t = target(&[3], &[]);
    t.backends = [a2, b].into_iter().collect();
    w.apply(&d, &v, &mut t, s(10), |_| None);
    assert_eq!(carried(&t), [vec![2]], "id 1 is the owner's address");
    assert_eq!(t.backends[&1].flags, BACKEND_F_DRAINED, "id 1 still held");
    // 20 s: the slot goes to 2 again: ids 1 and 3 (one address) make one hop.
    v.published.get_mut(&0).unwrap().table = Arc::new(vec![3]);
    v.backends = [a, a2, b].into_iter().collect();
    let mut t = target(&[2], &[]);
    t.backends = [a2, b].into_iter().collect();
    w.apply(&d, &v, &mut t, s(20), |_| None);
    assert_eq!(carried(&t), [vec![1]], "one hop for .1");
    assert_eq!(w.vips[&vip()].candidates()[0].map(|c| c.id), [1, 3, 0]);
}

#[test]
fn a_restarted_agent_keeps_the_previous_backends_the_kernel_carries() {
    let now = Instant::now();
    let d = desired(60, &[2, 3]);
    // The kernel (from the previous run): slots 0 and 1 carry 1 (now retired) and 2.
    let all = [(1, 0), (2, 0), (3, 0)];
    let mut live = view(&[3, 3, 2], &all);
    live.published.get_mut(&0).unwrap().previous = Arc::new(column(&[&[1], &[2], &[]]));
    let mut t = target(&[3, 3, 2], &[(2, 0), (3, 0)]);
    let mut w = Windows::default();
    w.apply(&d, &live, &mut t, now, |_| None);
    assert_eq!(carried(&t), [vec![1], vec![2], vec![]]);
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
        (id == 0).then(|| (vec![3, 3, 2], column(&[&[1], &[2], &[]])))
    });
    assert_eq!(carried(&t3), [vec![1], vec![2], vec![]]);
    // A change after the restart moves slots 0 and 1 from 3 to 2 and slot 2 from 2 to 3:
    // slot 0 keeps its adopted previous backend 1 first (the short-lived owner 3 comes
    // after it); slot 1 comes back to its previous owner 2, so 3 becomes its previous;
    // slot 2 had none, its "for ever" owner 2 becomes one.
    let mut t4 = target(&[2, 2, 3], &[(2, 0), (3, 0)]);
    let mut moved = view(&[3, 3, 2], &all);
    moved.published.get_mut(&0).unwrap().previous = Arc::new(column(&[&[1], &[2], &[]]));
    w.apply(&d, &moved, &mut t4, now + Duration::from_secs(5), |_| None);
    assert_eq!(carried(&t4), [vec![1, 3], vec![3], vec![2]]);
}

/// Builds a VIP one backend at a time (setup owners hold slots for 0.1-0.2 s), lets the owners
/// serve for seconds, restarts at 12 s (history saved at 10 s), then moves every slot at 20 s.
/// The previous backends must be the owners that served (as without a restart), not the setup
/// owners the kernel still carries (the rule without a saved history).
#[test]
fn a_restart_resumes_the_saved_history() {
    let now = Instant::now();
    let s = |secs: f64| now + Duration::from_secs_f64(secs);
    let d = desired(60, &[1, 2, 3]);
    let all = [(1, 0), (2, 0), (3, 0)];
    let mut w = Windows::default();
    let steps: [(f64, &[u32], &[u32]); 3] = [
        (0.0, &[], &[1, 1, 1, 1]),
        (0.1, &[1, 1, 1, 1], &[1, 2, 1, 2]),
        (0.2, &[1, 2, 1, 2], &[1, 2, 3, 3]),
    ];
    for (at, live, table) in steps {
        let mut v = view(live, &all);
        if live.is_empty() {
            v.published.clear();
        }
        w.apply(&d, &v, &mut target(table, &all), s(at), |_| None);
    }
    let (version, saved) = w.snapshot(0, s(10.0), 1_000_000).expect("a history");
    assert!(w.snapshot(version, s(10.0), 1_000_000).is_none(), "saved");
    let saved = saved::decode(&saved::encode(&saved)).expect("decodes");
    // The kernel at the restart: the table and the previous backends the run left.
    let mut live = view(&[1, 2, 3, 3], &all);
    live.published.clear();
    let kernel =
        |id: u32| (id == 0).then(|| (vec![1, 2, 3, 3], column(&[&[], &[1], &[1], &[1, 2]])));
    let restart = |h: Option<&saved::Saved>, kernel_table: Vec<u32>| {
        let mut r = Windows::default();
        if let Some(h) = h {
            r.restore(h.clone(), s(12.0), 1_002_000);
        }
        let mut t = target(&[1, 2, 3, 3], &all);
        r.apply(&d, &live, &mut t, s(12.0), |id| {
            kernel(id).map(|(_, p)| (kernel_table.clone(), p))
        });
        r
    };
    let moved = |w: &mut Windows| {
        let mut t = target(&[2, 3, 1, 1], &all);
        w.apply(&d, &view(&[1, 2, 3, 3], &all), &mut t, s(20.0), |_| None);
        carried(&t)
    };
    let mut resumed = restart(Some(&saved), vec![1, 2, 3, 3]);
    // The windows end when they would have: 60 s after slots 1 and 3 changed at 0.1 s.
    let end = resumed.next_end().expect("an end").duration_since(now);
    assert!((59.9..=60.3).contains(&end.as_secs_f64()), "{end:?}");
    // The owners that served first, then the setup owners.
    let served = [vec![1], vec![2, 1], vec![3], vec![3, 2]];
    assert_eq!(moved(&mut resumed), served, "the owners that served first");
    assert_eq!(moved(&mut w), served, "as without a restart");
    let mut blind = restart(None, vec![1, 2, 3, 3]);
    // Without the history the setup owners the kernel carries count as the longest-serving
    // (slot 2 goes back to 1, its adopted previous backend: 3 becomes previous either way).
    assert_eq!(
        moved(&mut blind),
        [vec![1], vec![1, 2], vec![3], vec![2, 3]],
        "the setup owners first"
    );
    // A slot the kernel holds otherwise than the history says (a table written after the
    // last save, before a kill -9) adopts what the kernel carries; the others resume.
    let partly = restart(Some(&saved), vec![1, 2, 3, 2]);
    let (_, now_held) = partly.snapshot(0, s(12.0), 1_002_000).expect("a history");
    let (was, is) = (
        saved.vips[&vip()].candidates(),
        now_held.vips[&vip()].candidates(),
    );
    let ids = |c: &[Candidates]| -> Vec<Vec<(u32, u32)>> {
        c.iter()
            .map(|c| c.iter().map(|x| (x.id, x.tenure)).collect())
            .collect()
    };
    assert_eq!(ids(&is[..3]), ids(&was[..3]), "slots 0-2 resumed");
    // Slot 3 adopted the kernel's previous backend 1 "for ever", then the restart's table
    // moved it from the kernel's owner 2 (whose tenure starts at the restart) to 3.
    assert_eq!(ids(&is[3..])[0][..2], [(1, u32::MAX), (2, 0)]);
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

/// The fleet test's case: a slot moves from X (which took the connections made at the start)
/// to A, and 15 s later from A, which held it longer, to B. With one previous backend the
/// slot carried A only, and X's connections broke; now it carries both, A first.
#[test]
fn two_changes_in_a_window_lose_nobody_and_a_fourth_owner_drops_the_shortest() {
    let now = Instant::now();
    let s = |secs: u64| now + Duration::from_secs(secs);
    let d = desired(300, &[1, 2, 3, 4, 5]);
    let all = [(1, 0), (2, 0), (3, 0), (4, 0), (5, 0)];
    let mut w = Windows::default();
    let steps: [(u64, &[u32], &[u32]); 5] = [
        (0, &[], &[3]),
        (10, &[3], &[1]),
        (25, &[1], &[2]),
        (27, &[2], &[4]),
        (28, &[4], &[5]),
    ];
    let mut seen = Vec::new();
    for (at, live, table) in steps {
        let mut v = view(live, &all);
        if live.is_empty() {
            v.published.clear();
        }
        let mut t = target(table, &all);
        w.apply(&d, &v, &mut t, s(at), |_| None);
        seen.push(carried(&t));
    }
    assert_eq!(seen[1], [vec![3]]);
    assert_eq!(seen[2], [vec![1, 3]], "A (15 s) first, then X (10 s)");
    assert_eq!(seen[3], [vec![1, 3, 2]], "then B (2 s)");
    // A fourth owner (1 s) serves less than every candidate: it is not carried.
    assert_eq!(seen[4], [vec![1, 3, 2]]);
}

/// The kernel carries a previous backend only in the owner's family and on another address
/// (`encap::second_chance_hops`): the agent leaves the others out and moves the rest up.
#[test]
fn only_what_the_kernel_can_carry_is_carried() {
    let now = Instant::now();
    let d = desired(60, &[1, 2, 3, 4]);
    let at = |id: u32, ip: IpAddr, port: u16| {
        (
            id,
            BackendTarget {
                addr: crate::model::BackendAddr { ip, port },
                ..backend(id as u8, 0)
            },
        )
    };
    let owner: IpAddr = [10, 42, 0, 1].into();
    let backends = [
        at(1, owner, 80),
        at(2, owner, 8080),
        at(3, "2001:db8::3".parse().unwrap(), 0),
        at(4, [10, 42, 0, 4].into(), 0),
    ];
    let with = |mut t: Target| {
        t.backends = backends.iter().copied().collect();
        t
    };
    let mut v = view(&[4], &[]);
    v.backends = backends.iter().copied().collect();
    let mut w = Windows::default();
    // Slot 0 goes 2 -> 3 -> 4 -> 1 at 0, 10 and 30 s: its candidates are 2 (for ever), 4
    // (20 s) and 3 (10 s).
    for (at, (live, table)) in [(0, (2, 3)), (10, (3, 4)), (30, (4, 1))] {
        let mut v = v.clone();
        v.published.get_mut(&0).unwrap().table = Arc::new(vec![live]);
        let mut t = with(target(&[table], &[]));
        w.apply(&d, &v, &mut t, now + Duration::from_secs(at), |_| None);
        if table == 1 {
            // 2 shares the owner's address, 3 is IPv6: only 4 is carried, moved up.
            assert_eq!(w.vips[&vip()].candidates()[0].map(|c| c.id), [2, 4, 3]);
            assert_eq!(carried(&t), [vec![4]]);
        }
    }
}
