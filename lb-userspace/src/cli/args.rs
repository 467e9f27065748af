//! The command line: argument definitions and their validation (pure, unit-tested).
use std::{net::IpAddr, net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use lb_userspace::{
    AttachMode,
    model::{BackendAddr, FlowLimit, Forward, MAX_WEIGHT, Mac, Prefix, VipAddr},
};

pub const DEFAULT_SOCKET: &str = "/run/xdp-lb/lb.sock";

/// A backend weight: a whole number 0-65535 (negative numbers get this message, not clap's
/// "unexpected argument" tip).
fn weight(s: &str) -> Result<u32, String> {
    match s.parse::<i64>() {
        Ok(w) if (0..=i64::from(MAX_WEIGHT)).contains(&w) => Ok(w as u32),
        Ok(w) => Err(format!("weight {w} is out of range: use 0-{MAX_WEIGHT}")),
        Err(_) => Err(format!(
            "`{s}` is not a weight: use a whole number 0-{MAX_WEIGHT}"
        )),
    }
}

/// A port range `LOW-HIGH`, 1 <= LOW <= HIGH.
fn port_range(s: &str) -> Result<(u16, u16), String> {
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
fn announce_min_serving(s: &str) -> Result<u32, String> {
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

#[derive(Args)]
pub struct RunArgs {
    /// Interface to attach to.
    #[arg(long)]
    pub iface: String,
    /// Attach mode; auto tries native, then generic.
    #[arg(long, value_enum, default_value_t = AttachMode::Native)]
    pub mode: AttachMode,
    /// TOML config applied at start (replaces the saved state).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// State file [default: /var/lib/xdp-lb/IFACE.json].
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// bpffs mount point for the pinned maps and link (mounted if needed).
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Serve Prometheus metrics on this address (read-only), e.g. 127.0.0.1:9100.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Slot-table size M (a prime).
    #[arg(long, default_value_t = lb_common::DEFAULT_RING_SIZE)]
    pub ring_size: u32,
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_VIPS)]
    pub max_vips: u32,
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_BACKENDS)]
    pub max_backends: u32,
    #[arg(long, default_value_t = lb_common::DEFAULT_FLOW_ENTRIES)]
    pub flow_entries: u32,
    /// Flow-hash seed: nodes with the same seed and tables pick the same backends.
    #[arg(long, default_value_t = lb_common::LbConfig::DEFAULT.hash_seed)]
    pub hash_seed: u64,
    /// Per-CPU LRU lists for the flow table (many-core NICs).
    #[arg(long)]
    pub per_cpu_flows: bool,
    /// `off`: no flow table; every packet is placed by the live slot table (stateless: no
    /// eviction, no SYN-flood table pressure, cheapest new flows; a table change moves the
    /// flows of the slots that change).
    #[arg(long, value_parser = ["on", "off"], default_value = "on")]
    pub flow_table: String,
    /// Slots per CPU of the flow cache in front of the flow table (a power of two; 0: none).
    /// A busy flow's packets are decided there, and meet the flow table at least once a second.
    #[arg(long, default_value_t = lb_common::DEFAULT_FLOW_CACHE_SLOTS)]
    pub flow_cache_slots: u32,
    /// Seconds a TCP flow keeps its backend after a FIN once it goes quiet.
    #[arg(long, default_value_t = lb_common::DEFAULT_FIN_GRACE_S)]
    pub fin_grace: u32,
    /// UDP port of GUE packets (backends' `lb decap --gue-port` must match).
    #[arg(long, default_value_t = lb_common::DEFAULT_GUE_PORT)]
    pub gue_port: u16,
    /// NAT source ports, LOW-HIGH (kept apart from the kernel's ephemeral ports, so the load
    /// balancer's own connections never meet a NAT port).
    #[arg(long, value_name = "LOW-HIGH", default_value = "1024-32767", value_parser = port_range)]
    pub nat_ports: (u16, u16),
    /// NAT connections the tables hold (established, and closed ones keeping their port);
    /// a quarter more is kept for half-open ones. Each connection takes two hash entries,
    /// about 360 bytes of kernel memory: about 360 MB per million.
    #[arg(long, default_value_t = lb_common::DEFAULT_NAT_ENTRIES)]
    pub nat_entries: u32,
    /// Seconds a NAT connection whose handshake is not complete (or a UDP flow not yet
    /// answered) lives without a packet.
    #[arg(long, value_name = "SECONDS", default_value_t = lb_common::DEFAULT_NAT_HALF_OPEN_S)]
    pub nat_half_open: u32,
    /// Seconds an established NAT'ed TCP connection lives without a packet (UDP: the VIP's
    /// `udp_idle`).
    #[arg(long, value_name = "SECONDS", default_value_t = lb_common::DEFAULT_NAT_TCP_IDLE_S)]
    pub nat_tcp_idle: u32,
    /// Seconds a NAT port stays held after a close that leaves the backend no TIME_WAIT
    /// (the client closed first and acknowledged the backend's FIN, or a RST); a backend
    /// that closes first holds it 70 s.
    #[arg(long, value_name = "SECONDS", default_value_t = lb_common::DEFAULT_NAT_GRACE_S)]
    pub nat_close_grace: u32,
    /// Percent of the NAT half-open slots one client address may hold.
    #[arg(long, value_name = "PERCENT", default_value_t = lb_common::DEFAULT_NAT_HALF_SHARE_PCT)]
    pub nat_half_open_share: u32,
    /// Source address of encapsulated and NAT'ed packets (one per family) [default: the
    /// interface's first global address of that family]. Backends answer NAT'ed packets to
    /// it: it must route back to this interface.
    #[arg(long = "encap-source", value_name = "ADDR")]
    pub encap_source: Vec<IpAddr>,
    /// A NAT source address (repeatable, up to 4 per family): NAT'ed connections leave
    /// from these instead of the encapsulation source of their family, each from one picked
    /// at random, and ports are per (address, backend), so each address adds a port range.
    /// Backends answer to them: each must route back to this interface (e.g. held on it as
    /// a /32 or /128), and none may be a VIP.
    #[arg(long = "nat-source", value_name = "ADDR")]
    pub nat_source: Vec<IpAddr>,
    /// IPIP only: take each flow's outer source from this prefix (an IPv4 /16 or an IPv6
    /// /64, e.g. 172.31.0.0/16), so the backends' RSS spreads flows (Katran's trick). The
    /// routers between must accept these sources.
    #[arg(long = "ipip-source-prefix", value_name = "PREFIX", value_parser = source_prefix)]
    pub ipip_source_prefix: Vec<IpAddr>,
    /// Keep forwarding after exit (maps and link stay pinned), for restarts and upgrades.
    #[arg(long)]
    pub keep_on_exit: bool,
    /// Discard pinned maps and link of this interface before starting.
    #[arg(long)]
    pub fresh: bool,
    /// Seconds between counter lines (0: only at exit).
    #[arg(long, default_value_t = 0)]
    pub interval: u64,
    /// Exit by itself after this many seconds.
    #[arg(long)]
    pub duration: Option<u64>,
    /// Counter lines as JSON.
    #[arg(long)]
    pub json: bool,
    /// A prefix VIPs may use on this node (repeatable), e.g. 192.0.2.0/24: a VIP outside
    /// every pool is refused, from the CLI, `apply`, an import or the store. Required with
    /// `--store` (the store is not trusted to choose addresses); without it and without
    /// `--store`, any address that is not the node's own.
    #[arg(long = "vip-prefix", value_name = "PREFIX")]
    pub vip_prefix: Vec<Prefix>,
    /// Fleet mode: take the desired state from etcd (etcd://HOST:PORT[,HOST:PORT...], or
    /// https://... for TLS); `vip`, `backend` and `apply` then write there and every node
    /// applies them.
    #[arg(long, value_name = "URL", requires = "cluster")]
    pub store: Option<String>,
    /// TLS store: the CA (PEM) that signed etcd's certificate; required with https://.
    #[arg(long, value_name = "FILE", requires = "store")]
    pub store_ca: Option<PathBuf>,
    /// TLS store: this node's client certificate (PEM), when etcd checks clients.
    #[arg(long, value_name = "FILE", requires_all = ["store", "store_key"])]
    pub store_cert: Option<PathBuf>,
    /// TLS store: the client certificate's private key (PEM; mode 600 or stricter).
    #[arg(long, value_name = "FILE", requires_all = ["store", "store_cert"])]
    pub store_key: Option<PathBuf>,
    /// etcd user name (etcd's authentication; its role grants the cluster's prefix).
    #[arg(long, value_name = "NAME", requires_all = ["store", "store_password_file"])]
    pub store_user: Option<String>,
    /// File holding the etcd user's password on one line (mode 600 or stricter; never on
    /// the command line, where every local user sees it).
    #[arg(long, value_name = "FILE", requires_all = ["store", "store_user"])]
    pub store_password_file: Option<PathBuf>,
    /// Fleet mode: the cluster's name (its keys live under /xdp-lb/NAME/).
    #[arg(long, value_name = "NAME", requires = "store")]
    pub cluster: Option<String>,
    /// Fleet mode: this node's name in `lb cluster status` [default: the host name].
    #[arg(long, value_name = "NAME", requires = "store")]
    pub node: Option<String>,
    /// Announce VIPs by BGP: keep one route per announceable VIP address in this kernel
    /// routing table (1-4294967295, not main/local/default), which the BGP speaker exports
    /// (see packaging/bird/bird.conf).
    #[arg(long, value_name = "N", value_parser = announce_table)]
    pub announce_table: Option<u32>,
    /// A VIP is announced only while at least this many of its backends serve.
    #[arg(long, value_name = "N", default_value_t = 1, requires = "announce_table",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub announce_min_serving: u32,
    /// Seconds a withdrawn VIP must qualify again before it is announced again (a flapping
    /// backend costs one withdrawal and one announcement).
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0, requires = "announce_table", value_parser = seconds)]
    pub announce_hold_down: f64,
    /// Seconds `lb node drain` announces with the GRACEFUL_SHUTDOWN community before it
    /// withdraws.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 30,
        requires = "announce_table"
    )]
    pub drain_time: u64,
    /// The BGP speaker's control socket (bird), read for `lb node status`, `/metrics` and the
    /// status page.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/bird/bird.ctl",
        requires = "announce_table"
    )]
    pub bgp_socket: PathBuf,
}

