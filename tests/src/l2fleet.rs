//! The L2 fleet network: a router doing ECMP (L4 hash) to three load balancer nodes that
//! share one segment (a bridge in its own namespace) with three
//! backends: L2 direct server return, one-armed (each node receives from the router and sends
//! to the backends on the same `eth0`). The backends hold the VIP on `lo` and answer the
//! client through the router. Everything is removed on drop, processes first.
//!
//! Addresses: client 10.20.0.2 (router 10.20.0.1); segment 10.50.0.0/24 with the router at
//! .1, node k at .2k (k = 0..3) and backend i at .3i (i = 1..=3); the VIP is
//! [`crate::routed::VIP4`]. The network installs no route to it: the router learns it from
//! the nodes over BGP across the segment ([`crate::fleet::Fleet::l2`]).
use crate::{
    AgentDir, ChildGuard, Netns,
    routed::{LbNode, VIP4},
};

pub fn node_ip(k: usize) -> String {
    format!("10.50.0.2{k}")
}

pub fn backend_ip(i: usize) -> String {
    format!("10.50.0.3{i}")
}

pub struct L2Net {
    /// Dropped first: agents, samples, XDP_PASS helpers.
    pub procs: Vec<ChildGuard>,
    pub nodes: Vec<LbNode>,
    pub client: Netns,
    pub router: Netns,
    pub bridge: Netns,
    pub backends: Vec<Netns>,
}

/// A veth from bridge port `port` to `dev` in `ns`, up, with `addr`/24.
fn plug(bridge: &Netns, port: &str, ns: &Netns, dev: &str, addr: &str) -> anyhow::Result<()> {
    bridge.ip(&[
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        dev,
        "netns",
        ns.name(),
    ])?;
    bridge.ip(&["link", "set", port, "master", "br0", "up"])?;
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev])?;
    ns.ip(&["link", "set", dev, "up"])
}

impl L2Net {
    /// Builds the network with `nodes` load balancer nodes and starts the sample backends
    /// (not the agents).
    pub fn build(tag: &str, nodes: usize) -> anyhow::Result<Self> {
        let mut net = L2Net {
            procs: Vec::new(),
            nodes: Vec::new(),
            client: Netns::new(&format!("{tag}c"))?,
            router: Netns::new(&format!("{tag}r"))?,
            bridge: Netns::new(&format!("{tag}s"))?,
            backends: Vec::new(),
        };
        for k in 0..nodes {
            net.nodes.push(LbNode {
                agent: None,
                dir: AgentDir::new(&format!("{tag}a{k}"))?,
                ns: Netns::new(&format!("{tag}l{k}"))?,
            });
        }
        for i in 1..=3 {
            net.backends.push(Netns::new(&format!("{tag}b{i}"))?);
        }
        net.wire()?;
        for i in 1..=3 {
            let child = crate::proc::sample_backend(&net.backends[i - 1], 80, i)?;
            net.procs.push(child);
        }
        Ok(net)
    }

    fn wire(&mut self) -> anyhow::Result<()> {
        let (b, r) = (&self.bridge, &self.router);
        b.ip(&["link", "add", "br0", "type", "bridge"])?;
        b.ip(&["link", "set", "br0", "up"])?;
        // Client <-> router.
        r.ip(&[
            "link",
            "add",
            "cl",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            self.client.name(),
        ])?;
        r.ip(&["addr", "add", "10.20.0.1/24", "dev", "cl"])?;
        r.ip(&["link", "set", "cl", "up"])?;
        self.client
            .ip(&["addr", "add", "10.20.0.2/24", "dev", "eth0"])?;
        self.client.ip(&["link", "set", "eth0", "up"])?;
        self.client
            .ip(&["route", "add", "default", "via", "10.20.0.1"])?;
        // Rewritten frames keep a partial checksum if the sender offloads it (NETNS-NOTES).
        self.client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
        // Router on the segment.
        plug(b, "p-r", r, "seg", "10.50.0.1")?;
        for key in ["net.ipv4.ip_forward", "net.ipv4.fib_multipath_hash_policy"] {
            r.sysctl(key, "1")?;
        }
        for dev in ["all", "default", "seg", "cl"] {
            r.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
            r.sysctl(&format!("net.ipv4.conf.{dev}.send_redirects"), "0")?;
        }
        // Nodes: one arm on the segment.
        for (k, n) in self.nodes.iter().enumerate() {
            plug(b, &format!("p-l{k}"), &n.ns, "eth0", &node_ip(k))?;
            n.ns.ip(&["route", "add", "default", "via", "10.50.0.1"])?;
            for dev in ["all", "eth0"] {
                n.ns.sysctl(&format!("net.ipv4.conf.{dev}.send_redirects"), "0")?;
                n.ns.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
            }
        }
        // Backends: the VIP on lo, answering only for their own address.
        for (n, ns) in self.backends.iter().enumerate() {
            let i = n + 1;
            plug(b, &format!("p-b{i}"), ns, "eth0", &backend_ip(i))?;
            ns.ip(&["route", "add", "default", "via", "10.50.0.1"])?;
            ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
            for dev in ["all", "eth0"] {
                ns.sysctl(&format!("net.ipv4.conf.{dev}.arp_ignore"), "1")?;
                ns.sysctl(&format!("net.ipv4.conf.{dev}.arp_announce"), "2")?;
                ns.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
            }
        }
        // Native XDP_TX on a veth is delivered only when the peer runs XDP.
        for k in 0..self.nodes.len() {
            let child = crate::proc::xdp_pass(&self.bridge, &format!("p-l{k}"))?;
            self.procs.push(child);
        }
        Ok(())
    }
}

impl Drop for L2Net {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.agent.take();
        }
        self.procs.clear();
    }
}
