//! `lb run`'s arguments: the agent's interface, state, load-time options and announcement.
//! Its own module because it holds most of the command line's options.
use std::{net::IpAddr, net::SocketAddr, path::PathBuf};

use clap::Args;
use lb_userspace::{AttachMode, model::Prefix};

use super::values::{announce_table, port_range, seconds, source_prefix};

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
