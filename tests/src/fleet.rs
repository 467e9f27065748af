//! A fleet for tests, the demo and the benchmarks: three load balancer nodes and a real etcd
//! (in the router's namespace, own data dir) that every node follows as nodes lb0..lb2 of
//! cluster `t`. Every node announces its VIPs by BGP (bird from the shipped template) to a
//! bird on the router, which installs them as one ECMP route: nobody edits the router's
//! kernel, and a test steers traffic as an operator would ([`Fleet::through_each`] drains
//! the other nodes). Two networks: [`Routed::fleet`] (GUE to routed backends running
//! `lb decap`) and [`L2Net`] (one segment, L2 direct server return).
use std::time::{Duration, Instant};

use lb_userspace::api::protocol::{ClusterView, StatsView, VipView};

use crate::{
    AgentDir, ChildGuard, Netns,
    bgp::{self, Bird},
    etcd::{Etcd, Security},
    l2fleet::L2Net,
    routed::Routed,
};

/// What the fleet helpers need from a network.
pub trait FleetNet {
    fn node_dir(&self, k: usize) -> &AgentDir;
    fn node_ns(&self, k: usize) -> &Netns;
    fn set_agent(&mut self, k: usize, agent: ChildGuard);
    /// Takes node `k`'s agent out (to stop it).
    fn take_agent(&mut self, k: usize) -> Option<ChildGuard>;
    /// Where node `k` reaches etcd (an address of the router's namespace); also the router's
    /// end of node `k`'s BGP session.
    fn store_addr(&self, k: usize) -> String;
    /// The router's namespace (etcd and the router's bird run there).
    fn router_ns(&self) -> &Netns;
    /// Node `k`'s end of its BGP session with the router (its router id too): the next hop
    /// of its IPv4 routes at the router.
    fn bgp_addr(&self, k: usize) -> String;
    /// The next hop of node `k`'s IPv6 routes at the router (None: an IPv4-only network).
    fn bgp_addr6(&self, k: usize) -> Option<String>;
}

impl FleetNet for Routed {
    fn node_dir(&self, k: usize) -> &AgentDir {
        self.dir_at(k)
    }
    fn node_ns(&self, k: usize) -> &Netns {
        if k == 0 {
            &self.lb
        } else {
            &self.more[k - 1].ns
        }
    }
    fn set_agent(&mut self, k: usize, agent: ChildGuard) {
        if k == 0 {
            self.agent = Some(agent);
        } else {
            self.more[k - 1].agent = Some(agent);
        }
    }
    fn take_agent(&mut self, k: usize) -> Option<ChildGuard> {
        self.take_agent_at(k)
    }
    // Each node reaches etcd on its own link to the router.
    fn store_addr(&self, k: usize) -> String {
        format!("10.30.{k}.1")
    }
    fn router_ns(&self) -> &Netns {
        &self.router
    }
    fn bgp_addr(&self, k: usize) -> String {
        node_addr(k)
    }
    fn bgp_addr6(&self, k: usize) -> Option<String> {
        Some(crate::routed::v6(30, k, 2))
    }
}

impl FleetNet for L2Net {
    fn node_dir(&self, k: usize) -> &AgentDir {
        &self.nodes[k].dir
    }
    fn node_ns(&self, k: usize) -> &Netns {
        &self.nodes[k].ns
    }
    fn set_agent(&mut self, k: usize, agent: ChildGuard) {
        self.nodes[k].agent = Some(agent);
    }
    fn take_agent(&mut self, k: usize) -> Option<ChildGuard> {
        self.nodes[k].agent.take()
    }
    fn store_addr(&self, _k: usize) -> String {
        "10.50.0.1".into()
    }
    fn router_ns(&self) -> &Netns {
        &self.router
    }
    fn bgp_addr(&self, k: usize) -> String {
        crate::l2fleet::node_ip(k)
    }
    fn bgp_addr6(&self, _k: usize) -> Option<String> {
        None
    }
}

