//! The agent's own condition: whether the kernel is in line, backends without a MAC, and the
//! NAT table and pool once NAT has been used.
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::Labels;
use crate::protocol::AgentStatus;

/// Whether the kernel is in line, backends without a MAC, and NAT once it has been used.
pub(super) fn agent_metrics(reg: &mut Registry, agent: &AgentStatus) {
    let converged = Gauge::<i64>::default();
    reg.register(
        "dataplane_converged",
        "1 when the kernel maps match the desired state",
        converged.clone(),
    );
    converged.set(i64::from(agent.not_converged.is_none()));
    let no_mac = Gauge::<i64>::default();
    reg.register(
        "backends_no_mac",
        "Backends whose MAC is unknown (kept out of their tables)",
        no_mac.clone(),
    );
    no_mac.set(agent.no_mac.len() as i64);
    if let Some((live, cap)) = agent.nat_connections {
        let nat = Gauge::<i64>::default();
        reg.register(
            "nat_connections",
            "NAT connections at the last sweep (closed ones keep their port 70 s)",
            nat.clone(),
        );
        nat.set(live as i64);
        let room = Gauge::<i64>::default();
        reg.register(
            "nat_connections_capacity",
            "Connections the NAT table holds; beyond, new ones are refused",
            room.clone(),
        );
        room.set(cap as i64);
    }
    if let Some(t) = agent.nat_table {
        for (name, help, v) in [
            (
                "nat_half_open",
                "NAT pairs whose handshake is not complete (UDP: not answered) at the last sweep",
                t.half_open,
            ),
            (
                "nat_half_open_capacity",
                "Half-open slots: half-open pairs beyond them replace old ones or are refused",
                t.half_slots,
            ),
            (
                "nat_established",
                "Established NAT connections (closing ones included) at the last sweep",
                t.established,
            ),
            (
                "nat_closing",
                "Closed NAT connections still holding their port at the last sweep",
                t.closing,
            ),
        ] {
            let g = Gauge::<i64>::default();
            reg.register(name, help, g.clone());
            g.set(v as i64);
        }
    }
}

/// Each NAT pool address's connections at the last sweep.
pub(super) fn nat_pool_metrics(reg: &mut Registry, agent: &AgentStatus) {
    if agent.nat_pool.is_empty() {
        return;
    }
    type Get = fn(&crate::protocol::NatAddrView) -> u64;
    let families: [(&str, &str, Get); 3] = [
        (
            "nat_address_connections",
            "NAT connections holding a port of this pool address at the last sweep",
            |a| a.connections,
        ),
        (
            "nat_address_half_open",
            "Half-open NAT pairs on this pool address at the last sweep",
            |a| a.half_open,
        ),
        (
            "nat_address_closing",
            "Closed NAT connections still holding a port of this pool address",
            |a| a.closing,
        ),
    ];
    for (name, help, get) in families {
        let fam = Family::<Labels, Gauge>::default();
        reg.register(name, help, fam.clone());
        for a in &agent.nat_pool {
            fam.get_or_create(&vec![("address".to_string(), a.address.to_string())])
                .set(get(a) as i64);
        }
    }
    nat_pool_detail_metrics(reg, agent);
}

/// Each NAT pool address's ports in use per backend and its refusals by reason.
fn nat_pool_detail_metrics(reg: &mut Registry, agent: &AgentStatus) {
    let ports = Family::<Labels, Gauge>::default();
    reg.register(
        "nat_address_backend_ports",
        "NAT ports of this pool address in use toward this backend at the last sweep",
        ports.clone(),
    );
    let refused = Family::<Labels, Counter>::default();
    reg.register(
        "nat_address_refused",
        "New NAT connections refused on this pool address, by reason (no_port, table_full)",
        refused.clone(),
    );
    for a in &agent.nat_pool {
        let address = ("address".to_string(), a.address.to_string());
        for b in &a.ports_by_backend {
            ports
                .get_or_create(&vec![
                    address.clone(),
                    ("backend".to_string(), b.backend.to_string()),
                ])
                .set(b.ports as i64);
        }
        for (reason, n) in [
            ("no_port", a.refused_no_port),
            ("table_full", a.refused_table_full),
        ] {
            refused
                .get_or_create(&vec![
                    address.clone(),
                    ("reason".to_string(), reason.into()),
                ])
                .inc_by(n);
        }
    }
}
