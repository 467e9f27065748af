//! The property test: random operation sequences with a failure injected at a random kernel
//! write or state-file write, checking after every operation that desired state, state file
//! and kernel agree.
use super::*;

/// xorshift64*: a fixed-seed generator, so a failing sequence can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_command(r: &mut Rng) -> Command {
    let v = vip(r.below(3) as u8);
    let a = addr(r.below(5) as u8);
    match r.below(11) {
        0 => Command::AddVip {
            udp_idle_s: 30,
            forward: Default::default(),
            second_chance_s: None,
            vip: v,
            source_hash: r.below(2) == 0,
            health: (r.below(2) == 0).then(check),
            allow_sources: Vec::new(),
            deny_sources: Vec::new(),
            new_flow_limit: None,
            source_limit: None,
            announce_min_serving: None,
        },
        1 => Command::RemoveVip { vip: v },
        2 | 3 => Command::AddBackend {
            vip: v,
            address: a,
            weight: r.below(4) as u32 * 50,
            mac: (r.below(3) != 0).then(|| mac(r.below(5) as u8)),
        },
        4 => Command::RemoveBackend { vip: v, address: a },
        5 => Command::SetWeight {
            vip: v,
            address: a,
            weight: r.below(3) as u32 * 100,
        },
        6 => Command::Drain {
            vip: v,
            address: a,
            drained: r.below(2) == 0,
        },
        7 => {
            let mut d = DesiredState::default();
            for i in 0..r.below(3) as u8 {
                let s = d.vips.entry(vip(r.below(3) as u8)).or_default();
                s.health = (i % 2 == 0).then(check);
                for _ in 0..r.below(4) {
                    s.backends.insert(
                        addr(r.below(5) as u8),
                        crate::model::BackendSpec {
                            weight: 1 + r.below(3) as u32,
                            mac: Some(mac(r.below(5) as u8)),
                            drained: false,
                        },
                    );
                }
            }
            Command::Apply {
                state: d,
                dry_run: r.below(4) == 0,
                if_revision: None,
            }
        }
        8 => Command::DenyAdd {
            prefixes: vec![format!("192.0.2.{}/32", r.below(4)).parse().unwrap()],
            expires_s: (r.below(2) == 0).then_some(3600),
        },
        9 => Command::DenyRemove {
            prefixes: vec![format!("192.0.2.{}/32", r.below(4)).parse().unwrap()],
        },
        _ => Command::Reconcile,
    }
}

#[test]
fn random_operations_with_failures_keep_state_file_and_kernel_in_agreement() {
    let mut failures = 0;
    for seed in 1..=300u64 {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        // Small capacities so "table full" happens too.
        let w = world(Capacity {
            vips: 2 + r.below(2) as u32,
            backends: 6 + r.below(6) as u32,
        });
        for step in 0..40 {
            let ctx = format!("seed {seed} step {step}");
            // Inject one failure at a random point of this step: a kernel write, the state
            // file, a health flip's convergence, or a MAC learned.
            match r.below(5) {
                0 => w.kernel.lock().unwrap().fail_after = Some(r.below(6) as usize),
                1 => w.store.lock().unwrap().fail_next = true,
                _ => {}
            }
            let before = w.agent.core().state_file();
            match r.below(6) {
                0 => {
                    let (v, a) = (vip(r.below(3) as u8), addr(r.below(5) as u8));
                    let _ = w
                        .agent
                        .core()
                        .observe_health(&v, a, r.below(2) == 0, "p".into());
                }
                1 => {
                    let m = [(addr(r.below(5) as u8).ip, mac(r.below(5) as u8))];
                    let _ = w.agent.core().learn_macs(&m);
                }
                _ => {
                    let cmd = random_command(&mut r);
                    if let Err(e) = w.agent.execute(&cmd) {
                        failures += 1;
                        // Refused before the file was written: nothing changed at all.
                        if e.kind() != ErrorKind::Kernel {
                            assert_eq!(w.agent.core().state_file(), before, "{ctx}: {e}");
                        }
                    }
                }
            }
            w.store.lock().unwrap().fail_next = false;
            w.kernel.lock().unwrap().fail_after = None;
            assert_agree(&w, &ctx);
        }
    }
    assert!(failures > 100, "too few failures exercised: {failures}");
}
