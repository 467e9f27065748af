//! The reconciler against in-memory fakes: unit tests of its rules, and a property test that
//! drives hundreds of random operation sequences with failures injected at every step and
//! checks after each operation that desired state, state file and kernel agree.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use super::{
    Agent,
    fake::{FakeKernel, FakeStore, KernelCtl, StoreCtl},
    reconcile::{self, Capacity, Facts, Ids, Serving},
};
use crate::{
    ErrorKind,
    model::{BackendAddr, DesiredState, HealthCheck, Mac, VipAddr},
    protocol::Command,
};

struct World {
    agent: Agent,
    kernel: Arc<Mutex<KernelCtl>>,
    store: Arc<Mutex<StoreCtl>>,
}

fn world(cap: Capacity) -> World {
    let (k, kernel) = FakeKernel::new(cap);
    let store = Arc::new(Mutex::new(StoreCtl::default()));
    let agent = Agent::start(Box::new(k), Box::new(FakeStore(store.clone())), "fake0").unwrap();
    World {
        agent,
        kernel,
        store,
    }
}

fn vip(i: u8) -> VipAddr {
    format!("10.0.0.{}:80/tcp", 100 + i).parse().unwrap()
}

fn addr(i: u8) -> BackendAddr {
    format!("10.0.1.{}", i + 1).parse().unwrap()
}

fn mac(i: u8) -> Mac {
    Mac([2, 0, 0, 0, 1, i + 1])
}

fn spec() -> crate::model::BackendSpec {
    crate::model::BackendSpec {
        weight: 1,
        mac: None,
        drained: false,
    }
}

fn check() -> HealthCheck {
    crate::agent::health::test_check(1, 1)
}

/// The kernel the core's current state asks for, computed independently of the core's cache.
fn expected_kernel(w: &World) -> reconcile::Target {
    struct F<'a>(&'a World);
    impl Facts for F<'_> {
        fn up(&self, vip: &VipAddr, addr: &BackendAddr) -> bool {
            self.0
                .agent
                .core()
                .list()
                .iter()
                .find(|v| v.vip == *vip)
                .and_then(|v| v.backends.iter().find(|b| b.address == *addr))
                .is_none_or(|b| b.health != "down")
        }
        fn mac(&self, vip: &VipAddr, addr: &IpAddr) -> Option<Mac> {
            let core = self.0.agent.core();
            let b = core.list();
            b.iter()
                .find(|v| v.vip == *vip)
                .and_then(|v| v.backends.iter().find(|b| b.address.ip == *addr))
                .and_then(|b| b.mac.parse().ok())
        }
    }
    let (desired, ids) = {
        let core = w.agent.core();
        (core.desired().clone(), core.ids().clone())
    };
    reconcile::target(&desired, &ids, &F(w), |_, from| {
        Arc::new(crate::maglev::build(from, 13))
    })
}

/// Desired state, state file and kernel agree (after a retry when the kernel was behind).
fn assert_agree(w: &World, ctx: &str) {
    let file = w.store.lock().unwrap().saved.clone();
    let mem = w.agent.core().state_file();
    assert_eq!(file, mem, "{ctx}: state file and memory differ");
    if w.agent.core().not_converged().is_some() {
        w.kernel.lock().unwrap().fail_after = None;
        w.agent.retry().unwrap();
        assert!(w.agent.core().not_converged().is_none(), "{ctx}");
    }
    let want = expected_kernel(w);
    let k = w.kernel.lock().unwrap();
    let have_vips: std::collections::BTreeMap<_, _> = k
        .actual
        .vips
        .iter()
        .map(|(key, id)| (*key, (*id, k.actual.published[id].clone())))
        .collect();
    let want_vips: std::collections::BTreeMap<_, _> = want
        .vips
        .iter()
        .map(|(key, t)| {
            let live = crate::agent::reconcile::Live {
                params: t.params,
                table: t.table.clone(),
                previous: t.previous.clone(),
            };
            (*key, (t.id, live))
        })
        .collect();
    assert_eq!(have_vips, want_vips, "{ctx}: kernel VIPs differ");
    assert_eq!(
        k.actual.backends, want.backends,
        "{ctx}: kernel backends differ"
    );
    assert!(k.violations.is_empty(), "{ctx}: {:?}", k.violations);
}

