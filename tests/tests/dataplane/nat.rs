//! Full NAT on real parts: the seed's scene (two app processes on ports 8000 and 8001 of one
//! backend host, behind a VIP on port 80), keep-alive connections through backend changes,
//! 10,000 short connections through one backend without a port collision, and UDP.
//!
//! The routed network: the load balancer receives on eth0 (10.30.0.2, also its NAT source:
//! backends answer to it through the router, back into the XDP program) and reaches the
//! backends through eth1. Backends know nothing about the VIP: they see connections from
//! 10.30.0.2.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use lb_tests::{
    proc::sample_backend,
    routed::{Routed, VIP4},
    traffic::{connect_many, one_request, request},
};

pub(crate) const VIP: &str = "10.0.0.10:80/tcp";

/// The seed's scene: backend host 1 runs app processes on 8000 ("backend 1") and 8001
/// ("backend 2"); a NAT VIP on :80 in front of them.
fn seed_scene(tag: &str) -> anyhow::Result<Routed> {
    let mut net = Routed::new(tag)?;
    nat_backend(&net, 1)?;
    for (port, index) in [(8000, 1), (8001, 2)] {
        let child = sample_backend(&net.backends[0], port, index)?;
        net.procs.push(child);
    }
    net.start_agent(&[])?;
    net.lb(&["vip", "add", VIP, "--forward", "nat"])?;
    for b in ["10.41.0.2:8000", "10.41.0.2:8001"] {
        net.lb(&["backend", "add", VIP, b])?;
    }
    Ok(net)
}

/// Backend `i` answers through the NAT: its packets cross the XDP program, which updates
/// their checksums incrementally, so they must leave with complete checksums (on a veth, TX
/// checksum offload would leave only the pseudo-header sum in place, as a NIC would not).
pub(crate) fn nat_backend(net: &Routed, i: usize) -> anyhow::Result<()> {
    net.backends[i - 1].exec(
        "ethtool",
        &["-K", &lb_tests::routed::backend_dev(i), "tx", "off"],
    )
}

pub(crate) fn target() -> SocketAddr {
    SocketAddr::new(VIP4.parse().expect("VIP"), 80)
}

/// `n` requests from the client on new connections: answers per backend, and the failures.
fn spread(
    net: &Routed,
    target: SocketAddr,
    n: usize,
) -> anyhow::Result<(BTreeMap<String, u32>, Vec<String>)> {
    net.client.run(|| {
        let mut spread: BTreeMap<String, u32> = BTreeMap::new();
        let mut failed = Vec::new();
        for i in 0..n {
            match one_request(target) {
                Ok(who) => *spread.entry(who).or_default() += 1,
                Err(e) => failed.push(format!("request {i}: {e}")),
            }
        }
        (spread, failed)
    })
}

pub(crate) fn stat(net: &Routed, name: &str) -> u64 {
    let out = net.lb(&["stats"]).unwrap_or_default();
    out.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(name)).then(|| w.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

#[test]
fn the_seeds_scene_spreads_300_connections_over_two_ports() -> anyhow::Result<()> {
    let net = seed_scene("nts")?;
    // A first request shows at once when nothing gets through (instead of 300 timeouts).
    if let Err(e) = net.client.run(|| one_request(target()))? {
        anyhow::bail!("the first request failed: {e}\n{}", net.lb(&["stats"])?);
    }
    let (spread, failed) = spread(&net, target(), 300)?;
    println!("300 new connections: {spread:?}, failed {failed:?}");
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(spread.len(), 2, "{spread:?}");
    for (who, n) in &spread {
        assert!(
            (120..=180).contains(n),
            "{who}: {n} of 300 is not 50% +- 10"
        );
    }
    let out = net.lb(&["backend", "list", VIP])?;
    assert!(
        out.contains("10.41.0.2:8000") && out.contains("10.41.0.2:8001"),
        "{out}"
    );
    // The client closes each connection first (it drops the socket after the answer) and
    // acknowledges the backend's FIN: the backend keeps no TIME_WAIT, so the ports are free
    // again after the grace (2 s), and the agent's sweep (every 5 s) finds the table empty.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (live, table) = loop {
        let stats = net.lb(&["stats"])?;
        let live = stats.lines().find_map(|l| {
            l.strip_prefix("NAT connections: ")?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        });
        let table = stats
            .lines()
            .find(|l| l.starts_with("NAT table: "))
            .map(str::to_string);
        match (live, table) {
            (Some(0), Some(t)) => break (0, t),
            _ if Instant::now() > deadline => anyhow::bail!("NAT table never emptied:\n{stats}"),
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    };
    println!("lb stats: NAT connections: {live}; {table}");
    let tw = net.backends[0]
        .command("ss")
        .args(["-Htan", "state", "time-wait"])
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&tw.stdout).lines().count(),
        0,
        "the backend holds no TIME_WAIT when clients close first"
    );
    Ok(())
}

