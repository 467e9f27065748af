//! The agent's core: the desired state, the ids it gave VIPs and backends, health, and the
//! reconciliation that makes the kernel maps match. Every operation validates first and
//! touches nothing when it fails; every change is persisted atomically before it returns.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use lb_common::{BACKEND_F_PRESENT, Backend, VIP_F_SRC_HASH, flow_hash};
use serde::{Deserialize, Serialize};

use crate::{
    Dataplane, Error,
    maglev::{self, MaglevBackend},
    model::{BackendSpec, DesiredState, HealthCheck, Mac, VipAddr, VipSpec, validate_backend},
    neigh,
    net::{addr_words, family, flow_key},
    plan::{self, VipPlan},
};

/// Ids given to VIPs and backends; persisted so a restart adopts pinned maps (and the flows
/// in them, which name these ids) unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ids {
    pub vips: BTreeMap<VipAddr, u32>,
    pub backends: BTreeMap<VipAddr, BTreeMap<IpAddr, u32>>,
}

/// What the state file holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StateFile {
    pub desired: DesiredState,
    pub ids: Ids,
}

/// Health of one backend as the checks see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Health {
    pub up: bool,
    /// Result of the last probe (`ok`, or what failed).
    pub last: String,
    #[serde(skip)]
    pub streak: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            up: true,
            last: "not checked yet".into(),
            streak: 0,
        }
    }
}

/// A backend as listed by the API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendView {
    pub address: IpAddr,
    pub id: u32,
    pub weight: u32,
    pub mac: String,
    pub drained: bool,
    /// `up`, `down` or `unchecked`.
    pub health: String,
    pub last_check: String,
    /// Share of the live slot table, percent.
    pub share_pct: f64,
}

/// A VIP as listed by the API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipView {
    pub vip: VipAddr,
    pub id: u32,
    pub source_hash: bool,
    pub health_check: Option<HealthCheck>,
    pub backends: Vec<BackendView>,
}

/// What `trace` reports for a 5-tuple.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Trace {
    pub vip: VipAddr,
    pub vip_id: u32,
    pub slot: u32,
    /// Backend the slot table gives a new flow.
    pub slot_backend: Option<IpAddr>,
    /// Backend remembered in the flow table, if the flow is known.
    pub flow_backend: Option<IpAddr>,
    /// Where the next packet goes.
    pub next_packet_to: Option<IpAddr>,
}

pub struct Agent {
    pub dp: Dataplane,
    iface: String,
    lb_mac: [u8; 6],
    desired: DesiredState,
    ids: Ids,
    health: BTreeMap<(VipAddr, IpAddr), Health>,
    /// What was last published per VIP: (flags, table of backend ids).
    published: BTreeMap<VipAddr, (u32, Vec<u32>)>,
    state_path: PathBuf,
}

