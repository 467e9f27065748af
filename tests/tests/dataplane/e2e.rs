//! End-to-end scenarios on the demo network: real clients, the real agent and XDP program,
//! real sample backends, in namespaces each test builds and removes.
use std::net::IpAddr;

use lb_tests::topo::{DemoNet, PORT, VIP};
use lb_userspace::api::protocol::StatsView;

fn vip_ip() -> IpAddr {
    VIP.parse().expect("literal")
}

fn tcp_vip() -> String {
    format!("{VIP}:{PORT}/tcp")
}

/// The demo network with its sample backends and agent, and the TCP VIP on `vip_backends`.
fn serving(backends: usize, mode: &str, vip_backends: &[usize]) -> anyhow::Result<DemoNet> {
    let mut net = DemoNet::build(backends, mode)?;
    net.start_backends()?;
    net.start_agent(&[])?;
    net.add_vip(&tcp_vip(), vip_backends, &[])?;
    Ok(net)
}

/// Background traffic saw no failed request and no broken long-lived connection.
fn assert_undisturbed(report: &lb_tests::topo::TrafficReport) {
    assert!(report.new_ok > 50, "too little traffic: {}", report.new_ok);
    assert!(report.new_failed.is_empty(), "{:?}", report.new_failed);
    assert!(
        report.long_lived_errors.is_empty(),
        "{:?}",
        report.long_lived_errors
    );
}

/// Shares of `n` new connections per backend index.
fn spread(net: &DemoNet, n: usize, backends: usize) -> anyhow::Result<Vec<usize>> {
    let mut counts = vec![0usize; backends];
    for _ in 0..n {
        counts[net.http_get(vip_ip(), PORT)?] += 1;
    }
    Ok(counts)
}

fn spread_scenario(mode: &str) -> anyhow::Result<()> {
    let mut net = DemoNet::build(3, mode)?;
    net.start_backends()?;
    net.start_agent(&[])?;
    net.add_vip(&tcp_vip(), &[0, 1, 2], &[])?;
    let counts = spread(&net, 300, 3)?;
    eprintln!("{mode}: equal weights {counts:?}");
    for c in &counts {
        assert!(
            (60..=141).contains(c),
            "{mode}: share out of 20-47 %: {counts:?}"
        );
    }
    for (i, w) in ["100", "200", "300"].iter().enumerate() {
        net.lb(&[
            "backend",
            "weight",
            &tcp_vip(),
            &lb_tests::topo::backend_ip(i),
            w,
        ])?;
    }
    let counts = spread(&net, 300, 3)?;
    eprintln!("{mode}: weights 1:2:3 {counts:?}");
    for (c, want) in counts.iter().zip([50.0, 100.0, 150.0]) {
        let pct_diff = (*c as f64 - want).abs() / 3.0;
        assert!(
            pct_diff <= 10.0,
            "{mode}: weighted shares off by more than 10 points: {counts:?}"
        );
    }
    let stats = net.dir.stats()?;
    assert!(counter(&stats, "forwarded") >= 600, "{stats:?}");
    Ok(())
}

#[test]
fn spread_native() -> anyhow::Result<()> {
    spread_scenario("native")
}

#[test]
fn spread_generic() -> anyhow::Result<()> {
    spread_scenario("generic")
}

fn forwarded(net: &DemoNet) -> anyhow::Result<StatsView> {
    net.dir.stats()
}

/// Packets of global counter `name` (0 when the agent does not list it).
fn counter(stats: &StatsView, name: &str) -> u64 {
    stats.global.get(name).map_or(0, |c| c.packets)
}

