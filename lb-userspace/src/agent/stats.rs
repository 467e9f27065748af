//! What `lb stats` shows of the agent: the kernel's counters per VIP and backend, and whether
//! the kernel is in line.
use crate::{
    Error,
    agent::Agent,
    capture::wire::CaptureStatus,
    model::{BackendAddr, VipAddr},
    protocol::{AgentStatus, BackendStats, StatsView, VipStats},
};

/// The ids to read, copied out under the core's lock: `(VIP, its id, [(backend, its id)])`.
type IdList = Vec<(VipAddr, u32, Vec<(BackendAddr, u32)>)>;

impl Agent {
    /// Counters of every VIP and backend, and the agent's own state (the node adds the
    /// store's). The core's lock is held only to copy the ids and the agent's state; the
    /// counter maps are then read per id (one syscall each, no walk over slot tables) with
    /// no lock held, so changes and health flips never wait for a reader. Map reads: call
    /// it from a blocking thread.
    pub fn stats(&self) -> Result<StatsView, Error> {
        let (maps, ids, agent, capturer) = {
            let core = self.core();
            let Some(maps) = core.kernel().counters() else {
                return Err(Error::Unavailable("no counter maps".into()));
            };
            let ids: IdList = core
                .desired()
                .vips
                .iter()
                .filter_map(|(vip, spec)| {
                    let id = *core.ids().vips.get(vip)?;
                    let backends = spec
                        .backends
                        .keys()
                        .filter_map(|a| Some((*a, core.ids().backend(vip, a)?)))
                        .collect();
                    Some((*vip, id, backends))
                })
                .collect();
            let agent = AgentStatus {
                not_converged: core.not_converged().map(str::to_string),
                no_mac: core.no_mac(),
                nat_connections: self.nat_connections(),
                nat_table: self.nat_table(),
                nat_pool: self.nat_pool(),
                migration: None,
                deny_entries: core.desired().deny.len(),
            };
            (maps, ids, agent, core.kernel().capture())
        };
        let global = maps.totals()?;
        let mut vips = Vec::with_capacity(ids.len());
        for (vip, id, backend_ids) in ids {
            let c = maps.vip(id)?;
            let mut backends = Vec::with_capacity(backend_ids.len());
            for (address, bid) in backend_ids {
                let bc = maps.backend(bid)?;
                backends.push(BackendStats {
                    address,
                    packets: bc.packets,
                    bytes: bc.bytes,
                });
            }
            vips.push(VipStats {
                vip,
                packets: c.packets,
                bytes: c.bytes,
                new_flows: c.new_flows,
                guard_dropped: maps.vip_guard_dropped(id)?,
                backends,
            });
        }
        Ok(StatsView {
            global: global
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            vips,
            agent,
            store: None,
            announce: None,
            capture: match capturer {
                Some(c) => Some(CaptureStatus {
                    running: c.running(),
                    counts: c.counts()?,
                }),
                None => None,
            },
        })
    }
}
