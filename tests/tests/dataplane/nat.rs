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

const VIP: &str = "10.0.0.10:80/tcp";

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
fn nat_backend(net: &Routed, i: usize) -> anyhow::Result<()> {
    net.backends[i - 1].exec(
        "ethtool",
        &["-K", &lb_tests::routed::backend_dev(i), "tx", "off"],
    )
}

fn target() -> SocketAddr {
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

fn stat(net: &Routed, name: &str) -> u64 {
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

/// The pool addresses of [`new_connections_at_full_rate_use_the_whole_pool`], held by the load
/// balancer on eth0 (the router reaches them there, so backends' answers come back into XDP).
const POOL: [&str; 4] = ["10.30.0.21", "10.30.0.22", "10.30.0.23", "10.30.0.24"];
/// Its NAT ports: 1,500 per (address, backend), so one address gives 3 backends 4,500.
const RATE_PORTS: &str = "20000-21499";
/// Connections the run opens at most: more than one address's 4,500 ports (servers close
/// first, so each holds its port 70 s, past the run), a third of the pool's 18,000.
const RATE_MAX: u64 = 6_000;
/// Connections the run must reach for the claim to hold: more than one address could take.
const RATE_MIN: u64 = 4_600;

/// A server on `addr` that answers one request per connection with `Connection: close` and
/// closes first; stops with `stop` (bounded at 60 s).
fn closing_server(
    net: &Routed,
    i: usize,
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    use std::io::{Read as _, Write as _};
    let listener = net.backends[i].run(|| std::net::TcpListener::bind(addr))??;
    listener.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(60);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < end {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }))
}

/// One request; the server closes, then the client.
fn server_closes(target: SocketAddr) -> std::io::Result<()> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    if all.ends_with(b"ok") {
        Ok(())
    } else {
        Err(std::io::ErrorKind::InvalidData.into())
    }
}

/// The agent's metrics listener in the rate run (inside the load balancer's namespace).
const RATE_METRICS: &str = "127.0.0.1:9100";

/// `GET /metrics` from the load balancer's namespace: the body.
fn metrics_text(net: &Routed) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    net.lb.run(|| -> anyhow::Result<String> {
        let to: SocketAddr = RATE_METRICS.parse()?;
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })?
}

fn client_syn_retrans(net: &Routed) -> anyhow::Result<u64> {
    let out = net
        .client
        .command("nstat")
        .args(["-asz", "TcpExtTCPSynRetrans"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("TcpExtTCPSynRetrans")).then(|| w.next()?.parse().ok())?
        })
        .unwrap_or(0))
}