#[test]
fn ids_freed_in_a_change_are_not_reused_in_the_same_change() {
    let mut old = DesiredState::default();
    old.vips.insert(vip(0), Default::default());
    old.vips
        .get_mut(&vip(0))
        .unwrap()
        .backends
        .insert(addr(0), spec());
    let cap = Capacity {
        vips: 4,
        backends: 8,
    };
    let ids = reconcile::allocate(&old, &Ids::default(), &BTreeSet::new(), cap).unwrap();
    assert_eq!(ids.backend(&vip(0), &addr(0)), Some(1));
    // Swap: VIP 0 goes, VIP 1 comes with a backend. Id 1 is still named by VIP 0's live table.
    let mut new = DesiredState::default();
    new.vips.insert(vip(1), Default::default());
    new.vips
        .get_mut(&vip(1))
        .unwrap()
        .backends
        .insert(addr(1), spec());
    let next = reconcile::allocate(&new, &ids, &ids.backend_ids(), cap).unwrap();
    assert_eq!(next.backend(&vip(1), &addr(1)), Some(2));
    // Full: the freed id is not handed out, and the error says so.
    let tiny = Capacity {
        vips: 4,
        backends: 2,
    };
    let err = reconcile::allocate(&new, &ids, &ids.backend_ids(), tiny).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Capacity);
}

#[test]
fn a_backend_without_a_mac_is_kept_out_and_blocks_nothing() {
    let w = world(Capacity {
        vips: 4,
        backends: 16,
    });
    let run = |c: Command| w.agent.execute(&c);
    run(Command::AddVip {
        udp_idle_s: 30,
        forward: Default::default(),
        second_chance_s: None,
        vip: vip(0),
        source_hash: false,
        health: Some(check()),
        allow_sources: Vec::new(),
        deny_sources: Vec::new(),
        new_flow_limit: None,
        source_limit: None,
        announce_min_serving: None,
    })
    .unwrap();
    let added = run(Command::AddBackend {
        vip: vip(0),
        address: addr(0),
        weight: 100,
        mac: None,
    })
    .unwrap();
    assert_eq!(added.no_mac, vec![addr(0).ip]);
    run(Command::AddBackend {
        vip: vip(0),
        address: addr(1),
        weight: 100,
        mac: Some(mac(1)),
    })
    .unwrap();
    let list = w.agent.core().list();
    assert_eq!(list[0].backends[0].serving, Serving::NoMac);
    assert_eq!(list[0].backends[1].share_pct, 100.0);
    // A health flip of the other backend reaches the kernel though one MAC is unknown.
    assert!(
        w.agent
            .core()
            .observe_health(&vip(0), addr(1), false, "refused".into())
            .unwrap()
    );
    assert_agree(&w, "after flip");
    let k = w.kernel.lock().unwrap();
    let id = k.actual.vips[&vip(0).key()];
    assert!(
        k.actual.published[&id].table.is_empty(),
        "down backend still in the table"
    );
    drop(k);
    // The MAC arrives: the backend serves.
    w.agent.core().learn_macs(&[(addr(0).ip, mac(0))]).unwrap();
    assert_eq!(w.agent.core().list()[0].backends[0].share_pct, 100.0);
    // A changed MAC is followed.
    w.agent.core().learn_macs(&[(addr(0).ip, mac(9))]).unwrap();
    let k = w.kernel.lock().unwrap();
    assert!(k.actual.backends.values().any(|b| b.mac == mac(9)));
}

