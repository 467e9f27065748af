//! A spoofed SYN flood from random sources (raw socket, bounded in count and time) against a
//! VIP with a new-flow limit, while 20 keep-alive connections are held: the backends receive
//! at most the limit plus its burst (counted at the backends, their TCP segments in), the
//! counters account for the packets sent (placed + `dropped_vip_rate`), and the keep-alive
//! connections see no failure afterwards. The same flood against a port of the VIP without a
//! limit is the baseline, reported beside it. Then three sources flood SYNs far over their
//! per-source limit while 20 legitimate clients, each from its own address, open connections
//! (`flood_from_three`); `lb stats --top-sources`, `/metrics` and the status page's JSON name
//! the three as the sources dropped most.
use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use lb_common::FlowEvent;
use lb_tests::{
    Netns,
    frames::{Frames, v4},
    raw::RawSocket,
    topo::{DemoNet, PORT, VIP},
};
use lb_userspace::protocol::TopSourcesView;

const SYNS: u32 = 20_000;
const RATE: u64 = 500;
const BURST: u64 = 50;
/// Each source's limit at the VIP: far above what one legitimate client opens, far below a
/// flooder's rate.
const SOURCE_RATE: u64 = 20;
const SOURCE_BURST: u64 = 10;
/// The three flooding sources (198.18.7.0/29, the benchmarking range).
const FLOODERS: [[u8; 4]; 3] = [[198, 18, 7, 1], [198, 18, 7, 2], [198, 18, 7, 3]];
const FLOODERS_NET: &str = "198.18.7.0/29";
/// The three sources' SYNs at most, in paced bursts over at most `THREE_FOR`.
const THREE_SYNS: u32 = 20_000;
const THREE_FOR: Duration = Duration::from_secs(2);
const LEGIT_CLIENTS: usize = 20;
/// The agent's metrics listener (inside the load balancer's namespace).
const METRICS: &str = "127.0.0.1:9100";

fn counter(net: &DemoNet, name: &str) -> anyhow::Result<u64> {
    Ok(net.dir.stats()?.global.get(name).map_or(0, |c| c.packets))
}

/// TCP segments the backends' stacks took in (`Tcp: InSegs`), summed.
fn backend_segments(net: &DemoNet) -> anyhow::Result<u64> {
    let mut total = 0;
    for b in &net.backends {
        total += in_segs(b)?;
    }
    Ok(total)
}

fn in_segs(ns: &Netns) -> anyhow::Result<u64> {
    let out = ns.command("cat").arg("/proc/net/snmp").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next(), tcp.next());
    let (Some(names), Some(values)) = (names, values) else {
        anyhow::bail!("no Tcp lines in /proc/net/snmp");
    };
    let i = names
        .split_whitespace()
        .position(|n| n == "InSegs")
        .ok_or_else(|| anyhow::anyhow!("no InSegs"))?;
    Ok(values.split_whitespace().nth(i).unwrap_or("0").parse()?)
}

/// Sends `SYNS` SYNs from random sources in 198.18.0.0/15 to `VIP:port` (bounded to 20 s);
/// returns how many and how long.
fn flood(net: &DemoNet, port: u16, seed: u64) -> anyhow::Result<(u32, Duration)> {
    let frames = Frames::new(net.client.mac("eth0")?, net.lb.mac("eth0")?);
    net.client.run(move || -> anyhow::Result<(u32, Duration)> {
        let sock = RawSocket::sender("eth0")?;
        let start = Instant::now();
        let mut rng = seed;
        let mut n = 0;
        while n < SYNS && start.elapsed() < Duration::from_secs(20) {
            let (src, sport) = lb_tests::traffic::spoofed_source(&mut rng);
            sock.send_waiting(&frames.tcp4((src, sport), (v4(VIP), port), "S", b""))?;
            n += 1;
        }
        Ok((n, start.elapsed()))
    })?
}

