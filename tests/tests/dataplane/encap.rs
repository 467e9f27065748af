//! Encapsulated forwarding on a routed network (see `lb_tests::routed`): IPIP and GUE to
//! backends in other subnets, IPv4, IPv6 and a v4 VIP over v6 backends, `lb decap` on the
//! backends, health checks through the tunnel, and path MTU discovery through it.
use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::Context as _;
use lb_tests::{
    routed::{CLIENT4, Routed, VIP_MIXED, VIP4, VIP6, backend4, backend6},
    topo::{backend_index, get, http_request},
    wait_until,
};
use lb_userspace::api::protocol::{StatsView, VipView};

const HEALTH: [&str; 10] = [
    "--health",
    "http",
    "--health-path",
    "/health",
    "--interval-ms",
    "200",
    "--timeout-ms",
    "150",
    "--rise",
    "1",
];

/// One HTTP request on a new connection from the client to `vip`:80; the whole answer.
fn request(net: &Routed, vip: &str, req: Vec<u8>) -> anyhow::Result<String> {
    http_request(&net.client, SocketAddr::new(vip.parse()?, 80), &req)
}

/// Health of backend `addr` in VIP `vip` (as `lb vip list` spells it).
fn health_of(vips: &[VipView], vip: &str, addr: &str) -> String {
    let addr: IpAddr = addr.parse().expect("address");
    vips.iter()
        .filter(|v| v.vip.to_string() == vip)
        .flat_map(|v| v.backends.iter())
        .find(|b| b.address == addr.into())
        .map(|b| b.health.clone())
        .unwrap_or_default()
}

fn backend_packets(stats: &StatsView, addr: &str) -> u64 {
    let addr: IpAddr = addr.parse().expect("address");
    stats
        .vips
        .iter()
        .flat_map(|v| v.backends.iter())
        .filter(|b| b.address == addr.into())
        .map(|b| b.packets)
        .sum()
}

fn global(stats: &StatsView, name: &str) -> u64 {
    stats.global.get(name).map_or(0, |c| c.packets)
}

