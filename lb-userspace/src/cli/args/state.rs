//! The desired state's commands: `lb vip`, `lb backend` and the deny list (`lb deny`).
use clap::{Subcommand, ValueEnum};
use lb_userspace::model::{BackendAddr, FlowLimit, Forward, Mac, Prefix, VipAddr};

use super::values::{announce_min_serving, duration_s, weight};

#[derive(Clone, Copy, ValueEnum)]
pub enum CheckKind {
    Tcp,
    Http,
}

#[derive(Subcommand)]
pub enum VipCmd {
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
        /// Seconds a UDP flow keeps its backend without a datagram (1-86400).
        #[arg(long, default_value_t = lb_common::DEFAULT_UDP_IDLE_S)]
        udp_idle: u32,
        /// How packets reach the backends: l2 (MAC rewrite, same segment), ipip or gue
        /// (encapsulated to backends behind routers, which run `lb decap`), or nat
        /// (addresses and ports translated both ways; backends on any port, anywhere).
        #[arg(long, default_value = "l2")]
        forward: Forward,
        /// Second chance (gue only): seconds each of a slot's previous backends (up to
        /// three) is carried after it lost the slot, so connections survive table changes
        /// [default: 300; 0: off].
        #[arg(long, value_name = "SECS")]
        second_chance: Option<u32>,
        /// Serve only sources in this prefix (repeatable; without it, every source).
        #[arg(long = "allow-source", value_name = "PREFIX")]
        allow_sources: Vec<Prefix>,
        /// Never serve sources in this prefix (repeatable; a deny wins over an allow).
        #[arg(long = "deny-source", value_name = "PREFIX")]
        deny_sources: Vec<Prefix>,
        /// New flows (SYNs, first UDP datagrams) the VIP takes per second on this node, with
        /// a burst [default burst: the rate]; over it, a new flow's first packet is dropped.
        #[arg(long, value_name = "RATE[/BURST]")]
        new_flow_limit: Option<FlowLimit>,
        /// New flows each source (a /32, an IPv6 /64) opens at the VIP per second.
        #[arg(long, value_name = "RATE[/BURST]")]
        source_limit: Option<FlowLimit>,
        /// Announce the VIP by BGP only while at least this many of its backends serve
        /// (1-65535) [default: lb run's --announce-min-serving].
        #[arg(long, value_name = "N", value_parser = announce_min_serving)]
        announce_min_serving: Option<u32>,
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
pub enum DenyCmd {
    /// Deny sources in these prefixes on every VIP of this node, at once.
    Add {
        #[arg(required_unless_present = "file", value_name = "PREFIX")]
        prefixes: Vec<Prefix>,
        /// End the deny after this long (SECS, or with s, m, h or d: 90s, 10m, 1h, 7d).
        #[arg(long, value_name = "DURATION", value_parser = duration_s)]
        expires: Option<u64>,
        /// Also the prefixes in FILE, one a line (blank lines and `#` comments skipped), sent
        /// as one change.
        #[arg(long, value_name = "FILE")]
        file: Option<std::path::PathBuf>,
    },
    /// Remove prefixes from the deny list.
    Remove {
        #[arg(required = true, value_name = "PREFIX")]
        prefixes: Vec<Prefix>,
    },
    /// List the deny list (ended entries left out).
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum BackendCmd {
    /// Add a backend to a VIP.
    Add {
        vip: VipAddr,
        /// ADDRESS or ADDRESS:PORT ([IPv6]:PORT); a port other than the VIP's needs
        /// `--forward nat`.
        address: BackendAddr,
        /// Relative weight, 0-65535.
        #[arg(long, default_value_t = 100, allow_negative_numbers = true, value_parser = weight)]
        weight: u32,
        /// Backend MAC; resolved from the neighbour table when omitted.
        #[arg(long)]
        mac: Option<Mac>,
    },
    /// Remove a backend; its flows are placed again.
    Remove { vip: VipAddr, address: BackendAddr },
    /// List a VIP's backends (all VIPs when omitted).
    List {
        vip: Option<VipAddr>,
        #[arg(long)]
        json: bool,
    },
    /// Set a backend's weight (0-65535).
    Weight {
        vip: VipAddr,
        address: BackendAddr,
        #[arg(allow_negative_numbers = true, value_parser = weight)]
        weight: u32,
    },
    /// Drain a backend: no new flows, established flows continue.
    Drain {
        vip: VipAddr,
        address: BackendAddr,
        /// Take new flows again.
        #[arg(long)]
        undo: bool,
    },
}
