//! The reconciler's pure core: which ids VIPs and backends get, what the kernel should hold
//! (the target), and the ordered list of writes that takes the kernel from what it holds to
//! the target. No I/O here: the agent feeds it the desired state, health and MACs, and the
//! [`Kernel`](super::kernel::Kernel) implementation carries the writes out (Katran's `Vip.h`
//! computes ring deltas the same way and leaves the writing to its I/O layer).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{BACKEND_F_DOWN, BACKEND_F_DRAINED, Previous, VIP_F_SRC_HASH, VipKey};
use serde::{Deserialize, Serialize};

use crate::{
    Error,
    maglev::MaglevBackend,
    model::{BackendAddr, DesiredState, Mac, VipAddr},
};

/// Ids given to VIPs and backends; persisted so a restart adopts pinned maps (and the flows
/// in them, which name these ids) unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ids {
    pub vips: BTreeMap<VipAddr, u32>,
    pub backends: BTreeMap<VipAddr, BTreeMap<BackendAddr, u32>>,
}

impl Ids {
    /// Every backend id in use.
    pub fn backend_ids(&self) -> BTreeSet<u32> {
        self.backends
            .values()
            .flat_map(|m| m.values().copied())
            .collect()
    }

    pub fn backend(&self, vip: &VipAddr, addr: &BackendAddr) -> Option<u32> {
        self.backends.get(vip)?.get(addr).copied()
    }
}

/// Sizes of the id spaces, from the loaded maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub vips: u32,
    /// Backend ids are 1..backends (id 0 means "no backend" in a slot).
    pub backends: u32,
}

/// Ids for `new`: ids in `old` are kept; a new VIP or backend gets the lowest free id.
///
/// A backend id in `reserved` is never handed out: the caller passes every id the kernel
/// still holds and every id of the previous state, so an id freed by this very change is not
/// reused before the tables that name it have been replaced (flows would otherwise be pinned
/// to the wrong backend for a moment). It becomes free in the next change.
pub fn allocate(
    new: &DesiredState,
    old: &Ids,
    reserved: &BTreeSet<u32>,
    cap: Capacity,
) -> Result<Ids, Error> {
    let mut ids = Ids::default();
    let kept_vips: BTreeSet<u32> = new
        .vips
        .keys()
        .filter_map(|v| old.vips.get(v).copied())
        .collect();
    let mut free_vips = (0..cap.vips).filter(|i| !kept_vips.contains(i));
    let mut taken: BTreeSet<u32> = reserved.clone();
    for (vip, spec) in &new.vips {
        for addr in spec.backends.keys() {
            if let Some(id) = old.backend(vip, addr) {
                taken.insert(id);
            }
        }
    }
    let mut free_backends = (1..cap.backends).filter(|i| !taken.contains(i));
    for (vip, spec) in &new.vips {
        let id = match old.vips.get(vip) {
            Some(id) => *id,
            None => free_vips.next().ok_or_else(|| {
                Error::Capacity(format!(
                    "no room for VIP {vip}: the agent holds at most {} VIPs (restart with a larger --max-vips and --fresh)",
                    cap.vips
                ))
            })?,
        };
        ids.vips.insert(*vip, id);
        let entry = ids.backends.entry(*vip).or_default();
        for addr in spec.backends.keys() {
            let id = match old.backend(vip, addr) {
                Some(id) => id,
                None => free_backends.next().ok_or_else(|| {
                    Error::Capacity(format!(
                        "no room for backend {addr}: at most {} backends (ids freed by this change are reusable after it; restart with a larger --max-backends and --fresh)",
                        cap.backends.saturating_sub(1)
                    ))
                })?,
            };
            entry.insert(*addr, id);
        }
    }
    Ok(ids)
}

/// A backend entry as the kernel should hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendTarget {
    pub addr: BackendAddr,
    /// The backend's MAC for L2 forwarding; all zero when encapsulated (the FIB finds the
    /// next hop).
    pub mac: Mac,
    /// `lb_common::ENCAP_*`: its VIP's forwarding mode.
    pub encap: u8,
    /// `BACKEND_F_DRAINED` or `BACKEND_F_DOWN` (without `BACKEND_F_PRESENT`): what its
    /// remembered flows do (see `lb_common::entry_decides`).
    pub flags: u32,
}

