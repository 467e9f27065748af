//! The agent's state and the one place that changes it: desired state, ids, health and
//! learned MACs in, kernel writes out through [`Kernel`]. Everything here is synchronous and
//! quick (map syscalls, no files, no sleeps); the [`Agent`](super::Agent) decides on which
//! thread it runs and when the state file is written.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Instant,
};

use crate::{
    Error,
    agent::{
        guard::Sources,
        health::Health,
        kernel::Kernel,
        reconcile::{self, Capacity, Facts, Ids},
        second_chance::{self, Windows},
        state::StateFile,
    },
    maglev::{self, MaglevBackend},
    model::{BackendAddr, DesiredState, Forward, Mac, OwnAddrs, Prefix, VipAddr, pool},
    plan::{self, VipPlan},
};

/// A change that passed validation and got its ids, not yet in effect.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub desired: DesiredState,
    pub ids: Ids,
    /// The VIPs it touches, as they were: enough to plan it without the core.
    pub replaced: plan::Replaced,
    /// Slot-table size the plan is made for.
    pub ring_size: u32,
    /// The guard's entries for `desired` and `ids`, when made already (outside the lock);
    /// otherwise the commit makes them.
    pub sources: Option<Arc<Sources>>,
    /// The change leaves the node's deny list alone: `desired.deny` is empty here and the
    /// commit moves the core's list over, so a VIP change never copies or compares a list
    /// of a million prefixes.
    pub keep_deny: bool,
}

impl Prepared {
    /// What the change does to the slot tables of the VIPs it touches. Builds two Maglev
    /// tables per touched VIP: call it without the core's lock.
    pub fn plan(&self) -> Vec<VipPlan> {
        plan::plan_change(&self.replaced, &self.desired, self.ring_size)
    }

    /// What the state file saves: all but the deny list, which has its own files
    /// ([`StateStore::save_deny`](super::state::StateStore::save_deny)) and is not copied.
    pub fn state_file(&self) -> StateFile {
        StateFile {
            desired: DesiredState {
                vips: self.desired.vips.clone(),
                deny: Default::default(),
            },
            ids: self.ids.clone(),
            store_revision: None,
        }
    }
}

/// A VIP's slot table as last built, with the backends it was built from and each backend
/// id's number of slots (so listings never walk M slots per backend).
pub(super) struct BuiltTable {
    from: Vec<MaglevBackend>,
    pub(super) table: Arc<Vec<u32>>,
    pub(super) slots: BTreeMap<u32, usize>,
}

pub struct Core {
    pub(super) desired: DesiredState,
    pub(super) ids: Ids,
    pub(super) health: BTreeMap<(VipAddr, BackendAddr), Health>,
    /// The fleet's health verdicts (store mode, while the others' statuses are known): they
    /// decide instead of this node's own probes, so every node takes a backend in or out
    /// alike; a backend the fleet has no verdict on yet counts as up. `None`: own probes.
    pub(super) fleet_health: Option<BTreeMap<(VipAddr, BackendAddr), bool>>,
    /// MACs learned from the neighbour table (the last known one is kept when an entry fails).
    pub(super) learned: BTreeMap<IpAddr, Mac>,
    pub(super) kernel: Box<dyn Kernel>,
    pub(super) tables: BTreeMap<VipAddr, BuiltTable>,
    /// Why the kernel does not match the desired state, while it does not.
    pub(super) not_converged: Option<String>,
    /// Second-chance drain windows.
    pub(super) windows: Windows,
    /// The prefixes VIPs may use (`lb run --vip-prefix`; empty: any address).
    vip_pools: Vec<Prefix>,
    /// The guard's entries for `desired` and `ids`, made once per change rather than at
    /// every convergence: a deny list of a million prefixes takes a while to lay out.
    pub(super) sources: Arc<Sources>,
    /// The node's own addresses as last read from the kernel, refreshed before every change.
    own: OwnAddrs,
}

/// The facts the target is computed from, borrowed from the core.
pub(super) struct CoreFacts<'a> {
    desired: &'a DesiredState,
    health: &'a BTreeMap<(VipAddr, BackendAddr), Health>,
    fleet_health: &'a Option<BTreeMap<(VipAddr, BackendAddr), bool>>,
    learned: &'a BTreeMap<IpAddr, Mac>,
}

impl Facts for CoreFacts<'_> {
    fn up(&self, vip: &VipAddr, addr: &BackendAddr) -> bool {
        fleet_verdict(self.fleet_health, vip, addr)
            .unwrap_or_else(|| self.health.get(&(*vip, *addr)).is_none_or(|h| h.up))
    }

    fn mac(&self, vip: &VipAddr, addr: &IpAddr) -> Option<Mac> {
        self.desired
            .vips
            .get(vip)
            .and_then(|v| {
                v.backends
                    .iter()
                    .find_map(|(a, b)| b.mac.filter(|_| a.ip == *addr))
            })
            .or_else(|| self.learned.get(addr).copied())
    }
}

