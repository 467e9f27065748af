//! `lb decap`: arguments and the command (the work is in `lb_userspace::decap`).
use std::{net::IpAddr, path::PathBuf};

use anyhow::Context as _;
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
    /// Capture what the attached (xdp) decap program receives and does, as pcapng, instead of
    /// attaching: `--capture -w FILE|-` with `-c`, `--duration`, `--snaplen`, `--verdict`,
    /// `--reason` (a `--stats` row), `--sample`, `--both`, `--max-rate`.
    #[arg(long, requires = "write", conflicts_with_all = ["stats", "detach", "print_setup"])]
    pub capture: bool,
    #[command(flatten)]
    pub capture_opts: DecapCaptureArgs,
    /// Detach the program and remove its pins.
    #[arg(long, conflicts_with = "print_setup")]
    pub detach: bool,
    /// Print the backend's one-time setup (VIP on lo, ARP and rp_filter sysctls) and exit.
    #[arg(long)]
    pub print_setup: bool,
    #[arg(long)]
    pub json: bool,
}

/// `lb decap --capture`'s options (those of `lb capture` that apply to the decap program).
#[derive(Args)]
pub struct DecapCaptureArgs {
    /// Where to write pcapng: a file (created with mode 0600) or `-` for standard output.
    #[arg(
        short = 'w',
        long = "write",
        value_name = "FILE|-",
        requires = "capture"
    )]
    pub write: Option<PathBuf>,
    /// Stop after this many packets.
    #[arg(short = 'c', long = "count", requires = "capture")]
    pub count: Option<u64>,
    /// Stop after this long (e.g. 500ms, 10s, 1m).
    #[arg(long, value_parser = super::capture::parse_duration, default_value = "10s")]
    pub duration: std::time::Duration,
    /// Bytes of each frame kept (at most 256).
    #[arg(long, default_value_t = lb_common::CAPTURE_DEFAULT_SNAP)]
    pub snaplen: u32,
    /// Only packets with this verdict: forwarded (second chance sent it on), passed (stripped
    /// and kept, or untouched), dropped (an untrusted sender).
    #[arg(long, value_parser = ["forwarded", "passed", "dropped"], requires = "capture")]
    pub verdict: Option<String>,
    /// Only packets counted under this reason (a row of `--stats`, e.g. decapsulated).
    #[arg(long, requires = "capture")]
    pub reason: Option<String>,
    /// Keep one matching packet in N: `--sample 1/100` (or `100`).
    #[arg(long, value_parser = super::capture::parse_sample, requires = "capture")]
    pub sample: Option<u32>,
    /// Also write each frame the program changed as it left (stripped, or rewritten for the
    /// next hop).
    #[arg(long, requires = "capture")]
    pub both: bool,
    /// At most this many packets a second are recorded; the rest are counted as missed.
    #[arg(long, default_value_t = lb_userspace::capture::DEFAULT_MAX_RATE)]
    pub max_rate: u32,
}

/// `lb decap --capture`: the capture runs on a blocking thread (`Session::run`, as the
/// agent's), its messages written here as `lb capture` writes the agent's.
async fn capture(iface: &str, bpffs: &std::path::Path, a: DecapCaptureArgs) -> anyhow::Result<()> {
    use lb_userspace::capture::{
        decap::{DecapCaptureRequest, begin},
        wire::{KIND_START, message, next_message},
    };
    let write = a.write.context("--capture needs -w FILE or -w -")?;
    let req = DecapCaptureRequest {
        count: a.count.unwrap_or(0),
        duration: a.duration,
        snaplen: a.snaplen,
        verdict: a.verdict,
        reason: a.reason,
        sample: a.sample.unwrap_or(1),
        both: a.both,
        max_rate: a.max_rate,
    };
    if a.max_rate == 0 {
        anyhow::bail!("--max-rate must be at least 1 packet a second");
    }
    // Begun before the file is made: a refused capture leaves no empty file.
    let iface = iface.to_string();
    let bpffs = bpffs.to_path_buf();
    let cap = tokio::task::spawn_blocking(move || begin(&iface, &bpffs, &req)).await??;
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let first = message(KIND_START, &serde_json::to_vec(&cap.start)?);
    // The channel is new and empty: room for the first message.
    let _ = tx.try_send(first);
    let limits = cap.limits;
    let session = cap.session;
    // The claim (the lock) goes with `cap`'s rest when the capture is over.
    let claim = tokio::task::spawn_blocking(move || session.run(limits, tx));
    // The session's messages are framed as the agent's stream is: one per channel item.
    let next = async || match rx.recv().await {
        None => Ok(None),
        Some(mut m) => next_message(&mut m).map_err(anyhow::Error::msg),
    };
    let written = super::capture::write_capture(&write, "lb decap", next).await;
    // Ctrl-C or a write error: the receiver goes, the session sees its client gone and
    // turns the kernel side off.
    drop(rx);
    let _ = claim.await;
    drop(cap.claim);
    written
}

/// `lb decap`.
pub async fn run(d: DecapArgs) -> anyhow::Result<()> {
    use lb_userspace::decap;
    if d.capture {
        return capture(&d.iface, &d.bpffs, d.capture_opts).await;
    }
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
