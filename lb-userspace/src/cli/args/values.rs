//! The command line's value parsers: each turns one argument into its value or one line
//! saying what to give instead. Apart from the definitions so the rules read in one place.
use std::net::IpAddr;

use lb_userspace::model::MAX_WEIGHT;

/// A backend weight: a whole number 0-65535 (negative numbers get this message, not clap's
/// "unexpected argument" tip).
pub(super) fn weight(s: &str) -> Result<u32, String> {
    match s.parse::<i64>() {
        Ok(w) if (0..=i64::from(MAX_WEIGHT)).contains(&w) => Ok(w as u32),
        Ok(w) => Err(format!("weight {w} is out of range: use 0-{MAX_WEIGHT}")),
        Err(_) => Err(format!(
            "`{s}` is not a weight: use a whole number 0-{MAX_WEIGHT}"
        )),
    }
}

/// A port range `LOW-HIGH`, 1 <= LOW <= HIGH.
pub(super) fn port_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("invalid port range `{s}`: expected LOW-HIGH with 1 <= LOW <= HIGH");
    let (lo, hi) = s.split_once('-').ok_or_else(bad)?;
    let (lo, hi): (u16, u16) = (
        lo.parse().map_err(|_| bad())?,
        hi.parse().map_err(|_| bad())?,
    );
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// A VIP's `--announce-min-serving`: the model's range, with its message.
pub(super) fn announce_min_serving(s: &str) -> Result<u32, String> {
    let max = lb_userspace::model::MAX_ANNOUNCE_MIN_SERVING;
    match s.parse::<i64>() {
        Ok(n) if (1..=i64::from(max)).contains(&n) => Ok(n as u32),
        _ => Err(format!(
            "`{s}` is not a backend count: use a whole number 1-{max}"
        )),
    }
}

/// An IPIP source prefix: an IPv4 /16 or an IPv6 /64 with nothing set past the prefix.
pub fn source_prefix(s: &str) -> Result<IpAddr, String> {
    let bad = |why: &str| format!("invalid source prefix `{s}`: {why}");
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| bad("expected ADDRESS/LENGTH, e.g. 172.31.0.0/16 or fd00:1:2:3::/64"))?;
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| bad("not an IPv4 or IPv6 address"))?;
    match (ip, len) {
        (IpAddr::V4(v4), "16") if v4.octets()[2..] == [0, 0] && v4.octets()[..2] != [0, 0] => {
            Ok(ip)
        }
        (IpAddr::V6(v6), "64") if v6.segments()[4..] == [0; 4] && !v6.is_unspecified() => Ok(ip),
        (IpAddr::V4(_), _) => Err(bad(
            "an IPv4 prefix must be a /16 with its last two bytes 0",
        )),
        (IpAddr::V6(_), _) => Err(bad("an IPv6 prefix must be a /64 with its last 64 bits 0")),
    }
}

pub(super) fn announce_table(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a routing table number"))?;
    // 0 unspecified, 253 default, 254 main, 255 local: the agent must own its table.
    if matches!(n, 0 | 253..=255) {
        return Err(format!(
            "table {n} is not the agent's to own: pick a table nothing else uses (e.g. 100)"
        ));
    }
    Ok(n)
}

pub(super) fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a number of seconds from 0 to 3600")),
    }
}

/// A duration in whole seconds: a number with an optional unit (s, m, h, d). The four units
/// an operator types for a block are all this needs; none of the tree's crates parses them.
pub(super) fn duration_s(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid duration `{s}`: expected e.g. 90s, 10m, 1h or 7d");
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    match n.checked_mul(mult) {
        Some(0) => Err(format!(
            "invalid duration `{s}`: it must be at least 1 second"
        )),
        Some(v) => Ok(v),
        None => Err(bad()),
    }
}
