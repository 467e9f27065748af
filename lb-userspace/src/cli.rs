//! Command-line interface: argument definitions and their execution against the agent.
use std::{net::IpAddr, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use lb_userspace::{
    AttachMode, LoadOptions,
    agent::{Trace, VipView},
    api::{Command, StatsView},
    client::{Client, encode_query},
    model::{HealthCheck, HealthKind, MAX_WEIGHT, Mac, VipAddr, parse_config},
    plan, run, samples,
};

const DEFAULT_SOCKET: &str = "/run/xdp-lb/lb.sock";

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "Layer-4 load balancer on eBPF/XDP: Maglev consistent hashing, L2 direct server return",
    long_about = "Layer-4 load balancer on eBPF/XDP.\n\n`lb run` attaches the XDP program to an interface and serves a control API on a unix socket; the other commands talk to it.\n\nExample:\n  lb run --iface eth0 &\n  lb vip add 10.0.0.10:80/tcp --health http --health-path /health\n  lb backend add 10.0.0.10:80/tcp 10.0.0.2 --weight 100\n  lb stats --watch"
)]
pub struct Cli {
    /// Control socket of the agent.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET, env = "LB_SOCKET")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Run the agent: load and attach the XDP program, serve the API, run health checks.
    Run(RunArgs),
    /// Add, remove or list VIPs.
    #[command(subcommand)]
    Vip(VipCmd),
    /// Add, remove, list, reweight or drain a VIP's backends.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Show counters (global, per VIP, per backend).
    Stats {
        /// Refresh every second with rates.
        #[arg(long)]
        watch: bool,
        /// With --watch: stop after this many refreshes.
        #[arg(long)]
        count: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Show the VIP, slot, backend and flow-table entry a packet would meet.
    Trace {
        /// Client address and port, e.g. 192.0.2.7:40000 or [2001:db8::7]:40000.
        client: SocketAddr,
        /// The VIP, e.g. 10.0.0.10:80/tcp.
        vip: VipAddr,
        #[arg(long)]
        json: bool,
    },
    /// Make a TOML config file the desired state (shows the plan first).
    Apply {
        /// The config file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Show the plan only.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Run sample HTTP (and UDP echo) backends answering "hello from backend i".
    Samples {
        #[arg(long, default_value_t = 2)]
        count: usize,
        #[arg(long, default_value_t = 8000)]
        base_port: u16,
        #[arg(long, default_value = "0.0.0.0")]
        bind: IpAddr,
        /// Number of the first backend (backend i answers "hello from backend i").
        #[arg(long, default_value_t = 0)]
        first_index: usize,
        /// Exit by itself after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Attach the trivial XDP_PASS program to an interface until stopped: native-mode
    /// XDP_TX on a veth is only delivered when its peer runs XDP.
    XdpPass {
        #[arg(long)]
        iface: String,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Interface to attach to.
    #[arg(long)]
    iface: String,
    /// Attach mode; auto tries native, then generic.
    #[arg(long, value_enum, default_value_t = AttachMode::Native)]
    mode: AttachMode,
    /// TOML config applied at start (replaces the saved state).
    #[arg(long)]
    config: Option<PathBuf>,
    /// State file [default: /var/lib/xdp-lb/IFACE.json].
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// bpffs mount point for the pinned maps and link (mounted if needed).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Serve Prometheus metrics on this address (read-only), e.g. 127.0.0.1:9100.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Slot-table size M (a prime).
    #[arg(long, default_value_t = lb_common::DEFAULT_RING_SIZE)]
    ring_size: u32,
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_VIPS)]
    max_vips: u32,
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    #[arg(long, default_value_t = lb_common::DEFAULT_FLOW_ENTRIES)]
    flow_entries: u32,
    /// Flow-hash seed: nodes with the same seed and tables pick the same backends.
    #[arg(long, default_value_t = lb_common::LbConfig::DEFAULT.hash_seed)]
    hash_seed: u64,
    /// Per-CPU LRU lists for the flow table (many-core NICs).
    #[arg(long)]
    per_cpu_flows: bool,
    /// Keep forwarding after exit (maps and link stay pinned), for restarts and upgrades.
    #[arg(long)]
    keep_on_exit: bool,
    /// Discard pinned maps and link of this interface before starting.
    #[arg(long)]
    fresh: bool,
    /// Seconds between counter lines (0: only at exit).
    #[arg(long, default_value_t = 0)]
    interval: u64,
    /// Exit by itself after this many seconds.
    #[arg(long)]
    duration: Option<u64>,
    /// Counter lines as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum CheckKind {
    Tcp,
    Http,
}

#[derive(Subcommand)]
enum VipCmd {
    /// Add a VIP (ADDRESS:PORT/PROTO; port * for every port).
    Add {
        vip: VipAddr,
        /// Hash the client address only (client affinity).
        #[arg(long)]
        source_hash: bool,
        /// Health-check every backend with a TCP connect or an HTTP GET.
        #[arg(long, value_enum)]
        health: Option<CheckKind>,
        /// HTTP path to GET.
        #[arg(long, default_value = "/health")]
        health_path: String,
        /// Expected HTTP status.
        #[arg(long, default_value_t = 200)]
        health_status: u16,
        /// Port to probe [default: the VIP's].
        #[arg(long)]
        health_port: Option<u16>,
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        #[arg(long, default_value_t = 500)]
        timeout_ms: u64,
        /// Successes that bring a backend back.
        #[arg(long, default_value_t = 2)]
        rise: u32,
        /// Failures that take a backend out.
        #[arg(long, default_value_t = 3)]
        fall: u32,
    },
    /// Remove a VIP; its traffic goes to the kernel again.
    Remove { vip: VipAddr },
    /// List VIPs.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BackendCmd {
    /// Add a backend to a VIP.
    Add {
        vip: VipAddr,
        address: IpAddr,
        /// Relative weight, 0-65535.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=MAX_WEIGHT as i64))]
        weight: u32,
        /// Backend MAC; resolved from the neighbour table when omitted.
        #[arg(long)]
        mac: Option<Mac>,
    },
    /// Remove a backend; its flows are placed again.
    Remove { vip: VipAddr, address: IpAddr },
    /// List a VIP's backends (all VIPs when omitted).
    List {
        vip: Option<VipAddr>,
        #[arg(long)]
        json: bool,
    },
    /// Set a backend's weight (0-65535).
    Weight {
        vip: VipAddr,
        address: IpAddr,
        #[arg(value_parser = clap::value_parser!(u32).range(0..=MAX_WEIGHT as i64))]
        weight: u32,
    },
    /// Drain a backend: no new flows, established flows continue.
    Drain {
        vip: VipAddr,
        address: IpAddr,
        /// Take new flows again.
        #[arg(long)]
        undo: bool,
    },
}

/// Prints rows as aligned columns under `headers`.
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn backend_rows(vips: &[VipView]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for v in vips {
        for b in &v.backends {
            rows.push(vec![
                v.vip.to_string(),
                b.address.to_string(),
                b.weight.to_string(),
                if b.drained {
                    "draining".into()
                } else {
                    "active".into()
                },
                b.health.clone(),
                format!("{:.1}%", b.share_pct),
                b.mac.clone(),
                b.last_check.clone(),
            ]);
        }
    }
    rows
}

pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.socket);
    match cli.command {
        Top::Run(a) => {
            let state_file = a
                .state_file
                .unwrap_or_else(|| PathBuf::from(format!("/var/lib/xdp-lb/{}.json", a.iface)));
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
                },
                config: a.config,
                state_file,
                socket: cli.socket,
                bpffs: a.bpffs,
                metrics: a.metrics,
                keep_on_exit: a.keep_on_exit,
                fresh: a.fresh,
                interval: a.interval,
                duration: a.duration,
                json: a.json,
            };
            run::run(opts).await?;
        }
        Top::Vip(VipCmd::Add {
            vip,
            source_hash,
            health,
            health_path,
            health_status,
            health_port,
            interval_ms,
            timeout_ms,
            rise,
            fall,
        }) => {
            let health = health.map(|k| HealthCheck {
                kind: match k {
                    CheckKind::Tcp => HealthKind::Tcp,
                    CheckKind::Http => HealthKind::Http,
                },
                port: health_port,
                path: health_path,
                expect_status: health_status,
                interval_ms,
                timeout_ms,
                rise,
                fall,
            });
            client
                .command(&Command::AddVip {
                    vip,
                    source_hash,
                    health,
                })
                .await?;
            println!("added VIP {vip}");
        }
        Top::Vip(VipCmd::Remove { vip }) => {
            client.command(&Command::RemoveVip { vip }).await?;
            println!("removed VIP {vip}");
        }
        Top::Vip(VipCmd::List { json }) => {
            let vips: Vec<VipView> = client.get("/v1/vips").await?;
            if json {
                return print_json(&vips);
            }
            let rows = vips
                .iter()
                .map(|v| {
                    let serving = v.backends.iter().filter(|b| b.share_pct > 0.0).count();
                    vec![
                        v.vip.to_string(),
                        v.id.to_string(),
                        if v.source_hash {
                            "source".into()
                        } else {
                            "5-tuple".into()
                        },
                        v.health_check
                            .as_ref()
                            .map_or("none".into(), |h| format!("{:?}", h.kind).to_lowercase()),
                        format!("{serving}/{}", v.backends.len()),
                    ]
                })
                .collect::<Vec<_>>();
            print_table(&["VIP", "ID", "HASH", "HEALTH", "SERVING"], &rows);
        }
        Top::Backend(BackendCmd::Add {
            vip,
            address,
            weight,
            mac,
        }) => {
            client
                .command(&Command::AddBackend {
                    vip,
                    address,
                    weight,
                    mac,
                })
                .await?;
            println!("added backend {address} to {vip} (weight {weight})");
        }
        Top::Backend(BackendCmd::Remove { vip, address }) => {
            client
                .command(&Command::RemoveBackend { vip, address })
                .await?;
            println!("removed backend {address} from {vip}");
        }
        Top::Backend(BackendCmd::Weight {
            vip,
            address,
            weight,
        }) => {
            client
                .command(&Command::SetWeight {
                    vip,
                    address,
                    weight,
                })
                .await?;
            println!("backend {address} of {vip} now has weight {weight}");
        }
        Top::Backend(BackendCmd::Drain { vip, address, undo }) => {
            client
                .command(&Command::Drain {
                    vip,
                    address,
                    drained: !undo,
                })
                .await?;
            println!(
                "backend {address} of {vip} {}",
                if undo {
                    "takes new flows again"
                } else {
                    "is draining"
                }
            );
        }
        Top::Backend(BackendCmd::List { vip, json }) => {
            let mut vips: Vec<VipView> = client.get("/v1/vips").await?;
            if let Some(vip) = vip {
                vips.retain(|v| v.vip == vip);
                if vips.is_empty() {
                    anyhow::bail!("unknown VIP {vip}: see `lb vip list`");
                }
            }
            if json {
                return print_json(&vips);
            }
            print_table(
                &[
                    "VIP",
                    "BACKEND",
                    "WEIGHT",
                    "STATE",
                    "HEALTH",
                    "SHARE",
                    "MAC",
                    "LAST CHECK",
                ],
                &backend_rows(&vips),
            );
        }
        Top::Stats { watch, count, json } => stats(&client, watch, count, json).await?,
        Top::Trace {
            client: c,
            vip,
            json,
        } => {
            let t: Trace = client
                .get(&format!(
                    "/v1/trace?src={}&sport={}&vip={}",
                    encode_query(&c.ip().to_string()),
                    c.port(),
                    encode_query(&vip.to_string())
                ))
                .await?;
            if json {
                return print_json(&t);
            }
            let show = |a: Option<IpAddr>| a.map_or("-".to_string(), |a| a.to_string());
            print_table(
                &[
                    "VIP",
                    "VIP ID",
                    "SLOT",
                    "SLOT BACKEND",
                    "FLOW ENTRY",
                    "NEXT PACKET TO",
                ],
                &[vec![
                    t.vip.to_string(),
                    t.vip_id.to_string(),
                    t.slot.to_string(),
                    show(t.slot_backend),
                    show(t.flow_backend),
                    show(t.next_packet_to),
                ]],
            );
        }
        Top::Apply {
            file,
            dry_run,
            json,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let state = parse_config(&text).map_err(anyhow::Error::msg)?;
            let r = client.command(&Command::Apply { state, dry_run }).await?;
            if json {
                return print_json(&r);
            }
            print!("{}", plan::render(&r.plan));
            println!(
                "{}",
                if dry_run {
                    "dry run: nothing changed"
                } else {
                    "applied"
                }
            );
        }
        Top::XdpPass { iface } => {
            let tiny = LoadOptions {
                ring_size: 7,
                max_vips: 1,
                max_backends: 2,
                flow_entries: 1,
                ..LoadOptions::default()
            };
            let mut dp = lb_userspace::Dataplane::load(tiny)?;
            dp.attach_pass(&iface)?;
            println!("XDP_PASS attached to {iface}");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Top::Samples {
            count,
            base_port,
            bind,
            first_index,
            duration,
        } => {
            let addrs = samples::start(count, base_port, bind, first_index).await?;
            for (i, a) in addrs.iter().enumerate() {
                println!("backend {} listening on {a} (http, udp)", first_index + i);
            }
            match duration {
                Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                None => {
                    tokio::signal::ctrl_c().await?;
                }
            }
        }
    }
    Ok(())
}

