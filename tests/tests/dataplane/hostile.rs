//! A hostile host on the routed network, next to a backend running `lb decap` that trusts the
//! load balancers and its peers (`lb_tests::routed::TRUSTED`). From a namespace that is no
//! load balancer: (a) GUE and IPIP packets carrying a spoofed inner source reach no socket on
//! the backend and are counted `decap_untrusted_source`; (b) a GUE packet whose hop list names
//! a third host (and whose inner packet no socket owns) is not relayed there. From the load
//! balancer's own namespace (a trusted sender): (c) the same hop list naming the third host is
//! not relayed either, counted `decap_hop_untrusted`. That trusted traffic still works is what
//! `encap` and `second_chance` show.
use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use etherparse::PacketBuilder;
use lb_tests::{
    Netns,
    routed::{Routed, VIP4, backend4},
    second_chance::gue_hop,
};

/// The spoofed inner source: nobody's client, from outside every network here.
const SPOOFED: [u8; 4] = [203, 0, 113, 7];
/// The UDP port the backend listens on at the VIP.
const PORT: u16 = 5300;
/// Packets of each kind sent.
const N: u64 = 5;

fn v4(s: &str) -> [u8; 4] {
    s.parse::<std::net::Ipv4Addr>().expect("literal").octets()
}

/// An IPv4 UDP packet from the spoofed source to the VIP's listening port.
fn spoofed_udp(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(SPOOFED, v4(VIP4), 64)
        .udp(4444, PORT)
        .write(&mut out, payload)
        .expect("build");
    out
}

/// An IPv4 TCP ACK from the spoofed source to the VIP's port 80, of a flow no socket has.
fn stray_ack() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(SPOOFED, v4(VIP4), 64)
        .tcp(4445, 80, 1000, 64000)
        .ack(1)
        .write(&mut out, b"x")
        .expect("build");
    out
}

/// Sends `payload` over UDP to the backend's GUE port from namespace `ns`, `N` times.
fn send_gue(ns: &Netns, to: &str, payload: &[u8]) -> anyhow::Result<()> {
    let to: SocketAddr = format!("{to}:6080").parse()?;
    ns.run(|| -> anyhow::Result<()> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        for _ in 0..N {
            s.send_to(payload, to)?;
        }
        Ok(())
    })?
}

/// Sends `inner` (an IPv4 packet) as IPIP (IP protocol 4, the kernel writing the outer header)
/// to `to` from namespace `ns`, `N` times.
fn send_ipip(ns: &Netns, to: &str, inner: &[u8]) -> anyhow::Result<()> {
    let to: IpAddr = to.parse()?;
    ns.run(|| -> anyhow::Result<()> {
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(4)),
        )?;
        for _ in 0..N {
            s.send_to(inner, &SocketAddr::new(to, 0).into())?;
        }
        Ok(())
    })?
}

/// Packets `ns`'s `eth0` has received.
fn rx_packets(ns: &Netns) -> anyhow::Result<u64> {
    let out = ns
        .command("cat")
        .arg("/sys/class/net/eth0/statistics/rx_packets")
        .output()?;
    anyhow::ensure!(out.status.success(), "reading rx_packets");
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// Waits until backend 1's decap counter `name` reaches `want` (the packets have arrived and
/// been judged), then checks it is exactly `want`.
fn await_count(net: &Routed, name: &str, want: u64) -> anyhow::Result<()> {
    let seen = std::cell::Cell::new(0);
    let r = lb_tests::wait_until(
        Duration::from_secs(3),
        name,
        || {
            seen.set(decap_count(net, name)?);
            Ok(seen.get() >= want)
        },
        || seen.get().to_string(),
    );
    r?;
    assert_eq!(decap_count(net, name)?, want, "{name}");
    Ok(())
}

/// Backend 1's decap counter `name` (packets).
fn decap_count(net: &Routed, name: &str) -> anyhow::Result<u64> {
    let s = net.decap(1, &["--stats", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&s)?;
    v[name]["packets"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no counter {name} in {s}"))
}

#[test]
fn a_stranger_can_neither_spoof_through_nor_relay_via_a_backend() -> anyhow::Result<()> {
    let mut net = Routed::new("hst")?;
    let stranger = net.add_host("hsts", 50)?;
    let third = net.add_host("hstt", 60)?;
    net.decap(1, &[])?;
    // The backend's own XDP_TX would be delivered (were anything relayed).
    net.xdp_pass_to_backends()?;
    let backend = backend4(1);
    let listener = net.backends[0].run(|| -> anyhow::Result<UdpSocket> {
        let s = UdpSocket::bind((VIP4, PORT))?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        Ok(s)
    })??;

    // (a) A spoofed inner source, by GUE and by IPIP: no socket sees it.
    let untrusted = decap_count(&net, "decap_untrusted_source")?;
    send_gue(&stranger, &backend, &spoofed_udp(b"gue"))?;
    send_ipip(&stranger, &backend, &spoofed_udp(b"ipip"))?;
    let mut buf = [0u8; 64];
    // Bounded: at most one more timeout after the last packet.
    let mut got = Vec::new();
    while let Ok((n, from)) = listener.recv_from(&mut buf) {
        got.push((from, String::from_utf8_lossy(&buf[..n]).into_owned()));
        anyhow::ensure!(got.len() < 64, "flooded: {got:?}");
    }
    assert!(got.is_empty(), "spoofed packets delivered: {got:?}");
    // Every tunnel from the stranger refused and counted.
    await_count(&net, "decap_untrusted_source", untrusted + 2 * N)?;

    // (b) From the stranger, a hop list naming the third host: nothing reaches it.
    let mut gue = gue_hop(true, "10.60.0.2".parse()?, 0);
    gue.extend_from_slice(&stray_ack());
    let before = rx_packets(&third)?;
    send_gue(&stranger, &backend, &gue)?;
    // (c) The same from the load balancer's namespace (a trusted sender, 10.31.0.2).
    let hop_refused = decap_count(&net, "decap_hop_untrusted")?;
    send_gue(&net.lb, &backend, &gue)?;
    // The stranger's hop list refused as its sender, the load balancer's for its hop.
    await_count(&net, "decap_untrusted_source", untrusted + 3 * N)?;
    await_count(&net, "decap_hop_untrusted", hop_refused + N)?;
    // A relayed packet would have followed at once (the same softirq); give it a moment more.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        rx_packets(&third)?,
        before,
        "the backend relayed packets to the third host"
    );
    // The third host's counter does count what is sent to it: the check above can fail.
    stranger.run(|| -> anyhow::Result<()> {
        UdpSocket::bind("0.0.0.0:0")?.send_to(b"hello", "10.60.0.2:9")?;
        Ok(())
    })??;
    lb_tests::wait_until(
        Duration::from_secs(2),
        "a packet at the third host",
        || Ok(rx_packets(&third)? > before),
        || "none".into(),
    )?;
    Ok(())
}
