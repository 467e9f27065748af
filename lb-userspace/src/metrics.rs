//! Prometheus text exposition of the counters and backend state (prometheus-client), on an
//! optional read-only TCP listener with the API's connection limits and timeouts. A fresh
//! registry is filled from the maps for each snapshot ([`crate::api::snapshot`]: at most one
//! read of the counters per second, whatever the number of scrapers), so the counters carry
//! the kernel's absolute values; the agent's lock is held only while copying the listing and
//! the ids, never across the map reads.
use std::{collections::BTreeMap, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    Error,
    api::{
        SharedNode,
        listen::{self, Limits},
        snapshot::Snapshots,
        status,
    },
    model::Serving,
    protocol::{AgentStatus, StatsView, StoreView, VipStats, VipView},
};

type Labels = Vec<(String, String)>;

fn family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

/// The metrics page for `stats` and the listing `list`, read in the `refreshes`th snapshot.
/// Families are registered in the order the page lists them.
pub fn render(stats: &StatsView, list: &[VipView], refreshes: u64) -> Result<String, Error> {
    let mut reg = Registry::with_prefix("lb");
    outcome_metrics(&mut reg, &stats.global);
    traffic_metrics(&mut reg, &stats.vips);
    let backends = BackendGauges::register(&mut reg);
    agent_metrics(&mut reg, &stats.agent);
    nat_pool_metrics(&mut reg, &stats.agent);
    fleet_metrics(&mut reg, list, stats.store.as_ref());
    if let Some(a) = &stats.announce {
        crate::announce::metrics::register(&mut reg, a);
    }
    if let Some(c) = &stats.capture {
        capture_metrics(&mut reg, c);
    }
    backends.fill(list);
    let reads = Counter::<u64>::default();
    reg.register(
        "snapshot_reads",
        "Reads of the counter maps for /metrics and the status page (at most one a second)",
        reads.clone(),
    );
    reads.inc_by(refreshes);
    let mut out = String::new();
    encode(&mut out, &reg).map_err(|e| Error::Invalid(format!("encoding metrics: {e}")))?;
    Ok(out)
}

/// Packets and bytes by outcome, flow-table events and health-probe encapsulation.
fn outcome_metrics(reg: &mut Registry, global: &BTreeMap<String, lb_common::Counter>) {
    let packets = family(reg, "packets", "Packets by outcome");
    let bytes = family(reg, "bytes", "Bytes by outcome");
    let flow_events = family(
        reg,
        "flow_events",
        "Flow-table events (see the README's Flow table section)",
    );
    let hc = family(
        reg,
        "hc_packets",
        "Health-probe packets by what the tunnel encapsulation (tc egress) did",
    );
    let flow_names: Vec<&str> = lb_common::FlowEvent::ALL.iter().map(|e| e.name()).collect();
    let hc_names: Vec<&str> = lb_common::HcStat::ALL.iter().map(|e| e.name()).collect();
    for (name, c) in global {
        if flow_names.contains(&name.as_str()) {
            flow_events
                .get_or_create(&vec![("event".into(), name.clone())])
                .inc_by(c.packets);
            continue;
        }
        if hc_names.contains(&name.as_str()) {
            hc.get_or_create(&vec![("outcome".into(), name.clone())])
                .inc_by(c.packets);
            continue;
        }
        packets
            .get_or_create(&vec![("reason".into(), name.clone())])
            .inc_by(c.packets);
        bytes
            .get_or_create(&vec![("reason".into(), name.clone())])
            .inc_by(c.bytes);
    }
}

/// `lb capture`: whether one runs, and the kernel's counts of the running or last one (they
/// start from zero when a capture starts).
fn capture_metrics(reg: &mut Registry, c: &crate::capture::wire::CaptureStatus) {
    let running = Gauge::<i64>::default();
    reg.register(
        "capture_running",
        "1 while an `lb capture` runs",
        running.clone(),
    );
    running.set(i64::from(c.running));
    let packets = family(
        reg,
        "capture_packets",
        "Packets of the running or last capture: captured (records output), missed (over \
         --max-rate or the ring full), sampled_out (left out by --sample)",
    );
    for (what, n) in [
        ("captured", c.counts.emitted),
        ("missed", c.counts.missed),
        ("sampled_out", c.counts.sampled_out),
    ] {
        packets
            .get_or_create(&vec![("outcome".into(), what.into())])
            .inc_by(n);
    }
}

