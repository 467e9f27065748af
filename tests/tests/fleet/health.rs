//! Health in a fleet: each node probes, the majority of the nodes' views decides on every
//! node.
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lb_tests::{
    fleet::{Fleet, FleetNet, NODES},
    routed::VIP4,
};

/// Blocks (or unblocks) node `k`'s health probes to `backend` only: a netfilter rule on the
/// node's own output matching the probe socket's mark (`HC_MARK_BASE | backend id`, the id
/// being this node's), which forwarded (XDP) traffic never meets.
fn block_probes(f: &Fleet, k: usize, vip: &str, backend: &str, on: bool) -> anyhow::Result<()> {
    let v = f.vips(k)?;
    let id = v
        .iter()
        .find(|v| v.vip.to_string() == vip)
        .and_then(|v| v.backends.iter().find(|b| b.address.to_string() == backend))
        .context("backend id")?
        .id;
    let mark = format!("{:#x}", lb_common::HC_MARK_BASE | id);
    f.net.node_ns(k).exec(
        "iptables",
        &[
            if on { "-A" } else { "-D" },
            "OUTPUT",
            "-p",
            "tcp",
            "-m",
            "mark",
            "--mark",
            &mark,
            "-j",
            "REJECT",
        ],
    )
}

/// The health column of `backend` on every node.
fn health_of(f: &Fleet, vip: &str, backend: &str) -> anyhow::Result<Vec<String>> {
    (0..NODES)
        .map(|k| {
            let v = f.vips(k)?;
            let v = v.iter().find(|v| v.vip.to_string() == vip).context("vip")?;
            let b = v
                .backends
                .iter()
                .find(|b| b.address.to_string() == backend)
                .context("backend")?;
            Ok(b.health.clone())
        })
        .collect()
}

/// Samples every node's digest for `period`; returns the longest run of samples (as time)
/// during which they differed.
fn longest_divergence(f: &Fleet, vip: &str, period: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut since: Option<Instant> = None;
    let mut longest = Duration::ZERO;
    while start.elapsed() < period {
        let d = f.digests(vip)?;
        let agree = d.windows(2).all(|w| w[0] == w[1]);
        match (agree, since) {
            (false, None) => since = Some(Instant::now()),
            (true, Some(t)) => {
                longest = longest.max(t.elapsed());
                since = None;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(t) = since {
        longest = longest.max(t.elapsed());
    }
    Ok(longest)
}

/// Health in a fleet: each node probes, the fleet's verdict is the majority of the nodes'
/// views. One node that cannot reach a backend does not take it out anywhere; two of three do
/// take it out everywhere, also on the node whose own probes pass. The nodes' tables never
/// differ for longer than a status round.
#[test]
fn health_is_decided_by_the_majority_of_nodes() -> anyhow::Result<()> {
    let f = Fleet::new("flh")?;
    let vip = format!("{VIP4}:80/tcp");
    let b3 = "10.43.0.2";
    f.gue_vip(
        0,
        &vip,
        &["10.41.0.2", "10.42.0.2", b3],
        &[
            "--health",
            "tcp",
            "--interval-ms",
            "200",
            "--timeout-ms",
            "150",
            "--fall",
            "2",
            "--rise",
            "2",
        ],
    )?;
    let (all_up, _) = f.converged(&vip, None)?;
    std::thread::sleep(Duration::from_secs(1));

    // Node 2 alone cannot reach backend 3: the fleet keeps it, node 2 too.
    block_probes(&f, 2, &vip, b3, true)?;
    let longest = longest_divergence(&f, &vip, Duration::from_secs(3))?;
    let h = health_of(&f, &vip, b3)?;
    println!(
        "one node's probes fail: health per node {h:?}, tables differed for at most {longest:?}"
    );
    assert_eq!(h, ["up", "up", "up (fleet)"]);
    assert_eq!(f.digests(&vip)?, vec![Some(all_up.clone()); NODES]);
    let c = f.cluster(0)?;
    assert!(c.divergence.is_empty(), "{c:?}");
    println!("{}", f.lb(0, &["cluster", "status"])?);

    // Node 1 too: a majority, so backend 3 leaves every node's table, node 0's as well.
    block_probes(&f, 1, &vip, b3, true)?;
    let longest2 = longest_divergence(&f, &vip, Duration::from_secs(3))?;
    let h = health_of(&f, &vip, b3)?;
    println!(
        "two nodes' probes fail: health per node {h:?}, tables differed for at most {longest2:?}"
    );
    assert_eq!(h, ["down (fleet)", "down", "down"]);
    let d = f.digests(&vip)?;
    assert!(
        d.windows(2).all(|w| w[0] == w[1]) && d[0].as_deref() != Some(all_up.as_str()),
        "{d:?}"
    );
    for k in 0..NODES {
        let v = f.vips(k)?;
        let b = v[0]
            .backends
            .iter()
            .find(|b| b.address.to_string() == b3)
            .context("b3")?;
        assert_eq!(b.share_pct, 0.0, "node {k} took backend 3 out");
    }

    // Back: both rules gone, backend 3 returns everywhere.
    block_probes(&f, 1, &vip, b3, false)?;
    block_probes(&f, 2, &vip, b3, false)?;
    let start = Instant::now();
    while f.digests(&vip)? != vec![Some(all_up.clone()); NODES] {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(5),
            "backend 3 did not return"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every node takes the verdict as soon as another node's status changes (a watch), and a
    // backend the fleet has no verdict on yet counts as up: the tables move together.
    assert!(
        longest < Duration::from_millis(500) && longest2 < Duration::from_millis(500),
        "{longest:?} {longest2:?}"
    );
    Ok(())
}
