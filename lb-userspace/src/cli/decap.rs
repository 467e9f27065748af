//! `lb decap`: arguments and the command (the work is in `lb_userspace::decap`).
use std::{net::IpAddr, path::PathBuf};

use clap::Args;
use lb_userspace::AttachMode;

use super::output::{print_json, print_table};

#[derive(Args)]
pub struct DecapArgs {
    /// The backend's interface that receives tunnels.
    #[arg(long)]
    pub iface: String,
    /// A VIP this backend serves (repeatable).
    #[arg(long = "vip", value_name = "ADDR")]
    pub vips: Vec<IpAddr>,
    /// A file of VIP addresses, one per line (`#` comments).
    #[arg(long)]
    pub vip_file: Option<PathBuf>,
    /// This host's tunnel address (repeatable) [default: IFACE's global addresses].
    #[arg(long = "local", value_name = "ADDR")]
    pub local: Vec<IpAddr>,
    /// Who may send this backend tunnels (repeatable; a prefix or an address): every load
    /// balancer's encapsulation source and `--ipip-source-prefix`, and the peer backends second
    /// chance forwards from (also the only hops it forwards to). Tunnels from anyone else are
    /// dropped (`decap_untrusted_source`).
    #[arg(long = "trusted-source", value_name = "PREFIX", value_parser = lb_userspace::decap::parse_trusted)]
    pub trusted_source: Vec<ipnet::IpNet>,
    /// Take tunnels from any sender (a lab only: anyone reaching this host can then have it
    /// deliver packets with any source address, and relay second-chance packets).
    #[arg(long, conflicts_with = "trusted_source")]
    pub trust_any_source: bool,
    /// UDP port of GUE packets (the load balancer's `--gue-port`).
    #[arg(long, default_value_t = lb_common::DEFAULT_GUE_PORT)]
    pub gue_port: u16,
    /// Where the program runs: xdp (default) or tc (ingress, through tcx).
    #[arg(long, value_enum, default_value = "xdp")]
    pub attach: lb_userspace::decap::DecapHook,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: AttachMode,
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Show the counters instead of attaching.
    #[arg(long, conflicts_with_all = ["detach", "print_setup"])]
    pub stats: bool,
    /// Detach the program and remove its pins.
    #[arg(long, conflicts_with = "print_setup")]
    pub detach: bool,
    /// Print the backend's one-time setup (VIP on lo, ARP and rp_filter sysctls) and exit.
    #[arg(long)]
    pub print_setup: bool,
    #[arg(long)]
    pub json: bool,
}

/// `lb decap`.
pub fn run(d: DecapArgs) -> anyhow::Result<()> {
    use lb_userspace::decap;
    if d.stats {
        let stats = decap::stats(&d.iface, &d.bpffs)?;
        if d.json {
            let m: std::collections::BTreeMap<_, _> = stats.into_iter().collect();
            return print_json(&m);
        }
        let rows: Vec<Vec<String>> = stats
            .iter()
            .map(|(n, c)| vec![n.to_string(), c.packets.to_string(), c.bytes.to_string()])
            .collect();
        print_table(&["COUNTER", "PACKETS", "BYTES"], &rows);
        return Ok(());
    }
    if d.detach {
        println!("{}", decap::detach(&d.iface, &d.bpffs)?);
        return Ok(());
    }
    let mut vips: std::collections::BTreeSet<IpAddr> = d.vips.iter().copied().collect();
    if let Some(f) = &d.vip_file {
        vips.extend(decap::read_vip_file(f)?);
    }
    if d.print_setup {
        let trusted = d.trusted_source.iter().copied().collect();
        print!("{}", decap::setup_script(&d.iface, &vips, &trusted));
        return Ok(());
    }
    let local = if d.local.is_empty() {
        lb_userspace::net::interface_addrs(&d.iface)
            .into_iter()
            .collect()
    } else {
        d.local.iter().copied().collect()
    };
    if d.trust_any_source {
        eprintln!(
            "warning: --trust-any-source: tunnels from any sender are decapsulated (any host \
             reaching {} can spoof inner sources and use second chance as a relay); name the \
             load balancers and peers with --trusted-source outside a lab",
            d.iface
        );
    }
    let opts = decap::DecapOptions {
        iface: d.iface,
        hook: d.attach,
        mode: d.mode,
        vips,
        local,
        trusted: d.trusted_source.into_iter().collect(),
        trust_any: d.trust_any_source,
        gue_port: d.gue_port,
        bpffs: d.bpffs,
    };
    println!("{}", decap::attach(&opts)?);
    Ok(())
}
