//! The node's deny list kept apart from the state file: which saves a change makes, what a
//! failed save leaves, and what a restart restores.
use super::*;
use crate::model::Prefix;

fn prefixes(n: u32) -> Vec<Prefix> {
    (0..n)
        .map(|i| format!("100.{}.{}.0/24", i >> 8, i & 255).parse().unwrap())
        .collect()
}

fn add_vip(i: u8) -> Command {
    Command::AddVip {
        udp_idle_s: 30,
        forward: Default::default(),
        second_chance_s: None,
        vip: vip(i),
        source_hash: false,
        health: None,
        allow_sources: Vec::new(),
        deny_sources: Vec::new(),
        new_flow_limit: None,
        source_limit: None,
        announce_min_serving: None,
    }
}

fn saves(w: &World) -> (usize, usize) {
    let s = w.store.lock().unwrap();
    (s.state_saves, s.deny_saves)
}

#[test]
fn a_vip_change_saves_no_deny_list_and_a_deny_change_no_state_file() {
    let w = world(Capacity {
        vips: 4,
        backends: 16,
    });
    let bulk = Command::DenyAdd {
        prefixes: prefixes(5000),
        expires_s: None,
    };
    w.agent.execute(&bulk).unwrap();
    assert_eq!(saves(&w), (0, 1), "a deny change: the deny list only");
    w.agent.execute(&add_vip(0)).unwrap();
    assert_eq!(saves(&w), (1, 1), "a VIP change: the state file only");
    assert_eq!(w.agent.core().desired().deny.len(), 5000, "the list kept");
    let with_backend = Command::AddBackend {
        vip: vip(0),
        address: addr(0),
        weight: 1,
        mac: Some(mac(0)),
    };
    w.agent.execute(&with_backend).unwrap();
    let apply = Command::Apply {
        state: w.agent.core().state_file().desired,
        dry_run: false,
        if_revision: None,
    };
    w.agent.execute(&apply).unwrap();
    assert_eq!(
        saves(&w),
        (2, 1),
        "an apply that changes nothing saves nothing"
    );
    let one = Command::DenyAdd {
        prefixes: vec!["198.51.100.7/32".parse().unwrap()],
        expires_s: Some(60),
    };
    w.agent.execute(&one).unwrap();
    let gone = Command::DenyRemove {
        prefixes: prefixes(3),
    };
    w.agent.execute(&gone).unwrap();
    assert_eq!(saves(&w), (2, 3));
    assert_agree(&w, "after the changes");
    let laid_out = {
        let core = w.agent.core();
        crate::agent::guard::sources(core.desired(), core.ids())
    };
    assert_eq!(laid_out.len(), 4998);
    assert_eq!(
        *w.agent.core().sources(),
        laid_out,
        "the guard's entries follow"
    );
    // A restart over the same store and kernel: the same list.
    let want = w.agent.core().state_file();
    let cap = Capacity {
        vips: 4,
        backends: 16,
    };
    let again = Agent::start(
        Box::new(FakeKernel::over(w.kernel.clone(), cap)),
        Box::new(FakeStore(w.store.clone())),
        "fake0",
    )
    .unwrap();
    assert_eq!(again.core().state_file(), want);
}

#[test]
fn a_failed_deny_write_changes_nothing() {
    let w = world(Capacity {
        vips: 4,
        backends: 16,
    });
    w.agent.execute(&add_vip(0)).unwrap();
    let before = w.agent.core().state_file();
    let kernel_before = w.kernel.lock().unwrap().actual.clone();
    let sources_before = w.agent.core().sources();
    w.store.lock().unwrap().fail_next = true;
    let add = Command::DenyAdd {
        prefixes: prefixes(10),
        expires_s: None,
    };
    let e = w.agent.execute(&add).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert_eq!(w.agent.core().state_file(), before);
    assert_eq!(w.kernel.lock().unwrap().actual, kernel_before);
    assert!(Arc::ptr_eq(&w.agent.core().sources(), &sources_before));
    assert_agree(&w, "after the failed deny write");
}

