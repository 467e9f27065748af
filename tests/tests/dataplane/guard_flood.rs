//! A spoofed SYN flood from random sources (raw socket, bounded in count and time) against a
//! VIP with a new-flow limit, while 20 keep-alive connections are held: the backends receive
//! at most the limit plus its burst (counted at the backends, their TCP segments in), the
//! counters account for the packets sent (placed + `dropped_vip_rate`), and the keep-alive
//! connections see no failure afterwards. The same flood against a port of the VIP without a
//! limit is the baseline, reported beside it.
use std::time::{Duration, Instant};

use lb_common::FlowEvent;
use lb_tests::{
    Netns,
    frames::{Frames, v4},
    raw::RawSocket,
    topo::{DemoNet, PORT, VIP},
};

const SYNS: u32 = 20_000;
const RATE: u64 = 500;
const BURST: u64 = 50;

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
    net.start_agent(&[])?;
    let limited = format!("{VIP}:{PORT}/tcp");
    net.add_vip(
        &limited,
        &[0, 1],
        &["--new-flow-limit", &format!("{RATE}/{BURST}")],
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
    Ok(())
}
