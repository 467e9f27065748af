//! `lb`: the XDP load balancer's agent and CLI.
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_userspace::{AttachMode, Dataplane, LoadOptions};

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "Layer-4 load balancer accelerated by eBPF/XDP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program, attach it to an interface and print its counters until Ctrl-C.
    Run {
        /// Interface to attach to.
        #[arg(long)]
        iface: String,
        /// Attach mode.
        #[arg(long, value_enum, default_value_t = AttachMode::Native)]
        mode: AttachMode,
        /// Seconds between counter reports (0 = only at exit).
        #[arg(long, default_value_t = 1)]
        interval: u64,
        /// Exit by itself after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
        /// Print counters as JSON lines.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    if let Err(err) = run(cli) {
        eprintln!("lb: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            iface,
            mode,
            interval,
            duration,
            json,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(run_agent(iface, mode, interval, duration, json))
        }
    }
}

async fn run_agent(
    iface: String,
    mode: AttachMode,
    interval: u64,
    duration: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let mut dp = Dataplane::load(LoadOptions::default())?;
    let used = dp.attach(&iface, mode)?;
    println!("attached to {iface} in {} mode", used.as_str());
    let start = Instant::now();
    let deadline = duration.map(|d| start + Duration::from_secs(d));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let tick = Duration::from_secs(interval.max(1));
    loop {
        let sleep = match deadline {
            Some(d) => tick.min(d.saturating_duration_since(Instant::now())),
            None => tick,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = tokio::time::sleep(sleep) => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if interval > 0 {
            print_stats(&dp, json)?;
        }
    }
    print_stats(&dp, json)?;
    println!("detached from {iface}");
    Ok(())
}

fn print_stats(dp: &Dataplane, json: bool) -> anyhow::Result<()> {
    let stats = dp.stats.global()?;
    if json {
        println!("{}", serde_json::to_string(&stats)?);
    } else {
        let line: Vec<String> = stats
            .0
            .iter()
            .filter(|(_, c)| c.packets > 0)
            .map(|(k, c)| format!("{k}={}", c.packets))
            .collect();
        println!(
            "counters: {}",
            if line.is_empty() {
                "(none)".into()
            } else {
                line.join(" ")
            }
        );
    }
    Ok(())
}