pub const NODES: usize = 3;
/// The VIP pools every node is started with (`--vip-prefix`): wide on purpose, so the nodes'
/// own addresses (10.30.k.2, 10.50.0.k) lie inside a pool and the own-address rule is what
/// keeps a VIP off them; 192.0.2.0/24 stays outside.
pub const VIP_POOLS: [&str; 2] = ["10.0.0.0/8", "2001:db8::/32"];
/// Where each node serves /metrics (inside its own namespace).
const METRICS: &str = "127.0.0.1:9100";

/// One fleet at a time in a test binary: each is seven or more namespaces, four agents and
/// etcd with traffic on two cores; two at once starve each other into timeouts.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The fleet's BGP: bird on the router and on every node ([`Bgp::start`]).
pub struct Bgp {
    /// Node k's speaker (None once killed).
    pub nodes: Vec<Option<Bird>>,
    pub router: Bird,
    /// `lb run` arguments every node gets (hold-down, drain time).
    pub agent_args: Vec<String>,
}

/// The BGP speakers first, then etcd: both go before the namespaces do; the turn last.
pub struct Fleet<N: FleetNet = Routed> {
    pub bgp: Bgp,
    pub etcd: Etcd,
    pub net: N,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Fleet<L2Net> {
    /// The L2 network, etcd, bird on the router and on every node, and three agents
    /// following etcd and announcing the VIPs (`agent_args`: e.g. the drain time). The
    /// router learns the VIP routes over BGP across the shared segment, as in [`Fleet::bgp`].
    pub fn l2(tag: &str, agent_args: &[&str]) -> anyhow::Result<Self> {
        let _turn = turn();
        let net = L2Net::build(tag, NODES)?;
        let etcd = Etcd::start(&net.router, "10.50.0.1")?;
        let bgp = Bgp::start(&net, "10.50.0.1", agent_args)?;
        let mut f = Fleet {
            bgp,
            etcd,
            net,
            _turn,
        };
        for k in 0..NODES {
            f.start(k)?;
        }
        Ok(f)
    }
}

impl Fleet<Routed> {
    /// The routed network, the backends (sample servers, `lb decap`), etcd, the BGP speakers
    /// and three agents following etcd as nodes lb0..lb2 of cluster `t` (announcing with the
    /// agent's defaults).
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        Self::with_security(tag, Security::Plain)
    }

    /// As [`Fleet::new`], with etcd serving `security` (TLS: every node gets the CA, and
    /// its client certificate when etcd asks for one).
    pub fn with_security(tag: &str, security: Security) -> anyhow::Result<Self> {
        Self::routed(tag, security, &[])
    }

    /// As [`Fleet::new`], every agent also given `agent_args` (e.g. the hold-down, the
    /// drain time).
    pub fn bgp(tag: &str, agent_args: &[&str]) -> anyhow::Result<Self> {
        Self::routed(tag, Security::Plain, agent_args)
    }

    /// The one routed-fleet builder: bird on the router (BFD, multipath into its kernel) and
    /// on each node (the shipped template), every agent announcing in table [`bgp::TABLE`].
    fn routed(tag: &str, security: Security, agent_args: &[&str]) -> anyhow::Result<Self> {
        let _turn = turn();
        let mut net = Routed::fleet(tag, NODES)?;
        for i in 1..=3 {
            net.start_sample(i)?;
            net.decap(i, &[])?;
        }
        // A backend sends packets of moved slots on to the previous one (second chance) by
        // XDP_TX: delivered when the router's ends run XDP.
        net.xdp_pass_to_backends()?;
        let addrs: Vec<String> = (0..NODES).map(|k| net.store_addr(k)).collect();
        let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let etcd = Etcd::start_with(&net.router, "10.30.0.1", &addrs, security)?;
        let bgp = Bgp::start(&net, "10.30.0.1", agent_args)?;
        let mut f = Fleet {
            bgp,
            etcd,
            net,
            _turn,
        };
        for k in 0..NODES {
            f.start(k)?;
        }
        Ok(f)
    }
}