/// Scenario 6: traffic to the load balancer itself (ping, TCP to its own address, ARP, IPv6
/// neighbour discovery) is passed to its kernel untouched and never forwarded.
#[test]
fn non_vip_traffic_is_unaffected() -> anyhow::Result<()> {
    use lb_tests::topo::{LB_IP, LB_IP6};
    let net = serving(1, "native", &[0])?;
    let before = forwarded(&net)?;
    net.client
        .exec("ping", &["-c", "3", "-i", "0.2", "-W", "2", LB_IP])?;
    net.client
        .exec("ping", &["-6", "-c", "3", "-i", "0.2", "-W", "2", LB_IP6])?;
    // TCP to the load balancer's own address: a listener in its namespace answers.
    let listener = net
        .lb
        .run(|| std::net::TcpListener::bind((LB_IP, 9000)))??;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        use std::io::Write as _;
        let (mut s, _) = listener.accept()?;
        s.write_all(b"lb host here\n")
    });
    let got = net.client.run(|| -> std::io::Result<String> {
        use std::io::Read as _;
        let mut s = std::net::TcpStream::connect((LB_IP, 9000))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("listener thread panicked"))??;
    assert_eq!(got, "lb host here\n");
    // The client learnt the load balancer's MAC through ARP and ND.
    let neigh = std::process::Command::new("ip")
        .args(["-n", net.client.name(), "neigh"])
        .output()?;
    let neigh = String::from_utf8_lossy(&neigh.stdout);
    assert!(neigh.contains(LB_IP) && neigh.contains(LB_IP6), "{neigh}");
    let after = forwarded(&net)?;
    assert_eq!(
        counter(&after, "forwarded"),
        counter(&before, "forwarded"),
        "non-VIP traffic was forwarded"
    );
    assert!(counter(&after, "passed_not_vip") >= counter(&before, "passed_not_vip") + 10);
    Ok(())
}

/// Scenario 8: an IPv6 VIP and a UDP VIP, end to end.
#[test]
fn ipv6_and_udp_vips() -> anyhow::Result<()> {
    use lb_tests::topo::VIP6;
    let mut net = DemoNet::build(3, "native")?;
    net.start_backends()?;
    net.start_agent(&[])?;
    net.add_vip(&format!("[{VIP6}]:{PORT}/tcp"), &[0, 1, 2], &[])?;
    net.add_vip(&format!("{VIP}:{PORT}/udp"), &[0, 1, 2], &[])?;
    let mut seen6 = std::collections::BTreeSet::new();
    for _ in 0..30 {
        seen6.insert(net.http_get(VIP6.parse()?, PORT)?);
    }
    let mut seen_udp = std::collections::BTreeSet::new();
    for _ in 0..30 {
        seen_udp.insert(net.udp_get(vip_ip(), PORT)?);
    }
    assert!(seen6.len() >= 2, "IPv6 connections all went to {seen6:?}");
    assert!(seen_udp.len() >= 2, "UDP requests all went to {seen_udp:?}");
    Ok(())
}

/// Scenario 3: a killed backend leaves rotation within interval x fall + 1 s; every new
/// connection after that succeeds; restarted, it comes back.
#[test]
fn health_checks_follow_backends() -> anyhow::Result<()> {
    use lb_tests::wait_until;
    use std::time::Duration;
    let mut net = DemoNet::build(3, "native")?;
    net.start_backends()?;
    net.start_agent(&[])?;
    let vip = tcp_vip();
    net.add_vip(
        &vip,
        &[0, 1, 2],
        &[
            "--health",
            "http",
            "--interval-ms",
            "200",
            "--timeout-ms",
            "150",
            "--fall",
            "3",
            "--rise",
            "2",
        ],
    )?;
    let state_of = |net: &DemoNet, i: usize| net.dir.backend_health(&lb_tests::topo::backend_ip(i));
    wait_until(
        Duration::from_secs(5),
        "backend 1 up",
        || Ok(state_of(&net, 1)? == "up"),
        || format!("{:?}", state_of(&net, 1)),
    )?;
    // At least `rise` probes passed: its streak is settled.
    std::thread::sleep(Duration::from_millis(600));
    // Kill backend 1's server (the sample processes were started in index order).
    let killed = net.procs.remove(1);
    drop(killed);
    let took = wait_until(
        Duration::from_millis(200 * 3 + 1000),
        "backend 1 out of rotation",
        || Ok(state_of(&net, 1)? == "down"),
        || format!("{:?}", state_of(&net, 1)),
    )?;
    eprintln!("backend 1 out of rotation after {took:?}");
    let mut counts = [0usize; 3];
    for _ in 0..100 {
        counts[net.http_get(vip_ip(), PORT)?] += 1;
    }
    assert_eq!(counts[1], 0, "{counts:?}");
    net.start_backend(1)?;
    wait_until(
        Duration::from_secs(5),
        "backend 1 back",
        || Ok(state_of(&net, 1)? == "up"),
        || format!("{:?}", state_of(&net, 1)),
    )?;
    let mut counts = [0usize; 3];
    for _ in 0..100 {
        counts[net.http_get(vip_ip(), PORT)?] += 1;
    }
    assert!(
        counts[1] > 0,
        "restarted backend gets no traffic: {counts:?}"
    );
    Ok(())
}