/// The rate run, scaled: new connections as fast as 8 client threads open them for
/// up to 8 s, servers closing first, 3 backends behind a 4-address pool whose ports per
/// address are too few for the run: no connection fails, no SYN is retransmitted, every
/// pool address carries its share, and the table (at its fullest at the end: every port is
/// held 70 s) is under half full.
#[test]
fn new_connections_at_full_rate_use_the_whole_pool() -> anyhow::Result<()> {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    let mut net = Routed::new("npr")?;
    for a in POOL {
        net.lb
            .ip(&["addr", "add", &format!("{a}/32"), "dev", "eth0"])?;
    }
    let mut args = vec![
        "--nat-ports",
        RATE_PORTS,
        "--nat-entries",
        "16384",
        "--metrics",
        RATE_METRICS,
    ];
    for a in POOL {
        args.extend(["--nat-source", a]);
    }
    net.start_agent(&args)?;
    // A pool address held on the interface as /32 would pass as a VIP the node holds
    // itself; as a given NAT source it is refused with one line.
    let on_pool = format!("{}:80/tcp", POOL[1]);
    let out = net.dir.cli(&["vip", "add", &on_pool, "--forward", "nat"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("NAT source addresses"),
        "{err}"
    );
    net.lb(&["vip", "add", VIP, "--forward", "nat"])?;
    assert!(
        !net.lb(&["vip", "list"])?.contains(POOL[1]),
        "the refused VIP was kept"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut servers = Vec::new();
    for i in 1..=3 {
        nat_backend(&net, i)?;
        let addr: SocketAddr = format!("10.4{i}.0.2:9000").parse()?;
        servers.push(closing_server(&net, i - 1, addr, stop.clone())?);
        net.lb(&["backend", "add", VIP, &addr.to_string()])?;
    }
    let result = (|| -> anyhow::Result<()> {
        // The first packets to each backend wait for its neighbour entry.
        net.client
            .run(|| (0..30).try_for_each(|_| server_closes(target())))??;
        let retrans = client_syn_retrans(&net)?;
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let start = Instant::now();
        let mut threads = Vec::new();
        for _ in 0..8 {
            let (ok, failed) = (ok.clone(), failed.clone());
            threads.push(net.client.spawn(move || {
                let mut errors = Vec::new();
                while start.elapsed() < Duration::from_secs(8)
                    && ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < RATE_MAX
                {
                    match server_closes(target()) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.push(e.to_string());
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                errors
            })?);
        }
        let mut errors = Vec::new();
        for t in threads {
            errors.extend(t.join().map_err(|_| anyhow::anyhow!("client thread"))??);
        }
        let took = start.elapsed();
        let ok = ok.load(Ordering::Relaxed);
        let retrans = client_syn_retrans(&net)? - retrans;
        // The sweep (every 5 s) counts the table and each address.
        let deadline = Instant::now() + Duration::from_secs(12);
        let view = loop {
            let s: lb_userspace::protocol::StatsView =
                serde_json::from_str(&net.lb(&["stats", "--json"])?)?;
            let seen: u64 = s.agent.nat_pool.iter().map(|a| a.connections).sum();
            if seen >= ok || Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let table = view.agent.nat_table.unwrap_or_default();
        println!(
            "{ok} connections in {:.1} s ({:.0}/s), {} failed, {retrans} SYN retransmissions; NAT table: {} of {}; per address: {:?}",
            took.as_secs_f64(),
            ok as f64 / took.as_secs_f64(),
            errors.len(),
            table.established,
            table.capacity,
            view.agent
                .nat_pool
                .iter()
                .map(|a| (a.address.to_string(), a.connections))
                .collect::<Vec<_>>()
        );
        assert!(errors.is_empty(), "{:?}", &errors[..errors.len().min(5)]);
        assert_eq!(retrans, 0, "SYNs retransmitted: a NAT port was refused");
        assert!(
            ok >= RATE_MIN,
            "only {ok} connections: fewer than one address's ports, the run shows nothing"
        );
        assert_eq!(stat(&net, "dropped_nat_no_port"), 0);
        assert!(
            table.established * 2 < table.capacity,
            "NAT table {} of {}",
            table.established,
            table.capacity
        );
        // IPv4's pool, then IPv6's: its encapsulation source (no `--nat-source` of it).
        let v4: Vec<_> = view
            .agent
            .nat_pool
            .iter()
            .filter(|a| a.address.is_ipv4())
            .collect();
        let pool: Vec<_> = v4.iter().map(|a| a.address).collect();
        let want: Vec<std::net::IpAddr> = POOL.iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(pool, want, "lb stats lists the pool");
        for a in v4 {
            // A quarter each expected: 15 % is far outside the random spread of thousands.
            assert!(
                a.connections * 100 >= ok * 15,
                "{}: {} of {ok}",
                a.address,
                a.connections
            );
            // Its ports in use per backend: all three, within each one's 1,500, adding up to
            // its connections; nothing refused on it.
            let ports: Vec<u64> = a.ports_by_backend.iter().map(|b| b.ports).collect();
            assert_eq!(ports.len(), 3, "{}: {:?}", a.address, a.ports_by_backend);
            assert!(ports.iter().all(|p| (1..=1500).contains(p)), "{ports:?}");
            assert_eq!(ports.iter().sum::<u64>(), a.connections, "{}", a.address);
            assert_eq!((a.refused_no_port, a.refused_table_full), (0, 0));
        }
        let text = net.lb(&["stats"])?;
        assert!(
            text.contains("ports in use: 10.41.0.2:9000 ") && text.contains("0 no free port"),
            "{text}"
        );
        // /metrics has the same per address: the sweep's figure, and the refusal counters.
        let metrics = metrics_text(&net)?;
        let a = &view.agent.nat_pool[0];
        let b = &a.ports_by_backend[0];
        // (A sweep may have run since `view`: the ports are compared within a margin.)
        let ports = format!(
            "lb_nat_address_backend_ports{{address=\"{}\",backend=\"{}\"}} ",
            a.address, b.backend
        );
        let seen: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&ports)?.parse().ok())
            .unwrap_or_else(|| panic!("{ports} not in /metrics"));
        assert!(
            seen.abs_diff(b.ports) * 10 <= b.ports,
            "{seen} vs {}",
            b.ports
        );
        let refused = format!(
            "lb_nat_address_refused_total{{address=\"{}\",reason=\"no_port\"}} 0",
            a.address
        );
        assert!(
            metrics.lines().any(|l| l == refused),
            "{refused} not in /metrics"
        );
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        let _ = s.join();
    }
    result
}
