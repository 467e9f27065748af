//! The status page in a real headless Chromium: served by the agent's metrics listener with
//! the demo's traffic running, it names the three backends with non-zero rates, shows the
//! VIP announced by BGP with its session established (bird beside the agent, a bird peer in
//! a backend's namespace), shows the guard's lists, limit, deny count and new flows per
//! second and its top dropped sources (SYNs from a source outside the allow list, raw
//! socket), logs nothing to the console, and renders to a screenshot. Also
//! `/healthz`, `/readyz` and the JSON.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use lb_tests::{
    Netns,
    bgp::{self, Bird},
    frames::{Frames, v4},
    raw::RawSocket,
    topo::{DemoNet, LB_IP, PORT, VIP, backend_ip},
    unique_name, wait_until,
};
use lb_userspace::api::protocol::StatusView;

const METRICS: &str = "127.0.0.1:9100";
/// A source outside the VIP's allow list, and how many SYNs it sends: the kernel samples one
/// drop in 16 at random, so 400 drops leave about 25 samples (none at all: 1 in 10^11).
const OUTSIDER: [u8; 4] = [198, 18, 0, 9];
const OUTSIDER_SYNS: u16 = 400;

/// `GET path` on the metrics listener inside `ns`: (status code, body).
fn get(ns: &Netns, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_string();
    ns.run(move || -> anyhow::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&METRICS.parse()?, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((code, body.to_string()))
    })?
}