/// Scenario 2: the same 5-tuple keeps its backend; 50 long-lived connections exchanging data
/// every 100 ms see no reset while other backends are added, removed and drained, and while
/// their own backend is drained and reweighted.
#[test]
fn long_lived_connections_stick_through_changes() -> anyhow::Result<()> {
    use lb_tests::topo::backend_ip;
    use std::time::Duration;
    let mut net = DemoNet::build(4, "native")?;
    net.start_backends()?;
    net.start_agent(&[])?;
    let vip = tcp_vip();
    net.add_vip(&vip, &[0, 1, 2], &[])?;
    let traffic = net.start_traffic(vip_ip(), 50, false)?;
    let pause = || std::thread::sleep(Duration::from_millis(400));
    pause();
    net.lb(&["backend", "add", &vip, &backend_ip(3)])?;
    pause();
    net.lb(&["backend", "drain", &vip, &backend_ip(3)])?;
    pause();
    net.lb(&["backend", "remove", &vip, &backend_ip(3)])?;
    pause();
    net.lb(&["backend", "drain", &vip, &backend_ip(0)])?;
    pause();
    net.lb(&["backend", "weight", &vip, &backend_ip(1), "300"])?;
    pause();
    net.lb(&["backend", "drain", &vip, &backend_ip(0), "--undo"])?;
    pause();
    let report = traffic.stop()?;
    eprintln!("{} rounds over 50 connections", report.rounds);
    assert!(report.rounds >= 15, "too few rounds: {}", report.rounds);
    assert!(
        report.long_lived_errors.is_empty(),
        "{:?}",
        report.long_lived_errors
    );
    Ok(())
}

/// Scenario 4: kill -9 the agent during steady traffic and start it again: the program keeps
/// forwarding from the pinned maps; no request fails and no long-lived connection resets.
#[test]
fn agent_kill_9_and_restart_under_traffic() -> anyhow::Result<()> {
    use std::time::Duration;
    let mut net = serving(3, "native", &[0, 1, 2])?;
    let traffic = net.start_traffic(vip_ip(), 20, true)?;
    std::thread::sleep(Duration::from_millis(500));
    if let Some(agent) = net.agent.as_mut() {
        agent.kill();
    }
    net.agent = None;
    std::thread::sleep(Duration::from_millis(1000));
    net.start_agent(&[])?;
    std::thread::sleep(Duration::from_millis(1000));
    let report = traffic.stop()?;
    eprintln!(
        "{} new connections, {} rounds",
        report.new_ok, report.rounds
    );
    assert_undisturbed(&report);
    Ok(())
}

fn program_id(net: &DemoNet) -> anyhow::Result<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", net.lb.name(), "-d", "link", "show", "eth0"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let id = text
        .split("prog/xdp id ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_string);
    id.ok_or_else(|| anyhow::anyhow!("no XDP program on the load balancer: {text}"))
}