/// A VIP's parameters the kernel holds beside its table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipParams {
    /// `VIP_F_*` bits (without `VIP_F_PRESENT`).
    pub flags: u32,
    /// Seconds a UDP flow entry lives without a datagram.
    pub udp_idle_s: u32,
}

/// A VIP as the kernel should hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipTarget {
    pub id: u32,
    pub params: VipParams,
    /// M backend ids, or empty for "no backend".
    pub table: Arc<Vec<u32>>,
    /// M slots' previous backend ids during a second-chance window (`lb_common::Previous`:
    /// 0s trail, all 0: none), or empty.
    pub previous: Arc<Vec<Previous>>,
}

/// A VIP's table as published (what the kernel's live generation holds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Live {
    pub params: VipParams,
    pub table: Arc<Vec<u32>>,
    pub previous: Arc<Vec<Previous>>,
}

impl Live {
    /// Whether the table names `id`, as backend or previous backend.
    pub fn names(&self, id: u32) -> bool {
        self.table.contains(&id) || self.previous.iter().any(|p| p.contains(&id))
    }
}

/// Everything the kernel maps should say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    pub vips: BTreeMap<VipKey, VipTarget>,
    pub backends: BTreeMap<u32, BackendTarget>,
}

/// Who serves is the model's rule ([`Serving::of`]); named here too for the reconciler's
/// users.
pub use crate::model::Serving;

/// What the target is computed from besides the desired state and ids.
pub trait Facts {
    /// Whether backend `addr` of `vip` passes its health check (true when unchecked).
    fn up(&self, vip: &VipAddr, addr: &BackendAddr) -> bool;
    /// The MAC to send backend `addr` of `vip`: configured, learned, or unknown.
    fn mac(&self, vip: &VipAddr, addr: &IpAddr) -> Option<Mac>;
}

/// Whether and why backend `addr` of `vip` takes new flows.
pub fn serving(
    state: &DesiredState,
    facts: &impl Facts,
    vip: &VipAddr,
    addr: &BackendAddr,
) -> Serving {
    let Some(b) = state.vips.get(vip).and_then(|v| v.backends.get(addr)) else {
        return Serving::Weightless;
    };
    let routed = state.vips.get(vip).is_some_and(|v| v.forward.routed());
    Serving::of(
        b,
        || routed || facts.mac(vip, &addr.ip).is_some(),
        || facts.up(vip, addr),
    )
}

/// The target for `state` with `ids`. `table` builds (or recalls) a VIP's slot table from its
/// serving backends, which come sorted by address so the table never depends on arrival order.
pub fn target(
    state: &DesiredState,
    ids: &Ids,
    facts: &impl Facts,
    mut table: impl FnMut(&VipAddr, &[MaglevBackend]) -> Arc<Vec<u32>>,
) -> Target {
    let mut out = Target::default();
    for (vip, spec) in &state.vips {
        let Some(vip_id) = ids.vips.get(vip) else {
            continue;
        };
        let mut serving_set = Vec::new();
        for (addr, b) in &spec.backends {
            let Some(id) = ids.backend(vip, addr) else {
                continue;
            };
            // A backend is written to the kernel whenever its MAC is known, serving or not:
            // drained flows stay on it; down ones move (its flag tells the program).
            let serves = serving(state, facts, vip, addr);
            // Routed backends need no MAC: the FIB finds their next hop.
            let mac = if spec.forward.routed() {
                Some(Mac([0; 6]))
            } else {
                facts.mac(vip, &addr.ip)
            };
            if let Some(mac) = mac {
                let flags = match serves {
                    Serving::Serving => 0,
                    Serving::Weightless | Serving::Drained => BACKEND_F_DRAINED,
                    Serving::Down | Serving::NoMac => BACKEND_F_DOWN,
                };
                out.backends.insert(
                    id,
                    BackendTarget {
                        addr: *addr,
                        mac,
                        encap: spec.forward.encap(),
                        flags,
                    },
                );
            }
            if serves == Serving::Serving {
                serving_set.push(MaglevBackend {
                    id,
                    key: addr.to_string(),
                    weight: b.weight,
                });
            }
        }
        out.vips.insert(
            vip.key(),
            VipTarget {
                id: *vip_id,
                params: VipParams {
                    flags: if spec.source_hash { VIP_F_SRC_HASH } else { 0 }
                        | super::guard::vip_flags(spec, !state.deny.is_empty()),
                    udp_idle_s: spec.udp_idle_s,
                },
                table: table(vip, &serving_set),
                previous: Arc::new(Vec::new()),
            },
        );
    }
    out
}

