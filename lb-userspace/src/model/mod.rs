//! The operator's vocabulary: VIP and backend addresses, MACs, health checks and the desired
//! state, with parsing that says exactly what is wrong. Pure: no I/O, unit-tested unprivileged.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use lb_common::{PROTO_TCP, PROTO_UDP, VipKey};
use serde::{Deserialize, Serialize};

/// Transport protocol of a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A VIP: `10.0.0.10:80/tcp`, `[2001:db8::10]:53/udp`; port 0 (`10.0.0.10:*/tcp` or `:0`)
/// means every port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipAddr {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl VipAddr {
    /// The key the data plane looks this VIP up by.
    pub fn key(&self) -> VipKey {
        crate::net::vip_key(self.ip, self.port, self.proto.number())
    }
}

impl fmt::Display for VipAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = if self.port == 0 {
            "*".to_string()
        } else {
            self.port.to_string()
        };
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{port}/{}", self.proto),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{port}/{}", self.proto),
        }
    }
}

impl FromStr for VipAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            format!(
                "invalid VIP `{s}`: {why} (expected ADDRESS:PORT/PROTO, e.g. 10.0.0.10:80/tcp or [2001:db8::10]:53/udp)"
            )
        };
        let (addr_port, proto) = s
            .rsplit_once('/')
            .ok_or_else(|| bad("missing /tcp or /udp"))?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(bad("protocol must be tcp or udp")),
        };
        let (ip, port) = addr_port
            .rsplit_once(':')
            .ok_or_else(|| bad("missing :PORT"))?;
        let bracketed = ip.strip_prefix('[').and_then(|i| i.strip_suffix(']'));
        if bracketed.is_none() && ip.contains(':') {
            return Err(bad(
                "an IPv6 VIP needs brackets around the address, e.g. [2001:db8::10]:80/tcp",
            ));
        }
        let ip = bracketed.unwrap_or(ip);
        let ip: IpAddr = ip.parse().map_err(|_| bad("not an IPv4 or IPv6 address"))?;
        let port = if port == "*" {
            0
        } else {
            port.parse::<u16>()
                .map_err(|_| bad("port must be 0-65535 or *"))?
        };
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(bad("the address must be a unicast address"));
        }
        Ok(VipAddr { ip, port, proto })
    }
}

impl Serialize for VipAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VipAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// An Ethernet address `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid MAC `{s}`: expected six hex bytes like 02:00:00:00:00:01");
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(bad());
            }
            mac[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if mac[0] & 1 == 1 || mac == [0; 6] {
            return Err(format!(
                "invalid MAC `{s}`: a backend needs a unicast, non-zero MAC"
            ));
        }
        Ok(Mac(mac))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// How a backend's health is probed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `tcp` (connect) or `http` (GET `path`, expect `expect_status`).
    pub kind: HealthKind,
    /// Port to probe; defaults to the VIP's port.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_status")]
    pub expect_status: u16,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Consecutive successes that bring a down backend back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take an up backend out.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Tcp,
    Http,
}

fn default_path() -> String {
    "/health".into()
}
fn default_status() -> u16 {
    200
}
fn default_interval() -> u64 {
    1000
}
fn default_timeout() -> u64 {
    500
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

impl HealthCheck {
    pub fn validate(&self, vip: &VipAddr) -> Result<(), String> {
        if self.port.unwrap_or(vip.port) == 0 {
            return Err(format!(
                "VIP {vip} covers every port: give its health check a `port`"
            ));
        }
        if self.interval_ms < 50 || self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            return Err(format!(
                "VIP {vip}: health check needs interval_ms >= 50 and 0 < timeout_ms <= interval_ms"
            ));
        }
        if self.rise == 0 || self.fall == 0 {
            return Err(format!(
                "VIP {vip}: health check rise and fall must be at least 1"
            ));
        }
        if !self.path.starts_with('/') {
            return Err(format!("VIP {vip}: health check path must start with /"));
        }
        if self.path.len() > MAX_PATH || self.path.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!(
                "VIP {vip}: health check path must be at most {} characters, without spaces or control characters",
                MAX_PATH
            ));
        }
        Ok(())
    }
}

/// Longest health-check path sent (longer ones are refused by validation).
pub const MAX_PATH: usize = 1024;

/// Highest backend weight.
pub const MAX_WEIGHT: u32 = 65535;

/// A backend of one VIP, keyed by its address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// 0-65535; 0 takes no new flows (like drain, but kept in the plan's shares).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Backend MAC; resolved from the neighbour table when absent.
    #[serde(default)]
    pub mac: Option<Mac>,
    /// Draining: no new flows, established flows continue.
    #[serde(default)]
    pub drained: bool,
}

pub(crate) fn default_weight() -> u32 {
    100
}

pub(crate) fn default_udp_idle() -> u32 {
    lb_common::DEFAULT_UDP_IDLE_S
}

/// Longest UDP idle time accepted (a day): longer is a flow table that never forgets.
pub const MAX_UDP_IDLE_S: u32 = 86_400;

