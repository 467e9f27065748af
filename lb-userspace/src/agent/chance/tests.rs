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
    let kernel = |id: u32| (id == 0).then(|| (vec![1, 2, 3, 3], vec![0, 1, 1, 2]));
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
        t.vips[&vip().key()].previous.to_vec()
    };
    let mut resumed = restart(Some(&saved), vec![1, 2, 3, 3]);
    // The windows end when they would have: 60 s after slots 1 and 3 changed at 0.1 s.
    let end = resumed.next_end().expect("an end").duration_since(now);
    assert!((59.9..=60.3).contains(&end.as_secs_f64()), "{end:?}");
    assert_eq!(
        moved(&mut resumed),
        vec![1, 2, 3, 3],
        "the owners that served"
    );
    assert_eq!(moved(&mut w), vec![1, 2, 3, 3], "as without a restart");
    let mut blind = restart(None, vec![1, 2, 3, 3]);
    // (Slot 2 goes back to 1, its adopted previous backend: 3 becomes previous either way.)
    assert_eq!(moved(&mut blind), vec![1, 1, 3, 2], "the setup owners");
    // A slot the kernel holds otherwise than the history says (a table written after the
    // last save, before a kill -9) adopts what the kernel carries; the others resume.
    let mut partly = restart(Some(&saved), vec![1, 2, 3, 2]);
    let mut t = target(&[2, 3, 1, 1], &all);
    partly.apply(&d, &view(&[1, 2, 3, 2], &all), &mut t, s(20.0), |_| None);
    assert_eq!(*t.vips[&vip().key()].previous, vec![1, 2, 3, 2]);
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
