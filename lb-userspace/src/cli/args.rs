//! The command line: argument definitions and their validation (pure, unit-tested).
//!
//! `args.rs` holds the top level (`Cli`, `Top`) and the small subcommands; `args/run.rs`
//! `lb run`'s options, `args/state.rs` the VIP, backend and deny commands, `args/values.rs`
//! the value parsers.
mod run;
mod state;
#[cfg(test)]
mod tests;
mod values;

use std::{net::IpAddr, net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};
use lb_userspace::model::VipAddr;

pub use self::run::RunArgs;
pub use self::state::{BackendCmd, CheckKind, DenyCmd, VipCmd};

pub const DEFAULT_SOCKET: &str = "/run/xdp-lb/lb.sock";

/// `lb --version`: the release, the commit it was built from, and the map ABI version (pins
/// made by a build with another ABI are refused, see `lb run`).
pub static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (commit {}, map ABI {})",
        env!("CARGO_PKG_VERSION"),
        env!("LB_GIT_REV"),
        lb_common::ABI_VERSION
    )
});

#[derive(Parser)]
#[command(
    name = "lb",
    version = VERSION.as_str(),
    about = "Layer-4 load balancer on eBPF/XDP: Maglev consistent hashing, L2 direct server return",
    long_about = "Layer-4 load balancer on eBPF/XDP.\n\n`lb run` attaches the XDP program to an interface and serves a control API on a unix socket; the other commands talk to it.\n\nExample:\n  lb run --iface eth0 &\n  lb vip add 10.0.0.10:80/tcp --health http --health-path /health\n  lb backend add 10.0.0.10:80/tcp 10.0.0.2 --weight 100\n  lb stats --watch"
)]
pub struct Cli {
    /// Control socket of the agent.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET, env = "LB_SOCKET")]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Top,
}

#[derive(Subcommand)]
pub enum Top {
    /// Run the agent: load and attach the XDP program, serve the API, run health checks.
    Run(Box<RunArgs>),
    /// Add, remove or list VIPs.
    #[command(subcommand)]
    Vip(VipCmd),
    /// Add, remove, list, reweight or drain a VIP's backends.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// The node-wide deny list: sources no VIP serves, new or established.
    #[command(subcommand)]
    Deny(DenyCmd),
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
        /// Instead: the ten sources the guard dropped most in the last minute (sampled).
        #[arg(long, conflicts_with_all = ["watch", "count"])]
        top_sources: bool,
    },
    /// Show the VIP, slot, backend and flow-table entry a packet would meet.
    Trace {
        /// Client address and port, e.g. 192.0.2.7:40000 or [2001:db8::7]:40000.
        client: SocketAddr,
        /// The VIP, e.g. 10.0.0.10:80/tcp.
        vip: VipAddr,
        /// Destination port of the packet: required for an every-port VIP (`ADDR:*/tcp`).
        #[arg(long)]
        dport: Option<u16>,
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
        /// Fleet mode: apply only if the configuration is still at this revision (the one the
        /// dry run printed); otherwise refuse with a conflict.
        #[arg(long, value_name = "REV")]
        if_revision: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Translate another load balancer's configuration into ours.
    #[command(subcommand)]
    Import(ImportCmd),
    /// Fleet mode: every node's applied revision, slot-table digests and health, side by
    /// side, with any divergence flagged.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// BGP announcement of this node: drain, undrain, status.
    #[command(subcommand)]
    Node(NodeCmd),
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
    /// Read the kernel maps again and bring them in line with the desired state.
    Reconcile,
    /// Print a shell completion script: `lb completions bash > /etc/bash_completion.d/lb`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (lb.1 and one per subcommand, roff) into DIR; `cargo xtask man`
    /// writes them to target/man.
    #[command(hide = true)]
    Man {
        #[arg(long)]
        out: PathBuf,
    },
    /// Detach a stopped agent's program and discard its pinned maps (after `lb run
    /// --keep-on-exit`, e.g. the systemd unit): forwarding on IFACE stops. Refused while an
    /// agent runs on it.
    Detach {
        #[arg(long)]
        iface: String,
        /// bpffs mount point the agent pinned under.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// Upgrades: an upgrade is the new build's normal start on the same pins (`lb run`, or
    /// the service's restart), which migrates maps of the previous map ABI in place. `--check`
    /// says beforehand what that start would do with the pins on IFACE: adopt, migrate (each
    /// map's rule, the entries to copy, the time and memory it takes) or refuse, and why.
    Upgrade {
        /// Only say what a start would do; change nothing.
        #[arg(long)]
        check: bool,
        #[arg(long)]
        iface: String,
        /// bpffs mount point the agent pinned under.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// Backend side of ipip/gue VIPs: attach the decapsulation program (it stays attached),
    /// show its counters, print the backend's setup, or detach it.
    Decap(super::decap::DecapArgs),
    /// Capture what the XDP program saw and decided (each packet as it arrived and, with
    /// --both, as it left, with its verdict, reason, VIP and backend) as pcapng.
    Capture(Box<super::capture::CaptureArgs>),
    /// Attach the trivial XDP_PASS program to an interface until stopped: native-mode
    /// XDP_TX on a veth is only delivered when its peer runs XDP.
    XdpPass {
        #[arg(long)]
        iface: String,
    },
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Announce this node's VIPs with the GRACEFUL_SHUTDOWN community, then withdraw them;
    /// the node keeps forwarding what reaches it. Kept across agent restarts.
    Drain {
        /// Seconds before the withdrawal [default: lb run's --drain-time].
        #[arg(long, value_name = "SECONDS")]
        withdraw_after: Option<u64>,
    },
    /// Announce this node's VIPs again (those that can serve).
    Undrain,
    /// What this node announces and why, and its BGP sessions.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ImportCmd {
    /// nginx `upstream` blocks and the `server` blocks that proxy_pass to them: prints our
    /// config file (notes on stderr), or applies it with --apply (showing the plan).
    Nginx {
        /// The nginx configuration file.
        file: PathBuf,
        /// Use ADDR for host NAME instead of resolving it (e.g. localhost=10.0.0.2).
        #[arg(long = "map-host", value_name = "NAME=ADDR", value_parser = lb_userspace::import::nginx::map_host)]
        map_host: Vec<(String, IpAddr)>,
        /// The VIP address for `listen PORT` without one.
        #[arg(long, value_name = "ADDR")]
        vip_address: Option<IpAddr>,
        /// How the VIPs reach the backends: l2, ipip, gue or nat (nat is chosen by itself
        /// when backend ports differ from the VIP's).
        #[arg(long, default_value = "l2")]
        forward: lb_userspace::model::Forward,
        /// Make it the desired state (through the agent; the plan is shown).
        #[arg(long)]
        apply: bool,
        /// With --apply: show the plan only.
        #[arg(long, requires = "apply")]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Show every live node of the cluster.
    Status {
        #[arg(long)]
        json: bool,
    },
}
