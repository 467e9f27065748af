//! `lb import nginx`: nginx `upstream` blocks (http and stream contexts) and the `server`
//! blocks that `proxy_pass` to them, translated into our desired state. Whatever has no
//! equivalent at layer 4 is named on one line each (never dropped silently); what cannot be
//! served at all (a loopback backend, ports that need translation) is an error naming the
//! line. Parsing is nginx-lint-parser's (comments, quotes, any directive).
//!
//! `nginx.rs` holds the options, what was read and the walk from one to the other;
//! `nginx/parse.rs` reads the directives, `nginx/translate.rs` makes the VIPs.
mod parse;
mod translate;

use std::{collections::BTreeMap, net::IpAddr};

use nginx_lint_parser::ast::Directive;

use self::{parse::collect, translate::frontend_vip};
use super::Resolver;
use crate::model::{DesiredState, Forward, Proto};

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

/// A `server { listen ...; proxy_pass ...; }` that uses an upstream.
#[derive(Clone, Debug)]
struct Frontend {
    line: usize,
    addr: Option<IpAddr>,
    port: u16,
    proto: Proto,
    upstream: String,
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
