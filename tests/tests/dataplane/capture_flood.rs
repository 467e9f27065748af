//! `lb capture` under a flood on the demo network: the rate limit, the missed count, the
//! API's answers and the forwarding rate.
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lb_tests::topo::{DemoNet, PORT, VIP};

use super::capture::{capture_during, out_file, serving, tshark};

/// Spoofed SYNs to the VIP from the client's raw socket for `dur` (at most 3,000,000 frames);
/// returns frames sent per second. On veth the program runs in the sender's context, so this
/// is also the rate the load balancer forwards at.
fn flood(client: &lb_tests::Netns, lb_mac: [u8; 6], dur: Duration) -> anyhow::Result<f64> {
    use lb_tests::{
        frames::{Frames, v4},
        raw::RawSocket,
    };
    let frames = Frames::new(client.mac("eth0")?, lb_mac);
    let syns: Vec<Vec<u8>> = (0..4096u32)
        .map(|i| {
            // Sources from 198.18.0.0/15 (the benchmarking range).
            let src = [198, 18, (i >> 8) as u8, i as u8];
            frames.tcp4((src, 1024 + i as u16), (v4(VIP), PORT), "S", b"")
        })
        .collect();
    client.run(move || -> anyhow::Result<f64> {
        let sock = RawSocket::sender("eth0")?;
        let start = Instant::now();
        let mut n = 0usize;
        while start.elapsed() < dur && n < 3_000_000 {
            sock.send_waiting(&syns[n % syns.len()])?;
            n += 1;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })?
}

/// How long `lb vip list` takes.
fn api_time(net: &DemoNet) -> anyhow::Result<Duration> {
    let t = Instant::now();
    net.lb(&["vip", "list"])?;
    Ok(t.elapsed())
}

/// A capture of everything under a flood with `--max-rate 1000`: at most the rate reaches
/// the client (one limit for all CPUs, with its stated margin) and most of it is used, the rest is counted and printed as missed, the API answers as
/// it does without the flood, and the forwarding rate stays within half of the rate
/// without a capture.
#[test]
fn a_flood_reaches_the_capture_at_most_at_its_rate() -> anyhow::Result<()> {
    let net = serving(2)?;
    let quiet = (0..5)
        .map(|_| api_time(&net))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or_default();
    let (client, lb_mac) = (&net.client, net.lb.mac("eth0")?);
    let before = flood(client, lb_mac, Duration::from_millis(1500))?;
    let file = out_file(&net.dir, "flood");
    let file_s = file.display().to_string();
    let mut with = 0.0;
    let mut busy = Duration::ZERO;
    let started = Instant::now();
    let out = capture_during(
        &net.dir,
        &["-w", &file_s, "--max-rate", "1000", "--duration", "3s"],
        || {
            let n = &net;
            std::thread::scope(|s| -> anyhow::Result<()> {
                let f = s.spawn(|| flood(client, lb_mac, Duration::from_millis(2000)));
                std::thread::sleep(Duration::from_millis(300));
                for _ in 0..5 {
                    busy = busy.max(api_time(n)?);
                    std::thread::sleep(Duration::from_millis(100));
                }
                with = f.join().map_err(|_| anyhow::anyhow!("flood panicked"))??;
                Ok(())
            })
        },
    )?;
    let took = started.elapsed().as_secs_f64();
    // Without a capture: the better of a run before and one after (the host is shared).
    let without = before.max(flood(client, lb_mac, Duration::from_millis(1500))?);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{said}");
    eprintln!(
        "forwarding {without:.0} frames/s without a capture, {with:.0} with one ({:.0} %); \
         the API {quiet:?} quiet, at most {busy:?} under the flood",
        100.0 * with / without
    );
    let packets: f64 = said
        .split(" packets captured")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .context("the packet count")?
        .parse()?;
    let missed: u64 = said
        .split(" missed")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .context("the missed count")?
        .parse()?;
    // At most the rate over the capture's whole life (`took` is longer than the kernel side
    // ran: it spans the start and the end), in windows of a tenth of a second: the window
    // the capture starts in may give its whole share at once (100), and CPUs racing for a
    // window's last place or its start may each take one more (two per other CPU and
    // window, as docs/capture.md states).
    let windows = (took * 10.0).ceil();
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
    assert!(
        packets <= 1000.0 * took + 100.0 + windows * (cpus - 1.0).max(1.0) * 2.0,
        "{packets} packets in {took:.1} s at --max-rate 1000"
    );
    // One limit for every CPU: the flood's 2 s allow 2,000 however its frames spread over
    // the CPUs. A share per CPU (rate / CPUs each, the limit before) stays well under that
    // when the frames land unevenly; 1,200 leaves room for a sender the loaded host stalls.
    assert!(packets >= 1200.0, "the rate went unused: {packets}");
    assert!(
        missed > 10_000,
        "the flood's rest is counted as missed: {missed}"
    );
    let pkts = tshark(&file)?;
    assert_eq!(pkts.len() as f64, packets, "the file holds what was said");
    // A capture changes no decision: the flood's SYNs were forwarded as without one.
    let mut reasons: std::collections::BTreeMap<&str, usize> = Default::default();
    for p in pkts.iter().filter(|p| p.ip_dst == VIP) {
        *reasons.entry(p.comment["reason"].as_str()).or_default() += 1;
    }
    eprintln!("captured reasons of packets to the VIP: {reasons:?}");
    assert_eq!(reasons.keys().copied().collect::<Vec<_>>(), ["forwarded"]);
    assert!(
        busy <= quiet + Duration::from_millis(500),
        "the API took {busy:?} under the flood and capture, {quiet:?} without"
    );
    assert!(
        with >= without * 0.5,
        "forwarding fell from {without:.0} to {with:.0} frames/s while capturing"
    );
    Ok(())
}
