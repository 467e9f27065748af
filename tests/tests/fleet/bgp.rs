//! VIPs announced by BGP: three nodes each running bird from the shipped template, a router
//! running bird with BFD and multipath into its kernel, a real etcd. Every figure is read
//! from the router's own kernel route table (`ip route`) or its bird (`birdc`).
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lb_tests::{
    Netns,
    bgp::{RouteMonitor, next_hops},
    fleet::{Fleet, FleetNet as _, NODES, node_addr},
    routed::{VIP_MIXED, VIP4, VIP6, backend4, backend6},
    traffic::Load,
};
use lb_userspace::announce::AnnounceView;

const PREFIX: &str = "10.0.0.10/32";
const PREFIX6: &str = "2001:db8::10/128";
/// The hold-down and drain time the nodes run with.
const AGENT_ARGS: [&str; 4] = ["--announce-hold-down", "2", "--drain-time", "3"];

/// Every node: the router's route through all three.
const ALL: [usize; NODES] = [0, 1, 2];

fn announce(f: &Fleet, k: usize) -> anyhow::Result<AnnounceView> {
    Ok(serde_json::from_str(
        &f.lb(k, &["node", "status", "--json"])?,
    )?)
}

/// Cuts (or restores) the router's link to node `k` without touching the carrier: netfilter
/// drops everything both ways on the router's end, as a dead host or a broken path would.
fn cut(router: &Netns, dev: &str, on: bool) -> anyhow::Result<()> {
    let op = if on { "-I" } else { "-D" };
    for rule in [
        ["INPUT", "-i", dev],
        ["OUTPUT", "-o", dev],
        ["FORWARD", "-i", dev],
        ["FORWARD", "-o", dev],
    ] {
        let mut a = vec![op];
        a.extend_from_slice(&rule);
        a.extend_from_slice(&["-j", "DROP"]);
        router.exec("iptables", &a)?;
    }
    Ok(())
}

/// The router's interface towards node `k` (the one its route via the node leaves on).
fn router_dev(f: &Fleet, k: usize) -> anyhow::Result<String> {
    let out = f
        .net
        .router
        .command("ip")
        .args(["-j", "route", "get", &node_addr(k)])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v[0]["dev"]
        .as_str()
        .context("no route to the node")?
        .to_string())
}

