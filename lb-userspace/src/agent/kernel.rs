//! The agent's view of the data-plane maps as one small trait, so the reconciler can be driven
//! against an in-memory fake in unit tests and against the real maps in the agent.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use lb_common::{Counter, FlowKey, LbConfig, VipCounter};

use crate::{
    Error,
    agent::reconcile::{Capacity, KernelView, Op},
};

/// Totals of the global counters, summed over CPUs, keyed by their stable names.
pub type Totals = BTreeMap<&'static str, Counter>;

/// The kernel's counters, read per id (no walk over slot tables).
pub trait Counters: Send + Sync {
    /// Every global counter (outcomes, flow events, health-probe encapsulation).
    fn totals(&self) -> Result<Totals, Error>;
    /// Counters of VIP id `id`.
    fn vip(&self, id: u32) -> Result<VipCounter, Error>;
    /// Counters of backend id `id`.
    fn backend(&self, id: u32) -> Result<Counter, Error>;
    /// Packets the guard dropped for VIP id `id`.
    fn vip_guard_dropped(&self, _id: u32) -> Result<u64, Error> {
        Ok(0)
    }
    /// The guard's sampled drops (`lb_common::TopKey` -> samples) and the program's clock
    /// when they were read (monotonic coarse ns). A walk of the whole map.
    fn top_sources(&self) -> Result<(Vec<(lb_common::TopKey, u64)>, u64), Error> {
        Ok((Vec::new(), 0))
    }
}

/// What a NAT sweep found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Connections still live.
    pub live: usize,
    /// Expired connections deleted.
    pub expired: usize,
    /// Of the live ones: half-open, and closed but holding their port.
    pub half_open: usize,
    pub closing: usize,
    /// `--nat-entries`, and the half-open slots.
    pub capacity: usize,
    pub half_slots: usize,
    /// The live ones per NAT address holding them.
    pub by_addr: Vec<crate::protocol::NatAddrView>,
}

/// The NAT sweep's own handles on the NAT tables, so it runs without the agent's lock (a
/// full table is many map reads). It reads the kernel's clock itself.
pub trait NatSweep: Send + Sync {
    /// Deletes the connections expired now.
    fn sweep(&self) -> Result<Swept, Error>;
}

/// The kernel maps, seen through the writes the reconciler makes.
/// A live slot table read from the kernel: each slot's backend id, and each slot's previous
/// backend id (empty when no slot carries one).
pub type LiveSlots = (Vec<u32>, Vec<lb_common::Previous>);

pub trait Kernel: Send {
    /// What the kernel holds, as last read or written.
    fn view(&self) -> &KernelView;
    /// Carries out one write. On success the view reflects it; on failure the view is left
    /// so that the next diff rewrites whatever may not be in place.
    fn apply(&mut self, op: &Op) -> Result<(), Error>;
    /// Reads the maps again (level-triggered reconciliation starts from here).
    fn resync(&mut self) -> Result<(), Error>;
    fn capacity(&self) -> Capacity;
    /// Slot-table size M.
    fn ring_size(&self) -> u32;
    /// Seed of the flow hash the program was loaded with.
    fn hash_seed(&self) -> u64;
    /// The backend id the flow table remembers for `key` under VIP id `vip_id`, if that
    /// entry is still valid (same VIP and backend generations).
    fn flow_backend(&self, key: &FlowKey, vip_id: u32) -> Result<Option<u32>, Error>;
    /// The counter maps (none in fakes): a shared handle, read outside the agent's lock.
    fn counters(&self) -> Option<Arc<dyn Counters>> {
        None
    }
    /// The load balancer's address encapsulated packets to `backend` come from, if it has
    /// one of that family.
    fn outer_source(&self, backend: IpAddr) -> Option<IpAddr>;
    /// The NAT address pool in use (none in fakes): `lb run --nat-source`, else the
    /// encapsulation sources.
    fn nat_pool(&self) -> Vec<IpAddr> {
        Vec::new()
    }
    /// The NAT addresses given with `lb run --nat-source` (none in fakes): no VIP may take
    /// one of them. The default pool (the encapsulation sources) is left to the rules for
    /// the node's own addresses, which let a VIP held as a host address through.
    fn nat_sources_given(&self) -> Vec<IpAddr> {
        Vec::new()
    }
    /// The constants the program was loaded with.
    fn config(&self) -> LbConfig;
    /// The live slot table of VIP id `vip_id` as the kernel holds it: each slot's backend and
    /// previous backends (second chance), or `None` when it has none. Read once per VIP after
    /// a start (M lookups), so a restarted agent keeps the previous backends.
    fn live_slots(&self, _vip_id: u32) -> Result<Option<LiveSlots>, Error> {
        Ok(None)
    }
    /// The NAT sweep's own handles on the NAT tables (none without a data plane): the sweep
    /// runs without the agent's lock.
    fn nat_sweeper(&self) -> Option<Arc<dyn NatSweep>> {
        None
    }
    /// Packet capture's maps (none without a data plane): used without the agent's lock.
    fn capture(&self) -> Option<Arc<crate::capture::Capturer>> {
        None
    }
    /// Brings the guard's tries toward `want` and its limits toward `rates`
    /// (`agent::guard::sources`, `rates`): with `prune` false, writes the entries missing or
    /// changed; with `prune` true, deletes (or zeroes) those not wanted. The core writes
    /// before the VIPs' flags change and deletes after, so a VIP never meets a list half
    /// written (none in fakes: they hold no tries).
    /// The guard's tries, shared (none in fakes): a change writes a large list's entries
    /// through it before it takes the agent's lock (`Agent::change`).
    fn guard_writer(&self) -> Option<Arc<std::sync::Mutex<crate::dataplane::guard::GuardTables>>> {
        None
    }
    fn sync_sources(
        &mut self,
        _want: &Arc<super::guard::Sources>,
        _rates: &super::guard::Rates,
        _prune: bool,
    ) -> Result<(), Error> {
        Ok(())
    }
    /// Edits the core's entries `sources` in place by `add` and `remove` (a change of the
    /// node's deny list: `agent::guard::node_delta`) and writes exactly those to the tries,
    /// entries first, then deletions: work in proportion to the change, not the list. The
    /// entries are edited whatever the tries' outcome (the change is saved; a failure is left
    /// to convergence). Fakes hold no tries: they edit the entries only.
    fn apply_source_delta(
        &mut self,
        sources: &mut Arc<super::guard::Sources>,
        add: &[(super::guard::SourceRule, u64)],
        remove: &[super::guard::SourceRule],
    ) -> Result<(), Error> {
        super::guard::edit_entries(Arc::make_mut(sources), add, remove);
        Ok(())
    }
}