#[test]
fn a_spoofed_syn_flood_against_a_new_flow_limit() -> anyhow::Result<()> {
    let mut net = DemoNet::build(2, "generic")?;
    net.start_backends()?;
    net.start_agent(&["--metrics", METRICS])?;
    let limited = format!("{VIP}:{PORT}/tcp");
    // The source limit does not touch the random flood (its sources seldom repeat).
    net.add_vip(
        &limited,
        &[0, 1],
        &[
            "--new-flow-limit",
            &format!("{RATE}/{BURST}"),
            "--source-limit",
            &format!("{SOURCE_RATE}/{SOURCE_BURST}"),
        ],
    )?;
    net.add_vip(&format!("{VIP}:8080/tcp"), &[0, 1], &[])?;
    let traffic = net.start_traffic(VIP.parse()?, 20, false)?;
    std::thread::sleep(Duration::from_millis(300));
    // Quiet connections during the floods, so the backends' segments are the flood's.
    traffic.pause();
    std::thread::sleep(Duration::from_millis(200));

    let mut report = Vec::new();
    for (label, port, seed) in [
        ("limited", PORT, 0x9e37_79b9_7f4a_7c15u64),
        ("baseline", 8080, 0x1234_5678_9abc_def1),
    ] {
        let (placed0, dropped0, segs0) = (
            counter(&net, FlowEvent::SynPlaced.name())?,
            counter(&net, "dropped_vip_rate")?,
            backend_segments(&net)?,
        );
        let (sent, took) = flood(&net, port, seed)?;
        std::thread::sleep(Duration::from_millis(500));
        let placed = counter(&net, FlowEvent::SynPlaced.name())? - placed0;
        let dropped = counter(&net, "dropped_vip_rate")? - dropped0;
        let segs = backend_segments(&net)? - segs0;
        eprintln!(
            "{label}: {sent} SYNs in {took:?} ({:.0}/s): {placed} placed, {dropped} dropped over the limit, backends took in {segs} segments",
            f64::from(sent) / took.as_secs_f64()
        );
        report.push((label, sent, took, placed, dropped, segs));
    }
    let (_, sent, took, placed, dropped, segs) = report[0];
    let allowed = RATE as f64 * took.as_secs_f64() + BURST as f64;
    // One flow per CPU may slip past a bucket two CPUs empty at the same instant.
    assert!(
        placed as f64 <= allowed + 2.0,
        "{placed} SYNs placed, the limit allows {allowed:.0}"
    );
    assert!(
        segs as f64 <= allowed + 40.0,
        "the backends took in {segs} segments"
    );
    let accounted = placed + dropped;
    assert!(accounted <= u64::from(sent));
    assert!(
        accounted as f64 >= 0.98 * f64::from(sent),
        "the counters account for {accounted} of {sent} SYNs"
    );
    assert!(dropped > 0);
    let (_, bsent, _, bplaced, _, _) = report[1];
    assert!(
        bplaced as f64 >= 0.98 * f64::from(bsent),
        "the baseline was limited"
    );

    traffic.resume();
    let after = traffic.wait_rounds(5, Duration::from_secs(15));
    let t = traffic.stop()?;
    assert!(after >= 5, "the connections barely ran: {after} rounds");
    assert!(t.long_lived_errors.is_empty(), "{:?}", t.long_lived_errors);
    flood_from_three(&net)
}

/// The `i`th legitimate client's address (on the client, on-link for the backends).
fn legit_ip(i: usize) -> String {
    format!("10.200.0.{}", 30 + i)
}

/// SYNs from the three flooders the backends' stacks took in (an iptables rule that only
/// counts, in each backend's namespace).
fn flooder_syns_at_backends(net: &DemoNet) -> anyhow::Result<u64> {
    let mut total = 0;
    for b in &net.backends {
        let out = b
            .command("iptables")
            .args(["-w", "-nvxL", "INPUT"])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains(FLOODERS_NET))
            .ok_or_else(|| anyhow::anyhow!("no counting rule in {}: {text}", b.name()))?;
        total += line
            .split_whitespace()
            .next()
            .unwrap_or("0")
            .parse::<u64>()?;
    }
    Ok(total)
}

