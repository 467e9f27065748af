//! Reading the file: `upstream` blocks and their `server` members, `server` blocks with their
//! `listen` and `proxy_pass`, collected from the `http` and `stream` contexts. Each refusal
//! names the line; each directive left out is a note.
use std::{collections::BTreeMap, net::IpAddr};

use nginx_lint_parser::ast::Directive;

use super::{Frontend, Member, Upstream, args, at, line_of};
use crate::model::Proto;

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
pub(super) fn collect(
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