/// What the kernel holds, as far as the agent knows: bound VIP keys, the live table of each
/// VIP id when known (unknown after a start until first published), present backends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelView {
    pub vips: BTreeMap<VipKey, u32>,
    pub published: BTreeMap<u32, Live>,
    pub backends: BTreeMap<u32, BackendTarget>,
}

/// One kernel write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Stop routing `key` and mark its id unused.
    RemoveVip { key: VipKey, id: u32 },
    /// Write backend `id`. `new_owner`: the id changes hands (or was empty): its generation
    /// is bumped so flows of a previous owner are never used, and its counters start at 0.
    SetBackend {
        id: u32,
        backend: BackendTarget,
        new_owner: bool,
    },
    /// Make `table` the live table of VIP `key` with id `id`. `new`: the key is not bound yet
    /// (the id's generation is bumped and its counters start at 0).
    PublishVip {
        key: VipKey,
        id: u32,
        params: VipParams,
        table: Arc<Vec<u32>>,
        /// Previous backends per slot (second chance), or empty.
        previous: Arc<Vec<Previous>>,
        new: bool,
    },
    /// Mark backend `id` absent; flows remembered on it are placed again.
    ClearBackend { id: u32 },
}

/// The writes that take the kernel from `view` to `target`, in an order that is safe at every
/// step: VIPs that go are unbound first (their ids may be published below); backends are
/// written before any table names them; tables are published (atomically, per VIP) before a
/// backend they no longer name is cleared.
pub fn diff(view: &KernelView, target: &Target) -> Vec<Op> {
    let mut ops = Vec::new();
    for (key, id) in &view.vips {
        if target.vips.get(key).is_none_or(|t| t.id != *id) {
            ops.push(Op::RemoveVip { key: *key, id: *id });
        }
    }
    for (id, want) in &target.backends {
        match view.backends.get(id) {
            Some(have) if have == want => {}
            have => ops.push(Op::SetBackend {
                id: *id,
                backend: *want,
                new_owner: have.is_none_or(|h| h.addr != want.addr),
            }),
        }
    }
    for (key, t) in &target.vips {
        let bound = view.vips.get(key) == Some(&t.id);
        let live = view.published.get(&t.id);
        if bound
            && live.is_some_and(|l| {
                l.params == t.params && l.table == t.table && l.previous == t.previous
            })
        {
            continue;
        }
        ops.push(Op::PublishVip {
            key: *key,
            id: t.id,
            params: t.params,
            table: t.table.clone(),
            previous: t.previous.clone(),
            new: !bound,
        });
    }
    for id in view.backends.keys() {
        if !target.backends.contains_key(id) {
            ops.push(Op::ClearBackend { id: *id });
        }
    }
    ops
}

/// What `view` becomes once `op` succeeded (the fake kernel and the real one's mirror agree
/// on this).
pub fn apply_to_view(view: &mut KernelView, op: &Op) {
    match op {
        Op::RemoveVip { key, id } => {
            view.vips.remove(key);
            view.published.remove(id);
        }
        Op::SetBackend { id, backend, .. } => {
            view.backends.insert(*id, *backend);
        }
        Op::PublishVip {
            key,
            id,
            params,
            table,
            previous,
            ..
        } => {
            view.vips.insert(*key, *id);
            view.published.insert(
                *id,
                Live {
                    params: *params,
                    table: table.clone(),
                    previous: previous.clone(),
                },
            );
        }
        Op::ClearBackend { id } => {
            view.backends.remove(id);
        }
    }
}