/// Default second-chance drain window of a `gue` VIP: a slot's previous backend is carried
/// for this long after it lost the slot.
pub const DEFAULT_SECOND_CHANCE_S: u32 = 300;
/// Longest drain window accepted (a day).
pub const MAX_SECOND_CHANCE_S: u32 = 86_400;

pub(crate) fn default_second_chance() -> u32 {
    DEFAULT_SECOND_CHANCE_S
}

fn is_default_second_chance(s: &u32) -> bool {
    *s == DEFAULT_SECOND_CHANCE_S
}

/// A VIP's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSpec {
    /// Hash the client address only (client affinity) instead of the 5-tuple.
    #[serde(default)]
    pub source_hash: bool,
    /// Seconds a UDP flow is remembered without a datagram.
    #[serde(default = "default_udp_idle")]
    pub udp_idle_s: u32,
    /// How packets reach the backends.
    #[serde(default, skip_serializing_if = "Forward::is_l2")]
    pub forward: Forward,
    /// Second-chance drain window in seconds (`gue` VIPs only; 0: off). See
    /// `agent::second_chance`.
    #[serde(
        default = "default_second_chance",
        skip_serializing_if = "is_default_second_chance"
    )]
    pub second_chance_s: u32,
    #[serde(default)]
    pub health: Option<HealthCheck>,
    #[serde(default)]
    pub backends: BTreeMap<BackendAddr, BackendSpec>,
    /// Sources the VIP serves (empty: every source); see `lb_common::guard`.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub allow_sources: BTreeSet<Prefix>,
    /// Sources the VIP never serves (a deny match always wins over the allow list).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub deny_sources: BTreeSet<Prefix>,
    /// New flows the VIP takes per second on this node, with a burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_flow_limit: Option<FlowLimit>,
    /// New flows each source (a /32, an IPv6 /64) opens at the VIP per second on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_limit: Option<FlowLimit>,
    /// Serving backends the VIP needs to be announced by BGP (`None`: the node's
    /// `--announce-min-serving`). See `announce::gate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_min_serving: Option<u32>,
}

/// A new-flow limit: `rate` flows per second, and up to `burst` at once after a quiet spell
/// (a token bucket). Written `RATE` or `RATE/BURST` on the command line; the burst defaults
/// to the rate (a second's worth).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowLimit {
    pub rate: u32,
    #[serde(default)]
    pub burst: Option<u32>,
}

/// Highest new-flow rate and burst accepted.
pub const MAX_FLOW_RATE: u32 = 100_000_000;

impl FlowLimit {
    /// The burst in effect.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.rate)
    }

    pub fn validate(&self, vip: &VipAddr, what: &str) -> Result<(), String> {
        if self.rate == 0
            || self.rate > MAX_FLOW_RATE
            || self.burst() == 0
            || self.burst() > MAX_FLOW_RATE
        {
            return Err(format!(
                "VIP {vip}: {what} needs a rate and a burst of 1 to {MAX_FLOW_RATE} flows"
            ));
        }
        Ok(())
    }
}

impl fmt::Display for FlowLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.rate, self.burst())
    }
}

impl FromStr for FlowLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid limit `{s}`: expected RATE or RATE/BURST (new flows per second), e.g. 1000/200"
            )
        };
        let (rate, burst) = match s.split_once('/') {
            Some((r, b)) => (r, Some(b.parse().map_err(|_| bad())?)),
            None => (s, None),
        };
        let l = FlowLimit {
            rate: rate.parse().map_err(|_| bad())?,
            burst,
        };
        if l.rate == 0 || l.burst() == 0 {
            return Err(bad());
        }
        Ok(l)
    }
}

impl Default for VipSpec {
    fn default() -> Self {
        VipSpec {
            source_hash: false,
            udp_idle_s: default_udp_idle(),
            forward: Forward::L2,
            second_chance_s: default_second_chance(),
            health: None,
            backends: BTreeMap::new(),
            allow_sources: BTreeSet::new(),
            deny_sources: BTreeSet::new(),
            new_flow_limit: None,
            source_limit: None,
            announce_min_serving: None,
        }
    }
}

/// Everything the operator asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    #[serde(default)]
    pub vips: BTreeMap<VipAddr, VipSpec>,
    /// The node-wide deny list (`lb deny`): prefix -> when it ends, Unix seconds (0: never).
    /// Kept apart from the VIPs: `lb apply` of a config leaves it as it is.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deny: BTreeMap<Prefix, u64>,
}

impl DesiredState {
    /// Checks every rule a single operation also checks.
    pub fn validate(&self) -> Result<(), String> {
        for (vip, spec) in &self.vips {
            if let Some(h) = &spec.health {
                h.validate(vip)?;
            }
            validate_udp_idle(vip, spec.udp_idle_s)?;
            validate_second_chance(vip, spec.second_chance_s)?;
            for (addr, b) in &spec.backends {
                validate_backend(vip, spec.forward, addr, b)?;
            }
            validate_sources(vip, spec)?;
            if let Some(n) = spec.announce_min_serving {
                validate_announce_min_serving(vip, i64::from(n))?;
            }
        }
        Ok(())
    }
}

