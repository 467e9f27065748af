//! What this node announces, decided from what it can serve (pure: no clock, no kernel).
//!
//! A VIP qualifies while the data plane is converged (`/readyz`) and at least `min_serving`
//! of its backends serve (the VIP's own `announce_min_serving`, else the node's); an address is announced while one of its VIPs qualifies (a route
//! carries an address, not a port). Withdrawal is immediate, so nothing is announced that
//! cannot serve; announcing again after a withdrawal waits until the address has qualified
//! for the whole hold-down, so a flapping backend costs one withdrawal and one announcement
//! however often it flaps. A drain announces with the graceful-shutdown mark, then withdraws
//! once its time is up. Routes found in the table when the agent starts (a restart: the
//! pinned program kept forwarding meanwhile) are kept through a start grace while the new
//! agent's probes settle, unless their VIPs are gone.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::model::VipAddr;

/// What a route in the announce table says to the speaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Announced plainly.
    Normal,
    /// Announced with the GRACEFUL_SHUTDOWN community (the node drains).
    Draining,
}

/// The node-wide drain, as the gate sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainPhase {
    /// Announced with the graceful-shutdown mark until the drain time is up.
    Draining,
    /// Withdrawn; the node still forwards what reaches it.
    Drained,
}

/// One VIP's announcement and, when withdrawn or held, why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipAnnounce {
    pub vip: VipAddr,
    /// `announced`, `draining` (announced with the graceful-shutdown community) or
    /// `withdrawn`.
    pub state: String,
    /// Why it is not plainly announced (or why it still is, during the start grace).
    #[serde(default)]
    pub why: Option<String>,
    /// Its backends that serve on this node now.
    pub serving: usize,
    /// Serving backends it needs to be announced (its own or the node's default).
    #[serde(default)]
    pub needed: usize,
}

impl VipAnnounce {
    /// `announced`, or the state and why (`withdrawn (too few backends: ...)`).
    pub fn state_line(&self) -> String {
        match &self.why {
            Some(w) => format!("{} ({w})", self.state),
            None => self.state.clone(),
        }
    }
}

/// Why each VIP does not qualify (None: it does).
type Reasons = BTreeMap<VipAddr, Option<String>>;

/// What the gate is told each round.
pub struct Inputs<'a> {
    /// `Err(why)` while the data plane is not converged.
    pub ready: Result<(), &'a str>,
    /// Serving backends per VIP (every configured VIP is listed).
    pub serving: &'a BTreeMap<VipAddr, usize>,
    /// VIPs that set their own `announce_min_serving` (the others need the gate's).
    pub min_serving: &'a BTreeMap<VipAddr, usize>,
    pub drain: Option<DrainPhase>,
}

impl Inputs<'_> {
    /// Serving backends `vip` needs: its own figure, else the node's `default`.
    fn needed(&self, vip: &VipAddr, default: usize) -> usize {
        self.min_serving.get(vip).copied().unwrap_or(default)
    }
}

#[derive(Clone, Debug, Default)]
struct AddrGate {
    announced: bool,
    /// Withdrawn for cause before: the next announcement waits for the hold-down.
    held: bool,
    /// Since when the address has qualified without a break.
    qualified_since: Option<Instant>,
}

/// The per-address state between rounds.
pub struct Gate {
    pub min_serving: usize,
    pub hold_down: Duration,
    addrs: BTreeMap<IpAddr, AddrGate>,
    /// Until then, routes found at start are kept even while not qualifying.
    grace_until: Option<Instant>,
}

impl Gate {
    /// A gate that starts with `found` announced (routes already in the table), kept for
    /// `grace` unless their VIPs are gone.
    pub fn new(
        min_serving: usize,
        hold_down: Duration,
        found: &BTreeSet<IpAddr>,
        now: Instant,
        grace: Duration,
    ) -> Self {
        let addrs = found
            .iter()
            .map(|a| {
                let g = AddrGate {
                    announced: true,
                    ..AddrGate::default()
                };
                (*a, g)
            })
            .collect();
        Gate {
            min_serving,
            hold_down,
            addrs,
            grace_until: (!found.is_empty()).then_some(now + grace),
        }
    }