#[test]
fn keep_alive_connections_survive_backend_add_and_drain() -> anyhow::Result<()> {
    let mut net = seed_scene("ntk")?;
    nat_backend(&net, 2)?;
    let child = sample_backend(&net.backends[1], 8002, 3)?;
    net.procs.push(child);
    let mut conns = connect_many(&net.client, target(), 20)?;
    let owners: Vec<String> = conns.iter_mut().map(request).collect::<Result<_, _>>()?;
    net.lb(&["backend", "add", VIP, "10.42.0.2:8002"])?;
    for (c, o) in conns.iter_mut().zip(&owners) {
        assert_eq!(&request(c)?, o, "a connection moved after an add");
    }
    // `lb trace` names each connection's NAT'ed backend (its NAT entry decides).
    for (c, o) in conns.iter().zip(&owners) {
        let local = c.local_addr()?;
        let t = net.lb(&["trace", &local.to_string(), VIP])?;
        let want = if o == "hello from backend 1" {
            "10.41.0.2:8000"
        } else {
            "10.41.0.2:8001"
        };
        // The row under the header: VIP, id, slot, slot backend, previous, FLOW ENTRY, ...
        let flow_entry = t
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(5))
            .unwrap_or("");
        assert_eq!(flow_entry, want, "{o}: {t}");
    }
    net.lb(&["backend", "drain", VIP, "10.41.0.2:8000"])?;
    for (c, o) in conns.iter_mut().zip(&owners) {
        assert_eq!(&request(c)?, o, "a connection moved after a drain");
    }
    // New connections avoid the drained backend and reach the added one.
    let seen: Vec<String> = net
        .client
        .run(|| (0..30).map(|_| one_request(target())).collect::<Vec<_>>())?
        .into_iter()
        .collect::<Result<_, _>>()?;
    assert!(
        !seen.iter().any(|w| w == "hello from backend 1"),
        "{seen:?}"
    );
    assert!(seen.iter().any(|w| w == "hello from backend 3"), "{seen:?}");
    println!(
        "20 keep-alive connections kept their backends through an add and a drain: {:?}",
        owners
            .iter()
            .fold(BTreeMap::<&str, u32>::new(), |mut m, o| {
                *m.entry(o.as_str()).or_default() += 1;
                m
            })
    );
    Ok(())
}

