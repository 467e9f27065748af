//! What the core tells the fleet and takes from it (store mode): its own probe verdicts, the
//! digest of each live slot table, and the fleet's health verdicts.
use std::{collections::BTreeMap, net::IpAddr};

use crate::{
    Error,
    agent::Core,
    model::{BackendAddr, VipAddr},
};

/// FNV-1a over the backend address of every slot in order (16 bytes each, IPv4 mapped, then
/// the port if the backend has its own; an empty slot hashes as 16 zero bytes). Backend ids are per node, addresses are not, so equal
/// digests mean the nodes send every flow of the VIP to the same backend.
pub fn ring_digest(slots: impl Iterator<Item = Option<BackendAddr>>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for s in slots {
        match s {
            Some(b) => {
                eat(&match b.ip {
                    IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                    IpAddr::V6(a) => a.octets(),
                });
                // A backend on its own port (NAT) also hashes the port; one on the VIP's
                // port hashes as before ports existed.
                if b.port != 0 {
                    eat(&b.port.to_be_bytes());
                }
            }
            None => eat(&[0; 16]),
        }
    }
    h
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_follows_addresses_and_order() {
        let a: BackendAddr = "10.0.0.2".parse().unwrap();
        let b: BackendAddr = "10.0.0.3".parse().unwrap();
        let ab = ring_digest([Some(a), Some(b)].into_iter());
        assert_eq!(ab, ring_digest([Some(a), Some(b)].into_iter()));
        assert_ne!(ab, ring_digest([Some(b), Some(a)].into_iter()));
        assert_ne!(ab, ring_digest([Some(a), None].into_iter()));
    }
}
