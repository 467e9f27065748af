//! Real BGP for the fleets: bird2 in the router's namespace (BGP, BFD, ECMP into its kernel)
//! and on every load balancer node, configured from the template the project ships
//! (`packaging/bird/bird.conf`), so the tests run what operators install. Each bird runs in
//! the foreground with its own config, control socket and pid file in a private directory;
//! the process is killed and the directory removed on drop.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    ChildGuard, Netns,
    fleet::{Fleet, FleetNet, NODES},
    unique_name,
};

/// The shipped node template.
pub const NODE_TEMPLATE: &str = include_str!("../../packaging/bird/bird.conf");
/// The routing table the agents announce in.
pub const TABLE: u32 = 100;
pub const ROUTER_AS: u32 = 65000;
pub const NODE_AS: u32 = 65001;
/// BFD in the tests: 100 ms x 3.
pub const BFD_MS: u32 = 100;
pub const BFD_MULT: u32 = 3;

/// A bird process in a namespace.
pub struct Bird {
    /// Dropped first: the process.
    child: Option<ChildGuard>,
    dir: PathBuf,
    ns_name: String,
}

impl Bird {
    /// Starts bird in `ns` with `config`; waits until its control socket answers.
    pub fn start(ns: &Netns, tag: &str, config: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&dir)?;
        let mut b = Bird {
            child: None,
            dir,
            ns_name: ns.name().to_string(),
        };
        b.spawn(ns, config)?;
        Ok(b)
    }

    fn spawn(&mut self, ns: &Netns, config: &str) -> anyhow::Result<()> {
        let conf = self.dir.join("bird.conf");
        std::fs::write(&conf, config)?;
        let mut cmd = ns.command("bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(self.socket())
            .arg("-P")
            .arg(self.dir.join("bird.pid"));
        self.child = Some(ChildGuard::spawn(cmd, "bird")?);
        let start = Instant::now();
        while self.birdc(&["show", "status"]).is_err() {
            if start.elapsed() > Duration::from_secs(5) {
                bail!("bird in {} did not answer within 5 s", self.ns_name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Its control socket (`lb run --bgp-socket`).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::id)
    }

    /// SIGKILL (a node's speaker dying with its host).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// `birdc -s SOCKET ARGS`, its output.
    pub fn birdc(&self, args: &[&str]) -> anyhow::Result<String> {
        birdc(&self.socket(), args)
    }
}

/// `birdc -s SOCKET ARGS`, its output.
pub fn birdc(socket: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(args)
        .output()
        .context("running birdc")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || text.contains("Unable to connect") {
        bail!(
            "birdc {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.child.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The shipped template filled in for node `router_id` peering with `peers` (name, address).
pub fn node_config(router_id: &str, peers: &[(&str, &str)]) -> String {
    let peers: Vec<String> = peers
        .iter()
        .map(|(name, addr)| {
            format!("protocol bgp {name} from lb_peer {{ neighbor {addr} as {ROUTER_AS}; }}")
        })
        .collect();
    NODE_TEMPLATE
        .replace("@TABLE@", &TABLE.to_string())
        .replace("@ROUTER_ID@", router_id)
        .replace("@BFD_INTERVAL_MS@", &BFD_MS.to_string())
        .replace("@BFD_MULTIPLIER@", &BFD_MULT.to_string())
        .replace("@LOCAL_AS@", &NODE_AS.to_string())
        .replace("@PEERS@", &peers.join("\n"))
}

/// The VIP ranges the routers take host routes for: the fleets' ([`crate::routed::VIP4`] and
/// its neighbours) and the demo network's ([`crate::topo::VIP`]). Narrower than the nodes'
/// `--vip-prefix` pools, as an operator's import filter would be.
pub const VIP_RANGES4: [&str; 2] = ["10.0.0.0/24", "10.200.0.0/24"];
pub const VIP_RANGES6: [&str; 2] = ["2001:db8::/64", "fd00:200::/64"];

/// The router: takes host routes inside [`VIP_RANGES4`] and [`VIP_RANGES6`] from the nodes,
/// lowers the preference of those carrying
/// GRACEFUL_SHUTDOWN (RFC 8326: traffic leaves a draining node before its withdrawal), and
/// installs the best ones as one multipath route in its kernel.
pub fn router_config(router_id: &str, nodes: &[(&str, &str)]) -> String {
    let mut c = format!(
        r#"router id {router_id};
protocol device {{}}
protocol kernel {{
    ipv4 {{ import none; export all; }};
    merge paths on;
}}
protocol kernel {{
    ipv6 {{ import none; export all; }};
    merge paths on;
}}
protocol bfd {{
    interface "*" {{ min rx interval {BFD_MS} ms; min tx interval {BFD_MS} ms; multiplier {BFD_MULT}; }};
}}
# Only host routes inside the VIP ranges delegated to the load balancers: a node announcing
# anything else (another node's address, written into etcd as a VIP) is not believed.
filter from_lb4 {{
    if net !~ [ {ranges4} ] then reject;
    if (65535, 0) ~ bgp_community then bgp_local_pref = 0;
    accept;
}}
filter from_lb6 {{
    if net !~ [ {ranges6} ] then reject;
    if (65535, 0) ~ bgp_community then bgp_local_pref = 0;
    accept;
}}
template bgp lb_node {{
    local as {ROUTER_AS};
    bfd on;
    error wait time 1, 10;
    ipv4 {{ import filter from_lb4; export none; }};
    ipv6 {{ import filter from_lb6; export none; }};
}}
"#,
        ranges4 = VIP_RANGES4.map(|r| format!("{r}{{32,32}}")).join(", "),
        ranges6 = VIP_RANGES6.map(|r| format!("{r}{{128,128}}")).join(", "),
    );
    for (name, addr) in nodes {
        c.push_str(&format!(
            "protocol bgp {name} from lb_node {{ neighbor {addr} as {NODE_AS}; }}\n"
        ));
    }
    c
}

/// The next hops of `prefix` (IPv4 or IPv6) in `ns`'s main table (empty: no route), from
/// `ip -j route`.
pub fn next_hops(ns: &Netns, prefix: &str) -> anyhow::Result<Vec<String>> {
    let family = if prefix.contains(':') { "-6" } else { "-4" };
    let out = ns
        .command("ip")
        .args(["-j", family, "route", "show", "exact", prefix])
        .output()?;
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut hops = Vec::new();
    for r in routes.as_array().into_iter().flatten() {
        if let Some(g) = r.get("gateway").and_then(|g| g.as_str()) {
            hops.push(g.to_string());
        }
        for nh in r
            .get("nexthops")
            .and_then(|n| n.as_array())
            .into_iter()
            .flatten()
        {
            if let Some(g) = nh.get("gateway").and_then(|g| g.as_str()) {
                hops.push(g.to_string());
            }
        }
    }
    hops.sort();
    Ok(hops)
}

/// Waits up to `limit` until `prefix`'s next hops in `ns` are `want` (sorted); returns how
/// long it took.
pub fn wait_hops(
    ns: &Netns,
    prefix: &str,
    want: &[&str],
    limit: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    loop {
        let have = next_hops(ns, prefix)?;
        if have == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("{prefix} at the router: next hops {have:?}, not {want:?} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `ip monitor route` in `ns`, counting the changes to one prefix until stopped.
pub struct RouteMonitor {
    child: ChildGuard,
    prefix: String,
}

impl RouteMonitor {
    pub fn start(ns: &Netns, prefix: &str) -> anyhow::Result<Self> {
        let mut cmd = ns.command("ip");
        cmd.args(["monitor", "route"]);
        let child = ChildGuard::spawn(cmd, "ip monitor route")?;
        Ok(RouteMonitor {
            child,
            prefix: prefix.to_string(),
        })
    }

    /// The route messages about the prefix seen so far (each an add, replace or delete).
    pub fn changes(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(line) = self
            .child
            .wait_for_line(Duration::from_millis(200), |_| true)
        {
            let ip = self.prefix.split('/').next().unwrap_or("");
            if line.contains(ip) && !line.starts_with(' ') {
                out.push(line);
            }
        }
        out
    }
}

/// What the fleets' tests read and do at the router, in node numbers.
impl<N: FleetNet> Fleet<N> {
    /// The router's next hops for `prefix` when nodes `nodes` announce it: each node's address
    /// on its link, IPv4 or IPv6 by the prefix's family (sorted, as [`next_hops`] gives them).
    pub fn hops(&self, prefix: &str, nodes: &[usize]) -> anyhow::Result<Vec<String>> {
        let mut hops = nodes
            .iter()
            .map(|k| {
                if prefix.contains(':') {
                    self.net
                        .bgp_addr6(*k)
                        .with_context(|| format!("node {k} has no IPv6 session"))
                } else {
                    Ok(self.net.bgp_addr(*k))
                }
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        hops.sort();
        Ok(hops)
    }

    /// Waits up to `limit` until the router's kernel routes `prefix` through exactly nodes
    /// `nodes` (none: no route); returns how long it took.
    pub fn wait_route(
        &self,
        prefix: &str,
        nodes: &[usize],
        limit: Duration,
    ) -> anyhow::Result<Duration> {
        let want = self.hops(prefix, nodes)?;
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        wait_hops(self.net.router_ns(), prefix, &want, limit)
    }

    /// Runs `each(k)` with the router sending `prefix` through node `k` alone, for every
    /// node in turn, as an operator would steer it: the other nodes drained with no drain
    /// time (withdrawn at once), undrained after, and the router's route waited for both
    /// ways. Every node serves `prefix` when it starts and when it returns.
    pub fn through_each<T>(
        &self,
        prefix: &str,
        mut each: impl FnMut(usize) -> anyhow::Result<T>,
    ) -> anyhow::Result<Vec<T>> {
        let all: Vec<usize> = (0..NODES).collect();
        self.wait_route(prefix, &all, STEER_LIMIT)?;
        let mut out = Vec::new();
        for k in 0..NODES {
            let others: Vec<usize> = all.iter().copied().filter(|o| *o != k).collect();
            let mut done = Ok(());
            for o in &others {
                done = done.and_then(|_| {
                    self.lb(*o, &["node", "drain", "--withdraw-after", "0"])
                        .map(drop)
                });
            }
            let got = done
                .and_then(|_| self.wait_route(prefix, &[k], STEER_LIMIT))
                .and_then(|_| each(k))
                .with_context(|| format!("through node {k} alone"));
            // Undrained on every path: the next turn (or the test's next step) needs them.
            for o in &others {
                self.lb(*o, &["node", "undrain"])?;
            }
            out.push(got?);
            self.wait_route(prefix, &all, STEER_LIMIT)?;
        }
        Ok(out)
    }
}

/// How long steering waits for the router: BGP updates between namespaces take
/// milliseconds; the margin is for a loaded machine.
const STEER_LIMIT: Duration = Duration::from_secs(10);
