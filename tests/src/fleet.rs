//! A fleet for tests, the demo and the benchmarks: `Routed::fleet` with three load balancer
//! nodes behind the router's ECMP group, GUE backends running `lb decap` and sample servers,
//! and a real etcd (in the router's namespace, own data dir) that every node follows as nodes
//! lb0..lb2 of cluster `t`.
use std::time::{Duration, Instant};

use lb_userspace::api::protocol::{ClusterView, StatsView, VipView};

use crate::{etcd::Etcd, routed::Routed};

pub const NODES: usize = 3;
/// Where each node serves /metrics (inside its own namespace).
const METRICS: &str = "127.0.0.1:9100";

/// etcd first: it goes before the namespaces do.
pub struct Fleet {
    pub etcd: Etcd,
    pub net: Routed,
}

impl Fleet {
    /// The network, the backends (sample servers, `lb decap`), etcd and three agents
    /// following it as nodes lb0..lb2 of cluster `t`.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let mut net = Routed::fleet(tag, NODES)?;
        for i in 1..=3 {
            net.start_sample(i)?;
            net.decap(i, &[])?;
        }
        // A backend sends packets of moved slots on to the previous one (second chance) by
        // XDP_TX: delivered when the router's ends run XDP.
        net.xdp_pass_to_backends()?;
        let etcd = Etcd::start(&net.router, "10.30.0.1")?;
        let mut f = Fleet { etcd, net };
        for k in 0..NODES {
            f.start(k)?;
        }
        Ok(f)
    }

    pub fn start(&mut self, k: usize) -> anyhow::Result<()> {
        // Each node reaches etcd on its own link to the router.
        let url = format!("etcd://10.30.{k}.1:{}", crate::etcd::PORT);
        let node = format!("lb{k}");
        self.net.start_agent_at(
            k,
            &[
                "--store",
                &url,
                "--cluster",
                "t",
                "--node",
                &node,
                "--metrics",
                METRICS,
            ],
        )
    }

    pub fn lb(&self, k: usize, args: &[&str]) -> anyhow::Result<String> {
        self.net.lb_at(k, args)
    }

    pub fn vips(&self, k: usize) -> anyhow::Result<Vec<VipView>> {
        self.net.dir_at(k).vips()
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
        let ns = if k == 0 {
            &self.net.lb
        } else {
            &self.net.more[k - 1].ns
        };
        crate::topo::http_request(ns, METRICS.parse()?, &crate::topo::get("/metrics"))
    }

    pub fn cluster(&self, k: usize) -> anyhow::Result<ClusterView> {
        Ok(serde_json::from_str(
            &self.lb(k, &["cluster", "status", "--json"])?,
        )?)
    }
}