/// (1) Nothing is announced before a backend serves, then three next hops; under 50
/// keep-alive connections and new ones: (a) a link cut is withdrawn by BFD within 1 s,
/// (b) a drain shows GRACEFUL_SHUTDOWN at the router, then withdraws, then undrain brings it
/// back, (d) kill -9 of an agent keeps its route and the restarted agent takes it over; zero
/// failed requests throughout.
#[test]
fn bgp_announces_what_serves_and_bfd_and_drain_break_nothing() -> anyhow::Result<()> {
    let mut f = Fleet::bgp("fbg", &AGENT_ARGS)?;
    let r = f.net.router.name().to_string();
    let vip = format!("{VIP4}:80/tcp");
    f.lb(0, &["vip", "add", &vip, "--forward", "gue"])?;
    // No backend: nothing announced, and every node says why.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        next_hops(&f.net.router, PREFIX)?.is_empty(),
        "announced with no backend"
    );
    let a = announce(&f, 0)?;
    assert_eq!(a.vips[0].state, "withdrawn", "{a:?}");
    assert!(
        a.vips[0]
            .why
            .as_deref()
            .unwrap_or("")
            .contains("too few backends"),
        "{a:?}"
    );
    let list = f.lb(0, &["vip", "list"])?;
    assert!(list.contains("withdrawn (too few backends"), "{list}");
    for b in ["10.41.0.2", "10.42.0.2", "10.43.0.2"] {
        f.lb(0, &["backend", "add", &vip, b])?;
    }
    let took = f.wait_route(PREFIX, &ALL, Duration::from_secs(10))?;
    println!("three next hops at router {r} {took:?} after the backends were added");
    println!("{}", f.lb(0, &["node", "status"])?);
    let a = announce(&f, 1)?;
    assert!(
        a.sessions.iter().all(|s| s.up) && a.sessions.len() == 1,
        "{a:?}"
    );
    let m = f.metrics(0)?;
    assert!(
        m.contains(&format!("lb_vip_announced{{vip=\"{vip}\"}} 1")),
        "{m}"
    );
    assert!(m.contains("lb_bgp_session_up{peer=\"r1\"} 1"), "{m}");

    // An IPv6 VIP goes over the same sessions (multiprotocol BGP, next hop each node's IPv6
    // address on its link): announced with a serving backend, withdrawn when removed.
    let vip6 = format!("[{VIP6}]:80/tcp");
    f.gue_vip(0, &vip6, &[&backend6(1)], &[])?;
    let took6 = f.wait_route(PREFIX6, &ALL, Duration::from_secs(10))?;
    println!(
        "IPv6: {PREFIX6} via the three nodes at the router {took6:?} after its backend was added"
    );
    f.lb(0, &["vip", "remove", &vip6])?;
    let gone6 = f.wait_route(PREFIX6, &[], Duration::from_secs(5))?;
    println!("IPv6: {PREFIX6} withdrawn at the router {gone6:?} after `lb vip remove`");
    assert_eq!(
        next_hops(&f.net.router, PREFIX)?,
        f.hops(PREFIX, &ALL)?,
        "the IPv4 VIP is untouched"
    );

    let mut monitor = RouteMonitor::start(&f.net.router, PREFIX)?;
    let load = Load::start(&f.net.client, 50)?;
    std::thread::sleep(Duration::from_secs(2));

    // (a) Node 2's link cut, carrier up: BFD withdraws it.
    let dev = router_dev(&f, 2)?;
    cut(&f.net.router, &dev, true)?;
    let cut_at = Instant::now();
    let withdrawn = f.wait_route(PREFIX, &[0, 1], Duration::from_secs(3));
    let restored = cut(&f.net.router, &dev, false);
    let withdrawn = withdrawn?;
    restored?;
    println!("(a) link to node 2 cut: withdrawn at the router after {withdrawn:?}");
    assert!(withdrawn <= Duration::from_secs(1), "{withdrawn:?}");
    let back = f.wait_route(PREFIX, &ALL, Duration::from_secs(20))?;
    println!(
        "(a) link restored: node 2 back after {back:?} (cut for {:?})",
        cut_at.elapsed()
    );
    std::thread::sleep(Duration::from_secs(1));

    // (b) Drain node 1: GRACEFUL_SHUTDOWN at the router (its route loses preference, so
    // traffic leaves before the withdrawal), withdrawn after the drain time, then undrain.
    // Taken before the command: the agent starts the drain time when it gets it.
    let drained_at = Instant::now();
    f.lb(1, &["node", "drain"])?;
    let start = Instant::now();
    loop {
        let routes = f
            .router_bird()
            .birdc(&["show", "route", "all", PREFIX, "protocol", "lb1"])?;
        if routes.contains("(65535,0)") {
            println!(
                "(b) at the router, lb1's route after {:?}:\n{routes}",
                start.elapsed()
            );
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(3), "{routes}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = f.wait_route(PREFIX, &[0, 2], Duration::from_secs(2))?;
    println!("(b) node 1 out of the router's ECMP route {left:?} after the drain began");
    let a = announce(&f, 1)?;
    assert_eq!(a.vips[0].state, "draining", "{a:?}");
    // Withdrawn once the drain time (3 s) is up.
    let start = Instant::now();
    loop {
        let routes = f
            .router_bird()
            .birdc(&["show", "route", PREFIX, "protocol", "lb1"])?;
        if !routes.contains(VIP4) {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(6), "{routes}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone = drained_at.elapsed();
    println!("(b) withdrawn by node 1 {gone:?} after the drain began");
    // Never before the drain time (the agent keeps its start in whole milliseconds).
    assert!(
        gone + Duration::from_millis(10) >= Duration::from_secs(3),
        "{gone:?}"
    );
    let a = announce(&f, 1)?;
    assert_eq!(a.vips[0].why.as_deref(), Some("node drained"), "{a:?}");
    f.lb(1, &["node", "undrain"])?;
    let back = f.wait_route(PREFIX, &ALL, Duration::from_secs(5))?;
    println!("(b) undrained: back {back:?}");

    // (d) kill -9 of agent 0: its route stays, its node keeps forwarding; the restarted agent
    // takes the same announcement over without a route change.
    std::thread::sleep(Duration::from_secs(1));
    // Forget the changes so far (the cut, the drain).
    monitor.changes();
    let mut dead = f.net.take_agent_at(0).context("agent 0")?;
    dead.kill();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        next_hops(&f.net.router, PREFIX)?,
        f.hops(PREFIX, &ALL)?,
        "kill -9 kept the route"
    );
    f.start(0)?;
    let start = Instant::now();
    while announce(&f, 0).map_or(true, |a| {
        a.vips.first().is_none_or(|v| v.state != "announced")
    }) {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "agent 0 did not take over"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    let a = announce(&f, 0)?;
    assert_eq!(
        a.route_changes_total, 0,
        "the restarted agent kept the route it found: {a:?}"
    );
    let during_kill = monitor.changes().len();
    println!("(d) kill -9 and restart of agent 0: {during_kill} route change(s) at the router");
    assert_eq!(during_kill, 0);

    let (requests, failed, failures) = load.finish();
    println!(
        "BGP fleet under a link cut, a drain and kill -9: {requests} requests, {failed} failed"
    );
    assert_eq!(failed, 0, "{failures:#?}");
    assert!(requests > 1000, "{requests}");
    // `lb cluster status` shows every node's announcement and session.
    let c = f.lb(2, &["cluster", "status"])?;
    println!("{c}");
    for k in 0..NODES {
        assert!(
            c.contains(&format!(
                "BGP lb{k}: {vip} announced; sessions: r1 established"
            )),
            "{c}"
        );
    }
    Ok(())
}

/// (c) All backends down in one node's own probes only: the node follows the fleet's
/// verdict (the majority sees them up), so it keeps serving and keeps announcing; down
/// fleet-wide: every node withdraws. A backend flapping every 300 ms for 10 s costs each
/// node one withdrawal and one announcement (hold-down 2 s).
#[test]
fn bgp_health_gating_and_a_flapping_backend() -> anyhow::Result<()> {
    let f = Fleet::bgp("fbh", &AGENT_ARGS)?;
    let vip = format!("{VIP4}:80/tcp");
    let health = [
        "--health",
        "tcp",
        "--interval-ms",
        "100",
        "--timeout-ms",
        "80",
        "--rise",
        "1",
        "--fall",
        "1",
    ];
    let mut args = vec!["vip", "add", &vip, "--forward", "gue"];
    args.extend_from_slice(&health);
    f.lb(0, &args)?;
    for i in 1..=3 {
        f.lb(0, &["backend", "add", &vip, &backend4(i)])?;
    }
    f.wait_route(PREFIX, &ALL, Duration::from_secs(10))?;

    // Node 2 cannot probe any backend (its own view: all down), the others can.
    let block = |ns: &Netns, on: bool, rule: &[&str]| -> anyhow::Result<()> {
        let mut a = vec![if on { "-A" } else { "-D" }];
        a.extend_from_slice(rule);
        ns.exec("iptables", &a)
    };
    let probes_out = ["OUTPUT", "-p", "tcp", "--dport", "80", "-j", "DROP"];
    block(f.net.node_ns(2), true, &probes_out)?;
    let start = Instant::now();
    loop {
        let c = f.cluster(0)?;
        let down = c.nodes.iter().find(|n| n.node == "lb2").is_some_and(|n| {
            n.health.values().all(|m| m.values().all(|up| !up)) && !n.health.is_empty()
        });
        if down {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(5), "{c:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    let a = announce(&f, 2)?;
    println!(
        "(c) node 2 sees every backend down, the fleet sees them up: {:?}",
        a.vips[0]
    );
    assert_eq!(a.vips[0].state, "announced", "{a:?}");
    assert_eq!(next_hops(&f.net.router, PREFIX)?, f.hops(PREFIX, &ALL)?);
    block(f.net.node_ns(2), false, &probes_out)?;

    // A VIP of its own that needs two serving backends (`--announce-min-serving 2`), with
    // two: withdrawn by every node when one of them fails, while the first VIP (three
    // backends, the node's default of one) stays announced through the same failure.
    let strict = format!("{VIP_MIXED}:80/tcp");
    let strict_prefix = format!("{VIP_MIXED}/32");
    let mut args = vec!["vip", "add", &strict, "--forward", "gue"];
    args.extend_from_slice(&health);
    args.extend_from_slice(&["--announce-min-serving", "2"]);
    f.lb(0, &args)?;
    for i in 1..=2 {
        f.lb(0, &["backend", "add", &strict, &backend4(i)])?;
    }
    f.wait_route(&strict_prefix, &ALL, Duration::from_secs(10))?;
    let probes_in = ["INPUT", "-p", "tcp", "--dport", "80", "-j", "DROP"];
    let b2 = &f.net.backends[1];
    let mut first = RouteMonitor::start(&f.net.router, PREFIX)?;
    block(b2, true, &probes_in)?;
    let strict_gone = f.wait_route(&strict_prefix, &[], Duration::from_secs(5));
    let views: anyhow::Result<Vec<AnnounceView>> = (0..NODES).map(|k| announce(&f, k)).collect();
    let first_hops = next_hops(&f.net.router, PREFIX);
    let first_changes = first.changes();
    block(b2, false, &probes_in)?;
    let strict_gone = strict_gone?;
    println!(
        "min 2 serving, one of two backends down: withdrawn by every node after {strict_gone:?}"
    );
    assert_eq!(
        first_hops?,
        f.hops(PREFIX, &ALL)?,
        "the VIP needing one backend stays announced"
    );
    assert!(first_changes.is_empty(), "{first_changes:#?}");
    for (k, a) in views?.iter().enumerate() {
        let v = a.vips.iter().find(|v| v.vip.to_string() == strict);
        assert_eq!(
            v.map(|v| (v.state_line(), v.needed)),
            Some((
                "withdrawn (too few backends: 1 serving, 2 needed)".to_string(),
                2
            )),
            "node {k}: {a:?}"
        );
    }
    // The flapping part below takes the address for a VIP of its own.
    f.lb(0, &["vip", "remove", &strict])?;
    f.wait_route(&strict_prefix, &[], Duration::from_secs(5))?;

    // Every backend down for every node: every node withdraws the VIP.
    // Probes reach the backends through the tunnel, decapsulated into TCP to port 80; the
    // load is over, so every TCP segment to port 80 can go.
    for b in &f.net.backends {
        block(b, true, &probes_in)?;
    }
    let none = f.wait_route(PREFIX, &[], Duration::from_secs(5));
    for b in &f.net.backends {
        block(b, false, &probes_in)?;
    }
    let unblocked = Instant::now();
    let none = none?;
    println!("(c) all backends down fleet-wide: withdrawn by every node after {none:?}");
    for k in 0..NODES {
        let a = announce(&f, k)?;
        // Withdrawn for too few backends, or already held down after they came back.
        assert_eq!(a.vips[0].state, "withdrawn", "node {k}: {a:?}");
    }
    f.wait_route(PREFIX, &ALL, Duration::from_secs(10))?;
    let back = unblocked.elapsed();
    println!("(c) backends back: announced again {back:?} after their probes pass (hold-down 2 s)");
    assert!(back >= Duration::from_secs(2), "{back:?}");

    // A VIP whose only backend flaps every 300 ms for 10 s.
    let flap_vip = strict.as_str();
    let mut args = vec!["vip", "add", flap_vip, "--forward", "gue"];
    args.extend_from_slice(&health);
    f.lb(0, &args)?;
    f.lb(0, &["backend", "add", flap_vip, &backend4(1)])?;
    f.wait_route(&strict_prefix, &ALL, Duration::from_secs(10))?;
    let before: Vec<u64> = (0..NODES)
        .map(|k| announce(&f, k).map(|a| a.route_changes_total))
        .collect::<anyhow::Result<_>>()?;
    let mut monitor = RouteMonitor::start(&f.net.router, &strict_prefix)?;
    let rule = probes_in;
    let b1 = &f.net.backends[0];
    let start = Instant::now();
    let mut down = false;
    let flapped = (|| -> anyhow::Result<()> {
        while start.elapsed() < Duration::from_secs(10) {
            down = !down;
            block(b1, down, &rule)?;
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(())
    })();
    if down {
        block(b1, false, &rule)?;
    }
    flapped?;
    let settled = f.wait_route(&strict_prefix, &ALL, Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(500));
    let at_router = monitor.changes();
    let per_node: Vec<u64> = (0..NODES)
        .map(|k| announce(&f, k).map(|a| a.route_changes_total - before[k]))
        .collect::<anyhow::Result<_>>()?;
    println!(
        "flapping backend (300 ms for 10 s): announced again {settled:?} after the flapping stopped; route changes per node {per_node:?}, at the router {}:\n{}",
        at_router.len(),
        at_router.join("\n")
    );
    for (k, n) in per_node.iter().enumerate() {
        assert!(*n <= 2, "node {k}: {n} route changes");
    }
    assert!(at_router.len() <= 2 * NODES, "{at_router:#?}");
    Ok(())
}