#[test]
fn routed_backends_over_ipip_and_gue_with_health_through_the_tunnel() -> anyhow::Result<()> {
    let mut net = Routed::new("enc")?;
    for i in 1..=3 {
        net.start_sample(i)?;
    }
    // Backends 1 (XDP) and 2 (tc ingress) decapsulate; backend 3 has the VIPs on lo but no
    // decap program.
    let out = net.decap(1, &[])?;
    assert!(out.contains("attached to bk1 in native mode"), "{out}");
    let out = net.decap(2, &["--attach", "tc"])?;
    assert!(
        out.contains("attached to bk2 in tc ingress (tcx) mode"),
        "{out}"
    );
    // One hook at a time: asking for the other is refused, naming the fix.
    let refused = net.decap(2, &[]).unwrap_err().to_string();
    assert!(refused.contains("runs at tc on bk2 already"), "{refused}");
    net.start_agent(&[])?;
    let vip4 = format!("{VIP4}:80/tcp");
    let vip6 = format!("[{VIP6}]:80/tcp");
    let mixed = format!("{VIP_MIXED}:80/tcp");
    for (vip, mode, backends) in [
        (&vip4, "ipip", (1..=3).map(backend4).collect::<Vec<_>>()),
        (&vip6, "gue", (1..=3).map(backend6).collect()),
        (&mixed, "gue", vec![backend6(1), backend6(2), backend6(3)]),
    ] {
        let mut args = vec!["vip", "add", vip.as_str(), "--forward", mode];
        args.extend_from_slice(&HEALTH);
        net.lb(&args)?;
        for b in &backends {
            net.lb(&["backend", "add", vip, b])?;
        }
    }
    let list = net.lb(&["vip", "list"])?;
    assert!(
        list.contains("FORWARD") && list.contains("ipip") && list.contains("gue"),
        "{list}"
    );
    // Health through the tunnel: backend 3 cannot decapsulate, so it is down in every VIP.
    wait_until(
        Duration::from_secs(15),
        "backends 1 and 2 up, backend 3 down, in every VIP",
        || {
            let vips = net.dir.vips()?;
            let of = |v: &str, b: String| health_of(&vips, v, &b);
            Ok([&vip4, &vip6, &mixed].iter().all(|v| {
                let (b1, b2, b3) = if *v == &vip4 {
                    (backend4(1), backend4(2), backend4(3))
                } else {
                    (backend6(1), backend6(2), backend6(3))
                };
                of(v, b1) == "up" && of(v, b2) == "up" && of(v, b3) == "down"
            }))
        },
        || {
            format!(
                "{}\n{}",
                net.lb(&["backend", "list"]).unwrap_or_default(),
                net.lb(&["stats"]).unwrap_or_default()
            )
        },
    )?;
    // Client traffic: every request answered, by backends 1 and 2 only.
    for vip in [VIP4, VIP6, VIP_MIXED] {
        let mut seen = BTreeSet::new();
        for _ in 0..30 {
            let body = request(&net, vip, get("/"))?;
            seen.insert(backend_index(&body).with_context(|| format!("{vip}: {body}"))?);
        }
        assert_eq!(seen, BTreeSet::from([1, 2]), "backends answering {vip}");
    }
    let stats = net.dir.stats()?;
    assert_eq!(
        backend_packets(&stats, &backend4(3)),
        0,
        "backend 3 got client traffic"
    );
    assert_eq!(
        backend_packets(&stats, &backend6(3)),
        0,
        "backend 3 got client traffic"
    );
    assert!(global(&stats, "forwarded") >= 90 * 3, "{:?}", stats.global);
    for bad in [
        "dropped_no_route",
        "dropped_forwarding_disabled",
        "dropped_tx_error",
    ] {
        assert_eq!(global(&stats, bad), 0, "{bad}: {:?}", stats.global);
    }
    // The backends counted what they decapsulated.
    for i in [1, 2] {
        let s = net.decap(i, &["--stats", "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&s)?;
        assert!(
            v["decapsulated"]["packets"].as_u64().unwrap_or(0) > 0,
            "backend {i}: {s}"
        );
    }
    // trace names the mode and the outer header.
    let t = net.lb(&["trace", &format!("{CLIENT4}:40000"), &vip4])?;
    assert!(t.contains("ipip") && t.contains("10.30.0.2 -> 10.4"), "{t}");
    let t = net.lb(&["trace", &format!("{CLIENT4}:40000"), &mixed])?;
    assert!(
        t.contains("gue") && t.contains("fd00:30::2 -> fd00:4") && t.contains("-> 6080"),
        "{t}"
    );
    // Re-running decap converges in place; detaching stops decapsulation (and health follows).
    let out = net.decap(1, &[])?;
    assert!(out.contains("updated on bk1"), "{out}");
    let out = net.decap(2, &["--attach", "tc"])?;
    assert!(out.contains("updated on bk2"), "{out}");
    net.decap(2, &["--detach"])?;
    wait_until(
        Duration::from_secs(10),
        "backend 2 down once its decap program is gone",
        || Ok(health_of(&net.dir.vips()?, &vip4, &backend4(2)) == "down"),
        || net.lb(&["backend", "list"]).unwrap_or_default(),
    )?;
    for _ in 0..10 {
        assert_eq!(backend_index(&request(&net, VIP4, get("/"))?)?, 1);
    }
    Ok(())
}

#[test]
fn path_mtu_through_the_tunnel() -> anyhow::Result<()> {
    let mut net = Routed::new("mtu")?;
    net.start_sample(1)?;
    net.decap(1, &[])?;
    // The tunnel side of the load balancer is 1400 bytes; the client's side is 1500.
    net.lb.ip(&["link", "set", "eth1", "mtu", "1400"])?;
    let r_out = net.router_to_lb_out.clone();
    net.router.ip(&["link", "set", &r_out, "mtu", "1400"])?;
    net.start_agent(&[])?;
    let vip4 = format!("{VIP4}:80/tcp");
    let vip6 = format!("[{VIP6}]:80/tcp");
    net.lb(&["vip", "add", &vip4, "--forward", "ipip"])?;
    net.lb(&["backend", "add", &vip4, &backend4(1)])?;
    net.lb(&["vip", "add", &vip6, "--forward", "gue"])?;
    net.lb(&["backend", "add", &vip6, &backend6(1)])?;
    const MB: usize = 1 << 20;
    for vip in [VIP4, VIP6] {
        // A 1 MB download (the answer goes straight from the backend to the client).
        let body = request(&net, vip, get("/big"))?;
        assert!(
            body.len() > MB && body.ends_with('x'),
            "{vip}: {} bytes",
            body.len()
        );
        // A 1 MB upload: full-size client segments no longer fit once encapsulated; the
        // client learns the path MTU from our ICMP and the upload completes.
        let mut req = format!(
            "POST /upload HTTP/1.1\r\nHost: vip\r\nContent-Length: {MB}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        req.extend(std::iter::repeat_n(b'u', MB));
        let answer = request(&net, vip, req)?;
        assert!(
            answer.contains(&format!("received {MB} bytes")),
            "{vip}: {answer}"
        );
    }
    let stats = net.dir.stats()?;
    assert!(
        global(&stats, "icmp_too_big_sent") >= 2,
        "{:?}",
        stats.global
    );
    assert_eq!(global(&stats, "dropped_too_big"), 0, "{:?}", stats.global);
    Ok(())
}

/// Runs `lb args...` inside `ns`; returns (exit code, stderr).
fn lb_in(
    ns: &lb_tests::Netns,
    dir: &lb_tests::AgentDir,
    args: &[&str],
) -> anyhow::Result<(i32, String)> {
    let mut cmd = ns.lb()?;
    cmd.arg("--socket").arg(dir.socket()).args(args);
    let out = cmd.output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// One line of error (clap's usage errors add a "try --help" line).
fn brief(err: &str) -> bool {
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    lines.len() == 1 || (lines.len() == 2 && lines[1].contains("--help"))
}

/// Bad input to the encapsulation commands: one clear line, a non-zero exit, nothing changed
/// (no pins, no attachment, the desired state as it was).
#[test]
fn bad_encapsulation_input_changes_nothing() -> anyhow::Result<()> {
    let net = lb_tests::TwoHosts::new("encbad", 77)?;
    let dir = lb_tests::AgentDir::new("encbad")?;
    let bpffs = dir.bpffs.to_string_lossy().into_owned();
    let dev = net.veth.b.clone();
    let decap_pins = lb_userspace::decap::pin_dir(&dir.bpffs, &dev);
    let nine: Vec<String> = (1..=9).map(|i| format!("10.77.1.{i}")).collect();
    let mut many = vec![
        "decap",
        "--iface",
        &dev,
        "--bpffs",
        &bpffs,
        "--vip",
        "10.0.0.10",
        "--trusted-source",
        "10.77.0.1",
    ];
    for a in &nine {
        many.extend(["--local", a.as_str()]);
    }
    for (args, code, why) in [
        (
            vec!["decap", "--iface", &dev, "--bpffs", &bpffs],
            2,
            "give the VIPs",
        ),
        (
            vec![
                "decap",
                "--iface",
                "nosuch0",
                "--bpffs",
                &bpffs,
                "--vip",
                "10.0.0.10",
                "--trusted-source",
                "10.77.0.1",
            ],
            -2,
            "nosuch0",
        ),
        // Nobody trusted: refused, saying what to pass.
        (
            vec![
                "decap",
                "--iface",
                &dev,
                "--bpffs",
                &bpffs,
                "--vip",
                "10.0.0.10",
            ],
            2,
            "--trusted-source PREFIX",
        ),
        (
            vec![
                "decap",
                "--iface",
                &dev,
                "--bpffs",
                &bpffs,
                "--vip",
                "10.0.0.10",
                "--trusted-source",
                "10.77.0.1/16",
            ],
            2,
            "did you mean 10.77.0.0/16",
        ),
        (many.clone(), 2, "at most 8"),
        (
            vec!["decap", "--iface", &dev, "--bpffs", &bpffs, "--stats"],
            -2,
            "no decap program",
        ),
        (
            vec!["decap", "--iface", &dev, "--bpffs", &bpffs, "--detach"],
            -2,
            "no decap program",
        ),
    ] {
        let (got, err) = lb_in(&net.backend, &dir, &args)?;
        assert_ne!(got, 0, "{args:?}");
        if code > 0 {
            assert_eq!(got, code, "{args:?}: {err}");
        }
        assert!(err.contains(why) && brief(&err), "{args:?}: {err}");
        assert!(
            !decap_pins.join("link").exists(),
            "{args:?} attached something"
        );
    }
    // The agent: conflicting options are refused before anything is pinned.
    let lb_dev = net.veth.a.clone();
    let agent_pins = lb_userspace::dataplane::pins::pin_dir(&dir.bpffs, &lb_dev);
    for (extra, why) in [
        (
            vec!["--encap-source", "10.77.0.1", "--encap-source", "10.77.0.9"],
            "at most one",
        ),
        (
            vec!["--flow-table", "off", "--per-cpu-flows"],
            "--per-cpu-flows",
        ),
        (vec!["--ipip-source-prefix", "172.31.5.0/24"], "/16"),
    ] {
        let mut args = vec![
            "run",
            "--iface",
            &lb_dev,
            "--bpffs",
            &bpffs,
            "--duration",
            "1",
        ];
        args.extend(extra.iter().copied());
        let (got, err) = lb_in(&net.lb, &dir, &args)?;
        assert_ne!(got, 0, "{extra:?}");
        assert!(err.contains(why) && brief(&err), "{extra:?}: {err}");
        assert!(!agent_pins.join("link").exists(), "{extra:?} attached");
    }
    // A running agent: a MAC on an encapsulated backend, and a bad mode, change nothing.
    let _agent = dir.spawn_agent(
        &net.lb,
        &lb_dev,
        &["--mode", "generic", "--metrics", "127.0.0.1:9477"],
    )?;
    dir.cli_ok(&["vip", "add", "10.0.0.10:80/tcp", "--forward", "ipip"])?;
    let before = dir.cli_ok(&["vip", "list", "--json"])?;
    for args in [
        vec![
            "backend",
            "add",
            "10.0.0.10:80/tcp",
            "10.77.0.2",
            "--mac",
            "02:00:00:00:00:02",
        ],
        vec!["vip", "add", "10.0.0.11:80/tcp", "--forward", "vxlan"],
    ] {
        let out = dir.cli(&args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(brief(&err), "{args:?}: {err}");
    }
    assert_eq!(dir.cli_ok(&["vip", "list", "--json"])?, before);
    // This namespace does not forward: once a routed backend exists the agent says which
    // sysctls encapsulation needs (in its events, on the status page).
    dir.cli_ok(&["backend", "add", "10.0.0.10:80/tcp", "10.77.0.2"])?;
    let status = || -> anyhow::Result<String> {
        net.lb.run(|| -> anyhow::Result<String> {
            let mut s = TcpStream::connect("127.0.0.1:9477")?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"GET /status.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })?
    };
    wait_until(
        Duration::from_secs(10),
        "an event naming the missing sysctls",
        || {
            let s = status()?;
            Ok(s.contains("encapsulating VIPs need")
                && s.contains("ipv4.conf.")
                && s.contains(".forwarding"))
        },
        || status().unwrap_or_default(),
    )?;
    Ok(())
}

/// kill -9 and a new agent: the encapsulating VIP keeps forwarding meanwhile (pinned program
/// and maps), the new agent adopts the pinned XDP link and the pinned tc link of the
/// health-check program in place, and the probes through the tunnel go on.
#[test]
fn a_killed_agent_is_replaced_without_losing_the_tunnel() -> anyhow::Result<()> {
    let mut net = Routed::new("enk")?;
    net.start_sample(1)?;
    net.decap(1, &[])?;
    net.start_agent(&[])?;
    let vip = format!("{VIP4}:80/tcp");
    let mut args = vec!["vip", "add", vip.as_str(), "--forward", "gue"];
    args.extend_from_slice(&HEALTH);
    net.lb(&args)?;
    net.lb(&["backend", "add", &vip, &backend4(1)])?;
    let up = |net: &Routed| -> anyhow::Result<bool> {
        Ok(health_of(&net.dir.vips()?, &vip, &backend4(1)) == "up")
    };
    wait_until(
        Duration::from_secs(10),
        "backend 1 up",
        || up(&net),
        || net.lb(&["backend", "list"]).unwrap_or_default(),
    )?;
    // Counters live in pinned maps: they carry over to the next agent.
    let probes_before = global(&net.dir.stats()?, "hc_encapsulated");
    let mut agent = net.agent.take().context("agent")?;
    agent.kill();
    // No agent: the pinned program still encapsulates.
    assert_eq!(backend_index(&request(&net, VIP4, get("/"))?)?, 1);
    net.start_agent(&[])?;
    assert_eq!(backend_index(&request(&net, VIP4, get("/"))?)?, 1);
    wait_until(
        Duration::from_secs(10),
        "probes through the tunnel after the restart",
        || Ok(up(&net)? && global(&net.dir.stats()?, "hc_encapsulated") > probes_before),
        || net.lb(&["stats"]).unwrap_or_default(),
    )?;
    Ok(())
}
