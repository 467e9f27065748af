//! The node's background tasks: health probes, the retry and NAT-sweep loop, the egress
//! upkeep, the neighbour table and, in store mode, the fleet's follower and publisher. Each
//! runs its blocking work (map writes, file writes, sysctl reads) on a blocking thread.
use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tokio::task::JoinHandle;

use crate::{
    Error,
    agent::{
        Agent,
        neigh::{self, NetlinkNeighbours},
        probe,
    },
    dataplane::egress::TxPorts,
    node::Node,
};

/// Seconds between NAT sweeps.
const NAT_SWEEP_S: u64 = 5;

/// Running tasks, stopped when dropped.
#[derive(Default)]
pub struct Tasks(Vec<JoinHandle<()>>);

impl Tasks {
    /// Adds a task to stop with the others.
    pub fn push(&mut self, task: JoinHandle<()>) {
        self.0.push(task);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl Node {
    /// Starts the node's tasks: health probes, retries and NAT sweeps, the upkeep of the
    /// egress ports `ports` on `iface`, and in store mode the fleet's follower and publisher.
    pub fn start(self: &Arc<Self>, ports: TxPorts, iface: String) -> Tasks {
        let agent = self.agent().clone();
        let mut tasks = Tasks::default();
        if let Some(fleet) = self.fleet() {
            tasks.push(tokio::spawn(fleet.clone().follow(agent.clone())));
            tasks.push(tokio::spawn(fleet.clone().publish(agent.clone())));
        }
        if let Some(a) = self.announcer() {
            tasks.push(tokio::spawn(a.clone().run(agent.clone())));
        }
        tasks.push(tokio::spawn(probe::supervise(
            agent.clone(),
            self.on_flip(),
        )));
        tasks.push(tokio::spawn(egress_upkeep(agent.clone(), ports, iface)));
        tasks.push(tokio::spawn(retry_and_sweep(agent)));
        tasks
    }

    /// Connects the neighbour table of interface `ifindex`: learned MACs go to the agent (on
    /// a blocking thread: map writes may follow), and the agent says which it needs.
    pub fn watch_neighbours(&self, ifindex: u32) -> Result<(), Error> {
        let reporter = self.agent().clone();
        let neighbours = NetlinkNeighbours::start(ifindex, move |macs| {
            let a = reporter.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = a.core().learn_macs(&macs) {
                    log::warn!("applying learned MACs: {e}");
                }
            });
        })?;
        self.agent().set_neighbours(Box::new(neighbours));
        Ok(())
    }
}

/// Every second: converges again when the kernel is not in line (or a second-chance window
/// ended), saves the second-chance history and removes ended deny entries; every
/// [`NAT_SWEEP_S`] seconds sweeps NAT.
async fn retry_and_sweep(agent: Arc<Agent>) {
    let mut swept: u64 = 0;
    let mut history_failed: Option<String> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let a = agent.clone();
        let retried = tokio::task::spawn_blocking(move || (a.retry(), a.save_history())).await;
        if let Ok((r, saved)) = retried {
            if let Err(e) = r {
                log::warn!("the data plane is still not in line: {e}");
            }
            // Once per distinct failure (a full or read-only disk would say so every second).
            let failed = saved.err().map(|e| e.to_string());
            if let Some(e) = &failed
                && failed != history_failed
            {
                log::warn!("saving the second-chance history: {e}");
            }
            history_failed = failed;
        }
        // Ended `lb deny` entries leave the kernel's trie and the state file.
        let a = agent.clone();
        match tokio::task::spawn_blocking(move || a.prune_denies()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => log::info!("{n} ended deny entries removed"),
            Ok(Err(e)) => log::warn!("removing ended deny entries: {e}"),
            Err(e) => log::warn!("removing ended deny entries: {e}"),
        }
        swept += 1;
        if swept.is_multiple_of(NAT_SWEEP_S) {
            let a = agent.clone();
            match tokio::task::spawn_blocking(move || a.nat_sweep()).await {
                Ok(Ok((_, 0))) => {}
                Ok(Ok((live, gone))) => {
                    log::debug!("NAT: {gone} expired connections deleted, {live} live")
                }
                Ok(Err(e)) => log::warn!("NAT sweep: {e}"),
                Err(e) => log::warn!("NAT sweep: {e}"),
            }
        }
    }
}

/// The sysctls encapsulation needs on `iface` that are not set: forwarding for both families
/// (the FIB lookup refuses otherwise) and IPv4 `accept_local` (the no-neighbour hand-off gives
/// the stack a packet whose source is our own address).
fn encap_sysctls_missing(iface: &str) -> Vec<String> {
    [
        ("ipv4", "forwarding"),
        ("ipv6", "forwarding"),
        ("ipv4", "accept_local"),
    ]
    .iter()
    .map(|(f, k)| format!("/proc/sys/net/{f}/conf/{iface}/{k}"))
    .filter(|p| std::fs::read_to_string(p).is_ok_and(|v| v.trim() == "0"))
    .map(|p| p.trim_start_matches("/proc/sys/").replace('/', "."))
    .collect()
}

/// Every few seconds: the egress device map follows the host's interfaces, and the next hops
/// of encapsulated backends are kept resolved (one datagram to each backend's discard port
/// makes the kernel resolve the route's next hop, so the program's FIB lookup finds a MAC).
async fn egress_upkeep(agent: Arc<Agent>, mut ports: TxPorts, iface: String) {
    let mut warned = false;
    let mut known = BTreeSet::new();
    let mut tick: u64 = 0;
    loop {
        tick += 1;
        // New backends are resolved within a second; all of them every five.
        let routed = agent
            .with_core(|c| c.routed_backends())
            .await
            .unwrap_or_default();
        for addr in routed
            .iter()
            .filter(|a| tick.is_multiple_of(5) || !known.contains(*a))
        {
            neigh::solicit(*addr).await;
        }
        known = routed;
        // The device map and the sysctl check: at once, then every five seconds.
        if tick % 5 == 1 {
            let name = iface.clone();
            let synced = tokio::task::spawn_blocking(move || {
                ports.sync();
                (ports, encap_sysctls_missing(&name))
            })
            .await;
            let off = match synced {
                Ok((p, off)) => {
                    ports = p;
                    off
                }
                Err(e) => {
                    log::warn!("egress device map upkeep stopped: {e}");
                    return;
                }
            };
            if !known.is_empty() && !warned && !off.is_empty() {
                let what = format!(
                    "encapsulating VIPs need on {iface}: {} = 1 (without forwarding packets are dropped as dropped_forwarding_disabled; without accept_local, IPv4 packets handed to the stack for a missing neighbour are dropped)",
                    off.join(" and ")
                );
                log::warn!("{what}");
                agent.record(what);
                warned = true;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
