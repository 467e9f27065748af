//! `lb import nginx`: nginx `upstream` blocks (http and stream contexts) and the `server`
//! blocks that `proxy_pass` to them, translated into our desired state. Whatever has no
//! equivalent at layer 4 is named on one line each (never dropped silently); what cannot be
//! served at all (a loopback backend, ports that need translation) is an error naming the
//! line. Parsing is nginx-lint-parser's (comments, quotes, any directive).
use std::{collections::BTreeMap, net::IpAddr};

use nginx_lint_parser::ast::Directive;

use super::Resolver;
use crate::model::{
    BackendAddr, BackendSpec, DesiredState, Forward, HealthCheck, HealthKind, MAX_WEIGHT, Proto,
    VipAddr, VipSpec,
};

/// What the operator adds to the file.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `--map-host NAME=ADDR`: used instead of resolving NAME (e.g. localhost).
    pub map_host: BTreeMap<String, IpAddr>,
    /// `--vip-address`: the VIP address for `listen PORT` without an address.
    pub vip_address: Option<IpAddr>,
    /// How the VIPs forward (`l2` unless given).
    pub forward: Forward,
}

/// The translation and what it says about it.
#[derive(Clone, Debug, Default)]
pub struct Imported {
    pub state: DesiredState,
    /// One line per name resolution and per thing not translated.
    pub notes: Vec<String>,
}

/// One `server` line of an upstream, as written.
#[derive(Clone, Debug)]
struct Member {
    line: usize,
    host: String,
    port: Option<u16>,
    weight: u32,
    down: bool,
    max_fails: u32,
    fail_timeout_s: u64,
}

#[derive(Clone, Debug, Default)]
struct Upstream {
    line: usize,
    members: Vec<Member>,
    source_hash: bool,
}

fn at(line: usize, msg: impl std::fmt::Display) -> String {
    format!("line {line}: {msg}")
}

fn line_of(d: &Directive) -> usize {
    d.span.start.line
}

fn args(d: &Directive) -> Vec<&str> {
    d.args.iter().map(|a| a.as_str()).collect()
}

/// Seconds of an nginx time (`10`, `10s`, `1m`, `500ms`: rounded up to a second).
fn seconds(v: &str) -> Option<u64> {
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = num.parse().ok()?;
    match unit {
        "" | "s" => Some(n),
        "ms" => Some(n.div_ceil(1000)),
        "m" => Some(n * 60),
        "h" => Some(n * 3600),
        _ => None,
    }
}

