//! The rules one VIP or backend must meet, each with the one line that says what is wrong;
//! shared by single operations and `DesiredState::validate`.
use super::{
    BackendAddr, BackendSpec, Forward, MAX_SECOND_CHANCE_S, MAX_UDP_IDLE_S, MAX_WEIGHT, VipAddr,
    VipSpec,
};

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
