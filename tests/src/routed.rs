//! A routed network for encapsulation: the client and the backends are in different subnets
//! from the load balancer, all joined by one router namespace.
//!
//! ```text
//!   client 10.20.0.2 ──── router ──── lb eth0 10.30.0.2   (VIPs routed here)
//!                          │  └────── lb eth1 10.31.0.2   (backend subnets routed there)
//!                          ├── backend 1  10.41.0.2, fd00:41::2 (on bk1)
//!                          ├── backend 2  10.42.0.2, fd00:42::2
//!                          └── backend 3  10.43.0.2, fd00:43::2
//! ```
//! Every link has an IPv6 twin (`fd00:N::/64`). The load balancer receives on `eth0` and
//! sends encapsulated packets out of `eth1` (XDP_REDIRECT through the devmap); backends answer
//! clients directly through the router. Backends hold every VIP on `lo`; each runs a sample
//! HTTP server on port 80, and `lb decap` where a test asks for it.

use anyhow::Context as _;

use crate::{
    agent::AgentDir,
    net::{Netns, VethPair},
    proc::ChildGuard,
};

/// VIPs the backends hold on `lo`.
pub const VIP4: &str = "10.0.0.10";
pub const VIP6: &str = "2001:db8::10";
/// An IPv4 VIP served by IPv6 backends.
pub const VIP_MIXED: &str = "10.0.0.11";
pub const CLIENT4: &str = "10.20.0.2";

/// Who the backends trust to send them tunnels (`lb decap --trusted-source`): the load
/// balancers (their encapsulation source, eth0's address 10.30.K.2 / fd00:30::2 /
/// fd00:30:K::2, and their sending side eth1, 10.31.K.2 and the like, also the fixtures' load
/// balancer in [`FibNs`]) and the peer backends second chance forwards from (10.4I.0.2,
/// fd00:4I::2). Not the client's or any other subnet.
pub const TRUSTED: [&str; 10] = [
    "10.30.0.0/16",
    "fd00:30::/32",
    "10.31.0.0/16",
    "fd00:31::/32",
    "10.41.0.0/24",
    "10.42.0.0/24",
    "10.43.0.0/24",
    "fd00:41::/64",
    "fd00:42::/64",
    "fd00:43::/64",
];