impl Agent {
    /// An agent over a loaded data plane for `iface`, restoring `state_path` if it exists
    /// and reconciling the maps with it.
    pub fn new(dp: Dataplane, iface: &str, state_path: &Path) -> Result<Self, Error> {
        let lb_mac =
            crate::net::interface_mac(iface).ok_or_else(|| Error::NoSuchInterface(iface.into()))?;
        let saved = load_state(state_path)?;
        let mut agent = Agent {
            dp,
            iface: iface.to_string(),
            lb_mac,
            desired: DesiredState::default(),
            ids: saved.ids.clone(),
            health: BTreeMap::new(),
            published: BTreeMap::new(),
            state_path: state_path.to_path_buf(),
        };
        agent.apply(saved.desired)?;
        Ok(agent)
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// Makes `new` the desired state: validates, resolves MACs and ids, writes the maps,
    /// persists. On error nothing is changed.
    pub fn apply(&mut self, new: DesiredState) -> Result<Vec<VipPlan>, Error> {
        new.validate().map_err(Error::Invalid)?;
        let plan = plan::plan(&self.desired, &new, self.dp.opts.ring_size);
        let macs = self.resolve_macs(&new)?;
        let ids = self.allocate(&new)?;
        self.sync(&new, &ids, &macs)?;
        self.desired = new;
        self.ids = ids;
        self.health.retain(|(v, a), _| {
            self.desired
                .vips
                .get(v)
                .is_some_and(|s| s.backends.contains_key(a))
        });
        save_state(
            &self.state_path,
            &StateFile {
                desired: self.desired.clone(),
                ids: self.ids.clone(),
            },
        )?;
        Ok(plan)
    }

    /// MACs for every backend: configured, or from the neighbour table.
    fn resolve_macs(&self, new: &DesiredState) -> Result<BTreeMap<IpAddr, Mac>, Error> {
        let mut out = BTreeMap::new();
        for spec in new.vips.values() {
            for (addr, b) in &spec.backends {
                let mac = match b.mac {
                    Some(m) => m,
                    None => match out.get(addr) {
                        Some(m) => *m,
                        None => neigh::resolve(&self.iface, *addr).ok_or_else(|| {
                            Error::Invalid(format!(
                                "no MAC for backend {addr}: it is not in the neighbour table of {} (is it on that link and up?); give it with --mac",
                                self.iface
                            ))
                        })?,
                    },
                };
                out.insert(*addr, mac);
            }
        }
        Ok(out)
    }

    /// Ids for `new`: existing ones kept, new ones the lowest free.
    fn allocate(&self, new: &DesiredState) -> Result<Ids, Error> {
        let mut ids = Ids::default();
        let vip_cap = self.dp.vips.capacity();
        let backend_cap = self.dp.backends.capacity();
        let kept_vips: BTreeSet<u32> = new
            .vips
            .keys()
            .filter_map(|v| self.ids.vips.get(v).copied())
            .collect();
        let mut free_vips = (0..vip_cap).filter(|i| !kept_vips.contains(i));
        let mut used_backends: BTreeSet<u32> = BTreeSet::new();
        for (vip, spec) in &new.vips {
            for addr in spec.backends.keys() {
                if let Some(id) = self.ids.backends.get(vip).and_then(|b| b.get(addr)) {
                    used_backends.insert(*id);
                }
            }
        }
        // Backend id 0 is never used: an empty slot reads as "no backend".
        let mut free_backends = (1..backend_cap).filter(|i| !used_backends.contains(i));
        for (vip, spec) in &new.vips {
            let id = match self.ids.vips.get(vip) {
                Some(id) => *id,
                None => free_vips.next().ok_or_else(|| {
                    Error::Invalid(format!("no room for VIP {vip}: the agent holds at most {vip_cap} VIPs (restart with a larger --max-vips)"))
                })?,
            };
            ids.vips.insert(*vip, id);
            let entry = ids.backends.entry(*vip).or_default();
            for addr in spec.backends.keys() {
                let id = match self.ids.backends.get(vip).and_then(|b| b.get(addr)) {
                    Some(id) => *id,
                    None => free_backends.next().ok_or_else(|| {
                        Error::Invalid(format!("no room for backend {addr}: at most {} backends (restart with a larger --max-backends)", backend_cap - 1))
                    })?,
                };
                entry.insert(*addr, id);
            }
        }
        Ok(ids)
    }

    fn serving(&self, vip: &VipAddr, addr: &IpAddr, b: &BackendSpec) -> bool {
        b.weight > 0 && !b.drained && self.health.get(&(*vip, *addr)).is_none_or(|h| h.up)
    }

    /// Writes backends, publishes changed tables, then removes what is gone.
    fn sync(
        &mut self,
        new: &DesiredState,
        ids: &Ids,
        macs: &BTreeMap<IpAddr, Mac>,
    ) -> Result<(), Error> {
        // VIPs that are gone first: their ids are free again and may be published below.
        for vip in self.ids.vips.keys() {
            if !new.vips.contains_key(vip) {
                self.dp.remove_vip(&vip.key())?;
                self.published.remove(vip);
            }
        }
        for (vip, spec) in &new.vips {
            let vip_id = ids.vips[vip];
            let bids = &ids.backends[vip];
            for (addr, bid) in bids {
                self.write_backend(*bid, *addr, macs[addr])?;
            }
            let serving: Vec<MaglevBackend> = spec
                .backends
                .iter()
                .filter(|(addr, b)| self.serving(vip, addr, b))
                .map(|(addr, b)| MaglevBackend {
                    id: bids[addr],
                    key: addr.to_string(),
                    weight: b.weight,
                })
                .collect();
            let table = maglev::build(&serving, self.dp.opts.ring_size);
            let flags = if spec.source_hash { VIP_F_SRC_HASH } else { 0 };
            if self.published.get(vip) != Some(&(flags, table.clone())) {
                self.dp.publish_vip(&vip.key(), vip_id, flags, &table)?;
                self.published.insert(*vip, (flags, table));
            }
        }
        // Backends no VIP uses any more, once no table names them.
        let live: BTreeSet<u32> = ids
            .backends
            .values()
            .flat_map(|m| m.values().copied())
            .collect();
        for bid in self.ids.backends.values().flat_map(|m| m.values().copied()) {
            if !live.contains(&bid) {
                self.dp.backends.clear(bid)?;
            }
        }
        Ok(())
    }

    /// Stores backend `id`, bumping its generation only when the id changes hands.
    fn write_backend(&mut self, id: u32, addr: IpAddr, mac: Mac) -> Result<(), Error> {
        let old = self.dp.backends.get(id)?;
        let words = addr_words(addr);
        let same_backend = old.flags & BACKEND_F_PRESENT != 0 && old.addr == words;
        let b = Backend {
            addr: words,
            mac: mac.0,
            src_mac: self.lb_mac,
            ifindex: 0,
            generation: if same_backend {
                old.generation
            } else {
                old.generation.wrapping_add(1)
            },
            flags: BACKEND_F_PRESENT,
            family: family(addr),
            _pad: [0; 3],
        };
        if b != old {
            self.dp.backends.set(id, &b)?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Operations.

    fn vip_spec(&self, vip: &VipAddr) -> Result<&VipSpec, Error> {
        self.desired
            .vips
            .get(vip)
            .ok_or_else(|| Error::Invalid(format!("unknown VIP {vip}: see `lb vip list`")))
    }

    pub fn add_vip(
        &mut self,
        vip: VipAddr,
        source_hash: bool,
        health: Option<HealthCheck>,
    ) -> Result<(), Error> {
        if self.desired.vips.contains_key(&vip) {
            return Err(Error::Invalid(format!(
                "VIP {vip} already exists: remove it first or use `lb apply`"
            )));
        }
        let mut new = self.desired.clone();
        new.vips.insert(
            vip,
            VipSpec {
                source_hash,
                health,
                backends: BTreeMap::new(),
            },
        );
        self.apply(new).map(drop)
    }

    pub fn remove_vip(&mut self, vip: &VipAddr) -> Result<(), Error> {
        self.vip_spec(vip)?;
        let mut new = self.desired.clone();
        new.vips.remove(vip);
        self.apply(new).map(drop)
    }

    pub fn add_backend(
        &mut self,
        vip: &VipAddr,
        addr: IpAddr,
        spec: BackendSpec,
    ) -> Result<(), Error> {
        if self.vip_spec(vip)?.backends.contains_key(&addr) {
            return Err(Error::Invalid(format!(
                "backend {addr} already exists in VIP {vip}: use `lb backend weight` to change it"
            )));
        }
        validate_backend(vip, &addr, &spec).map_err(Error::Invalid)?;
        let mut new = self.desired.clone();
        new.vips.get_mut(vip).map(|v| v.backends.insert(addr, spec));
        self.apply(new).map(drop)
    }

    fn change_backend(
        &mut self,
        vip: &VipAddr,
        addr: IpAddr,
        f: impl FnOnce(&mut BackendSpec),
    ) -> Result<(), Error> {
        if !self.vip_spec(vip)?.backends.contains_key(&addr) {
            return Err(Error::Invalid(format!(
                "unknown backend {addr} in VIP {vip}: see `lb backend list {vip}`"
            )));
        }
        let mut new = self.desired.clone();
        if let Some(b) = new
            .vips
            .get_mut(vip)
            .and_then(|v| v.backends.get_mut(&addr))
        {
            f(b);
            validate_backend(vip, &addr, b).map_err(Error::Invalid)?;
        }
        self.apply(new).map(drop)
    }

    pub fn remove_backend(&mut self, vip: &VipAddr, addr: IpAddr) -> Result<(), Error> {
        self.change_backend(vip, addr, |_| {})?;
        let mut new = self.desired.clone();
        new.vips.get_mut(vip).map(|v| v.backends.remove(&addr));
        self.apply(new).map(drop)
    }

    pub fn set_weight(&mut self, vip: &VipAddr, addr: IpAddr, weight: u32) -> Result<(), Error> {
        self.change_backend(vip, addr, |b| b.weight = weight)
    }

    pub fn set_drained(&mut self, vip: &VipAddr, addr: IpAddr, drained: bool) -> Result<(), Error> {
        self.change_backend(vip, addr, |b| b.drained = drained)
    }

    /// Records a health probe result; republishes the VIP when the backend changes state.
    pub fn record_health(
        &mut self,
        vip: &VipAddr,
        addr: IpAddr,
        ok: bool,
        detail: String,
    ) -> Result<(), Error> {
        let Some(check) = self.desired.vips.get(vip).and_then(|v| v.health.clone()) else {
            return Ok(());
        };
        if !self.desired.vips[vip].backends.contains_key(&addr) {
            return Ok(());
        }
        let h = self.health.entry((*vip, addr)).or_default();
        h.last = detail;
        let flipped = if ok == h.up {
            h.streak = 0;
            false
        } else {
            h.streak += 1;
            let needed = if ok { check.rise } else { check.fall };
            if h.streak >= needed {
                h.up = ok;
                h.streak = 0;
                true
            } else {
                false
            }
        };
        if flipped {
            let (desired, ids) = (self.desired.clone(), self.ids.clone());
            let macs = self.resolve_macs(&desired)?;
            self.sync(&desired, &ids, &macs)?;
        }
        Ok(())
    }

    /// Backends that need probing: (VIP, address, check).
    pub fn health_targets(&self) -> Vec<(VipAddr, IpAddr, HealthCheck)> {
        let mut out = Vec::new();
        for (vip, spec) in &self.desired.vips {
            if let Some(h) = &spec.health {
                for addr in spec.backends.keys() {
                    out.push((*vip, *addr, h.clone()));
                }
            }
        }
        out
    }

    pub fn list(&self) -> Vec<VipView> {
        let mut out = Vec::new();
        for (vip, spec) in &self.desired.vips {
            let table = self
                .published
                .get(vip)
                .map(|(_, t)| t.as_slice())
                .unwrap_or(&[]);
            let bids = self.ids.backends.get(vip).cloned().unwrap_or_default();
            let backends = spec
                .backends
                .iter()
                .map(|(addr, b)| {
                    let id = bids.get(addr).copied().unwrap_or(0);
                    let h = self.health.get(&(*vip, *addr));
                    let share = if table.is_empty() {
                        0.0
                    } else {
                        100.0 * table.iter().filter(|x| **x == id).count() as f64
                            / table.len() as f64
                    };
                    let mac = self
                        .dp
                        .backends
                        .get(id)
                        .map(|k| Mac(k.mac).to_string())
                        .unwrap_or_default();
                    BackendView {
                        address: *addr,
                        id,
                        weight: b.weight,
                        mac,
                        drained: b.drained,
                        health: match (&spec.health, h) {
                            (None, _) => "unchecked".into(),
                            (Some(_), Some(h)) if !h.up => "down".into(),
                            (Some(_), _) => "up".into(),
                        },
                        last_check: h.map(|h| h.last.clone()).unwrap_or_default(),
                        share_pct: share,
                    }
                })
                .collect();
            out.push(VipView {
                vip: *vip,
                id: self.ids.vips.get(vip).copied().unwrap_or(0),
                source_hash: spec.source_hash,
                health_check: spec.health.clone(),
                backends,
            });
        }
        out
    }

    /// Address of backend id `id` of `vip`.
    fn backend_addr(&self, vip: &VipAddr, id: u32) -> Option<IpAddr> {
        self.ids
            .backends
            .get(vip)?
            .iter()
            .find(|(_, b)| **b == id)
            .map(|(a, _)| *a)
    }

    /// What a packet from `src:sport` to `vip` would meet.
    pub fn trace(&self, src: IpAddr, sport: u16, vip: &VipAddr) -> Result<Trace, Error> {
        let spec = self.vip_spec(vip)?;
        if src.is_ipv4() != vip.ip.is_ipv4() {
            return Err(Error::Invalid(format!(
                "client {src} and VIP {vip} are of different address families"
            )));
        }
        let vip_id = self.ids.vips[vip];
        let info = self.dp.vips.info(vip_id)?;
        let key = flow_key(src, sport, vip.ip, vip.port, vip.proto.number());
        let m = self.dp.opts.ring_size;
        let slot =
            (flow_hash(&key, self.dp.opts.hash_seed, spec.source_hash) % u64::from(m)) as u32;
        let slot_backend = if info.backend_count == 0 {
            None
        } else {
            let id = self.dp.slots.get(vip_id, info.active_gen, slot)?;
            self.backend_addr(vip, id)
        };
        let flow_backend = self.dp.flows.get(&key)?.and_then(|f| {
            let b = self.dp.backends.get(f.backend_id).ok()?;
            let valid = f.vip_id == vip_id
                && f.vip_generation == info.generation
                && b.flags & BACKEND_F_PRESENT != 0
                && b.generation == f.backend_generation;
            if valid {
                self.backend_addr(vip, f.backend_id)
            } else {
                None
            }
        });
        Ok(Trace {
            vip: *vip,
            vip_id,
            slot,
            slot_backend,
            flow_backend,
            next_packet_to: flow_backend.or(slot_backend),
        })
    }
}

fn load_state(path: &Path) -> Result<StateFile, Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| {
            Error::Invalid(format!(
                "state file {} is corrupt ({e}): fix or remove it",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile::default()),
        Err(e) => Err(Error::Io {
            what: format!("reading {}", path.display()),
            source: e,
        }),
    }
}

/// Writes the state atomically: a temporary file, fsync, rename over, fsync the directory.
fn save_state(path: &Path, state: &StateFile) -> Result<(), Error> {
    let io = |what: String| move |source| Error::Io { what, source };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::Invalid(format!("serializing state: {e}")))?;
    let mut f = std::fs::File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    f.write_all(&text)
        .map_err(io(format!("writing {}", tmp.display())))?;
    f.sync_all()
        .map_err(io(format!("syncing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("renaming onto {}", path.display())))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing {}", dir.display())))?;
    Ok(())
}