impl Core {
    /// A core over `kernel` holding `saved`, not yet converged (call [`Core::converge`]).
    /// MACs of backends the kernel already holds are taken as learned, so a restarted agent
    /// keeps serving them before the neighbour table is read.
    pub fn new(kernel: Box<dyn Kernel>, saved: StateFile) -> Result<Self, Error> {
        saved.desired.validate().map_err(|e| {
            Error::Invalid(format!(
                "the saved state is not valid ({e}): fix or remove the state file"
            ))
        })?;
        let mut ids = saved.ids;
        let cap = kernel.capacity();
        // Ids beyond this run's capacity (a state file from a larger --max-*) are dropped and
        // given again.
        ids.vips.retain(|_, id| *id < cap.vips);
        for m in ids.backends.values_mut() {
            m.retain(|_, id| *id > 0 && *id < cap.backends);
        }
        let mut learned = BTreeMap::new();
        for (vip, m) in &ids.backends {
            for (addr, id) in m {
                let configured = saved
                    .desired
                    .vips
                    .get(vip)
                    .and_then(|v| v.backends.get(addr))
                    .and_then(|b| b.mac);
                if let Some(b) = kernel.view().backends.get(id)
                    && b.addr == *addr
                    && configured.is_none()
                {
                    learned.insert(addr.ip, b.mac);
                }
            }
        }
        let sources = Arc::new(super::guard::sources(&saved.desired, &ids));
        Ok(Core {
            sources,
            desired: saved.desired,
            ids,
            health: BTreeMap::new(),
            fleet_health: None,
            learned,
            kernel,
            tables: BTreeMap::new(),
            not_converged: None,
            windows: Windows::default(),
            vip_pools: Vec::new(),
            own: OwnAddrs::default(),
        })
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    pub fn ids(&self) -> &Ids {
        &self.ids
    }

    /// The guard's entries for the current state.
    pub fn sources(&self) -> Arc<Sources> {
        self.sources.clone()
    }

    pub fn kernel(&self) -> &dyn Kernel {
        self.kernel.as_ref()
    }

    pub fn not_converged(&self) -> Option<&str> {
        self.not_converged.as_deref()
    }

    pub fn capacity(&self) -> Capacity {
        self.kernel.capacity()
    }

    /// What is saved for the current state.
    pub fn state_file(&self) -> StateFile {
        StateFile {
            desired: self.desired.clone(),
            ids: self.ids.clone(),
            store_revision: None,
        }
    }

    /// The prefixes VIPs may use (empty: any address).
    pub fn vip_pools(&self) -> &[Prefix] {
        &self.vip_pools
    }

    pub fn set_vip_pools(&mut self, pools: Vec<Prefix>) {
        self.vip_pools = pools;
    }

    /// The node's own addresses, read from the kernel by the caller (never under this lock).
    pub fn set_own_addrs(&mut self, own: OwnAddrs) {
        self.own = own;
    }

    /// Whether a VIP may take address `ip` here: inside the pools and not one of the node's
    /// own addresses ([`pool::check_vip_address`]); its encapsulation/NAT source counts as
    /// its own.
    pub fn check_vip_address(&self, ip: IpAddr) -> Result<(), String> {
        pool::check_not_nat_source(ip, &self.kernel.nat_sources_given())?;
        let services: Vec<IpAddr> = self.kernel.outer_source(ip).into_iter().collect();
        pool::check_vip_address(ip, &self.vip_pools, &self.own, &services)
    }

    /// The rules [`Core::check_vip_address`] applies, copied out (for checks made outside the
    /// lock).
    pub fn address_rules(&self) -> pool::AddressRules {
        let probes = [
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        ];
        pool::AddressRules {
            pools: self.vip_pools.clone(),
            own: self.own.clone(),
            services: probes
                .into_iter()
                .filter_map(|p| self.kernel.outer_source(p))
                .collect(),
            nat_pool: self.kernel.nat_sources_given(),
        }
    }

    /// Validates `new` and gives it ids; changes nothing. No tables are built here (see
    /// [`Prepared::plan`]).
    pub fn prepare(&self, new: DesiredState) -> Result<Prepared, Error> {
        new.validate().map_err(Error::Invalid)?;
        self.check_sources(&new)?;
        // VIPs already served were checked when they came; an address that became the node's
        // own since then is not a reason to refuse an unrelated change.
        for vip in new
            .vips
            .keys()
            .filter(|v| !self.desired.vips.contains_key(v))
        {
            self.check_vip_address(vip.ip).map_err(Error::Invalid)?;
        }
        // Ids the kernel still holds or the current state uses are not handed to newcomers.
        let mut reserved = self.ids.backend_ids();
        reserved.extend(self.kernel.view().backends.keys().copied());
        let ids = reconcile::allocate(&new, &self.ids, &reserved, self.kernel.capacity())?;
        Ok(Prepared {
            replaced: plan::replaced(&self.desired, &new),
            desired: new,
            ids,
            ring_size: self.kernel.ring_size(),
            sources: None,
            keep_deny: false,
        })
    }

    /// Every routed backend needs a source address of its family on this node; with NAT in
    /// use, no VIP may sit on a NAT source address (the program takes every packet to it as
    /// a backend's answer).
    fn check_sources(&self, new: &DesiredState) -> Result<(), Error> {
        if new.vips.values().any(|s| s.forward == Forward::Nat)
            && let Some(vip) = new
                .vips
                .keys()
                .find(|v| self.kernel.outer_source(v.ip) == Some(v.ip))
        {
            return Err(Error::Invalid(format!(
                "VIP {vip} is this load balancer's NAT source address: backends' answers arrive there; give the VIP another address (or `lb run --encap-source` another source)"
            )));
        }
        for (vip, spec) in &new.vips {
            if !spec.forward.routed() {
                continue;
            }
            for addr in spec.backends.keys() {
                if self.kernel.outer_source(addr.ip).is_none() {
                    return Err(Error::Invalid(format!(
                        "backend {addr} of VIP {vip}: this load balancer has no {} address to encapsulate from (give `lb run --encap-source ADDR`)",
                        if addr.ip.is_ipv4() { "IPv4" } else { "IPv6" }
                    )));
                }
            }
        }
        Ok(())
    }

    /// Makes `p` the state in memory (the caller has saved it) and converges the kernel. A
    /// kernel failure leaves the change in effect in memory and is retried by
    /// [`Core::converge`]; it is returned as [`Error::NotConverged`].
    pub fn commit(&mut self, mut p: Prepared) -> Result<(), Error> {
        if p.keep_deny {
            p.desired.deny = std::mem::take(&mut self.desired.deny);
        }
        self.sources = match p.sources {
            Some(s) => s,
            None => Arc::new(super::guard::sources(&p.desired, &p.ids)),
        };
        self.desired = p.desired;
        self.ids = p.ids;
        let desired = &self.desired;
        // Health gathered under a check that is gone or changed no longer counts.
        self.health.retain(|(v, a), h| {
            desired
                .vips
                .get(v)
                .is_some_and(|s| s.backends.contains_key(a) && s.health.as_ref() == Some(&h.check))
        });
        self.tables.retain(|v, _| desired.vips.contains_key(v));
        self.converge()
    }

    /// Brings the kernel in line with the desired state; level-triggered, idempotent.
    pub fn converge(&mut self) -> Result<(), Error> {
        let ring = self.kernel.ring_size();
        let facts = CoreFacts {
            desired: &self.desired,
            health: &self.health,
            fleet_health: &self.fleet_health,
            learned: &self.learned,
        };
        let tables = &mut self.tables;
        let mut target = reconcile::target(&self.desired, &self.ids, &facts, |vip, from| {
            if let Some(t) = tables.get(vip)
                && t.from == from
            {
                return t.table.clone();
            }
            let table = Arc::new(maglev::build(from, ring));
            let mut slots = BTreeMap::new();
            for id in table.iter() {
                *slots.entry(*id).or_insert(0) += 1;
            }
            tables.insert(
                *vip,
                BuiltTable {
                    from: from.to_vec(),
                    table: table.clone(),
                    slots,
                },
            );
            table
        });
        let kernel = &self.kernel;
        self.windows.apply(
            &self.desired,
            kernel.view(),
            &mut target,
            Instant::now(),
            |id| kernel.live_slots(id).ok().flatten(),
        );
        let ops = reconcile::diff(self.kernel.view(), &target);
        // The guard's entries go in before the flags that make a VIP read them, and come out
        // after the flags that stop it.
        let sources = self.sources.clone();
        let rates = super::guard::rates(&self.desired, &self.ids);
        let written = self
            .kernel
            .sync_sources(&sources, &rates, false)
            .and_then(|()| {
                for op in &ops {
                    self.kernel.apply(op)?;
                }
                self.kernel.sync_sources(&sources, &rates, true)
            });
        if let Err(e) = written {
            let msg = e.to_string();
            self.not_converged = Some(msg.clone());
            return Err(Error::NotConverged(msg));
        }
        self.not_converged = None;
        Ok(())
    }

    /// Takes the second-chance history the previous run saved; call before the first
    /// convergence (which resumes it where it agrees with the kernel's tables).
    pub fn restore_history(&mut self, saved: second_chance::saved::Saved) {
        self.windows.restore(saved, Instant::now(), unix_ms());
    }

    /// The second-chance history to save, and its version, unless version `saved` is the
    /// latest (a clone of each second-chance VIP's history: 20 bytes a slot).
    pub fn history_snapshot(&self, saved: u64) -> Option<(u64, second_chance::saved::Saved)> {
        self.windows.snapshot(saved, Instant::now(), unix_ms())
    }

    /// When the earliest second-chance window ends: the agent converges then, which clears
    /// the previous backends of that VIP's slots.
    pub fn next_window_end(&self) -> Option<Instant> {
        self.windows.next_end()
    }

    /// Re-reads the kernel maps, then converges (`lb reconcile`, and after a failure).
    pub fn resync(&mut self) -> Result<(), Error> {
        if let Err(e) = self.kernel.resync() {
            self.not_converged = Some(e.to_string());
            return Err(e);
        }
        self.converge()
    }

    /// Records a probe of backend `addr` of `vip`; converges when the backend flips. Returns
    /// whether it flipped.
    pub fn observe_health(
        &mut self,
        vip: &VipAddr,
        addr: BackendAddr,
        ok: bool,
        detail: String,
    ) -> Result<bool, Error> {
        let Some(check) = self
            .desired
            .vips
            .get(vip)
            .filter(|v| v.backends.contains_key(&addr))
            .and_then(|v| v.health.clone())
        else {
            return Ok(false);
        };
        let h = self
            .health
            .entry((*vip, addr))
            .or_insert_with(|| Health::new(check.clone()));
        if h.check != check {
            *h = Health::new(check);
        }
        let flipped = h.observe(ok, detail);
        if flipped {
            self.converge()?;
        }
        Ok(flipped)
    }

    /// Records MACs learned from the neighbour table; converges when one of ours changed.
    pub fn learn_macs(&mut self, macs: &[(IpAddr, Mac)]) -> Result<bool, Error> {
        let ours: BTreeSet<IpAddr> = self.wanted_macs();
        let mut changed = false;
        for (addr, mac) in macs {
            if ours.contains(addr) && self.learned.get(addr) != Some(mac) {
                self.learned.insert(*addr, *mac);
                changed = true;
            }
        }
        if changed {
            self.converge()?;
        }
        Ok(changed)
    }

    /// Backends whose MAC must come from the neighbour table.
    pub fn wanted_macs(&self) -> BTreeSet<IpAddr> {
        self.desired
            .vips
            .values()
            .filter(|v| !v.forward.routed())
            .flat_map(|v| v.backends.iter())
            .filter(|(_, b)| b.mac.is_none())
            .map(|(a, _)| a.ip)
            .collect()
    }

    /// Backends of encapsulating VIPs (reached through routers).
    pub fn routed_backends(&self) -> BTreeSet<IpAddr> {
        self.desired
            .vips
            .values()
            .filter(|v| v.forward.routed())
            .flat_map(|v| v.backends.keys().map(|a| a.ip))
            .collect()
    }

    /// Backends without a known MAC.
    pub fn no_mac(&self) -> Vec<IpAddr> {
        let facts = self.facts();
        let mut out: BTreeSet<IpAddr> = BTreeSet::new();
        for (vip, spec) in &self.desired.vips {
            if spec.forward.routed() {
                continue;
            }
            for addr in spec.backends.keys() {
                if facts.mac(vip, &addr.ip).is_none() {
                    out.insert(addr.ip);
                }
            }
        }
        out.into_iter().collect()
    }

    pub(super) fn facts(&self) -> CoreFacts<'_> {
        CoreFacts {
            desired: &self.desired,
            health: &self.health,
            fleet_health: &self.fleet_health,
            learned: &self.learned,
        }
    }
}

/// The fleet's verdict on a backend in store mode (one without a verdict yet counts as up),
/// `None` when this node's own probes decide.
pub(super) fn fleet_verdict(
    fleet: &Option<BTreeMap<(VipAddr, BackendAddr), bool>>,
    vip: &VipAddr,
    addr: &BackendAddr,
) -> Option<bool> {
    fleet
        .as_ref()
        .map(|v| v.get(&(*vip, *addr)).copied().unwrap_or(true))
}

/// Wall-clock milliseconds since the Unix epoch (0 for a clock before it).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