    /// One round: the routes wanted per address, and each VIP's state.
    pub fn decide(
        &mut self,
        now: Instant,
        inputs: &Inputs,
    ) -> (BTreeMap<IpAddr, Want>, Vec<VipAnnounce>) {
        let (why_vip, qualifies) = self.qualify(inputs);
        let held_why = self.step(now, &qualifies);
        let mut routes = BTreeMap::new();
        for (addr, g) in &self.addrs {
            if !g.announced {
                continue;
            }
            match inputs.drain {
                None => routes.insert(*addr, Want::Normal),
                Some(DrainPhase::Draining) => routes.insert(*addr, Want::Draining),
                Some(DrainPhase::Drained) => None,
            };
        }
        let views = views(inputs, self.min_serving, &routes, &why_vip, &held_why);
        (routes, views)
    }

    /// Why each VIP does not qualify (None: it does), and whether each address does.
    fn qualify(&self, inputs: &Inputs) -> (Reasons, BTreeMap<IpAddr, bool>) {
        let mut why_vip = BTreeMap::new();
        let mut qualifies: BTreeMap<IpAddr, bool> = BTreeMap::new();
        for (vip, serving) in inputs.serving {
            let needed = inputs.needed(vip, self.min_serving);
            let why = match inputs.ready {
                Err(w) => Some(format!("not ready: {w}")),
                Ok(()) if *serving < needed => Some(format!(
                    "too few backends: {serving} serving, {needed} needed"
                )),
                Ok(()) => None,
            };
            *qualifies.entry(vip.ip).or_default() |= why.is_none();
            why_vip.insert(*vip, why);
        }
        (why_vip, qualifies)
    }

    /// Moves each address's gate: withdrawn at once when it stops qualifying (not during the
    /// start grace), announced when it has qualified long enough. Returns why each address
    /// held down waits.
    fn step(
        &mut self,
        now: Instant,
        qualifies: &BTreeMap<IpAddr, bool>,
    ) -> BTreeMap<IpAddr, String> {
        let in_grace = self.grace_until.is_some_and(|t| now < t);
        if !in_grace {
            self.grace_until = None;
        }
        self.addrs.retain(|a, _| qualifies.contains_key(a));
        let mut held_why = BTreeMap::new();
        for (addr, q) in qualifies {
            let g = self.addrs.entry(*addr).or_default();
            if !*q {
                g.qualified_since = None;
                if g.announced && !in_grace {
                    g.announced = false;
                    g.held = true;
                }
                continue;
            }
            let since = *g.qualified_since.get_or_insert(now);
            if g.announced {
                continue;
            }
            let wait = if g.held {
                self.hold_down
            } else {
                Duration::ZERO
            };
            let stable = now.saturating_duration_since(since);
            if stable >= wait {
                g.announced = true;
                g.held = false;
            } else {
                held_why.insert(
                    *addr,
                    format!(
                        "hold-down: qualifies again, announced after {:.1} s more",
                        (wait - stable).as_secs_f64()
                    ),
                );
            }
        }
        held_why
    }
}