/// A directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Headless Chromium inside `ns` on the status page, with `extra` flags; flags from the
/// machine notes keep it from reaching for the (closed) network.
fn chromium(ns: &Netns, profile: &Path, extra: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new("timeout")
        .args(["60", "ip", "netns", "exec", ns.name(), "chromium"])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=4000",
            "--window-size=1200,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(format!("http://{METRICS}/"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

#[test]
fn the_status_page_shows_backends_and_rates_in_chromium() -> anyhow::Result<()> {
    let mut net = DemoNet::build(3, "generic")?;
    net.start_backends()?;
    // BGP: the shipped template's bird beside the agent, and a peer in backend 0's namespace
    // (which holds the VIP on lo, so the route it learns changes nothing there).
    let peer = backend_ip(0);
    let _router = Bird::start(
        &net.backends[0],
        "bird-sp-r",
        &bgp::router_config(&peer, &[("lb0", LB_IP)]),
    )?;
    let speaker = Bird::start(
        &net.lb,
        "bird-sp",
        &bgp::node_config(LB_IP, &[("r1", &peer)]),
    )?;
    let socket = speaker.socket().display().to_string();
    let table = bgp::TABLE.to_string();
    net.start_agent(&[
        "--metrics",
        METRICS,
        "--announce-table",
        &table,
        "--bgp-socket",
        &socket,
    ])?;
    let (code, _) = get(&net.lb, "/readyz")?;
    assert_eq!(code, 200);
    assert_eq!(get(&net.lb, "/healthz")?, (200, "ok\n".to_string()));
    assert_eq!(get(&net.lb, "/nope")?.0, 404);
    // Guarded: an allow list holding the client, a new-flow limit far above the traffic's,
    // and a node-wide deny of a prefix nobody here uses.
    net.add_vip(
        &format!("{VIP}:{PORT}/tcp"),
        &[0, 1, 2],
        &[
            "--allow-source",
            "10.200.0.0/24",
            "--new-flow-limit",
            "100000/20000",
        ],
    )?;
    net.lb(&["deny", "add", "192.0.2.0/24"])?;
    let frames = Frames::new(net.client.mac("eth0")?, net.lb.mac("eth0")?);
    net.client.run(move || -> anyhow::Result<()> {
        let sock = RawSocket::sender("eth0")?;
        for sport in 0..OUTSIDER_SYNS {
            let syn = frames.tcp4((OUTSIDER, 40_000 + sport), (v4(VIP), PORT), "S", b"");
            sock.send_waiting(&syn)?;
        }
        Ok(())
    })??;
    let traffic = net.start_traffic(VIP.parse()?, 6, true)?;
    // The sampler needs two one-second samples with traffic between them.
    let status = || -> anyhow::Result<StatusView> {
        Ok(serde_json::from_str(&get(&net.lb, "/status.json")?.1)?)
    };
    let all_flowing = |s: &StatusView| {
        (0..3).all(|i| {
            s.rates
                .backends
                .get(&format!("{VIP}:{PORT}/tcp {}", backend_ip(i)))
                .is_some_and(|r| *r > 0.0)
        })
    };
    wait_until(
        Duration::from_secs(8),
        "every backend has a non-zero rate",
        || Ok(all_flowing(&status()?)),
        || format!("{:?}", status().map(|s| s.rates)),
    )?;
    let announced = |s: &StatusView| {
        s.stats.announce.as_ref().is_some_and(|a| {
            a.vips.iter().any(|v| v.state == "announced")
                && !a.sessions.is_empty()
                && a.sessions.iter().all(|x| x.up)
        })
    };
    wait_until(
        Duration::from_secs(15),
        "the VIP announced and the BGP session established",
        || Ok(announced(&status()?)),
        || format!("{:?}", status().map(|s| s.stats.announce)),
    )?;
    let s = status()?;
    assert!(
        s.events.iter().any(|e| e.what.contains("added backend")),
        "{:?}",
        s.events
    );

    let scratch = Scratch(std::env::temp_dir().join(unique_name("chromium")));
    std::fs::create_dir_all(&scratch.0)?;
    let out = chromium(&net.lb, &scratch.0.join("profile"), &["--dump-dom"])?;
    let dom = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        dom.contains("data-state=\"live\""),
        "page never rendered: {dom}"
    );
    for i in 0..3 {
        let addr = backend_ip(i);
        let row = dom
            .split("<tr ")
            .find(|r| r.contains(&format!("data-backend=\"{addr}\"")))
            .unwrap_or_default();
        let pps: f64 = row
            .split("data-pps=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(pps > 0.0, "backend {addr} shows no rate: {row}");
    }
    // The BGP part: the session as bird reports it, and the VIP's row announced.
    let bgp_part = dom.split("id=\"bgp\"").nth(1).unwrap_or_default();
    assert!(
        bgp_part.contains("r1 established"),
        "no established session on the page: {bgp_part}"
    );
    let vip_row = bgp_part
        .split("<tr>")
        .find(|r| r.contains(&format!("<td>{VIP}:{PORT}/tcp</td>")))
        .unwrap_or_default();
    assert!(
        vip_row.contains("<td class=\"announced\">announced</td>"),
        "the VIP is not shown announced: {bgp_part}"
    );
    // The guard: the node's deny count, the VIP's lists and limit, its new flows per second.
    let guard = dom
        .split("id=\"guard\"")
        .nth(1)
        .and_then(|g| g.split("id=\"bgp\"").next())
        .unwrap_or_default();
    assert!(
        guard.contains("node deny list: 1 prefix(es)"),
        "no deny count on the page: {guard}"
    );
    let guard_row = guard
        .split("<tr ")
        .find(|r| r.contains(&format!("data-vip=\"{VIP}:{PORT}/tcp\"")))
        .unwrap_or_default();
    let new_flows: f64 = guard_row
        .split("data-new-flows=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        guard_row.contains("<td class=\"num\">1</td><td class=\"num\">0</td>")
            && guard_row.contains("100,000/s, burst 20,000")
            && new_flows > 0.0,
        "the VIP's guard row: {guard_row}"
    );
    // The outsider's SYNs, dropped as not allowed, among the top dropped sources.
    let outsider = std::net::Ipv4Addr::from(OUTSIDER).to_string();
    let top_row = guard
        .split("<tr ")
        .find(|r| r.contains(&format!("data-source=\"{outsider}\"")))
        .unwrap_or_default();
    assert!(
        guard.contains("Top dropped sources") && top_row.contains("dropped_source_not_allowed"),
        "no top dropped source row for {outsider}: {guard}"
    );
    let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");

    let png = scratch.0.join("status.png");
    chromium(
        &net.lb,
        &scratch.0.join("profile2"),
        &[&format!("--screenshot={}", png.display())],
    )?;
    let bytes = std::fs::read(&png)?;
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 20_000,
        "{} bytes",
        bytes.len()
    );
    // Kept for the README (`cp target/status-page.png docs/`).
    let _ = std::fs::copy(
        &png,
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/status-page.png"),
    );
    let report = traffic.stop()?;
    assert!(
        report.long_lived_errors.is_empty(),
        "{:?}",
        report.long_lived_errors
    );
    Ok(())
}
