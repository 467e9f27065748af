//! Walking skeleton: the real `lb` binary attaches the real XDP program to a veth in a
//! namespace of our own, real UDP traffic crosses it, and the per-CPU counter moves.
use std::{net::UdpSocket, time::Duration};

use lb_tests::{AgentDir, Netns, VethPair};

const PACKETS: u64 = 50;

fn counted_packets(line: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(line).expect("stats line is JSON");
    v.as_object()
        .expect("stats object")
        .iter()
        // flow-table events are not packets of their own
        .filter(|(name, _)| !name.starts_with("flow_"))
        .map(|(_, c)| c["packets"].as_u64().expect("packets"))
        .sum::<u64>()
}

fn attach_and_count(mode: &str, mtu: u32) -> anyhow::Result<()> {
    let client = Netns::new("skc")?;
    let server = Netns::new("sks")?;
    let veth = VethPair::new(&client, "10.77.0.1/24", &server, "10.77.0.2/24")?;
    client.ip(&["link", "set", &veth.a, "mtu", &mtu.to_string()])?;
    server.ip(&["link", "set", &veth.b, "mtu", &mtu.to_string()])?;

    let dir = AgentDir::new("sk")?;
    let lb = dir.spawn_agent(
        &server,
        &veth.b,
        &["--mode", mode, "--json", "--duration", "60"],
    )?;

    let receiver = server.run(|| UdpSocket::bind("10.77.0.2:7000"))??;
    receiver.set_read_timeout(Some(Duration::from_secs(5)))?;
    client.run(|| -> std::io::Result<()> {
        let sock = UdpSocket::bind("10.77.0.1:0")?;
        for i in 0..PACKETS {
            sock.send_to(format!("packet {i}").as_bytes(), "10.77.0.2:7000")?;
        }
        Ok(())
    })??;
    let mut buf = [0u8; 64];
    for _ in 0..PACKETS {
        receiver.recv(&mut buf)?;
    }

    let lines = lb.terminate(Duration::from_secs(10))?;
    let stats = lines
        .iter()
        .find(|l| l.starts_with('{'))
        .expect("final stats line");
    let seen = counted_packets(stats);
    assert!(
        seen >= PACKETS,
        "XDP counted {seen} packets, sent {PACKETS}: {stats}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("detached")),
        "lb did not detach: {lines:?}"
    );
    Ok(())
}

#[test]
fn native_mode_counts_real_traffic() -> anyhow::Result<()> {
    attach_and_count("native", 1500)
}

/// A veth refuses native XDP above ~3.5 KB MTU unless the program handles multi-buffer
/// frames (`xdp.frags`): ours does, so native attach works at a jumbo MTU.
#[test]
fn native_mode_attaches_at_jumbo_mtu() -> anyhow::Result<()> {
    attach_and_count("native", 9000)
}

#[test]
fn generic_mode_counts_real_traffic() -> anyhow::Result<()> {
    attach_and_count("generic", 1500)
}