/// `HOST[:PORT]`, `[V6][:PORT]`, `V6` bare is not nginx syntax.
fn host_port(s: &str) -> Result<(String, Option<u16>), String> {
    let bad_port = |p: &str| format!("`{s}`: port `{p}` is not 1-65535");
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{s}`: missing ]"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| bad_port(p))?,
            ),
            None if after.is_empty() => None,
            None => return Err(format!("`{s}`: unexpected `{after}`")),
        };
        return Ok((host.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad_port(p))?;
            Ok((h.to_string(), Some(port)))
        }
        _ => Ok((s.to_string(), None)),
    }
}

fn parse_member(
    d: &Directive,
    notes: &mut Vec<String>,
    name: &str,
) -> Result<Option<Member>, String> {
    let line = line_of(d);
    let a = args(d);
    let Some(addr) = a.first() else {
        return Err(at(line, "`server` without an address"));
    };
    if addr.starts_with("unix:") {
        return Err(at(
            line,
            format!(
                "upstream {name}: `{addr}` is a unix socket; a network load balancer needs IP backends"
            ),
        ));
    }
    let (host, port) = host_port(addr).map_err(|e| at(line, e))?;
    let mut m = Member {
        line,
        host,
        port,
        weight: 1,
        down: false,
        max_fails: 1,
        fail_timeout_s: 10,
    };
    for p in &a[1..] {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        match k {
            "weight" => {
                m.weight =
                    v.parse().ok().filter(|w| *w >= 1).ok_or_else(|| {
                        at(line, format!("`{p}`: weight must be a positive number"))
                    })?;
            }
            "max_fails" => {
                m.max_fails = v
                    .parse()
                    .map_err(|_| at(line, format!("`{p}`: max_fails must be a number")))?;
            }
            "fail_timeout" => {
                m.fail_timeout_s =
                    seconds(v).ok_or_else(|| at(line, format!("`{p}`: not an nginx time")))?;
            }
            "down" => m.down = true,
            "backup" => {
                notes.push(at(
                    line,
                    format!("not translated: backup server {addr} in upstream {name} (no standby backends: add it when needed)"),
                ));
                return Ok(None);
            }
            _ => notes.push(at(
                line,
                format!("not translated: `{p}` on server {addr} in upstream {name}"),
            )),
        }
    }
    Ok(Some(m))
}

fn parse_upstream(d: &Directive, notes: &mut Vec<String>) -> Result<(String, Upstream), String> {
    let line = line_of(d);
    let name = args(d)
        .first()
        .map(|s| s.to_string())
        .ok_or_else(|| at(line, "`upstream` without a name"))?;
    let mut up = Upstream {
        line,
        ..Upstream::default()
    };
    for inner in d.block.iter().flat_map(|b| b.directives()) {
        match inner.name.as_str() {
            "server" => {
                if let Some(m) = parse_member(inner, notes, &name)? {
                    up.members.push(m);
                }
            }
            "ip_hash" => {
                up.source_hash = true;
                notes.push(at(
                    line_of(inner),
                    format!("upstream {name}: ip_hash becomes source_hash (the whole client address, not its first three octets, picks the backend)"),
                ));
            }
            other => notes.push(at(
                line_of(inner),
                format!("not translated: `{other}` in upstream {name} (every VIP balances by consistent hashing)"),
            )),
        }
    }
    Ok((name, up))
}

/// A `server { listen ...; proxy_pass ...; }` that uses an upstream.
#[derive(Clone, Debug)]
struct Frontend {
    line: usize,
    addr: Option<IpAddr>,
    port: u16,
    proto: Proto,
    upstream: String,
}

/// `listen` arguments: `[ADDR:]PORT` and flags.
fn parse_listen(
    d: &Directive,
    notes: &mut Vec<String>,
) -> Result<(Option<IpAddr>, u16, Proto), String> {
    let line = line_of(d);
    let a = args(d);
    let spec = a
        .first()
        .ok_or_else(|| at(line, "`listen` without a port"))?;
    if spec.starts_with("unix:") {
        return Err(at(
            line,
            format!("`listen {spec}`: a unix socket cannot be a VIP"),
        ));
    }
    let (host, port) = match spec.parse::<u16>() {
        Ok(p) => (None, Some(p)),
        Err(_) => {
            let (h, p) = host_port(spec).map_err(|e| at(line, e))?;
            (Some(h), p)
        }
    };
    let port = port.unwrap_or(80);
    let addr = match host.as_deref() {
        None | Some("*") | Some("0.0.0.0") | Some("::") => None,
        Some(h) => Some(h.parse::<IpAddr>().map_err(|_| {
            at(
                line,
                format!("`listen {spec}`: the VIP must be an IP address"),
            )
        })?),
    };
    let mut proto = Proto::Tcp;
    for flag in &a[1..] {
        match *flag {
            "udp" => proto = Proto::Udp,
            "ssl" => notes.push(at(
                line,
                "TLS is terminated by nginx here: behind xdp-lb the backends terminate it (layer 4 passes it through)",
            )),
            "default_server" | "reuseport" | "http2" | "proxy_protocol" => {}
            other => notes.push(at(line, format!("not translated: listen flag `{other}`"))),
        }
    }
    Ok((addr, port, proto))
}

/// The upstream a `proxy_pass` names: `http://NAME`, `https://NAME`, or `NAME` (stream).
fn proxy_target(d: &Directive) -> Result<String, String> {
    let line = line_of(d);
    let a = args(d);
    let t = a
        .first()
        .ok_or_else(|| at(line, "`proxy_pass` without a target"))?;
    let raw: String = d.args.iter().map(|a| a.raw.as_str()).collect();
    if raw.contains('$') {
        let t = raw;
        return Err(at(
            line,
            format!("`proxy_pass {t}`: a target built from variables cannot be translated"),
        ));
    }
    let name = t
        .strip_prefix("http://")
        .or_else(|| t.strip_prefix("https://"))
        .unwrap_or(t);
    Ok(name.trim_end_matches('/').to_string())
}

fn parse_server(
    d: &Directive,
    notes: &mut Vec<String>,
    out: &mut Vec<Frontend>,
) -> Result<(), String> {
    let mut listens = Vec::new();
    let mut target: Option<(usize, String)> = None;
    for inner in d.block.iter().flat_map(|b| b.directives()) {
        match inner.name.as_str() {
            "listen" => listens.push((line_of(inner), parse_listen(inner, notes)?)),
            "proxy_pass" => target = Some((line_of(inner), proxy_target(inner)?)),
            "location" => {
                let path = args(inner).join(" ");
                for p in inner.block.iter().flat_map(|b| b.directives()) {
                    if p.name != "proxy_pass" {
                        continue;
                    }
                    let t = proxy_target(p)?;
                    if path == "/" {
                        target = Some((line_of(p), t));
                    } else {
                        notes.push(at(
                            line_of(p),
                            format!("not translated: location {path} -> {t} (a layer-4 load balancer cannot route by URL path; only `location /` is taken)"),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    let Some((_, upstream)) = target else {
        return Ok(());
    };
    if listens.is_empty() {
        listens.push((line_of(d), (None, 80, Proto::Tcp)));
    }
    for (line, (addr, port, proto)) in listens {
        out.push(Frontend {
            line,
            addr,
            port,
            proto,
            upstream: upstream.clone(),
        });
    }
    Ok(())
}

/// Walks the file: `include` is refused; `upstream` and `server` blocks are collected in
/// the `http` and `stream` contexts (and at the top level, as snippets are often written).
fn collect(
    directives: Vec<&Directive>,
    notes: &mut Vec<String>,
    upstreams: &mut BTreeMap<String, Upstream>,
    frontends: &mut Vec<Frontend>,
) -> Result<(), String> {
    for d in directives {
        match d.name.as_str() {
            "include" => {
                return Err(at(
                    line_of(d),
                    format!(
                        "`include {}` is not followed: concatenate the files, or import each one",
                        args(d).join(" ")
                    ),
                ));
            }
            "http" | "stream" => {
                let inner: Vec<&Directive> = d.block.iter().flat_map(|b| b.directives()).collect();
                collect(inner, notes, upstreams, frontends)?;
            }
            "upstream" => {
                let (name, up) = parse_upstream(d, notes)?;
                if let Some(prev) = upstreams.insert(name.clone(), up) {
                    return Err(at(
                        line_of(d),
                        format!(
                            "upstream {name} is defined twice (also at line {})",
                            prev.line
                        ),
                    ));
                }
            }
            "server" if d.block.is_some() => parse_server(d, notes, frontends)?,
            _ => {}
        }
    }
    Ok(())
}

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

/// Translates `text` (an nginx configuration) into our desired state.
pub fn import(text: &str, opts: &Options, resolver: &dyn Resolver) -> Result<Imported, String> {
    let config = nginx_lint_parser::parse_string(text).map_err(|e| e.to_string())?;
    let mut notes = Vec::new();
    let mut upstreams = BTreeMap::new();
    let mut frontends = Vec::new();
    collect(
        config.directives().collect(),
        &mut notes,
        &mut upstreams,
        &mut frontends,
    )?;
    if frontends.is_empty() {
        return Err(
            "no `server` block passes traffic to an upstream (proxy_pass): nothing to import"
                .into(),
        );
    }
    let mut state = DesiredState::default();
    for f in &frontends {
        let up = upstreams.get(&f.upstream).ok_or_else(|| {
            at(f.line, format!("proxy_pass names `{}`, which is not an upstream in this file (a single host is not load balanced)", f.upstream))
        })?;
        let (vip, spec) = frontend_vip(f, up, opts, resolver, &mut notes)?;
        if state.vips.insert(vip, spec).is_some() {
            return Err(at(f.line, format!("VIP {vip} is listened on twice")));
        }
    }
    state.validate()?;
    Ok(Imported { state, notes })
}

/// One frontend (`listen` + `proxy_pass`) and its upstream as a VIP.
fn frontend_vip(
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

/// `NAME=ADDR` of `--map-host`.
pub fn map_host(s: &str) -> Result<(String, IpAddr), String> {
    let (n, a) = s.split_once('=').ok_or_else(|| {
        format!("--map-host `{s}`: expected NAME=ADDRESS, e.g. localhost=10.0.0.2")
    })?;
    let addr: IpAddr = a
        .parse()
        .map_err(|_| format!("--map-host `{s}`: `{a}` is not an IP address"))?;
    Ok((n.to_string(), addr))
}