async fn stats(client: &Client, watch: bool, count: Option<u64>, json: bool) -> anyhow::Result<()> {
    let mut prev: Option<StatsView> = None;
    let mut n = 0u64;
    loop {
        let s: StatsView = client.get("/v1/stats").await?;
        if json {
            println!("{}", serde_json::to_string(&s)?);
        } else {
            let rate = |now: u64, before: Option<u64>| {
                before.map_or(String::new(), |b| format!("{}/s", now.saturating_sub(b)))
            };
            let mut rows = Vec::new();
            for (k, c) in &s.global {
                let before = prev
                    .as_ref()
                    .and_then(|p| p.global.get(k))
                    .map(|c| c.packets);
                rows.push(vec![
                    k.clone(),
                    c.packets.to_string(),
                    c.bytes.to_string(),
                    rate(c.packets, before),
                ]);
            }
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            print_table(&["COUNTER", "PACKETS", "BYTES", "RATE"], &rows);
            println!();
            let mut rows = Vec::new();
            for v in &s.vips {
                let pv = prev
                    .as_ref()
                    .and_then(|p| p.vips.iter().find(|x| x.vip == v.vip));
                rows.push(vec![
                    v.vip.to_string(),
                    "-".into(),
                    v.packets.to_string(),
                    v.bytes.to_string(),
                    v.new_flows.to_string(),
                    rate(v.packets, pv.map(|x| x.packets)),
                ]);
                for b in &v.backends {
                    let pb = pv.and_then(|x| x.backends.iter().find(|y| y.address == b.address));
                    rows.push(vec![
                        String::new(),
                        b.address.to_string(),
                        b.packets.to_string(),
                        b.bytes.to_string(),
                        String::new(),
                        rate(b.packets, pb.map(|y| y.packets)),
                    ]);
                }
            }
            print_table(
                &["VIP", "BACKEND", "PACKETS", "BYTES", "NEW FLOWS", "RATE"],
                &rows,
            );
        }
        n += 1;
        if !watch || count.is_some_and(|c| n >= c) {
            break;
        }
        prev = Some(s);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("lb").chain(args.iter().copied()))
    }

    #[test]
    fn valid_commands_parse() {
        for args in [
            &[
                "run",
                "--iface",
                "eth0",
                "--mode",
                "generic",
                "--keep-on-exit",
            ][..],
            &[
                "vip",
                "add",
                "10.0.0.10:80/tcp",
                "--health",
                "http",
                "--rise",
                "3",
            ],
            &["vip", "add", "[2001:db8::10]:*/udp", "--source-hash"],
            &[
                "backend",
                "add",
                "10.0.0.10:80/tcp",
                "10.0.0.2",
                "--weight",
                "65535",
                "--mac",
                "02:00:00:00:00:02",
            ],
            &["backend", "weight", "10.0.0.10:80/tcp", "10.0.0.2", "0"],
            &["backend", "drain", "10.0.0.10:80/tcp", "10.0.0.2", "--undo"],
            &["trace", "192.0.2.1:5000", "10.0.0.10:80/tcp", "--json"],
            &["stats", "--watch", "--count", "2"],
            &["apply", "-f", "lb.toml", "--dry-run"],
            &["samples", "--count", "3", "--base-port", "8000"],
        ] {
            assert!(parse(args).is_ok(), "{args:?}: {:?}", parse(args).err());
        }
    }

    #[test]
    fn invalid_arguments_are_refused_with_the_reason() {
        for (args, why) in [
            (
                &[
                    "backend",
                    "add",
                    "10.0.0.10:80/tcp",
                    "10.0.0.2",
                    "--weight",
                    "65536",
                ][..],
                "65536",
            ),
            (
                &["backend", "add", "10.0.0.10:80", "10.0.0.2"],
                "missing /tcp",
            ),
            (
                &["backend", "add", "10.0.0.10:80/tcp", "10.0.0.300"],
                "invalid IP address",
            ),
            (
                &[
                    "backend",
                    "add",
                    "10.0.0.10:80/tcp",
                    "10.0.0.2",
                    "--mac",
                    "02:00",
                ],
                "invalid MAC",
            ),
            (&["vip", "add", "10.0.0.10:80/icmp"], "tcp or udp"),
            (&["run", "--iface", "eth0", "--mode", "turbo"], "turbo"),
            (
                &["trace", "192.0.2.1", "10.0.0.10:80/tcp"],
                "invalid socket address",
            ),
        ] {
            let err = parse(args).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(why), "{args:?}: {err}");
        }
    }
}
