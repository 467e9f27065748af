//! The fleet under faults: node loss (a node drained, another dying, withdrawn by BGP and
//! BFD at the router; a restart catching up) and an etcd outage under load, on the routed
//! fleet; the
//! same agreement and node loss on an L2 fleet (direct server return, its router also
//! learning the nodes by BGP).
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lb_tests::{
    bgp::next_hops,
    fleet::{Fleet, NODES},
    routed::VIP4,
    traffic::{Load, moved, udp_picks},
};

/// (c) node loss under load, with the nodes announcing by BGP to the router: one node drains
/// (maintenance), another dies (its agent and its bird killed: the router's BFD withdraws it),
/// then it comes back and catches up; (d) etcd down for 10 s: forwarding unaffected, changes
/// refused with a clear line, and they resume on its return.
#[test]
fn node_loss_and_an_etcd_outage_break_nothing() -> anyhow::Result<()> {
    let mut f = Fleet::bgp("flc", &["--announce-hold-down", "1"])?;
    let vip = format!("{VIP4}:80/tcp");
    let prefix = format!("{VIP4}/32");
    let at_router =
        |f: &Fleet, nodes: &[usize]| f.wait_route(&prefix, nodes, Duration::from_secs(10));
    // Backends added one by one: the setup's own moves stay in the slots as previous backends
    // for the window, and node 1, restarted below, resumes its saved history to tell their
    // milliseconds of tenure from the real owners'.
    f.gue_vip(0, &vip, &["10.41.0.2", "10.42.0.2", "10.43.0.2"], &[])?;
    f.converged(&vip, None)?;
    at_router(&f, &[0, 1, 2])?;
    let t0 = Instant::now();
    let phase = |what: &str| println!("{:.1} s: {what}", t0.elapsed().as_secs_f64());
    let load = Load::start(&f.net.client, 50)?;
    std::thread::sleep(Duration::from_secs(2));
    // Node 2 drains (maintenance): the router prefers the others at once, then it withdraws.
    f.lb(2, &["node", "drain", "--withdraw-after", "1"])?;
    let took = at_router(&f, &[0, 1])?;
    phase(&format!(
        "node 2 drained: out of the router's route after {took:?}"
    ));
    std::thread::sleep(Duration::from_secs(2));
    // Node 1 dies: its agent and its speaker are killed; BFD takes it out at the router.
    f.kill_node(1)?;
    let took = at_router(&f, &[0])?;
    phase(&format!(
        "node 1 killed: withdrawn at the router after {took:?}"
    ));
    std::thread::sleep(Duration::from_secs(2));
    // Its status lease runs out: the cluster shows two nodes.
    let start = Instant::now();
    loop {
        let c = f.cluster(0)?;
        if c.nodes.len() == 2 {
            println!(
                "the killed node left `lb cluster status` after {:?}",
                start.elapsed()
            );
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "{c:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A change while node 1 is down; it restarts from its state file and catches up.
    f.lb(0, &["backend", "weight", &vip, "10.41.0.2", "150"])?;
    phase("weight changed");
    f.revive_node(1)?;
    let (d, took) = f.converged(&vip, None)?;
    println!("the restarted node caught up in {took:?} (digest {d})");
    f.lb(2, &["node", "undrain"])?;
    let took = at_router(&f, &[0, 1, 2])?;
    phase(&format!(
        "nodes 1 and 2 back in the router's route after {took:?}"
    ));
    std::thread::sleep(Duration::from_secs(2));

    // (d) etcd down for 10 s.
    f.etcd.stop();
    phase("etcd stopped");
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let refused = f
        .net
        .dir_at(2)
        .cli(&["backend", "weight", &vip, "10.42.0.2", "120"])?;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(6), "unavailable: {err}");
    assert!(
        err.contains("etcd is unreachable") && err.contains("keeps forwarding"),
        "{err}"
    );
    println!("a change while etcd is down: {}", err.trim());
    for k in 0..NODES {
        let s = f.stats(k)?.store.context("store")?;
        assert!(!s.connected, "node {k} says etcd is unreachable: {s:?}");
    }
    let text = f.lb(0, &["stats"])?;
    assert!(text.contains("unreachable"), "{text}");
    println!("{}", text.lines().next().unwrap_or(""));
    std::thread::sleep(Duration::from_secs(10).saturating_sub(down.elapsed()));
    f.etcd.resume()?;
    phase("etcd started");
    let back = Instant::now();
    loop {
        if (0..NODES).all(|k| {
            f.stats(k)
                .ok()
                .and_then(|s| s.store)
                .is_some_and(|s| s.connected)
        }) {
            break;
        }
        anyhow::ensure!(
            back.elapsed() < Duration::from_secs(15),
            "nodes did not reconnect"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "all nodes reconnected {:?} after etcd returned",
        back.elapsed()
    );
    let before = f.digests(&vip)?[0].clone();
    f.lb(2, &["backend", "weight", &vip, "10.42.0.2", "120"])?;
    f.converged(&vip, before.as_deref())?;
    std::thread::sleep(Duration::from_secs(1));
    let (requests, failed, failures) = load.finish();
    println!("under node loss and an etcd outage: {requests} requests, {failed} failed");
    assert_eq!(failed, 0, "{failures:#?}");
    assert!(requests > 1000, "{requests}");
    Ok(())
}

/// The same fleet on one L2 segment (direct server return, one-armed nodes), its router
/// learning the VIP's route from the nodes by BGP across the segment: every node picks the
/// same backend for 1,000 UDP flows (each node alone at the router, the other two drained),
/// and 50 keep-alive connections plus a stream of new ones see zero failures while one node
/// drains out, another's agent is killed with kill -9 (its route stays, its pinned program
/// forwards) and then that node's speaker dies too (withdrawn at the router).
#[test]
fn an_l2_fleet_agrees_and_survives_node_loss() -> anyhow::Result<()> {
    let mut f = Fleet::l2("fll", &["--drain-time", "1"])?;
    let backends: Vec<String> = (1..=3).map(lb_tests::l2fleet::backend_ip).collect();
    let prefix = format!("{VIP4}/32");
    for vip in [format!("{VIP4}:80/udp"), format!("{VIP4}:80/tcp")] {
        f.lb(0, &["vip", "add", &vip])?;
        for b in &backends {
            f.lb(0, &["backend", "add", &vip, b])?;
        }
        let (d, took) = f.converged(&vip, None)?;
        println!("L2 fleet: {vip} live on all nodes after {took:?} (digest {d})");
    }
    let took = f.wait_route(&prefix, &[0, 1, 2], Duration::from_secs(10))?;
    println!(
        "L2 fleet: the router learned {prefix} via the three nodes {took:?} after the VIPs converged"
    );
    // Each node's MACs of the backends come from its own neighbour table.
    let start = Instant::now();
    while (0..NODES).any(|k| {
        f.vips(k)
            .map(|v| {
                v.iter()
                    .any(|v| v.backends.iter().any(|b| b.mac == "no-mac"))
            })
            .unwrap_or(true)
    }) {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(5), "MACs not learned");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each node alone at the router: the other two drained with no drain time (withdrawn
    // at once), undrained after.
    let seen = f.through_each(&prefix, |_| udp_picks(&f.net.client))?;
    let differ = moved(&seen);
    let backends_seen: std::collections::BTreeSet<&String> = seen[0].values().collect();
    println!(
        "L2 fleet: 1000 UDP flows through each node alone: {differ} met a different backend; {} backends answered",
        backends_seen.len()
    );
    assert_eq!(differ, 0);
    assert_eq!(backends_seen.len(), 3, "{backends_seen:?}");

    let load = Load::start(&f.net.client, 50)?;
    std::thread::sleep(Duration::from_secs(2));
    // Node 2 drains (GRACEFUL_SHUTDOWN, withdrawn after 1 s).
    f.lb(2, &["node", "drain"])?;
    let left = f.wait_route(&prefix, &[0, 1], Duration::from_secs(3))?;
    println!("L2 fleet: node 2 drained out of the router's route after {left:?}");
    std::thread::sleep(Duration::from_secs(2));
    // kill -9 of node 1's agent: its route stays, its pinned program keeps forwarding.
    let mut dead = f.net.nodes[1].agent.take().context("agent 1")?;
    dead.kill();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        next_hops(&f.net.router, &prefix)?,
        f.hops(&prefix, &[0, 1])?,
        "kill -9 kept the route"
    );
    // Then node 1's speaker dies as well (its host going): withdrawn at the router.
    f.kill_node(1)?;
    let gone = f.wait_route(&prefix, &[0], Duration::from_secs(3))?;
    println!("L2 fleet: node 1's speaker killed, withdrawn at the router after {gone:?}");
    std::thread::sleep(Duration::from_secs(2));
    let (requests, failed, failures) = load.finish();
    println!(
        "L2 fleet, a node draining out, one agent killed and then its speaker: {requests} requests, {failed} failed"
    );
    assert_eq!(failed, 0, "{failures:#?}");
    assert!(requests > 500, "{requests}");
    Ok(())
}

/// A node that cannot take a revision (started with room for two backends) refuses it whole,
/// keeps serving the previous one, counts it, and `lb cluster status` names the divergence;
/// once the configuration fits again the node applies it and the fleet agrees.
#[test]
fn a_node_refusing_a_revision_is_flagged_as_divergent() -> anyhow::Result<()> {
    let mut f = Fleet::new("fld")?;
    let mut agent = f.net.take_agent_at(2).context("agent 2")?;
    agent.kill();
    // Backend ids 1 and 2 only; --fresh: pins sized for the default are refused otherwise.
    f.start_with(2, &["--max-backends", "3", "--fresh"])?;
    let vip = format!("{VIP4}:80/tcp");
    f.gue_vip(0, &vip, &["10.41.0.2", "10.42.0.2"], &[])?;
    let (fits, _) = f.converged(&vip, None)?;
    f.lb(0, &["backend", "add", &vip, "10.43.0.2"])?;
    let start = Instant::now();
    let c = loop {
        let c = f.cluster(0)?;
        if c.divergence
            .iter()
            .any(|d| d.contains("node lb2 has applied revision"))
        {
            break c;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(5), "{c:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("{}", f.lb(0, &["cluster", "status"])?);
    let d = f.digests(&vip)?;
    assert_eq!(
        d[2].as_deref(),
        Some(fits.as_str()),
        "node 2 still serves the revision that fit"
    );
    assert!(d[0] == d[1] && d[0] != d[2], "{d:?}");
    let s = f.stats(2)?.store.context("store")?;
    assert_eq!(s.refused_revisions_total, 1, "{s:?}");
    assert!(
        c.nodes
            .iter()
            .any(|n| n.node == "lb2" && n.revision < c.revision),
        "{c:?}"
    );
    // Back within its room: node 2 applies the next revision and the fleet agrees again.
    f.lb(1, &["backend", "remove", &vip, "10.43.0.2"])?;
    let start = Instant::now();
    loop {
        let c = f.cluster(0)?;
        if c.divergence.is_empty()
            && f.digests(&vip)?
                .iter()
                .all(|x| x.as_deref() == Some(fits.as_str()))
        {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(5), "{c:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
