//! The flow table under attack and under failure, on the demo network with the real agent:
//! a flood of spoofed flows (each a SYN then an ACK) twelve times the flow table must not
//! evict established connections, even idle ones, so a backend change after it breaks none
//! of them; and a
//! UDP client with a fixed source port moves off a killed backend within interval x fall + 1 s.
use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_common::FlowEvent;
use lb_tests::{
    frames::{Frames, v4},
    raw::RawSocket,
    topo::{DemoNet, PORT, VIP, backend_index, backend_ip},
};

const FLOWS: u32 = 50_000;
/// Active flows the table holds when the flood starts.
const BUSY: u32 = 3_000;

fn flow_event(net: &DemoNet, ev: FlowEvent) -> anyhow::Result<u64> {
    Ok(net
        .dir
        .stats()?
        .global
        .get(ev.name())
        .map_or(0, |c| c.packets))
}

/// Entries in the pinned established flow table: (all, those of the real client).
fn established_entries(net: &DemoNet) -> anyhow::Result<(usize, usize)> {
    use aya::maps::{HashMap, Map, MapData};
    let path = net.dir.map_pin("eth0", lb_common::FLOWS_MAP);
    let map: HashMap<MapData, lb_common::TableKey, lb_common::FlowValue> =
        HashMap::try_from(Map::LruHashMap(MapData::from_pin(&path)?))?;
    let client = u32::from_ne_bytes(v4(lb_tests::topo::CLIENT_IP));
    let (mut total, mut real) = (0, 0);
    for k in map.keys() {
        let k = k?;
        total += 1;
        real += usize::from(k.v4_client() == Some(client));
    }
    Ok((total, real))
}

#[test]
fn a_spoofed_flood_evicts_no_established_flow() -> anyhow::Result<()> {
    let mut net = DemoNet::build(3, "generic")?;
    net.start_backends()?;
    net.start_agent(&["--flow-entries", "4096"])?;
    let vip = format!("{VIP}:{PORT}/tcp");
    net.add_vip(&vip, &[0, 1], &[])?;
    // 20 keep-alive connections, a request on each every 100 ms, each checked to be answered
    // by the backend that answered it first.
    let traffic = net.start_traffic(VIP.parse()?, 20, false)?;
    std::thread::sleep(Duration::from_millis(500));
    // Idle during the flood (the connections an LRU evicts first), and until the tables have
    // changed: a connection whose entry was evicted would then be placed by the new table.
    traffic.pause();
    let syn_before = flow_event(&net, FlowEvent::SynPlaced)?;
    let frames = Frames::new(net.client.mac("eth0")?, net.lb.mac("eth0")?);
    let sent = net
        .client
        .run(move || -> anyhow::Result<(u32, Duration)> {
            let sock = RawSocket::sender("eth0")?;
            let start = Instant::now();
            let mut rng = 0x9e37_79b9_7f4a_7c15u64;
            let mut n = 0;
            // Bounded in count and in time.
            // A busy table first: 3,000 flows that were active (three packets each, so the LRU
            // saw them used), the way a loaded node's table looks. Kernel LRUs spare entries used
            // recently; this is what makes it demote, and evict, the idle connections.
            for i in 0..BUSY {
                let src = [198, 19, (i >> 8) as u8, i as u8];
                for _ in 0..3 {
                    sock.send_waiting(&frames.tcp4((src, 2000), (v4(VIP), PORT), "A", b""))?;
                }
            }
            while n < FLOWS && start.elapsed() < Duration::from_secs(60) {
                let (src, sport) = lb_tests::traffic::spoofed_source(&mut rng);
                let dst = v4(VIP);
                sock.send_waiting(&frames.tcp4((src, sport), (dst, PORT), "S", b""))?;
                sock.send_waiting(&frames.tcp4((src, sport), (dst, PORT), "A", b""))?;
                n += 1;
            }
            Ok((n, start.elapsed()))
        })??;
    eprintln!(
        "flood: {} spoofed flows (SYN + ACK) in {:?}",
        sent.0, sent.1
    );
    assert_eq!(sent.0, FLOWS);
    // Let the flood drain through, then change the tables under the 20 connections.
    std::thread::sleep(Duration::from_millis(500));
    let placed = flow_event(&net, FlowEvent::SynPlaced)? - syn_before;
    let events: Vec<(String, u64)> = net
        .dir
        .stats()?
        .global
        .into_iter()
        .filter(|(k, _)| k.starts_with("flow_"))
        .map(|(k, c)| (k, c.packets))
        .collect();
    eprintln!("flow events after the flood: {events:?}");
    let (total, real) = established_entries(&net)?;
    eprintln!("established entries after the flood: {total}, of the real client: {real}");
    assert_eq!(
        real, 20,
        "established connections were evicted by the flood"
    );
    assert!(
        // Most reach it (a slow machine may drop some in the bridge's backlog).
        placed >= u64::from(FLOWS) / 2,
        "the flood did not reach the program: {placed} SYNs placed"
    );
    net.lb(&["backend", "add", &vip, &backend_ip(2)])?;
    net.lb(&["backend", "drain", &vip, &backend_ip(0)])?;
    traffic.resume();
    // Ten rounds (a request on each of the 20 connections) after the changes: ~1 s, longer on
    // a loaded machine (a fixed 1.5 s once gave 19 rounds in all, one short of the bound).
    let after = traffic.wait_rounds(10, Duration::from_secs(15));
    let report = traffic.stop()?;
    eprintln!(
        "after the flood and the changes: {after} rounds ({} in all), errors {:?}",
        report.rounds, report.long_lived_errors
    );
    assert!(after >= 10, "the connections barely ran: {after} rounds");
    assert!(
        report.long_lived_errors.is_empty(),
        "{} connection failures: {:?}",
        report.long_lived_errors.len(),
        report.long_lived_errors
    );
    Ok(())
}