/// Packets, bytes and new flows per VIP; packets and bytes per backend.
fn traffic_metrics(reg: &mut Registry, vips: &[VipStats]) {
    let vip_packets = family(reg, "vip_packets", "Packets forwarded per VIP");
    let vip_bytes = family(reg, "vip_bytes", "Bytes forwarded per VIP");
    let vip_flows = family(
        reg,
        "vip_new_flows",
        "Flows first remembered per VIP (a TCP connection once, at its handshake ACK)",
    );
    let vip_guard = family(
        reg,
        "vip_guard_dropped",
        "Packets the guard dropped per VIP (source lists and new-flow limits)",
    );
    let be_packets = family(reg, "backend_packets", "Packets forwarded per backend");
    let be_bytes = family(reg, "backend_bytes", "Bytes forwarded per backend");
    for v in vips {
        let l = vec![("vip".to_string(), v.vip.to_string())];
        vip_packets.get_or_create(&l).inc_by(v.packets);
        vip_bytes.get_or_create(&l).inc_by(v.bytes);
        vip_flows.get_or_create(&l).inc_by(v.new_flows);
        vip_guard.get_or_create(&l).inc_by(v.guard_dropped);
        for b in &v.backends {
            let l = vec![
                ("vip".to_string(), v.vip.to_string()),
                ("backend".to_string(), b.address.to_string()),
            ];
            be_packets.get_or_create(&l).inc_by(b.packets);
            be_bytes.get_or_create(&l).inc_by(b.bytes);
        }
    }
}

/// Each backend's state from the listing: up, weight, serving.
struct BackendGauges {
    up: Family<Labels, Gauge>,
    weight: Family<Labels, Gauge>,
    serving: Family<Labels, Gauge>,
}

impl BackendGauges {
    fn register(reg: &mut Registry) -> Self {
        let g = BackendGauges {
            up: Family::default(),
            weight: Family::default(),
            serving: Family::default(),
        };
        reg.register(
            "backend_up",
            "1 when the backend passes its health check (or has none)",
            g.up.clone(),
        );
        reg.register(
            "backend_weight",
            "Configured weight (0 while drained)",
            g.weight.clone(),
        );
        reg.register(
            "backend_serving",
            "1 when the backend takes new flows (up, not drained, weight > 0, MAC known)",
            g.serving.clone(),
        );
        g
    }

    fn fill(&self, list: &[VipView]) {
        for v in list {
            for b in &v.backends {
                let l = vec![
                    ("vip".to_string(), v.vip.to_string()),
                    ("backend".to_string(), b.address.to_string()),
                ];
                // "down" (own probes) or "down (fleet)" (the fleet's majority).
                self.up
                    .get_or_create(&l)
                    .set(i64::from(!b.health.starts_with("down")));
                self.serving
                    .get_or_create(&l)
                    .set(i64::from(b.serving == Serving::Serving));
                self.weight
                    .get_or_create(&l)
                    .set(if b.drained { 0 } else { i64::from(b.weight) });
            }
        }
    }
}

/// Whether the kernel is in line, backends without a MAC, and NAT once it has been used.
fn agent_metrics(reg: &mut Registry, agent: &AgentStatus) {
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
fn nat_pool_metrics(reg: &mut Registry, agent: &AgentStatus) {
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

/// Each VIP's slot-table digest (equal on nodes that agree), and the store link in fleet mode.
fn fleet_metrics(reg: &mut Registry, list: &[VipView], store: Option<&StoreView>) {
    let digest = Family::<Labels, Gauge>::default();
    reg.register(
        "vip_ring_digest",
        "Always 1; the digest label is the live slot table's digest (compare across nodes)",
        digest.clone(),
    );
    for v in list {
        if let Some(d) = &v.digest {
            digest
                .get_or_create(&vec![
                    ("vip".to_string(), v.vip.to_string()),
                    ("digest".to_string(), d.clone()),
                ])
                .set(1);
        }
    }
    let Some(s) = store else { return };
    let gauge = |reg: &mut Registry, name: &str, help: &str, value: i64| {
        let g = Gauge::<i64>::default();
        reg.register(name, help, g.clone());
        g.set(value);
    };
    gauge(
        reg,
        "store_connected",
        "1 while etcd answers (0: forwarding with the last applied configuration)",
        i64::from(s.connected),
    );
    gauge(
        reg,
        "store_applied_revision",
        "The configuration revision this node applied",
        s.applied_revision.unwrap_or(0),
    );
    gauge(
        reg,
        "store_rejected_keys",
        "Keys whose value is not applied now (each keeps its last good value)",
        s.rejected.len() as i64,
    );
    for (name, help, value) in [
        (
            "store_rejected_values",
            "Malformed or invalid values seen in etcd",
            s.rejected_total,
        ),
        (
            "store_refused_revisions",
            "Revisions this node refused as a whole (e.g. beyond its capacity)",
            s.refused_revisions_total,
        ),
        (
            "store_reconnects",
            "Times the link to etcd was lost",
            s.reconnects_total,
        ),
        (
            "store_ignored_statuses",
            "Node status keys ignored for fleet health (no live short lease, named for another node, stale, unreadable)",
            s.ignored_statuses_total,
        ),
    ] {
        let c = Counter::<u64>::default();
        reg.register(name, help, c.clone());
        c.inc_by(value);
    }
}

/// Binds the metrics listener on `addr`. `lb run` calls it before anything is attached, so
/// a port in use refuses the start with nothing changed.
pub async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::io(format!(
            "binding the metrics listener {addr} (is another process using that port? pick another --metrics)"
        ))(e)
    })
}