fn announce_table(s: &str) -> Result<u32, String> {
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

fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a number of seconds from 0 to 3600")),
    }
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

/// A duration in whole seconds: a number with an optional unit (s, m, h, d). The four units
/// an operator types for a block are all this needs; none of the tree's crates parses them.
fn duration_s(s: &str) -> Result<u64, String> {
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
            &[
                "vip",
                "add",
                "10.0.0.10:80/tcp",
                "--announce-min-serving",
                "65535",
            ],
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
                "not an IPv4 or IPv6 address",
            ),
            (
                &["backend", "add", "10.0.0.10:80/tcp", "10.0.0.2:0"],
                "port must be 1-65535",
            ),
            (
                &[
                    "backend",
                    "add",
                    "10.0.0.10:80/tcp",
                    "10.0.0.2",
                    "--weight",
                    "-5",
                ],
                "weight -5 is out of range",
            ),
            (
                &["backend", "weight", "10.0.0.10:80/tcp", "10.0.0.2", "-1"],
                "out of range",
            ),
            (&["vip", "add", "2001:db8::50:80/tcp"], "needs brackets"),
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
            (
                &[
                    "vip",
                    "add",
                    "10.0.0.10:80/tcp",
                    "--announce-min-serving",
                    "0",
                ],
                "`0` is not a backend count: use a whole number 1-65535",
            ),
            (
                &[
                    "vip",
                    "add",
                    "10.0.0.10:80/tcp",
                    "--announce-min-serving",
                    "65536",
                ],
                "`65536` is not a backend count",
            ),
        ] {
            let err = parse(args).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(why), "{args:?}: {err}");
        }
    }
}