#[test]
fn removing_a_health_check_forgets_down() {
    let w = world(Capacity {
        vips: 4,
        backends: 16,
    });
    let mut d = DesiredState::default();
    d.vips.insert(vip(0), Default::default());
    let v = d.vips.get_mut(&vip(0)).unwrap();
    v.health = Some(check());
    v.backends.insert(
        addr(0),
        crate::model::BackendSpec {
            weight: 1,
            mac: Some(mac(0)),
            drained: false,
        },
    );
    w.agent
        .execute(&Command::Apply {
            state: d.clone(),
            dry_run: false,
            if_revision: None,
        })
        .unwrap();
    w.agent
        .core()
        .observe_health(&vip(0), addr(0), false, "x".into())
        .unwrap();
    assert_eq!(w.agent.core().list()[0].backends[0].health, "down");
    d.vips.get_mut(&vip(0)).unwrap().health = None;
    w.agent
        .execute(&Command::Apply {
            state: d,
            dry_run: false,
            if_revision: None,
        })
        .unwrap();
    let b = &w.agent.core().list()[0].backends[0];
    assert_eq!((b.health.as_str(), b.share_pct), ("unchecked", 100.0));
}

#[test]
fn a_failed_save_changes_nothing() {
    let w = world(Capacity {
        vips: 4,
        backends: 16,
    });
    w.store.lock().unwrap().fail_next = true;
    let err = w
        .agent
        .execute(&Command::AddVip {
            udp_idle_s: 30,
            forward: Default::default(),
            second_chance_s: None,
            vip: vip(0),
            source_hash: false,
            health: None,
            allow_sources: Vec::new(),
            deny_sources: Vec::new(),
            new_flow_limit: None,
            source_limit: None,
            announce_min_serving: None,
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(w.agent.core().desired().vips.is_empty());
    assert!(w.kernel.lock().unwrap().actual.vips.is_empty());
}

#[test]
fn encapsulated_backends_need_no_mac_and_a_source_of_their_family() {
    let w = world(Capacity {
        vips: 4,
        backends: 16,
    });
    let run = |c: Command| w.agent.execute(&c);
    run(Command::AddVip {
        udp_idle_s: 30,
        forward: crate::model::Forward::Gue,
        second_chance_s: None,
        vip: vip(0),
        source_hash: false,
        health: None,
        allow_sources: Vec::new(),
        deny_sources: Vec::new(),
        new_flow_limit: None,
        source_limit: None,
        announce_min_serving: None,
    })
    .unwrap();
    // No MAC, no neighbour: an encapsulated backend serves at once and is not `no-mac`.
    let added = run(Command::AddBackend {
        vip: vip(0),
        address: addr(0),
        weight: 100,
        mac: None,
    })
    .unwrap();
    assert!(added.no_mac.is_empty());
    assert_eq!(
        w.agent.core().list()[0].backends[0].serving,
        Serving::Serving
    );
    assert!(w.agent.core().wanted_macs().is_empty());
    assert_eq!(
        w.agent.core().routed_backends(),
        BTreeSet::from([addr(0).ip])
    );
    {
        let k = w.kernel.lock().unwrap();
        let b = k.actual.backends.values().next().unwrap();
        assert_eq!(b.encap, lb_common::ENCAP_GUE);
    }
    // A MAC makes no sense for it: refused, nothing changes.
    let e = run(Command::AddBackend {
        vip: vip(0),
        address: addr(1),
        weight: 100,
        mac: Some(mac(1)),
    })
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    assert!(e.to_string().contains("only applies to l2"), "{e}");
    // The fake load balancer has no IPv6 address: an IPv6 backend is refused with the fix.
    let e = run(Command::AddBackend {
        vip: vip(0),
        address: "2001:db8::5".parse().unwrap(),
        weight: 100,
        mac: None,
    })
    .unwrap_err();
    assert!(e.to_string().contains("--encap-source"), "{e}");
    assert_eq!(w.agent.core().desired().vips[&vip(0)].backends.len(), 1);
    assert_agree(&w, "after refusals");
}

#[test]
fn nat_backends_on_their_own_ports_and_no_vip_on_the_nat_source() {
    let w = world(Capacity {
        vips: 4,
        backends: 16,
    });
    let run = |c: Command| w.agent.execute(&c);
    let add_vip = |v: VipAddr| Command::AddVip {
        udp_idle_s: 30,
        forward: crate::model::Forward::Nat,
        second_chance_s: None,
        vip: v,
        source_hash: false,
        health: None,
        allow_sources: Vec::new(),
        deny_sources: Vec::new(),
        new_flow_limit: None,
        source_limit: None,
        announce_min_serving: None,
    };
    run(add_vip(vip(0))).unwrap();
    // The same host on two ports: two backends, routed (no MAC), the port in the kernel.
    for p in [8000, 8001] {
        let a = BackendAddr::new(addr(0).ip, p);
        let added = run(Command::AddBackend {
            vip: vip(0),
            address: a,
            weight: 100,
            mac: None,
        })
        .unwrap();
        assert!(added.no_mac.is_empty());
    }
    {
        let k = w.kernel.lock().unwrap();
        let mut ports: Vec<u16> = k
            .actual
            .backends
            .values()
            .map(|b| {
                assert_eq!(b.encap, lb_common::ENCAP_NAT);
                b.addr.port
            })
            .collect();
        ports.sort();
        assert_eq!(ports, [8000, 8001]);
    }
    // A VIP on the NAT source address is refused while NAT is in use; nothing changes.
    let before = w.agent.core().desired().clone();
    let on_source = VipAddr {
        ip: "192.0.2.254".parse().unwrap(),
        port: 80,
        proto: crate::model::Proto::Tcp,
    };
    let e = run(add_vip(on_source)).unwrap_err();
    assert!(e.to_string().contains("NAT source address"), "{e}");
    assert_eq!(*w.agent.core().desired(), before);
}

/// An agent that restarts over the same kernel resumes the second-chance history the first
/// one saved (through the state store, after every change): the candidates keep their real
/// tenures (deciseconds of setup here), where adopting from the kernel alone would take each
/// carried previous backend for a "for ever" owner (`u32::MAX`).
#[test]
fn a_restarted_agent_resumes_the_saved_second_chance_history() {
    let cap = Capacity {
        vips: 4,
        backends: 16,
    };
    let w = world(cap);
    let gue = |n: u8| {
        let mut d = DesiredState::default();
        let mut v = crate::model::VipSpec {
            forward: crate::model::Forward::Gue,
            second_chance_s: 60,
            ..crate::model::VipSpec::default()
        };
        for i in 0..n {
            v.backends.insert(addr(i), spec());
        }
        d.vips.insert(vip(0), v);
        d
    };
    // Built one backend at a time: slots change hands, previous backends are carried.
    for n in 1..=3 {
        w.agent.change(|_| Ok(gue(n))).unwrap();
    }
    let first = w.agent.core().history_snapshot(u64::MAX).unwrap().1;
    let candidates = first.vips[&vip(0)].candidates();
    let held = || candidates.iter().flatten().filter(|c| c.id != 0);
    assert!(held().count() > 0, "some slot has a candidate");
    let saved = w
        .store
        .lock()
        .unwrap()
        .history
        .clone()
        .expect("history saved");
    assert_eq!(
        super::second_chance::saved::decode(&saved).unwrap().vips,
        first.vips,
        "the last change's history was saved"
    );
    let carried = |w: &World| {
        let k = w.kernel.lock().unwrap();
        let id = k.actual.vips[&vip(0).key()];
        k.actual.published[&id].previous.clone()
    };
    let before = carried(&w);
    // Restart over the same kernel and store.
    let restarted = Agent::start(
        Box::new(FakeKernel::over(w.kernel.clone(), cap)),
        Box::new(FakeStore(w.store.clone())),
        "fake0",
    )
    .unwrap();
    let after = restarted.core().history_snapshot(u64::MAX).unwrap().1;
    assert_eq!(after.vips[&vip(0)].candidates(), candidates);
    assert!(held().all(|c| c.tenure != u32::MAX), "{candidates:?}");
    assert_eq!(carried(&w), before, "the same previous backends");
    // Without the history the same restart adopts the kernel's previous backends as
    // "for ever" owners.
    w.store.lock().unwrap().history = None;
    let blind = Agent::start(
        Box::new(FakeKernel::over(w.kernel.clone(), cap)),
        Box::new(FakeStore(w.store.clone())),
        "fake0",
    )
    .unwrap();
    let adopted = blind.core().history_snapshot(u64::MAX).unwrap().1;
    let adopted = adopted.vips[&vip(0)].candidates();
    assert!(
        adopted.iter().flatten().any(|c| c.tenure == u32::MAX),
        "{adopted:?}"
    );
}

mod deny;
mod property;
