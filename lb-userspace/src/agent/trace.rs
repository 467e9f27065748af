//! `lb trace`: what a packet would meet, from the same rules and tables the program uses.
use std::net::IpAddr;

use lb_common::{FlowKey, slot_of};

use super::{core::Core, reconcile::Live};
use crate::{
    Error,
    model::{BackendAddr, Forward, VipAddr},
    net::{addr_words, family, flow_key, words_addr},
    protocol::{OuterView, Trace},
};

impl Core {
    /// Address of backend id `id` of `vip`.
    fn backend_addr(&self, vip: &VipAddr, id: u32) -> Option<BackendAddr> {
        self.ids
            .backends
            .get(vip)?
            .iter()
            .find(|(_, b)| **b == id)
            .map(|(a, _)| *a)
    }

    /// What a packet from `src:sport` to `vip` (at port `dport` for an every-port VIP) would
    /// meet. The kernel looks a packet up by its exact port first: a port that another VIP on
    /// the same address serves is refused here, naming that VIP.
    pub fn trace(
        &self,
        src: IpAddr,
        sport: u16,
        vip: &VipAddr,
        dport: Option<u16>,
    ) -> Result<Trace, Error> {
        if !self.desired.vips.contains_key(vip) {
            return Err(Error::NotFound(format!(
                "unknown VIP {vip}: see `lb vip list`"
            )));
        }
        let spec = &self.desired.vips[vip];
        if src.is_ipv4() != vip.ip.is_ipv4() {
            return Err(Error::Invalid(format!(
                "client {src} and VIP {vip} are of different address families"
            )));
        }
        let vip_id = *self
            .ids
            .vips
            .get(vip)
            .ok_or_else(|| Error::NotFound(format!("VIP {vip} has no id yet")))?;
        let port = self.traced_port(vip, dport)?;
        let key = flow_key(src, sport, vip.ip, port, vip.proto.number());
        let slot = slot_of(
            &key,
            self.kernel_seed(),
            spec.source_hash,
            self.kernel.ring_size(),
        )
        .ok_or_else(|| Error::Kernel("the slot table has no slots".into()))?;
        let live = self.kernel.view().published.get(&vip_id);
        let slot_backend = live
            .and_then(|l| l.table.get(slot as usize).copied())
            .and_then(|id| self.backend_addr(vip, id));
        let flow_backend = self
            .kernel
            .flow_backend(&key, vip_id)?
            .and_then(|id| self.backend_addr(vip, id));
        let next_packet_to = flow_backend.or(slot_backend);
        // Previous backends matter only when the flow table does not decide the flow.
        let previous_backends = match (live, slot_backend, flow_backend) {
            (Some(l), Some(owner), None) if spec.forward == Forward::Gue => {
                self.next_hops(l, slot, owner)
            }
            _ => Vec::new(),
        };
        let outer = next_packet_to
            .filter(|_| spec.forward.encapsulates())
            .and_then(|b| self.outer_view(spec.forward, b.ip, &key));
        Ok(Trace {
            vip: *vip,
            vip_id,
            slot,
            slot_backend,
            previous_backends,
            flow_backend,
            next_packet_to,
            forward: spec.forward,
            outer,
        })
    }

    /// The destination port a traced packet has: the VIP's own, or `--dport` for an
    /// every-port VIP. The kernel looks a packet up by its exact port first, so a port that
    /// another VIP on the same address serves is refused, naming that VIP.
    fn traced_port(&self, vip: &VipAddr, dport: Option<u16>) -> Result<u16, Error> {
        match (vip.port, dport) {
            (0, None) => Err(Error::Invalid(format!(
                "VIP {vip} covers every port: give the packet's port with --dport"
            ))),
            (0, Some(0)) => Err(Error::Invalid("--dport 0 is no packet's port".into())),
            (0, Some(p)) => {
                let exact = VipAddr { port: p, ..*vip };
                if self.desired.vips.contains_key(&exact) {
                    return Err(Error::Invalid(format!(
                        "packets to port {p} go to VIP {exact}, not {vip}: trace that one"
                    )));
                }
                Ok(p)
            }
            (p, None) => Ok(p),
            (p, Some(d)) if d == p => Ok(p),
            (p, Some(d)) => Err(Error::Invalid(format!(
                "VIP {vip} serves port {p} only, not {d}"
            ))),
        }
    }

    /// The next hops the kernel writes for `slot` (gue only): the longest prefix of the slot's
    /// previous backends that are present, of the slot backend's family and on another
    /// address (`encap::second_chance_hops`).
    fn next_hops(&self, live: &Live, slot: u32, owner: BackendAddr) -> Vec<BackendAddr> {
        let view = self.kernel.view();
        live.previous
            .get(slot as usize)
            .into_iter()
            .flatten()
            .map_while(|id| view.backends.get(id).map(|b| b.addr))
            .take_while(|p| p.ip.is_ipv4() == owner.ip.is_ipv4() && p.ip != owner.ip)
            .collect()
    }

    /// The outer header the program builds for `key` to `backend`, by the shared rules.
    fn outer_view(&self, forward: Forward, backend: IpAddr, key: &FlowKey) -> Option<OuterView> {
        let cfg = self.kernel.config();
        let entry = lb_common::Backend {
            addr: addr_words(backend),
            family: family(backend),
            encap: forward.encap(),
            outer_src: addr_words(self.kernel.outer_source(backend)?),
            ..Default::default()
        };
        let src = words_addr(lb_common::outer_source(&cfg, &entry, key), entry.family);
        Some(OuterView {
            src,
            dst: backend,
            udp: (forward == Forward::Gue)
                .then(|| (lb_common::gue_source_port(key), u16::from_be(cfg.gue_port))),
        })
    }

    fn kernel_seed(&self) -> u64 {
        self.kernel.hash_seed()
    }
}