/// Fills a freshly loaded decap object's trusted senders with [`TRUSTED`] (what `lb decap`
/// does from its `--trusted-source` flags).
pub fn trust_routed(ebpf: &mut aya::Ebpf) -> anyhow::Result<()> {
    let set = TRUSTED
        .iter()
        .map(|p| lb_userspace::decap::parse_trusted(p).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    lb_userspace::decap::set_trusted(ebpf, &set)?;
    Ok(())
}

pub fn backend4(i: usize) -> String {
    format!("10.4{i}.0.2")
}

pub fn backend6(i: usize) -> String {
    format!("fd00:4{i}::2")
}

/// Backend `i`'s interface.
pub fn backend_dev(i: usize) -> String {
    format!("bk{i}")
}

/// The network; everything is removed on drop (processes first).
pub struct Routed {
    /// Agent, samples, decap and XDP_PASS helpers: dropped first.
    pub procs: Vec<ChildGuard>,
    pub agent: Option<ChildGuard>,
    pub dir: AgentDir,
    pub links: Vec<VethPair>,
    pub client: Netns,
    pub router: Netns,
    pub lb: Netns,
    /// Backends 1..=3 at index 0..3.
    pub backends: Vec<Netns>,
    /// The router's end of lb's eth1 (the MTU tests lower it).
    pub router_to_lb_out: String,
    /// The router's ends of the backends' links (index 0 for backend 1).
    pub router_to_backends: Vec<String>,
    /// Load balancers 2.. of a fleet (`Routed::fleet`); `lb`, `dir` and `agent` are the first.
    pub more: Vec<LbNode>,
}

/// One more load balancer node of a fleet: node `k` (from 1) has eth0 10.30.k.2 and eth1
/// 10.31.k.2 (IPv6 fd00:30:k::2, fd00:31:k::2).
pub struct LbNode {
    pub agent: Option<ChildGuard>,
    pub dir: AgentDir,
    pub ns: Netns,
}

fn veth_named(a: &Netns, a_name: &str, b: &Netns) -> anyhow::Result<String> {
    let peer = crate::net::unique_name("r");
    crate::net::ip(&[
        "link",
        "add",
        a_name,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        &peer,
        "netns",
        b.name(),
    ])?;
    Ok(peer)
}

/// Adds `v4`/24 and `v6`/64 to `dev` in `ns` and brings it up.
fn addrs(ns: &Netns, dev: &str, v4: &str, v6: &str) -> anyhow::Result<()> {
    ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
    ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
    ns.ip(&["link", "set", dev, "up"])
}

impl Routed {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        Self::fleet(tag, 1)
    }

    /// The network with `nodes` load balancers. With more than one the router has no route
    /// to the VIPs of its own: it learns them from the nodes over BGP ([`crate::bgp`], started
    /// by [`crate::fleet::Fleet`] or [`crate::fleet::Bgp::start`]) and spreads VIP traffic
    /// over them by ECMP (L4 hash).
    pub fn fleet(tag: &str, nodes: usize) -> anyhow::Result<Self> {
        let client = Netns::new(&format!("{tag}c"))?;
        let router = Netns::new(&format!("{tag}r"))?;
        let lb = Netns::new(&format!("{tag}l"))?;
        let mut backends = Vec::new();
        for i in 1..=3 {
            backends.push(Netns::new(&format!("{tag}b{i}"))?);
        }
        let dir = AgentDir::new(&format!("{tag}-agent"))?;
        let mut more = Vec::new();
        for k in 1..nodes {
            more.push(LbNode {
                agent: None,
                dir: AgentDir::new(&format!("{tag}a{k}"))?,
                ns: Netns::new(&format!("{tag}l{k}"))?,
            });
        }
        let mut net = Routed {
            procs: Vec::new(),
            agent: None,
            dir,
            links: Vec::new(),
            client,
            router,
            lb,
            backends,
            router_to_lb_out: String::new(),
            router_to_backends: Vec::new(),
            more,
        };
        net.wire().context("building the routed network")?;
        Ok(net)
    }

    fn wire(&mut self) -> anyhow::Result<()> {
        let r = &self.router;
        for key in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] {
            r.sysctl(key, "1")?;
        }
        r.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        r.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        r.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
        r.sysctl("net.ipv4.conf.default.send_redirects", "0")?;
        // Client.
        let rc = veth_named(&self.client, "eth0", r)?;
        addrs(&self.client, "eth0", "10.20.0.2", "fd00:20::2")?;
        addrs(r, &rc, "10.20.0.1", "fd00:20::1")?;
        self.client
            .ip(&["route", "add", "default", "via", "10.20.0.1"])?;
        self.client
            .ip(&["-6", "route", "add", "default", "via", "fd00:20::1"])?;
        // Checksums complete on the client's packets (they cross XDP on a veth).
        self.client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
        // Load balancers: eth0 receives, eth1 sends to the backends.
        let mut router_ends = Vec::new();
        let nodes: Vec<&Netns> = std::iter::once(&self.lb)
            .chain(self.more.iter().map(|n| &n.ns))
            .collect();
        for (k, l) in nodes.iter().enumerate() {
            router_ends.push(wire_lb(r, l, k)?);
        }
        if nodes.len() == 1 {
            // The router sends VIP traffic to the load balancer.
            r.ip(&["route", "add", "10.0.0.0/24", "via", "10.30.0.2"])?;
            r.ip(&["-6", "route", "add", "2001:db8::/64", "via", "fd00:30::2"])?;
        } else {
            // ECMP by L4 hash over the routes BGP installs.
            r.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
            r.sysctl("net.ipv6.fib_multipath_hash_policy", "1")?;
        }
        self.router_to_lb_out = router_ends[0].1.clone();
        // Backends.
        for (n, b) in self.backends.iter().enumerate() {
            let i = n + 1;
            // Named apart: the backends share one bpffs in tests, and decap pins by name.
            let dev = backend_dev(i);
            let rb = veth_named(b, &dev, r)?;
            self.router_to_backends.push(rb.clone());
            addrs(b, &dev, &backend4(i), &backend6(i))?;
            addrs(r, &rb, &format!("10.4{i}.0.1"), &format!("fd00:4{i}::1"))?;
            b.ip(&["route", "add", "default", "via", &format!("10.4{i}.0.1")])?;
            b.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:4{i}::1"),
            ])?;
            for vip in [VIP4, VIP_MIXED] {
                b.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
            }
            b.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo"])?;
            for dev in ["all", dev.as_str()] {
                b.sysctl(&format!("net.ipv4.conf.{dev}.arp_ignore"), "1")?;
                b.sysctl(&format!("net.ipv4.conf.{dev}.arp_announce"), "2")?;
                b.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "2")?;
            }
        }
        // Native XDP_TX (eth0) and redirects into eth1 are delivered only when the router's
        // ends run XDP.
        for (r_in, r_out) in router_ends {
            for dev in [r_in, r_out] {
                self.xdp_pass_on_router(&dev)?;
            }
        }
        Ok(())
    }

    /// Starts the agent of node `k` (0: the first) on its eth0.
    pub fn start_agent_at(&mut self, k: usize, extra: &[&str]) -> anyhow::Result<()> {
        if k == 0 {
            return self.start_agent(extra);
        }
        let mut args = vec!["--mode", "native"];
        args.extend_from_slice(extra);
        let n = &mut self.more[k - 1];
        n.agent = Some(n.dir.spawn_agent(&n.ns, "eth0", &args)?);
        Ok(())
    }

    /// `lb ...` against node `k`'s agent.
    pub fn lb_at(&self, k: usize, args: &[&str]) -> anyhow::Result<String> {
        if k == 0 {
            self.dir.cli_ok(args)
        } else {
            self.more[k - 1].dir.cli_ok(args)
        }
    }

    /// Node `k`'s agent directory (socket, state file, pins).
    pub fn dir_at(&self, k: usize) -> &AgentDir {
        if k == 0 {
            &self.dir
        } else {
            &self.more[k - 1].dir
        }
    }

    /// Takes node `k`'s running agent (to kill or stop it); `None` when none runs.
    pub fn take_agent_at(&mut self, k: usize) -> Option<ChildGuard> {
        if k == 0 {
            self.agent.take()
        } else {
            self.more[k - 1].agent.take()
        }
    }

    /// The number of load balancer nodes.
    pub fn nodes(&self) -> usize {
        1 + self.more.len()
    }

    /// XDP on the router's ends of the backends' links: needed for the backends' own native
    /// XDP_TX (second chance sends packets on from a backend's decap program).
    pub fn xdp_pass_to_backends(&mut self) -> anyhow::Result<()> {
        for dev in self.router_to_backends.clone() {
            self.xdp_pass_on_router(&dev)?;
        }
        Ok(())
    }

    fn xdp_pass_on_router(&mut self, dev: &str) -> anyhow::Result<()> {
        let child = crate::proc::xdp_pass(&self.router, dev)?;
        self.procs.push(child);
        Ok(())
    }

    /// One more host on the router, IPv4 only: `10.{net}.0.2/24` on its `eth0`, the router's
    /// end `10.{net}.0.1`. Neither end has IPv6, so nothing but what is sent to the host (no
    /// neighbour discovery, no MLD) reaches its link: its receive counter can be read as
    /// "was anything sent here". Outside [`TRUSTED`] (a stranger to the backends).
    pub fn add_host(&self, tag: &str, net: u8) -> anyhow::Result<Netns> {
        let host = Netns::new(tag)?;
        host.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        host.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        let peer = veth_named(&host, "eth0", &self.router)?;
        self.router
            .sysctl(&format!("net.ipv6.conf.{peer}.disable_ipv6"), "1")?;
        host.ip(&["addr", "add", &format!("10.{net}.0.2/24"), "dev", "eth0"])?;
        host.ip(&["link", "set", "eth0", "up"])?;
        self.router
            .ip(&["addr", "add", &format!("10.{net}.0.1/24"), "dev", &peer])?;
        self.router.ip(&["link", "set", &peer, "up"])?;
        host.ip(&["route", "add", "default", "via", &format!("10.{net}.0.1")])?;
        Ok(host)
    }

    /// Starts a sample HTTP backend on port 80 (both families) in backend `i` (1..=3).
    pub fn start_sample(&mut self, i: usize) -> anyhow::Result<()> {
        let child = crate::proc::sample_backend(&self.backends[i - 1], 80, i)?;
        self.procs.push(child);
        Ok(())
    }

    /// Runs `lb decap` on backend `i`'s interface for every VIP, trusting the load balancers
    /// and the peers ([`TRUSTED`]) unless `extra` names its own senders; returns its output.
    pub fn decap(&self, i: usize, extra: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.backends[i - 1].lb()?;
        cmd.args(["decap", "--iface", &backend_dev(i), "--bpffs"])
            .arg(&self.dir.bpffs)
            .args(["--vip", VIP4, "--vip", VIP6, "--vip", VIP_MIXED]);
        if !extra
            .iter()
            .any(|a| *a == "--trusted-source" || *a == "--trust-any-source")
        {
            for t in TRUSTED {
                cmd.args(["--trusted-source", t]);
            }
        }
        cmd.args(extra);
        let out = cmd.output().context("running lb decap")?;
        anyhow::ensure!(
            out.status.success(),
            "lb decap on backend {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts the agent on the load balancer's eth0 (native mode).
    pub fn start_agent(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.start_agent_in("native", extra)
    }

    /// Starts the agent on the load balancer's eth0 in attach `mode`.
    pub fn start_agent_in(&mut self, mode: &str, extra: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["--mode", mode];
        args.extend_from_slice(extra);
        self.agent = Some(self.dir.spawn_agent(&self.lb, "eth0", &args)?);
        Ok(())
    }

    /// `lb ...` against the agent.
    pub fn lb(&self, args: &[&str]) -> anyhow::Result<String> {
        self.dir.cli_ok(args)
    }
}

impl Drop for Routed {
    fn drop(&mut self) {
        self.agent.take();
        for n in &mut self.more {
            n.agent.take();
        }
        self.procs.clear();
    }
}

/// Wires load balancer node `k` to the router: eth0 (10.30.k.2) receives, eth1 (10.31.k.2)
/// sends to the backends. Returns the router's ends (eth0's, eth1's).
fn wire_lb(r: &Netns, l: &Netns, k: usize) -> anyhow::Result<(String, String)> {
    let r_in = veth_named(l, "eth0", r)?;
    let (in4, in6) = (format!("10.30.{k}.2"), v6(30, k, 2));
    addrs(l, "eth0", &in4, &in6)?;
    addrs(r, &r_in, &format!("10.30.{k}.1"), &v6(30, k, 1))?;
    let r_out = veth_named(l, "eth1", r)?;
    addrs(l, "eth1", &format!("10.31.{k}.2"), &v6(31, k, 2))?;
    addrs(r, &r_out, &format!("10.31.{k}.1"), &v6(31, k, 1))?;
    l.ip(&["route", "add", "default", "via", &format!("10.30.{k}.1")])?;
    l.ip(&["-6", "route", "add", "default", "via", &v6(30, k, 1)])?;
    for i in 1..=3 {
        l.ip(&[
            "route",
            "add",
            &format!("10.4{i}.0.0/24"),
            "via",
            &format!("10.31.{k}.1"),
        ])?;
        l.ip(&[
            "-6",
            "route",
            "add",
            &format!("fd00:4{i}::/64"),
            "via",
            &v6(31, k, 1),
        ])?;
    }
    for key in [
        "net.ipv4.conf.all.forwarding",
        "net.ipv6.conf.all.forwarding",
    ] {
        l.sysctl(key, "1")?;
    }
    for dev in ["all", "default", "eth0", "eth1"] {
        l.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
    }
    // The no-neighbour path hands encapsulated packets (source: ours) to our stack.
    l.sysctl("net.ipv4.conf.eth0.accept_local", "1")?;
    // The agent's own probes cross XDP on the backends' veths: full checksums.
    l.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
    l.exec("ethtool", &["-K", "eth1", "tx", "off"])?;
    Ok((r_in, r_out))
}

/// `fd00:NET::HOST` for node 0, `fd00:NET:K::HOST` for node `k`.
pub fn v6(net: u32, k: usize, host: u32) -> String {
    if k == 0 {
        format!("fd00:{net}::{host}")
    } else {
        format!("fd00:{net}:{k}::{host}")
    }
}

/// MAC of the gateway in [`FibNs`].
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x01];