/// The three flooders' SYNs, round robin from random ports, 100 every 10 ms (about 3,000 a
/// second each, 150 times their limit) so the flood lasts while the clients connect.
fn flood_three(net: &DemoNet) -> anyhow::Result<(u32, Duration)> {
    let frames = Frames::new(net.client.mac("eth0")?, net.lb.mac("eth0")?);
    net.client.run(move || -> anyhow::Result<(u32, Duration)> {
        let sock = RawSocket::sender("eth0")?;
        let start = Instant::now();
        let mut rng = 0x5851_f42d_4c95_7f2du64;
        let mut n = 0;
        while n < THREE_SYNS && start.elapsed() < THREE_FOR {
            for _ in 0..100 {
                let (_, sport) = lb_tests::traffic::spoofed_source(&mut rng);
                let src = FLOODERS[n as usize % FLOODERS.len()];
                sock.send_waiting(&frames.tcp4((src, sport), (v4(VIP), PORT), "S", b""))?;
                n += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok((n, start.elapsed()))
    })?
}

/// One legitimate client from `src`: a new connection and one request every 150 ms until
/// `until`; the connections made and the slowest connect, or the first failure.
fn legit_client(src: IpAddr, to: SocketAddr, until: Instant) -> Result<(u32, Duration), String> {
    let mut made = 0;
    let mut slowest = Duration::ZERO;
    while Instant::now() < until {
        let t = Instant::now();
        let connect = || -> std::io::Result<TcpStream> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.bind(&SocketAddr::new(src, 0).into())?;
            s.connect_timeout(&to.into(), Duration::from_secs(3))?;
            let s: TcpStream = s.into();
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            Ok(s)
        };
        let mut s = connect().map_err(|e| format!("{src}: connect {made}: {e}"))?;
        slowest = slowest.max(t.elapsed());
        lb_tests::traffic::request(&mut s).map_err(|e| format!("{src}: request {made}: {e}"))?;
        made += 1;
        std::thread::sleep(Duration::from_millis(150));
    }
    Ok((made, slowest))
}

/// Flood (a): three sources far over their per-source limit while 20 legitimate clients,
/// each its own address, open connections: zero failures for the clients, the backends take
/// in no more of the three's SYNs than the limits allow, and `lb stats --top-sources` names
/// the three first with estimates that account for the drops.
fn flood_from_three(net: &DemoNet) -> anyhow::Result<()> {
    for i in 0..LEGIT_CLIENTS {
        net.client
            .ip(&["addr", "add", &format!("{}/24", legit_ip(i)), "dev", "eth0"])?;
    }
    for b in &net.backends {
        b.exec(
            "iptables",
            &[
                "-w",
                "-I",
                "INPUT",
                "-s",
                FLOODERS_NET,
                "-p",
                "tcp",
                "--syn",
            ],
        )?;
    }
    let dropped0 = counter(net, "dropped_source_rate")?;
    let to: SocketAddr = format!("{VIP}:{PORT}").parse()?;
    let until = Instant::now() + THREE_FOR;
    let mut clients = Vec::new();
    for i in 0..LEGIT_CLIENTS {
        let src: IpAddr = legit_ip(i).parse()?;
        clients.push(net.client.spawn(move || legit_client(src, to, until))?);
    }
    let (sent, took) = flood_three(net)?;
    let mut failures = Vec::new();
    let (mut made, mut slowest) = (0, Duration::ZERO);
    for c in clients {
        match c
            .join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))??
        {
            Ok((n, s)) => (made, slowest) = (made + n, slowest.max(s)),
            Err(e) => failures.push(e),
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let syns = flooder_syns_at_backends(net)?;
    let dropped = counter(net, "dropped_source_rate")? - dropped0;
    eprintln!(
        "three flooders: {sent} SYNs in {took:?}, backends took in {syns}, {dropped} dropped over the source limit; {LEGIT_CLIENTS} clients: {made} connections, {} failed, slowest connect {slowest:?}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "legitimate clients failed: {failures:?}"
    );
    assert!(
        made >= LEGIT_CLIENTS as u32 * 5,
        "the clients barely ran: {made}"
    );
    // Each flooder: its burst, then one per interval over the flood (plus the time until the
    // clients were joined), and one flow per CPU slipping past at the same instant.
    let per_source = SOURCE_RATE as f64 * (took.as_secs_f64() + 0.5) + SOURCE_BURST as f64 + 2.0;
    let allowed = FLOODERS.len() as f64 * per_source;
    assert!(
        syns as f64 <= allowed,
        "the backends took in {syns} of the three's SYNs, the limits allow {allowed:.0}"
    );
    assert!(
        dropped + syns >= u64::from(sent) * 98 / 100 && dropped <= u64::from(sent),
        "{dropped} dropped and {syns} placed of {sent} sent"
    );
    let out = net.dir.cli_ok(&["stats", "--top-sources", "--json"])?;
    let top: TopSourcesView = serde_json::from_str(&out)?;
    let first: Vec<String> = top
        .sources
        .iter()
        .take(3)
        .map(|s| s.source.to_string())
        .collect();
    for f in FLOODERS {
        let a = std::net::Ipv4Addr::from(f).to_string();
        assert!(first.contains(&a), "{a} not among the top three: {top:?}");
    }
    let estimated: u64 = top.sources.iter().take(3).map(|s| s.dropped).sum();
    assert!(
        estimated * 10 >= dropped * 7 && estimated * 10 <= dropped * 13,
        "sampled 1 in {}: {estimated} estimated for {dropped} dropped",
        top.sample_every
    );
    top_sources_on_metrics(net, dropped)
}

/// `/metrics` names the three flooders among at most ten sources, their estimates
/// accounting for the drops as `lb stats --top-sources` does, and `/status.json` (the
/// status page's data) lists them too.
fn top_sources_on_metrics(net: &DemoNet, dropped: u64) -> anyhow::Result<()> {
    let to: SocketAddr = METRICS.parse()?;
    let page = lb_tests::topo::http_request(&net.lb, to, &lb_tests::topo::get("/metrics"))?;
    let series: Vec<(String, String, u64)> = page
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("lb_guard_top_source_dropped{source=\"")?;
            let (source, rest) = rest.split_once("\",reason=\"")?;
            let (reason, value) = rest.split_once("\"} ")?;
            Some((source.to_string(), reason.to_string(), value.parse().ok()?))
        })
        .collect();
    let sources: std::collections::BTreeSet<&str> =
        series.iter().map(|(s, _, _)| s.as_str()).collect();
    assert!(
        !sources.is_empty() && sources.len() <= 10,
        "{} sources on /metrics: {series:?}",
        sources.len()
    );
    let mut estimated = 0;
    for f in FLOODERS {
        let a = std::net::Ipv4Addr::from(f).to_string();
        let n = series
            .iter()
            .find(|(s, r, _)| *s == a && r == "dropped_source_rate")
            .map(|(_, _, n)| *n)
            .ok_or_else(|| anyhow::anyhow!("{a} not on /metrics: {series:?}"))?;
        estimated += n;
    }
    assert!(
        estimated * 10 >= dropped * 7 && estimated * 10 <= dropped * 13,
        "/metrics estimates {estimated} for {dropped} dropped"
    );
    let json = lb_tests::topo::http_request(&net.lb, to, &lb_tests::topo::get("/status.json"))?;
    let body = json.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let status: lb_userspace::protocol::StatusView = serde_json::from_str(body)?;
    let listed: Vec<String> = status
        .top_sources
        .iter()
        .flat_map(|t| t.sources.iter().map(|s| s.source.to_string()))
        .collect();
    for f in FLOODERS {
        let a = std::net::Ipv4Addr::from(f).to_string();
        assert!(listed.contains(&a), "{a} not in /status.json: {listed:?}");
    }
    Ok(())
}
