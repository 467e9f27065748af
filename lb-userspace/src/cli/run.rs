//! `lb run`: its arguments turned into the agent's options. Its own module because the
//! mapping is long and touches no API call.
use std::{net::IpAddr, path::PathBuf, time::Duration};

use lb_userspace::{LoadOptions, run};

use super::args::RunArgs;

pub(super) async fn run_agent(a: RunArgs, socket: PathBuf) -> anyhow::Result<()> {
    let state_file = a
        .state_file
        .unwrap_or_else(|| PathBuf::from(format!("/var/lib/xdp-lb/{}.json", a.iface)));
    // Beside the state file: the drain belongs to this node's agent as its state does.
    let drain_file = state_file.with_extension("drain.json");
    let opts = run::RunOptions {
        iface: a.iface,
        mode: a.mode,
        load: LoadOptions {
            ring_size: a.ring_size,
            max_vips: a.max_vips,
            max_backends: a.max_backends,
            flow_entries: a.flow_entries,
            hash_seed: a.hash_seed,
            per_cpu_flows: a.per_cpu_flows,
            flow_table_off: a.flow_table == "off",
            fin_grace_s: a.fin_grace,
            gue_port: a.gue_port,
            nat_ports: a.nat_ports,
            flow_cache_slots: a.flow_cache_slots,
            nat_entries: a.nat_entries,
            nat_half_open_s: a.nat_half_open,
            nat_tcp_idle_s: a.nat_tcp_idle,
            nat_grace_s: a.nat_close_grace,
            nat_half_share_pct: a.nat_half_open_share,
            ipip_prefix4: a.ipip_source_prefix.iter().find_map(|p| match p {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            }),
            ipip_prefix6: a.ipip_source_prefix.iter().find_map(|p| match p {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            }),
        },
        encap_sources: a.encap_source,
        nat_sources: a.nat_source,
        vip_pools: a.vip_prefix,
        config: a.config,
        state_file,
        socket,
        bpffs: a.bpffs,
        metrics: a.metrics,
        keep_on_exit: a.keep_on_exit,
        fresh: a.fresh,
        interval: a.interval,
        duration: a.duration,
        json: a.json,
        store: match (&a.store, &a.cluster) {
            (Some(url), Some(cluster)) => {
                let node = match a.node {
                    Some(n) => n,
                    None => nix_hostname()?,
                };
                let access = lb_userspace::fleet::access::AccessArgs {
                    ca: a.store_ca,
                    cert: a.store_cert,
                    key: a.store_key,
                    user: a.store_user,
                    password_file: a.store_password_file,
                };
                Some(
                    lb_userspace::fleet::FleetConfig::new(url, &access, cluster, &node)
                        .map_err(lb_userspace::Error::Invalid)?,
                )
            }
            _ => None,
        },
        announce: a
            .announce_table
            .map(|table| lb_userspace::announce::AnnounceConfig {
                table,
                min_serving: a.announce_min_serving as usize,
                hold_down: Duration::from_secs_f64(a.announce_hold_down),
                drain_time: Duration::from_secs(a.drain_time),
                speaker: Some(a.bgp_socket.clone()),
                drain_file: drain_file.clone(),
            }),
    };
    run::run(opts).await?;
    Ok(())
}

/// This host's name (the default node name in a fleet).
fn nix_hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(name.trim().to_string())
}
