//! What the core tells the fleet and takes from it (store mode): its own probe verdicts, the
//! digest of each live slot table, and the fleet's health verdicts.
use std::collections::BTreeMap;

use crate::{
    Error,
    agent::Core,
    fleet::status::ring_digest,
    model::{BackendAddr, VipAddr},
};

impl Core {
    /// This node's own verdict for every probed backend (true: up).
    pub fn own_health(&self) -> BTreeMap<VipAddr, BTreeMap<BackendAddr, bool>> {
        let mut out: BTreeMap<VipAddr, BTreeMap<BackendAddr, bool>> = BTreeMap::new();
        for ((vip, addr), h) in &self.health {
            out.entry(*vip).or_default().insert(*addr, h.up);
        }
        out
    }

    /// The fleet's verdicts replace this node's own probes (`None`: back to its own view);
    /// converges when that changes anything.
    pub fn set_fleet_health(
        &mut self,
        verdicts: Option<BTreeMap<(VipAddr, BackendAddr), bool>>,
    ) -> Result<bool, Error> {
        if verdicts == self.fleet_health {
            return Ok(false);
        }
        self.fleet_health = verdicts;
        self.converge()?;
        Ok(true)
    }

    /// [`ring_digest`] of the slot table live in the kernel for `vip` (None: not published).
    fn digest(&self, vip: &VipAddr) -> Option<u64> {
        let view = self.kernel.view();
        let live = view.published.get(self.ids.vips.get(vip)?)?;
        Some(ring_digest(
            live.table
                .iter()
                .map(|id| view.backends.get(id).map(|b| b.addr)),
        ))
    }

    /// [`Core::digest`] as shown to operators (16 hex digits).
    pub fn digest_hex(&self, vip: &VipAddr) -> Option<String> {
        self.digest(vip).map(|d| format!("{d:016x}"))
    }

    /// Every VIP's digest, hex.
    pub fn digests(&self) -> BTreeMap<VipAddr, String> {
        self.desired
            .vips
            .keys()
            .filter_map(|v| Some((*v, self.digest_hex(v)?)))
            .collect()
    }
}