/// The agents go first (killed, as a node's power cut would): etcd and the speakers stopping
/// under running agents would have each log that it lost them.
impl<N: FleetNet> Drop for Fleet<N> {
    fn drop(&mut self) {
        for k in 0..NODES {
            drop(self.net.take_agent(k));
        }
    }
}

impl<N: FleetNet> Fleet<N> {
    /// The router's bird.
    pub fn router_bird(&self) -> &Bird {
        &self.bgp.router
    }

    /// Node `k`'s host dies: its agent and its bird killed (SIGKILL); the router's BFD
    /// notices. Its kernel routes die with it: the announce table is emptied, so the
    /// revived node's bird has nothing to announce until its agent, ready again, adds them
    /// (left in place, they would be announced the moment the bird starts, and the router
    /// would send flows to a node whose agent is still starting).
    pub fn kill_node(&mut self, k: usize) -> anyhow::Result<()> {
        drop(self.net.take_agent(k));
        drop(self.bgp.nodes[k].take());
        let table = bgp::TABLE.to_string();
        for family in ["-4", "-6"] {
            let out = self
                .net
                .node_ns(k)
                .command("ip")
                .args([family, "route", "flush", "table", &table])
                .output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            // A table no route was ever added to does not exist: nothing to flush.
            anyhow::ensure!(
                out.status.success() || err.contains("does not exist"),
                "flushing node {k}'s table {table}: {err}"
            );
        }
        Ok(())
    }

    /// Node `k` comes back: its bird, then its agent (which announces once ready).
    pub fn revive_node(&mut self, k: usize) -> anyhow::Result<()> {
        self.bgp.nodes[k] = Some(Bgp::node_bird(&self.net, k)?);
        self.start(k)
    }
}

