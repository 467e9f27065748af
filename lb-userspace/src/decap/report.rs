//! What `lb decap` reports: the program's counters and the backend's one-time setup script.
use std::{collections::BTreeSet, net::IpAddr, path::Path};

use aya::maps::{Map, MapData, PerCpuArray};
use ipnet::IpNet;
use lb_common::{Counter, DECAP_STATS_MAP, DecapStat};

use super::pin_dir;
use crate::Error;

/// The decap counters of `iface`, summed over CPUs, in [`DecapStat`] order.
pub fn stats(iface: &str, bpffs: &Path) -> Result<Vec<(&'static str, Counter)>, Error> {
    let path = pin_dir(bpffs, iface).join("maps").join(DECAP_STATS_MAP);
    if !path.exists() {
        return Err(Error::NotFound(format!(
            "no decap program is attached to {iface} (no counters at {})",
            path.display()
        )));
    }
    let name = DECAP_STATS_MAP;
    let data = MapData::from_pin(&path).map_err(|source| Error::Map { name, source })?;
    let m: PerCpuArray<_, Counter> = PerCpuArray::try_from(Map::PerCpuArray(data))
        .map_err(|source| Error::Map { name, source })?;
    let mut out = Vec::new();
    for s in DecapStat::ALL {
        let per_cpu = m
            .get(&(s as u32), 0)
            .map_err(|source| Error::Map { name, source })?;
        let mut c = Counter::default();
        for v in per_cpu.iter() {
            c.packets += v.packets;
            c.bytes += v.bytes;
        }
        out.push((s.name(), c));
    }
    Ok(out)
}

/// The backend's one-time setup for `vips` on `iface`, taking tunnels from `trusted`, as
/// shell commands. With no trusted source given, the command names what to put there.
pub fn setup_script(iface: &str, vips: &BTreeSet<IpAddr>, trusted: &BTreeSet<IpNet>) -> String {
    let mut s = String::from(
        "# One-time setup of a backend behind an encapsulating VIP (run as root).\n\
         # The VIP lives on lo, so the stack accepts the decapsulated packets and answers\n\
         # from the VIP straight to the client; the host must not answer ARP/ND for it.\n",
    );
    for vip in vips {
        let len = if vip.is_ipv4() { 32 } else { 128 };
        s.push_str(&format!("ip addr add {vip}/{len} dev lo\n"));
    }
    s.push_str(&format!(
        "sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.{iface}.arp_ignore=1\n\
         sysctl -w net.ipv4.conf.all.arp_announce=2 net.ipv4.conf.{iface}.arp_announce=2\n\
         # The inner packet comes from the client but arrives on {iface}: loose or no\n\
         # reverse-path filtering (strict mode drops it when the client's route differs).\n\
         sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{iface}.rp_filter=2\n\
         # Then attach the decapsulation program (stays attached across restarts). It takes\n\
         # tunnels only from --trusted-source: every load balancer's encapsulation source\n\
         # (its --encap-source or interface address, and its --ipip-source-prefix), and the\n\
         # peer backends second chance forwards from.\n\
         lb decap --iface {iface}{}{}\n",
        vips.iter()
            .map(|v| format!(" --vip {v}"))
            .collect::<String>(),
        if trusted.is_empty() {
            " --trusted-source LB_PREFIX --trusted-source PEER_PREFIX".to_string()
        } else {
            trusted
                .iter()
                .map(|t| format!(" --trusted-source {t}"))
                .collect::<String>()
        }
    ));
    s
}