/// Each VIP's state from the routes wanted and the reasons.
fn views(
    inputs: &Inputs,
    default_needed: usize,
    routes: &BTreeMap<IpAddr, Want>,
    why_vip: &Reasons,
    held_why: &BTreeMap<IpAddr, String>,
) -> Vec<VipAnnounce> {
    inputs
        .serving
        .iter()
        .map(|(vip, serving)| {
            let own = why_vip.get(vip).cloned().flatten();
            let (state, why) = match (routes.get(&vip.ip), inputs.drain) {
                (Some(Want::Normal), _) => (
                    "announced",
                    own.map(|w| format!("start grace or another VIP on the address: {w}")),
                ),
                (Some(Want::Draining), _) => {
                    ("draining", Some("node draining: graceful shutdown".into()))
                }
                (None, Some(DrainPhase::Drained)) => ("withdrawn", Some("node drained".into())),
                (None, _) => ("withdrawn", own.or_else(|| held_why.get(&vip.ip).cloned())),
            };
            VipAnnounce {
                vip: *vip,
                state: state.into(),
                why,
                serving: *serving,
                needed: inputs.needed(vip, default_needed),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip(s: &str) -> VipAddr {
        s.parse().unwrap()
    }

    fn run(g: &mut Gate, t: Instant, ready: bool, n: usize, drain: Option<DrainPhase>) -> bool {
        let serving: BTreeMap<VipAddr, usize> = [(vip("10.0.0.10:80/tcp"), n)].into();
        let inputs = Inputs {
            ready: if ready { Ok(()) } else { Err("converging") },
            serving: &serving,
            min_serving: &BTreeMap::new(),
            drain,
        };
        !g.decide(t, &inputs).0.is_empty()
    }

    #[test]
    fn announced_only_while_it_can_serve_and_withdrawn_at_once() {
        let t = Instant::now();
        let mut g = Gate::new(
            1,
            Duration::from_secs(3),
            &BTreeSet::new(),
            t,
            Duration::ZERO,
        );
        assert!(!run(&mut g, t, true, 0, None), "no backend serves");
        assert!(!run(&mut g, t, false, 2, None), "not ready");
        assert!(
            run(&mut g, t, true, 1, None),
            "first announcement has no hold-down"
        );
        assert!(!run(&mut g, t + Duration::from_millis(1), true, 0, None));
    }

    #[test]
    fn a_flapping_backend_costs_one_withdrawal_and_one_announcement() {
        let t0 = Instant::now();
        let mut g = Gate::new(
            1,
            Duration::from_secs(3),
            &BTreeSet::new(),
            t0,
            Duration::ZERO,
        );
        let mut last = run(&mut g, t0, true, 1, None);
        let mut changes = 0;
        for i in 1..=100u64 {
            let t = t0 + Duration::from_millis(100 * i);
            // Up and down every 300 ms for 10 s.
            let up = (i / 3) % 2 == 0;
            let now = run(&mut g, t, true, usize::from(up), None);
            changes += usize::from(now != last);
            last = now;
        }
        for i in 101..=200u64 {
            let now = run(&mut g, t0 + Duration::from_millis(100 * i), true, 1, None);
            changes += usize::from(now != last);
            last = now;
        }
        assert!(last);
        assert_eq!(changes, 2);
    }

    #[test]
    fn a_drain_marks_then_withdraws_and_routes_found_at_start_are_kept_in_grace() {
        let t = Instant::now();
        let found: BTreeSet<IpAddr> = ["10.0.0.10".parse().unwrap()].into();
        let mut g = Gate::new(1, Duration::from_secs(3), &found, t, Duration::from_secs(2));
        assert!(run(&mut g, t, true, 0, None), "kept in the start grace");
        let serving: BTreeMap<VipAddr, usize> = [(vip("10.0.0.10:80/tcp"), 1)].into();
        let mut inputs = Inputs {
            ready: Ok(()),
            serving: &serving,
            min_serving: &BTreeMap::new(),
            drain: Some(DrainPhase::Draining),
        };
        let (r, v) = g.decide(t, &inputs);
        assert_eq!(r.values().next(), Some(&Want::Draining));
        assert_eq!(v[0].state, "draining");
        inputs.drain = Some(DrainPhase::Drained);
        let (r, v) = g.decide(t, &inputs);
        assert!(r.is_empty());
        assert_eq!(v[0].why.as_deref(), Some("node drained"));
        // After the grace, a VIP that cannot serve is withdrawn.
        assert!(!run(&mut g, t + Duration::from_secs(3), true, 0, None));
    }

    /// A gate needing one serving backend, hold-down 3 s, nothing found at start.
    fn fresh(t: Instant) -> Gate {
        Gate::new(
            1,
            Duration::from_secs(3),
            &BTreeSet::new(),
            t,
            Duration::ZERO,
        )
    }

    #[test]
    fn a_vip_s_own_min_serving_overrides_the_node_s() {
        let t = Instant::now();
        let mut g = fresh(t);
        let (strict, plain) = (vip("10.0.0.11:80/tcp"), vip("10.0.0.12:80/tcp"));
        let min: BTreeMap<VipAddr, usize> = [(strict, 2)].into();
        let decide = |g: &mut Gate, t: Instant, n: usize| {
            let serving: BTreeMap<VipAddr, usize> = [(strict, n), (plain, n)].into();
            let inputs = Inputs {
                ready: Ok(()),
                serving: &serving,
                min_serving: &min,
                drain: None,
            };
            g.decide(t, &inputs)
        };
        let (r, v) = decide(&mut g, t, 2);
        assert_eq!(r.len(), 2, "both have enough: {v:?}");
        // One of two backends fails: the VIP that needs two is withdrawn, the other stays.
        let (r, v) = decide(&mut g, t + Duration::from_millis(100), 1);
        assert_eq!(r.keys().collect::<Vec<_>>(), vec![&plain.ip], "{v:?}");
        assert_eq!(
            v[0].state_line(),
            "withdrawn (too few backends: 1 serving, 2 needed)"
        );
        assert_eq!((v[0].needed, v[1].needed), (2, 1));
        assert_eq!(v[1].state, "announced");
    }
}
