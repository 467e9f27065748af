//! The declarative config file (TOML): `[[vip]]` tables parsed strictly (unknown fields are
//! errors) into a validated [`DesiredState`].
use std::collections::BTreeMap;

use serde::Deserialize;

use super::{
    BackendAddr, BackendSpec, DesiredState, Forward, HealthCheck, Mac, VipAddr, VipSpec,
    default_second_chance, default_udp_idle, default_weight,
};

/// `[[vip]]` tables of the config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    vip: Vec<ConfigVip>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigVip {
    address: VipAddr,
    #[serde(default)]
    source_hash: bool,
    /// Seconds a UDP flow is remembered without a datagram (default 30).
    #[serde(default)]
    udp_idle: Option<u32>,
    /// `l2` (default), `ipip` or `gue`.
    #[serde(default)]
    forward: Forward,
    /// Second-chance drain window in seconds (`gue` only; default 300, 0: off).
    #[serde(default)]
    second_chance: Option<u32>,
    #[serde(default)]
    health: Option<HealthCheck>,
    #[serde(default)]
    backend: Vec<ConfigBackend>,
    /// Sources the VIP serves (prefixes; empty: all).
    #[serde(default)]
    allow_sources: Vec<super::Prefix>,
    /// Sources the VIP never serves.
    #[serde(default)]
    deny_sources: Vec<super::Prefix>,
    /// New flows per second the VIP takes: `{ rate = N, burst = B }`.
    #[serde(default)]
    new_flow_limit: Option<super::FlowLimit>,
    /// New flows per second each source opens at the VIP.
    #[serde(default)]
    source_limit: Option<super::FlowLimit>,
    /// Serving backends needed to announce the VIP by BGP (default: the node's option).
    /// Signed, so a negative figure gets the field's own message rather than serde's.
    #[serde(default)]
    announce_min_serving: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigBackend {
    address: BackendAddr,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    mac: Option<Mac>,
    #[serde(default)]
    drained: bool,
}

/// Parses a TOML config file into a validated desired state.
///
/// ```toml
/// [[vip]]
/// address = "10.0.0.10:80/tcp"
/// health = { kind = "http", path = "/health" }
/// backend = [ { address = "10.0.0.2", weight = 100 }, { address = "10.0.0.3" } ]
/// ```
pub fn parse_config(text: &str) -> Result<DesiredState, String> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| format!("config: {}", e.message()))?;
    let mut state = DesiredState::default();
    for v in file.vip {
        let announce_min_serving = v
            .announce_min_serving
            .map(|n| super::validate_announce_min_serving(&v.address, n))
            .transpose()
            .map_err(|e| format!("config: {e}"))?;
        let mut spec = VipSpec {
            source_hash: v.source_hash,
            udp_idle_s: v.udp_idle.unwrap_or_else(default_udp_idle),
            forward: v.forward,
            second_chance_s: v.second_chance.unwrap_or_else(default_second_chance),
            health: v.health,
            backends: BTreeMap::new(),
            allow_sources: v.allow_sources.into_iter().collect(),
            deny_sources: v.deny_sources.into_iter().collect(),
            new_flow_limit: v.new_flow_limit,
            source_limit: v.source_limit,
            announce_min_serving,
        };
        if v.second_chance.is_some() {
            super::second_chance_needs_gue(&v.address, v.forward)
                .map_err(|e| format!("config: {e}"))?;
        }
        for b in v.backend {
            let bs = BackendSpec {
                weight: b.weight,
                mac: b.mac,
                drained: b.drained,
            };
            if spec.backends.insert(b.address, bs).is_some() {
                return Err(format!(
                    "config: backend {} appears twice under VIP {}",
                    b.address, v.address
                ));
            }
        }
        if state.vips.insert(v.address, spec).is_some() {
            return Err(format!("config: VIP {} appears twice", v.address));
        }
    }
    state.validate().map_err(|e| format!("config: {e}"))?;
    Ok(state)
}

/// The config file for `state` ([`parse_config`] reads it back to the same state).
pub fn render_config(state: &DesiredState) -> String {
    let mut out = String::new();
    for (vip, spec) in &state.vips {
        out.push_str(&format!("[[vip]]\naddress = \"{vip}\"\n"));
        if spec.source_hash {
            out.push_str("source_hash = true\n");
        }
        if spec.udp_idle_s != default_udp_idle() {
            out.push_str(&format!("udp_idle = {}\n", spec.udp_idle_s));
        }
        if spec.forward != Forward::L2 {
            out.push_str(&format!("forward = \"{}\"\n", spec.forward));
            if spec.second_chance_s != default_second_chance() {
                out.push_str(&format!("second_chance = {}\n", spec.second_chance_s));
            }
        }
        if let Some(h) = &spec.health {
            let kind = match h.kind {
                super::HealthKind::Tcp => "tcp",
                super::HealthKind::Http => "http",
            };
            out.push_str(&format!(
                "health = {{ kind = \"{kind}\", path = {}, expect_status = {}, interval_ms = {}, timeout_ms = {}, rise = {}, fall = {}{} }}\n",
                toml::Value::String(h.path.clone()),
                h.expect_status,
                h.interval_ms,
                h.timeout_ms,
                h.rise,
                h.fall,
                h.port.map(|p| format!(", port = {p}")).unwrap_or_default()
            ));
        }
        for (name, list) in [
            ("allow_sources", &spec.allow_sources),
            ("deny_sources", &spec.deny_sources),
        ] {
            if !list.is_empty() {
                let items: Vec<String> = list.iter().map(|p| format!("\"{p}\"")).collect();
                out.push_str(&format!("{name} = [{}]\n", items.join(", ")));
            }
        }
        for (name, l) in [
            ("new_flow_limit", &spec.new_flow_limit),
            ("source_limit", &spec.source_limit),
        ] {
            if let Some(l) = l {
                out.push_str(&format!(
                    "{name} = {{ rate = {}, burst = {} }}\n",
                    l.rate,
                    l.burst()
                ));
            }
        }
        if let Some(n) = spec.announce_min_serving {
            out.push_str(&format!("announce_min_serving = {n}\n"));
        }
        out.push_str("backend = [\n");
        for (addr, b) in &spec.backends {
            out.push_str(&format!("  {{ address = \"{addr}\", weight = {}", b.weight));
            if let Some(m) = b.mac {
                out.push_str(&format!(", mac = \"{m}\""));
            }
            if b.drained {
                out.push_str(", drained = true");
            }
            out.push_str(" },\n");
        }
        out.push_str("]\n\n");
    }
    out
}