/// Scenario 5: upgrade: the agent exits keeping the program (`--keep-on-exit`), a new agent
/// loads a fresh program that replaces it on the same link with the same maps; nothing drops.
#[test]
fn upgrade_replaces_the_program_without_drops() -> anyhow::Result<()> {
    use std::time::Duration;
    let mut net = DemoNet::build(3, "native")?;
    net.start_backends()?;
    net.start_agent(&["--keep-on-exit"])?;
    net.add_vip(&tcp_vip(), &[0, 1, 2], &[])?;
    let before = program_id(&net)?;
    let traffic = net.start_traffic(vip_ip(), 20, true)?;
    std::thread::sleep(Duration::from_millis(500));
    let old = net
        .agent
        .take()
        .ok_or_else(|| anyhow::anyhow!("no agent"))?;
    let lines = old.terminate(Duration::from_secs(10))?;
    assert!(
        lines.iter().any(|l| l.contains("left running")),
        "{lines:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    net.start_agent(&[])?;
    std::thread::sleep(Duration::from_millis(800));
    let report = traffic.stop()?;
    let after = program_id(&net)?;
    assert_ne!(before, after, "the program was not replaced");
    assert_undisturbed(&report);
    Ok(())
}

/// Scenario 7: malformed and odd frames from the client on a raw socket: nothing crashes,
/// the counters account for each by reason, and no backend receives a rewritten frame that
/// was not for a VIP. Normal traffic works afterwards.
#[test]
fn malformed_and_odd_frames_are_counted_and_never_forwarded() -> anyhow::Result<()> {
    use etherparse::{
        IpHeaders, IpNumber, Ipv4Header, Ipv4Options, Ipv6Extensions, Ipv6Header, Ipv6RawExtHeader,
        VlanId,
    };
    use lb_tests::{
        frames::{Frames, v4, v6},
        raw::RawSocket,
        topo::{CLIENT_IP, CLIENT_IP6, LB_IP, VIP6},
    };

    let net = serving(3, "native", &[0, 1, 2])?;
    net.add_vip(&format!("[{VIP6}]:{PORT}/tcp"), &[0, 1, 2], &[])?;
    let (lb_mac, client_mac) = (net.lb.mac("eth0")?, net.client.mac("eth0")?);
    let frames = Frames::new(client_mac, lb_mac);
    let eth = || frames.eth();
    let tcp_to = |dst: &str| frames.tcp4((v4(CLIENT_IP), 40000), (v4(dst), PORT), "A", b"x");
    let patched = |mut f: Vec<u8>, at: usize, v: u8| {
        f[at] = v;
        f
    };
    let cut = |mut f: Vec<u8>, n: usize| {
        f.truncate(n);
        f
    };
    let with_ip4 = |options: bool, mf: bool, dst: &str, port: u16| {
        let mut h = Ipv4Header::new(0, 64, IpNumber::TCP, v4(CLIENT_IP), v4(dst)).expect("header");
        if options {
            h.options = Ipv4Options::from([1u8, 1, 1, 0]);
        }
        h.more_fragments = mf;
        let mut f = Vec::new();
        eth()
            .ip(IpHeaders::Ipv4(h, Default::default()))
            .tcp(40001, port, 1, 1000)
            .write(&mut f, b"x")
            .expect("frame");
        f
    };
    let ext6 = {
        let h = Ipv6Header {
            hop_limit: 64,
            source: v6(CLIENT_IP6),
            destination: v6(VIP6),
            ..Default::default()
        };
        let exts = Ipv6Extensions {
            destination_options: Some(
                Ipv6RawExtHeader::new_raw(IpNumber::TCP, &[0u8; 6]).expect("ext"),
            ),
            ..Default::default()
        };
        let mut f = Vec::new();
        eth()
            .ip(IpHeaders::Ipv6(h, exts))
            .tcp(40002, PORT, 1, 1000)
            .write(&mut f, b"x")
            .expect("frame");
        f
    };
    let vlan_non_vip = {
        let mut f = Vec::new();
        eth()
            .single_vlan(VlanId::try_new(100).expect("vlan"))
            .ipv4(v4(CLIENT_IP), v4(LB_IP), 64)
            .udp(40003, 9)
            .write(&mut f, b"x")
            .expect("frame");
        f
    };
    // (frame, counter it must move)
    let kinds: Vec<(Vec<u8>, &str)> = vec![
        (cut(tcp_to(VIP), 14 + 10), "dropped_malformed"),
        (patched(tcp_to(VIP), 14, 0x44), "dropped_malformed"),
        (patched(tcp_to(VIP), 16, 0x7f), "dropped_malformed"),
        (cut(tcp_to(VIP), 14 + 20 + 8), "dropped_malformed"),
        (with_ip4(false, true, VIP, PORT), "passed_fragment"),
        // IP options are a reason only for a VIP address on a port no VIP serves (a served
        // port is balanced as usual): the same frame to the load balancer's own address is
        // plain non-VIP traffic, decided first by the pre-filter.
        (with_ip4(true, false, VIP, PORT + 1), "passed_ip_options"),
        (with_ip4(true, false, LB_IP, PORT), "passed_not_vip"),
        (ext6, "passed_ipv6_ext"),
        (vlan_non_vip, "passed_not_vip"),
    ];
    const EACH: u64 = 5;
    let captures = net
        .backends
        .iter()
        .map(|ns| ns.run(|| RawSocket::bind("eth0")))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let before = forwarded(&net)?;
    let frames: Vec<Vec<u8>> = kinds.iter().map(|(f, _)| f.clone()).collect();
    net.client.run(move || -> anyhow::Result<()> {
        let sock = RawSocket::bind("eth0")?;
        for f in &frames {
            for _ in 0..EACH {
                sock.send(f)?;
            }
        }
        Ok(())
    })??;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let after = forwarded(&net)?;
    let delta = |name: &str| counter(&after, name) - counter(&before, name);
    let mut want: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    for (_, name) in &kinds {
        *want.entry(name).or_default() += EACH;
    }
    assert_eq!(
        delta("dropped_malformed"),
        want["dropped_malformed"],
        "{after:?}"
    );
    assert_eq!(delta("passed_fragment"), want["passed_fragment"]);
    // Background IGMP reports carry the Router Alert option and background IPv6 (MLD, ND)
    // extension headers; one whose group address shares the VIP bitmap's bit passes the
    // pre-filter and counts by its header, the rest as not-VIP. So these are lower bounds.
    assert!(
        delta("passed_ip_options") >= want["passed_ip_options"],
        "{after:?}"
    );
    assert!(delta("passed_ipv6_ext") >= want["passed_ipv6_ext"]);
    assert!(delta("passed_not_vip") >= want["passed_not_vip"]);
    assert_eq!(delta("forwarded"), 0, "an odd frame was forwarded");
    // No backend saw a frame the load balancer rewrote: its source MAC with the client's
    // source address (the load balancer's own frames carry its own address).
    let (c4, c6) = (v4(CLIENT_IP), v6(CLIENT_IP6));
    let rewritten_by_lb = |f: &Vec<u8>| -> bool {
        if f.len() < 14 || f[6..12] != lb_mac {
            return false;
        }
        let l3 = if f[12..14] == [0x81, 0x00] { 18 } else { 14 };
        let et = f.get(l3 - 2..l3);
        match et {
            Some([0x08, 0x00]) => f.get(l3 + 12..l3 + 16) == Some(&c4[..]),
            Some([0x86, 0xdd]) => f.get(l3 + 8..l3 + 24) == Some(&c6[..]),
            _ => false,
        }
    };
    for (i, cap) in captures.iter().enumerate() {
        let rewritten: Vec<_> = cap.drain().into_iter().filter(rewritten_by_lb).collect();
        assert!(
            rewritten.is_empty(),
            "backend {i} received rewritten frames: {rewritten:02x?}"
        );
    }
    // Still serving; and the capture does see rewritten frames when they are for the VIP.
    for _ in 0..10 {
        net.http_get(vip_ip(), PORT)?;
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let seen: usize = captures
        .iter()
        .map(|c| c.drain().iter().filter(|f| rewritten_by_lb(f)).count())
        .sum();
    assert!(
        seen >= 10,
        "the capture saw only {seen} forwarded VIP frames"
    );
    Ok(())
}