/// Serves, read-only, on `listener` until the task is dropped: `GET /metrics` (Prometheus
/// text), `/` (the status page) and its `/status.json`, `/healthz` (the agent answers) and
/// `/readyz` (503 while the kernel maps are not in line with the desired state).
pub fn serve(listener: tokio::net::TcpListener, node: SharedNode) -> tokio::task::JoinHandle<()> {
    let listener = Arc::new(listener);
    let snapshots = Arc::new(Snapshots::new(node.clone()));
    tokio::spawn(listen::serve(
        move || {
            let l = listener.clone();
            async move { l.accept().await.map(|(s, _)| s) }
        },
        Limits::METRICS,
        "metrics",
        move |req: Request<hyper::body::Incoming>| {
            let node = node.clone();
            let snapshots = snapshots.clone();
            async move { route(req.uri().path(), &node, &snapshots).await }
        },
    ))
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

async fn route(path: &str, node: &SharedNode, snapshots: &Snapshots) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let failed = |e: String| reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, Bytes::from(e));
    match path {
        "/metrics" => match &snapshots.get().await.metrics {
            Ok(text) => reply(StatusCode::OK, "text/plain; version=0.0.4", text.clone()),
            Err(e) => failed(e.clone()),
        },
        "/" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from_static(status::PAGE.as_bytes()),
        ),
        "/status.json" => match &snapshots.get().await.status {
            Ok(body) => reply(StatusCode::OK, "application/json", body.clone()),
            Err(e) => failed(e.clone()),
        },
        "/healthz" => reply(StatusCode::OK, TEXT, Bytes::from_static(b"ok\n")),
        "/readyz" => {
            // The core's lock may be held by a change writing maps: wait for it on a
            // blocking thread, not on this worker.
            let a = node.agent().clone();
            let why =
                tokio::task::spawn_blocking(move || a.core().not_converged().map(str::to_string))
                    .await;
            match why {
                Ok(None) => reply(StatusCode::OK, TEXT, Bytes::from_static(b"ready\n")),
                Ok(Some(why)) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    Bytes::from(format!("not converged: {why}\n")),
                ),
                Err(e) => failed(e.to_string()),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            Bytes::from_static(b"see / (status page), /metrics, /healthz or /readyz\n"),
        ),
    }
}

#[cfg(test)]
mod capture_tests {
    use super::*;
    use crate::capture::wire::{CaptureStatus, Progress};

    #[test]
    fn the_capture_counts_are_on_the_page() {
        let stats = StatsView {
            global: BTreeMap::new(),
            vips: Vec::new(),
            agent: AgentStatus::default(),
            store: None,
            announce: None,
            capture: Some(CaptureStatus {
                running: true,
                counts: Progress {
                    emitted: 7,
                    missed: 3,
                    sampled_out: 11,
                },
            }),
        };
        let page = render(&stats, &[], 1).unwrap();
        for line in [
            "lb_capture_running 1",
            "lb_capture_packets_total{outcome=\"captured\"} 7",
            "lb_capture_packets_total{outcome=\"missed\"} 3",
            "lb_capture_packets_total{outcome=\"sampled_out\"} 11",
        ] {
            assert!(page.lines().any(|l| l == line), "{line} in\n{page}");
        }
    }
}