/// The namespace the program runs in: `fxa` (10.31.0.2, fd00:31::2) with a permanent
/// neighbour for the gateway (10.31.0.1, fd00:31::1); backend subnets 10.41/24 and
/// fd00:41::/64 behind it, 10.42/24 and fd00:42::/64 behind it with a link with an MTU of 1400,
/// 10.44/24 behind a gateway with no neighbour entry.
pub struct FibNs {
    pub ns: Netns,
    _peer: Netns,
    _veth: VethPair,
    _small: VethPair,
    /// The program's receiving (and, unless the MTU is small, sending) interface.
    pub ifindex: u32,
    pub mac: [u8; 6],
}

impl FibNs {
    /// Sets the MTU of the main link (both ends): the FIB's MTU check uses it.
    pub fn set_mtu(&self, mtu: u32) -> anyhow::Result<()> {
        let mtu = mtu.to_string();
        self.ns.ip(&["link", "set", &self._veth.a, "mtu", &mtu])?;
        self._peer.ip(&["link", "set", &self._veth.b, "mtu", &mtu])
    }

    pub fn new() -> anyhow::Result<Self> {
        let ns = Netns::new("encfx")?;
        let peer = Netns::new("encfp")?;
        let veth = VethPair::new(&ns, "10.31.0.2/24", &peer, "10.31.0.1/24")?;
        let a = veth.a.clone();
        ns.ip(&["addr", "add", "fd00:31::2/64", "dev", &a, "nodad"])?;
        for key in [
            "net.ipv4.conf.all.forwarding",
            "net.ipv6.conf.all.forwarding",
        ] {
            ns.sysctl(key, "1")?;
        }
        let gw = "02:00:00:00:0a:01";
        for gw_ip in ["10.31.0.1", "fd00:31::1"] {
            ns.ip(&[
                "neigh",
                "replace",
                gw_ip,
                "lladdr",
                gw,
                "dev",
                &a,
                "nud",
                "permanent",
            ])?;
        }
        ns.ip(&[
            "route",
            "add",
            "10.41.0.0/24",
            "via",
            "10.31.0.1",
            "dev",
            &a,
        ])?;
        ns.ip(&[
            "-6",
            "route",
            "add",
            "fd00:41::/64",
            "via",
            "fd00:31::1",
            "dev",
            &a,
        ])?;
        // A second link with a 1400-byte MTU (the FIB's MTU check uses the device's).
        let small = VethPair::new(&ns, "10.32.0.2/24", &peer, "10.32.0.1/24")?;
        let c = small.a.clone();
        ns.ip(&["link", "set", &c, "mtu", "1400"])?;
        peer.ip(&["link", "set", &small.b, "mtu", "1400"])?;
        ns.ip(&["addr", "add", "fd00:32::2/64", "dev", &c, "nodad"])?;
        for (gw_ip, fam) in [("10.32.0.1", "-4"), ("fd00:32::1", "-6")] {
            ns.ip(&[
                fam,
                "neigh",
                "replace",
                gw_ip,
                "lladdr",
                gw,
                "dev",
                &c,
                "nud",
                "permanent",
            ])?;
        }
        ns.ip(&[
            "route",
            "add",
            "10.42.0.0/24",
            "via",
            "10.32.0.1",
            "dev",
            &c,
        ])?;
        ns.ip(&[
            "-6",
            "route",
            "add",
            "fd00:42::/64",
            "via",
            "fd00:32::1",
            "dev",
            &c,
        ])?;
        ns.ip(&[
            "route",
            "add",
            "10.44.0.0/24",
            "via",
            "10.31.0.9",
            "dev",
            &a,
        ])?;
        let mac = ns.mac(&a)?;
        let ifindex = ns
            .run(|| lb_userspace::dataplane::if_index(&a))?
            .expect("veth");
        Ok(FibNs {
            ns,
            _peer: peer,
            _veth: veth,
            _small: small,
            ifindex,
            mac,
        })
    }
}
