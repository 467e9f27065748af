//! The agent's view of the data-plane maps as one small trait, so the reconciler can be driven
//! against an in-memory fake in unit tests and against the real maps in the agent.
use std::net::IpAddr;

use lb_common::{FlowKey, LbConfig};

use crate::{
    Error,
    agent::reconcile::{Capacity, KernelView, Op},
    dataplane::stats::StatsMaps,
};

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
    /// The counter maps (none in fakes).
    fn stats(&self) -> Option<&StatsMaps> {
        None
    }
    /// The load balancer's address encapsulated packets to `backend` come from, if it has
    /// one of that family.
    fn outer_source(&self, backend: IpAddr) -> Option<IpAddr>;
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
    fn nat_sweeper(
        &self,
    ) -> Option<std::sync::Arc<std::sync::Mutex<crate::dataplane::nat::NatSweeper>>> {
        None
    }
}
