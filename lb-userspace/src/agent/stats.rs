//! What `lb stats` shows of the agent: the kernel's counters per VIP and backend, and whether
//! the kernel is in line.
use crate::{
    Error,
    agent::Agent,
    protocol::{AgentStatus, BackendStats, StatsView, VipStats},
};

impl Agent {
    /// Counters of every VIP and backend, and the agent's own state (the node adds the
    /// store's). The counter maps are read per id (no walk over slot tables). Map reads:
    /// call it from a blocking thread.
    pub fn stats(&self) -> Result<StatsView, Error> {
        let core = self.core();
        let Some(maps) = core.kernel().counters() else {
            return Err(Error::Unavailable("no counter maps".into()));
        };
        let global = maps.totals()?;
        let mut vips = Vec::new();
        for (vip, spec) in &core.desired().vips {
            let Some(id) = core.ids().vips.get(vip) else {
                continue;
            };
            let c = maps.vip(*id)?;
            let mut backends = Vec::new();
            for addr in spec.backends.keys() {
                let Some(bid) = core.ids().backend(vip, addr) else {
                    continue;
                };
                let bc = maps.backend(bid)?;
                backends.push(BackendStats {
                    address: *addr,
                    packets: bc.packets,
                    bytes: bc.bytes,
                });
            }
            vips.push(VipStats {
                vip: *vip,
                packets: c.packets,
                bytes: c.bytes,
                new_flows: c.new_flows,
                backends,
            });
        }
        Ok(StatsView {
            global: global
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            vips,
            agent: AgentStatus {
                not_converged: core.not_converged().map(str::to_string),
                no_mac: core.no_mac(),
                nat_connections: self.nat_connections(),
            },
            store: None,
        })
    }
}
