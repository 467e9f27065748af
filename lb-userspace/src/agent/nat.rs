//! The NAT table as the agent shows it: the periodic sweep of expired connections and the
//! views (`lb stats`, `/metrics`, the status page) it leaves behind. Apart from the change
//! path in `mod.rs`: it reads the kernel's tables through their own handles, not the core.
use std::sync::PoisonError;

use crate::{Error, agent::Agent};

impl Agent {
    /// Deletes expired NAT connections (every few seconds; the program takes over an
    /// expired port by itself, this keeps the tables from filling up).
    pub fn nat_sweep(&self) -> Result<(usize, usize), Error> {
        // The core's lock only to get the handles: the sweep reads up to two full tables.
        let (Some(sweeper), pool) = ({
            let core = self.core();
            (core.kernel().nat_sweeper(), core.kernel().nat_pool())
        }) else {
            return Ok((0, 0));
        };
        let s = sweeper.sweep()?;
        let (live, gone) = (s.live, s.expired);
        if live + gone > 0 || self.nat_connections().is_some() {
            self.nat_live
                .store(live as u64, std::sync::atomic::Ordering::Relaxed);
            let view = crate::protocol::NatTableView {
                established: (s.live - s.half_open) as u64,
                capacity: s.capacity as u64,
                half_open: s.half_open as u64,
                half_slots: s.half_slots as u64,
                closing: s.closing as u64,
            };
            *self
                .nat_table
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(view);
            *self.nat_pool.lock().unwrap_or_else(PoisonError::into_inner) =
                pool_view(&pool, &s.by_addr);
        }
        Ok((live, gone))
    }

    /// NAT connections live at the last sweep and the table's capacity, once NAT has been
    /// used.
    pub fn nat_connections(&self) -> Option<(u64, u64)> {
        let live = self.nat_live.load(std::sync::atomic::Ordering::Relaxed);
        let cap = self.nat_table().map_or(0, |t| t.capacity + t.half_slots);
        (live != u64::MAX).then_some((live, cap))
    }

    /// Each NAT pool address's connections at the last sweep, once NAT has been used.
    pub fn nat_pool(&self) -> Vec<crate::protocol::NatAddrView> {
        self.nat_pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The NAT table's parts at the last sweep, once NAT has been used.
    pub fn nat_table(&self) -> Option<crate::protocol::NatTableView> {
        *self
            .nat_table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Every pool address with its connections (none: zeros), then any other address the
/// sweep found holding connections (a pool of an earlier run whose pairs live on).
fn pool_view(
    pool: &[std::net::IpAddr],
    found: &[crate::protocol::NatAddrView],
) -> Vec<crate::protocol::NatAddrView> {
    let mut out: Vec<crate::protocol::NatAddrView> = pool
        .iter()
        .map(|a| {
            found.iter().find(|f| f.address == *a).cloned().unwrap_or(
                crate::protocol::NatAddrView {
                    address: *a,
                    connections: 0,
                    half_open: 0,
                    closing: 0,
                    ports_by_backend: Vec::new(),
                    refused_no_port: 0,
                    refused_table_full: 0,
                },
            )
        })
        .collect();
    out.extend(found.iter().filter(|f| !pool.contains(&f.address)).cloned());
    out
}