#[test]
fn a_udp_client_with_a_fixed_port_moves_off_a_killed_backend() -> anyhow::Result<()> {
    let mut net = DemoNet::build(3, "generic")?;
    net.start_backends()?;
    net.start_agent(&[])?;
    let vip = format!("{VIP}:{PORT}/udp");
    let (interval_ms, fall) = (200u64, 2u64);
    net.add_vip(
        &vip,
        &[0, 1, 2],
        &[
            "--health",
            "tcp",
            "--interval-ms",
            &interval_ms.to_string(),
            "--timeout-ms",
            "150",
            "--fall",
            &fall.to_string(),
        ],
    )?;
    // One UDP socket with a fixed source port (syslog, statsd, DNS forwarders do this),
    // asking every 50 ms and noting who answers when.
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let started = Instant::now();
    let client = net
        .client
        .spawn(move || -> anyhow::Result<Vec<(Duration, usize)>> {
            let s = UdpSocket::bind("0.0.0.0:40404")?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            let to = SocketAddr::new(VIP.parse()?, PORT);
            let mut answers = Vec::new();
            let mut buf = [0u8; 256];
            while !st.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(30) {
                s.send_to(b"hello", to)?;
                if let Ok(n) = s.recv(&mut buf) {
                    let i = backend_index(&String::from_utf8_lossy(&buf[..n]))?;
                    answers.push((started.elapsed(), i));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(answers)
        })?;
    std::thread::sleep(Duration::from_millis(1500));
    let stop_all = |stop: &AtomicBool| stop.store(true, Ordering::SeqCst);
    // Which backend holds the flow? Ask the agent (the flow entry), then kill that server.
    let trace: lb_userspace::api::protocol::Trace = serde_json::from_str(&net.lb(&[
        "trace",
        &format!("{}:40404", lb_tests::topo::CLIENT_IP),
        &vip,
        "--json",
    ])?)?;
    let held = trace.flow_backend.map(|a| a.to_string());
    let Some(victim) = (0..3).find(|i| Some(backend_ip(*i)) == held) else {
        stop_all(&stop);
        anyhow::bail!("the flow has no entry: {trace:?}");
    };
    let killed_at = started.elapsed();
    drop(net.procs.remove(victim));
    std::thread::sleep(Duration::from_millis(interval_ms * fall + 2500));
    stop_all(&stop);
    let answers = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))???;
    let before: Vec<usize> = answers
        .iter()
        .filter(|(t, _)| *t < killed_at)
        .map(|(_, i)| *i)
        .collect();
    assert!(
        !before.is_empty() && before.iter().all(|i| *i == victim),
        "before the kill the flow was not on one backend: {before:?}"
    );
    let moved = answers
        .iter()
        .find(|(t, i)| *t > killed_at && *i != victim)
        .map(|(t, _)| *t - killed_at);
    let limit = Duration::from_millis(interval_ms * fall + 1000);
    eprintln!("UDP flow moved off backend {victim} after {moved:?} (limit {limit:?})");
    let moved = moved.ok_or_else(|| anyhow::anyhow!("the UDP flow never moved"))?;
    assert!(moved <= limit, "moved after {moved:?}");
    Ok(())
}