impl Bgp {
    /// bird on the router (`router_id`, BFD, multipath into its kernel) peering with every
    /// node, then bird on each node from the shipped template; `agent_args` are what
    /// [`Bgp::agent_args`] adds.
    pub fn start<N: FleetNet>(
        net: &N,
        router_id: &str,
        agent_args: &[&str],
    ) -> anyhow::Result<Self> {
        let names: Vec<(String, String)> = (0..NODES)
            .map(|k| (format!("lb{k}"), net.bgp_addr(k)))
            .collect();
        let peers: Vec<(&str, &str)> = names
            .iter()
            .map(|(n, a)| (n.as_str(), a.as_str()))
            .collect();
        let router = Bird::start(
            net.router_ns(),
            "bird-r",
            &bgp::router_config(router_id, &peers),
        )?;
        let nodes = (0..NODES)
            .map(|k| Self::node_bird(net, k).map(Some))
            .collect::<anyhow::Result<_>>()?;
        Ok(Bgp {
            nodes,
            router,
            agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// The `lb run` arguments that make node `k`'s agent announce through its bird.
    pub fn agent_args(&self, k: usize) -> Vec<String> {
        let socket = self.nodes[k]
            .as_ref()
            .map(|n| n.socket().display().to_string())
            .unwrap_or_default();
        let mut a = vec![
            "--announce-table".to_string(),
            bgp::TABLE.to_string(),
            "--bgp-socket".into(),
            socket,
        ];
        a.extend(self.agent_args.iter().cloned());
        a
    }

    /// Node `k`'s bird, peering with the router as `r1`.
    fn node_bird<N: FleetNet>(net: &N, k: usize) -> anyhow::Result<Bird> {
        let conf = bgp::node_config(&net.bgp_addr(k), &[("r1", &net.store_addr(k))]);
        Bird::start(net.node_ns(k), &format!("bird-{k}"), &conf)
    }
}

/// Node `k`'s address on its link to the router (its BGP session's).
pub fn node_addr(k: usize) -> String {
    format!("10.30.{k}.2")
}

impl<N: FleetNet> Fleet<N> {
    /// Starts node `k`'s agent (native mode on its eth0) following etcd.
    pub fn start(&mut self, k: usize) -> anyhow::Result<()> {
        self.start_with(k, &[])
    }

    /// As [`Fleet::start`], with more `lb run` arguments.
    pub fn start_with(&mut self, k: usize, extra: &[&str]) -> anyhow::Result<()> {
        let url = self.etcd.url_at(&self.net.store_addr(k));
        let node = format!("lb{k}");
        let access = self.etcd.client_args();
        let args = [
            "--mode",
            "native",
            "--store",
            &url,
            "--cluster",
            "t",
            "--node",
            &node,
            "--metrics",
            METRICS,
        ];
        let mut args = args.to_vec();
        args.extend(access.iter().map(String::as_str));
        for p in &VIP_POOLS {
            args.extend_from_slice(&["--vip-prefix", p]);
        }
        let announce = self.bgp.agent_args(k);
        args.extend(announce.iter().map(String::as_str));
        args.extend_from_slice(extra);
        let agent = self
            .net
            .node_dir(k)
            .spawn_agent(self.net.node_ns(k), "eth0", &args)?;
        self.net.set_agent(k, agent);
        Ok(())
    }

    /// `lb vip add VIP --forward gue EXTRA` and `lb backend add` of each of `backends`,
    /// through node `k` (written to etcd, applied by every node).
    pub fn gue_vip(
        &self,
        k: usize,
        vip: &str,
        backends: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let mut args = vec!["vip", "add", vip, "--forward", "gue"];
        args.extend_from_slice(extra);
        self.lb(k, &args)?;
        for b in backends {
            self.lb(k, &["backend", "add", vip, b])?;
        }
        Ok(())
    }

    pub fn lb(&self, k: usize, args: &[&str]) -> anyhow::Result<String> {
        self.net.node_dir(k).cli_ok(args)
    }

    pub fn vips(&self, k: usize) -> anyhow::Result<Vec<VipView>> {
        self.net.node_dir(k).vips()
    }

    pub fn stats(&self, k: usize) -> anyhow::Result<StatsView> {
        Ok(serde_json::from_str(&self.lb(k, &["stats", "--json"])?)?)
    }

    /// Each node's digest of `vip` (None: not live there).
    pub fn digests(&self, vip: &str) -> anyhow::Result<Vec<Option<String>>> {
        (0..NODES)
            .map(|k| {
                Ok(self
                    .vips(k)?
                    .into_iter()
                    .find(|v| v.vip.to_string() == vip)
                    .and_then(|v| v.digest))
            })
            .collect()
    }

    /// Waits until every node has the same digest of `vip`, different from `before`;
    /// returns it and how long it took.
    pub fn converged(&self, vip: &str, before: Option<&str>) -> anyhow::Result<(String, Duration)> {
        let start = Instant::now();
        loop {
            let d = self.digests(vip)?;
            if let Some(Some(first)) = d.first()
                && d.iter().all(|x| x.as_deref() == Some(first.as_str()))
                && before != Some(first.as_str())
            {
                return Ok((first.clone(), start.elapsed()));
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(10),
                "nodes did not agree on {vip} within 10 s: {d:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Node `k`'s Prometheus page.
    pub fn metrics(&self, k: usize) -> anyhow::Result<String> {
        crate::topo::http_request(
            self.net.node_ns(k),
            METRICS.parse()?,
            &crate::topo::get("/metrics"),
        )
    }

    pub fn cluster(&self, k: usize) -> anyhow::Result<ClusterView> {
        Ok(serde_json::from_str(
            &self.lb(k, &["cluster", "status", "--json"])?,
        )?)
    }
}
