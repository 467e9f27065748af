//! End-to-end scenarios on the demo network: real clients, the real agent and XDP program,
//! real sample backends, in namespaces each test builds and removes.
use std::net::IpAddr;

use lb_tests::topo::{DemoNet, PORT, VIP};

fn vip_ip() -> IpAddr {
    VIP.parse().expect("literal")
}

fn tcp_vip() -> String {
    format!("{VIP}:{PORT}/tcp")
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
    let stats = net.lb(&["stats", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&stats)?;
    assert!(
        v["global"]["forwarded"]["packets"].as_u64().unwrap_or(0) >= 600,
        "{stats}"
    );
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