/// Most prefixes one VIP's source lists may hold together.
pub const MAX_VIP_SOURCES: usize = 4 << 20;

/// A VIP's source lists stay within the tries' room; its new-flow limits are in range, and
/// not on a NAT VIP (whose every packet is placed by the slot table: a limit there would
/// count its UDP datagrams, not its flows).
pub fn validate_sources(vip: &VipAddr, spec: &VipSpec) -> Result<(), String> {
    for (l, what) in [
        (&spec.new_flow_limit, "new_flow_limit"),
        (&spec.source_limit, "source_limit"),
    ] {
        if let Some(l) = l {
            l.validate(vip, what)?;
            if spec.forward == Forward::Nat {
                return Err(format!(
                    "VIP {vip}: {what} applies to l2, ipip and gue VIPs, not nat"
                ));
            }
        }
    }
    let n = spec.allow_sources.len() + spec.deny_sources.len();
    if n > MAX_VIP_SOURCES {
        return Err(format!(
            "VIP {vip}: {n} source prefixes, at most {MAX_VIP_SOURCES}"
        ));
    }
    Ok(())
}

/// Most serving backends a VIP may require before it is announced: the weight's range, far
/// above any VIP's backend count, so a typo of an extra digit is still caught.
pub const MAX_ANNOUNCE_MIN_SERVING: u32 = 65_535;

/// A VIP's `announce_min_serving`: 1 to [`MAX_ANNOUNCE_MIN_SERVING`] (0 would announce a VIP
/// with no backend serving, which the gate exists to prevent).
/// Signed, so a negative figure in a config file gets this message too.
pub fn validate_announce_min_serving(vip: &VipAddr, n: i64) -> Result<u32, String> {
    match u32::try_from(n) {
        Ok(n) if (1..=MAX_ANNOUNCE_MIN_SERVING).contains(&n) => Ok(n),
        _ => Err(format!(
            "VIP {vip}: announce_min_serving must be 1 to {MAX_ANNOUNCE_MIN_SERVING} backends, not {n}"
        )),
    }
}

/// The UDP idle time's range: 1 s to a day.
pub fn validate_udp_idle(vip: &VipAddr, secs: u32) -> Result<(), String> {
    if secs == 0 || secs > MAX_UDP_IDLE_S {
        return Err(format!(
            "VIP {vip}: udp_idle must be 1 to {MAX_UDP_IDLE_S} seconds, not {secs}"
        ));
    }
    Ok(())
}

/// The drain window's range: 0 (off) to a day.
pub fn validate_second_chance(vip: &VipAddr, secs: u32) -> Result<(), String> {
    if secs > MAX_SECOND_CHANCE_S {
        return Err(format!(
            "VIP {vip}: second_chance must be 0 (off) to {MAX_SECOND_CHANCE_S} seconds, not {secs}"
        ));
    }
    Ok(())
}

/// A drain window given explicitly for a VIP that cannot carry one.
pub fn second_chance_needs_gue(vip: &VipAddr, forward: Forward) -> Result<(), String> {
    if forward != Forward::Gue {
        return Err(format!(
            "VIP {vip}: second_chance needs forward = \"gue\" (the previous backends travel in the GUE header), not {forward}"
        ));
    }
    Ok(())
}

/// One backend's rules: weight range, the address family (only an encapsulating VIP may have
/// backends of the other family), a MAC only for L2, a port of its own only for NAT.
pub fn validate_backend(
    vip: &VipAddr,
    forward: Forward,
    backend: &BackendAddr,
    b: &BackendSpec,
) -> Result<(), String> {
    let addr = &backend.ip;
    if b.weight > MAX_WEIGHT {
        return Err(format!(
            "weight {} for backend {addr} is out of range: use 0-{MAX_WEIGHT}",
            b.weight
        ));
    }
    if !forward.encapsulates() && addr.is_ipv4() != vip.ip.is_ipv4() {
        return Err(format!(
            "backend {addr} and VIP {vip} are of different address families (only ipip and gue forwarding can cross families)"
        ));
    }
    if backend.port != 0 && backend.port != vip.port && !forward.translates_ports() {
        return Err(format!(
            "backend {backend} of VIP {vip}: {forward} forwarding never changes ports, so a backend serves the VIP's port (use forward = \"nat\" for backends on other ports)"
        ));
    }
    if forward.routed() && b.mac.is_some() {
        return Err(format!(
            "backend {addr} of VIP {vip}: a MAC only applies to l2 forwarding ({forward} finds the next hop by route)"
        ));
    }
    if addr.is_unspecified() || addr.is_multicast() {
        return Err(format!("backend {addr} must be a unicast address"));
    }
    if *addr == vip.ip {
        return Err(format!(
            "backend {addr} is the VIP's own address: a backend must be another host"
        ));
    }
    Ok(())
}

mod backend;
mod config;
mod forward;
pub mod pool;
mod serving;
pub use backend::BackendAddr;
pub use config::{parse_config, render_config};
pub use forward::Forward;
// `FlowLimit` is defined above, beside `VipSpec`.
pub use pool::{OwnAddrs, Prefix};
pub use serving::Serving;

#[cfg(test)]
mod tests;
