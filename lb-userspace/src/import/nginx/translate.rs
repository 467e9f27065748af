//! Turning what was read into VIPs: each frontend with its upstream's members (mapped,
//! literal or resolved addresses), the forwarding mode, and the health check nginx's passive
//! checks become.
use std::net::IpAddr;

use super::{Frontend, Member, Options, Upstream, at};
use crate::{
    import::Resolver,
    model::{
        BackendAddr, BackendSpec, Forward, HealthCheck, HealthKind, MAX_WEIGHT, VipAddr, VipSpec,
    },
};

/// The backends of one member: mapped, a literal address, or resolved (each resolution noted).
fn addresses(
    m: &Member,
    opts: &Options,
    resolver: &dyn Resolver,
    notes: &mut Vec<String>,
) -> Result<Vec<IpAddr>, String> {
    let addrs = if let Some(a) = opts.map_host.get(&m.host) {
        notes.push(at(m.line, format!("{} -> {a} (--map-host)", m.host)));
        vec![*a]
    } else if let Ok(a) = m.host.parse::<IpAddr>() {
        vec![a]
    } else {
        let r = resolver.resolve(&m.host).map_err(|e| at(m.line, e))?;
        let list: Vec<String> = r.iter().map(IpAddr::to_string).collect();
        notes.push(at(
            m.line,
            format!("resolved {} -> {}", m.host, list.join(", ")),
        ));
        r
    };
    if let Some(lo) = addrs.iter().find(|a| a.is_loopback() || a.is_unspecified()) {
        return Err(at(
            m.line,
            format!(
                "backend {} is {lo}, this host's own loopback: an XDP load balancer forwards frames on the wire and cannot reach it; give the backends' address with --map-host {}=ADDR",
                m.host, m.host
            ),
        ));
    }
    Ok(addrs)
}

/// One frontend (`listen` + `proxy_pass`) and its upstream as a VIP.
pub(super) fn frontend_vip(
    f: &Frontend,
    up: &Upstream,
    opts: &Options,
    resolver: &dyn Resolver,
    notes: &mut Vec<String>,
) -> Result<(VipAddr, VipSpec), String> {
    let ip = f.addr.or(opts.vip_address).ok_or_else(|| {
        at(
            f.line,
            format!(
                "`listen {}` has no address: give the VIP's address with --vip-address",
                f.port
            ),
        )
    })?;
    let vip = VipAddr {
        ip,
        port: f.port,
        proto: f.proto,
    };
    let forward = forward_for(f, up, opts, notes);
    let mut spec = VipSpec {
        source_hash: up.source_hash,
        forward,
        ..VipSpec::default()
    };
    let (mut fall, mut window) = (0, 0);
    for m in &up.members {
        add_member(&mut spec, vip, m, opts, resolver, notes)?;
        fall = fall.max(m.max_fails);
        window = window.max(m.fail_timeout_s);
    }
    if let Some(p) = up
        .members
        .iter()
        .map(|m| m.port.unwrap_or(80))
        .find(|p| *p != f.port)
        && !forward.translates_ports()
    {
        return Err(at(
            up.line,
            format!(
                "upstream {}: backend port {p} differs from the VIP's port {}: {forward} forwarding keeps the port; import with --forward nat",
                f.upstream, f.port
            ),
        ));
    }
    if fall > 0 {
        spec.health = Some(passive_checks_as_active(fall));
        notes.push(at(
            up.line,
            format!("upstream {}: nginx's passive checks (max_fails={fall} fail_timeout={window}s) become an active TCP check every second, down after {fall} failure(s)", f.upstream),
        ));
    }
    Ok((vip, spec))
}

/// The forwarding mode: the one asked for, except that backends on other ports than the VIP's
/// need port translation, so NAT is chosen unless another mode was asked for explicitly (which
/// is then refused by the port check).
fn forward_for(f: &Frontend, up: &Upstream, opts: &Options, notes: &mut Vec<String>) -> Forward {
    let translate = up.members.iter().any(|m| m.port.unwrap_or(80) != f.port);
    if translate && opts.forward == Forward::L2 {
        notes.push(at(
            up.line,
            format!(
                "upstream {}: backend ports differ from the VIP's port {}: forward = \"nat\" (direct server return cannot change ports)",
                f.upstream, f.port
            ),
        ));
        Forward::Nat
    } else {
        opts.forward
    }
}

/// Adds one upstream member's backends (every address it maps or resolves to) to `spec`.
fn add_member(
    spec: &mut VipSpec,
    vip: VipAddr,
    m: &Member,
    opts: &Options,
    resolver: &dyn Resolver,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let port = m.port.unwrap_or(80);
    let weight = m
        .weight
        .checked_mul(100)
        .filter(|w| *w <= MAX_WEIGHT)
        .ok_or_else(|| {
            at(
                m.line,
                format!(
                    "weight={} is above {} (ours are nginx's x100)",
                    m.weight,
                    MAX_WEIGHT / 100
                ),
            )
        })?;
    for a in addresses(m, opts, resolver, notes)? {
        if a.is_ipv4() != vip.ip.is_ipv4() && !spec.forward.encapsulates() {
            return Err(at(
                m.line,
                format!(
                    "backend {a} and VIP {vip} are of different families: import with --forward gue (or ipip)"
                ),
            ));
        }
        let own_port = if port == vip.port { 0 } else { port };
        spec.backends.insert(
            BackendAddr::new(a, own_port),
            BackendSpec {
                weight,
                mac: None,
                drained: m.down,
            },
        );
    }
    Ok(())
}

/// nginx's passive checks (`max_fails`) have no active equivalent there; ours become an
/// active TCP check every second, down after the same number of failures.
fn passive_checks_as_active(fall: u32) -> HealthCheck {
    HealthCheck {
        kind: HealthKind::Tcp,
        port: None,
        path: "/health".into(),
        expect_status: 200,
        interval_ms: 1000,
        timeout_ms: 500,
        rise: 2,
        fall,
    }
}