#[test]
fn a_failed_state_file_puts_the_saved_deny_list_back() {
    let w = world(Capacity {
        vips: 4,
        backends: 16,
    });
    w.agent
        .execute(&Command::DenyAdd {
            prefixes: prefixes(4),
            expires_s: None,
        })
        .unwrap();
    let before = w.agent.core().state_file();
    // A whole state (a config at start, the fleet's) changing both the VIPs and the list.
    let mut next = before.desired.clone();
    next.deny.clear();
    next.deny.insert("203.0.113.0/24".parse().unwrap(), 0);
    next.vips.insert(vip(1), Default::default());
    w.store.lock().unwrap().fail_state = true;
    let e = w.agent.change(|_| Ok(next.clone())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert_eq!(w.agent.core().state_file(), before);
    assert_eq!(
        w.store.lock().unwrap().saved,
        before,
        "the deny list put back"
    );
    w.agent.change(|_| Ok(next.clone())).unwrap();
    assert_eq!(w.store.lock().unwrap().saved.desired, next);
    assert_agree(&w, "after the retried change");
}

#[test]
fn a_config_applied_at_start_keeps_the_deny_list() {
    let w = world(Capacity {
        vips: 4,
        backends: 16,
    });
    w.agent
        .execute(&Command::DenyAdd {
            prefixes: prefixes(3),
            expires_s: None,
        })
        .unwrap();
    let mut config = DesiredState::default();
    config.vips.insert(vip(2), Default::default());
    w.agent.apply_config(config.clone()).unwrap();
    let now = w.agent.core().state_file().desired;
    assert_eq!(now.vips, config.vips);
    assert_eq!(now.deny.len(), 3, "`lb run --config` left the deny list");
    assert_eq!(saves(&w), (1, 1));
    assert_agree(&w, "after the config");
}

#[test]
fn a_deny_command_edits_the_list_in_place_and_a_failed_write_is_retried() {
    let w = world(Capacity {
        vips: 4,
        backends: 16,
    });
    w.agent.execute(&add_vip(0)).unwrap();
    w.agent
        .execute(&Command::DenyAdd {
            prefixes: prefixes(2000),
            expires_s: None,
        })
        .unwrap();
    let at = Arc::as_ptr(&w.agent.core().sources());
    let one: Prefix = "198.51.100.7/32".parse().unwrap();
    w.agent
        .execute(&Command::DenyAdd {
            prefixes: vec![one, one],
            expires_s: Some(60),
        })
        .unwrap();
    assert_eq!(
        Arc::as_ptr(&w.agent.core().sources()),
        at,
        "the entries edited where they are, not copied and laid out again"
    );
    // Added again with the same end: nothing to save.
    w.agent
        .execute(&Command::DenyAdd {
            prefixes: prefixes(3),
            expires_s: None,
        })
        .unwrap();
    assert_eq!(saves(&w), (1, 2));
    // The kernel refuses the write: the change is saved and in memory, said, then retried.
    w.kernel.lock().unwrap().fail_after = Some(0);
    let e = w
        .agent
        .execute(&Command::DenyRemove {
            prefixes: vec![one, prefixes(1)[0]],
        })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Kernel, "{e}");
    assert!(w.agent.core().not_converged().is_some());
    assert_eq!(w.agent.core().desired().deny.len(), 1999);
    assert_eq!(w.store.lock().unwrap().saved.desired.deny.len(), 1999);
    let laid_out = {
        let core = w.agent.core();
        crate::agent::guard::sources(core.desired(), core.ids())
    };
    assert_eq!(*w.agent.core().sources(), laid_out);
    assert_agree(&w, "after the retry");
    // The list emptied: the ordinary convergence takes the flags off.
    let all = w.agent.core().desired().deny.keys().copied().collect();
    w.agent
        .execute(&Command::DenyRemove { prefixes: all })
        .unwrap();
    assert!(w.agent.core().sources().is_empty());
    assert_agree(&w, "after the list emptied");
}