#[test]
fn ten_thousand_short_connections_through_one_backend_never_collide() -> anyhow::Result<()> {
    let net = seed_scene("ntp")?;
    net.lb(&["backend", "remove", VIP, "10.41.0.2:8001"])?;
    // The first packet to a backend waits for its neighbour entry; measured from the second.
    net.client.run(|| one_request(target()))??;
    let start = Instant::now();
    let (ok, failed, slow) = net.client.run(|| {
        let (mut ok, mut failed, mut slow) = (0u32, Vec::new(), 0u32);
        for i in 0..10_000 {
            let t = Instant::now();
            match one_request(target()) {
                Ok(_) => ok += 1,
                Err(e) => failed.push(format!("connection {i}: {e}")),
            }
            // A SYN refused as PAWS by a backend still in TIME_WAIT on a reused port shows
            // as a 1 s retransmission.
            if t.elapsed() > Duration::from_millis(900) {
                slow += 1;
            }
            if start.elapsed() > Duration::from_secs(240) {
                failed.push(format!("stopped after {i} connections: too slow"));
                break;
            }
        }
        (ok, failed, slow)
    })?;
    let paws = net.backends[0]
        .command("nstat")
        .args(["-az", "TcpExtPAWSTimewait"])
        .output()?;
    let paws = String::from_utf8_lossy(&paws.stdout).into_owned();
    println!(
        "10,000 short connections in {:.1} s: {ok} ok, {} failed, {slow} slower than 900 ms; backend: {}",
        start.elapsed().as_secs_f64(),
        failed.len(),
        paws.lines().last().unwrap_or("")
    );
    if !failed.is_empty() || slow != 0 {
        println!("{}", net.lb(&["stats"])?);
    }
    assert!(failed.is_empty(), "{:?}", &failed[..failed.len().min(5)]);
    assert_eq!(
        slow, 0,
        "connections waited for a retransmission (port reuse)"
    );
    assert_eq!(stat(&net, "dropped_nat_no_port"), 0);
    Ok(())
}

#[test]
fn udp_request_and_reply_through_nat() -> anyhow::Result<()> {
    let mut net = Routed::new("ntu")?;
    nat_backend(&net, 1)?;
    for (port, index) in [(5300, 1), (5301, 2)] {
        let child = sample_backend(&net.backends[0], port, index)?;
        net.procs.push(child);
    }
    net.start_agent(&[])?;
    let vip = "10.0.0.10:53/udp";
    net.lb(&["vip", "add", vip, "--forward", "nat"])?;
    for b in ["10.41.0.2:5300", "10.41.0.2:5301"] {
        net.lb(&["backend", "add", vip, b])?;
    }
    let answers = net
        .client
        .run(|| -> anyhow::Result<BTreeMap<String, u32>> {
            let mut seen = BTreeMap::new();
            for _ in 0..40 {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.connect("10.0.0.10:53")?;
                // The same flow twice: the same backend both times, answers from the VIP.
                let mut first = None;
                for _ in 0..2 {
                    s.send(b"ping")?;
                    let mut buf = [0u8; 256];
                    let n = s.recv(&mut buf)?;
                    let who = String::from_utf8_lossy(&buf[..n]).to_string();
                    let who = who.split(" (").next().unwrap_or("").to_string();
                    if let Some(f) = &first {
                        anyhow::ensure!(*f == who, "one UDP flow met two backends");
                    }
                    first = Some(who);
                }
                *seen.entry(first.unwrap_or_default()).or_default() += 1;
            }
            Ok(seen)
        })??;
    println!("40 UDP flows through NAT, 2 datagrams each: {answers:?}");
    assert_eq!(answers.values().sum::<u32>(), 40);
    assert_eq!(answers.len(), 2, "{answers:?}");
    Ok(())
}

#[test]
fn ipv6_connections_through_nat() -> anyhow::Result<()> {
    let mut net = Routed::new("nt6")?;
    nat_backend(&net, 1)?;
    for (port, index) in [(8000, 1), (8001, 2)] {
        let child = sample_backend(&net.backends[0], port, index)?;
        net.procs.push(child);
    }
    net.start_agent(&[])?;
    let vip = "[2001:db8::10]:80/tcp";
    net.lb(&["vip", "add", vip, "--forward", "nat"])?;
    for b in ["[fd00:41::2]:8000", "[fd00:41::2]:8001"] {
        net.lb(&["backend", "add", vip, b])?;
    }
    let target: SocketAddr = "[2001:db8::10]:80".parse()?;
    let (spread, failed) = spread(&net, target, 100)?;
    println!("100 IPv6 connections through NAT: {spread:?}, failed {failed:?}");
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(spread.len(), 2, "{spread:?}");
    Ok(())
}
