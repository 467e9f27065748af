//! Jumbo frames on veths at MTU 9000, with the agent attached natively and generically: raw
//! frames of every size sent by the client and captured whole where they land (the backend,
//! after `lb_decap` for tunnels), non-VIP frames taken by the load balancer's own stack, a
//! real TCP connection through full NAT with 8,000-byte segments, and the MTU changed under
//! a running agent.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
use lb_tests::{
    Netns,
    frames::Frames,
    raw::RawSocket,
    routed::{CLIENT4, Routed, VIP4, backend_dev, backend4},
    topo::{CLIENT_IP, CLIENT_IP6, DemoNet, LB_IP, VIP, VIP6},
    traffic::one_request,
    wait_until,
};

use lb_tests::jumbo::{Kind, SIZES, edit_ipv4_header, frame, pattern};

/// The jumbo MTU of every link the client's frames cross.
const MTU: u32 = 9000;
/// The tunnel side's MTU: a 9000-byte packet and its outer headers (up to 48 bytes for GUE
/// over IPv6) fit, as on a fabric sized for encapsulation.
const TUNNEL_MTU: u32 = 9100;

/// A capture on `dev` in `ns`, with room for a few megabytes of frames.
fn capture(ns: &Netns, dev: &str) -> anyhow::Result<RawSocket> {
    let dev = dev.to_string();
    let cap = ns.run(move || RawSocket::bind(&dev))??;
    cap.set_receive_buffer(16 << 20)?;
    Ok(cap)
}

/// The one connection `listener` gets within 20 s.
fn accept_within(listener: &TcpListener) -> anyhow::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                anyhow::ensure!(Instant::now() < deadline, "no connection within 20 s");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends `frames` out of `dev` in `ns`, one every 2 ms (bounded: a few dozen frames).
fn send(ns: &Netns, dev: &str, frames: &[Vec<u8>]) -> anyhow::Result<()> {
    let dev = dev.to_string();
    let frames = frames.to_vec();
    ns.run(move || -> anyhow::Result<()> {
        let s = RawSocket::sender(&dev)?;
        for f in &frames {
            s.send_waiting(f)?;
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    })?
}

/// What `cap` receives until `done` holds of it, for at most 3 s.
fn collect(cap: &RawSocket, done: impl Fn(&[Vec<u8>]) -> bool) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut got = Vec::new();
    loop {
        got.extend(cap.drain());
        if done(&got) || Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The global counter `name` of `lb stats` output (0 when the row is left out).
fn stat(out: &str, name: &str) -> u64 {
    out.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(name)).then(|| w.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

/// The demo network at MTU `mtu` with the agent in `mode` and one backend behind TCP and
/// UDP VIPs on port 80 in both families (L2 direct server return).
fn demo(mode: &str, mtu: u32) -> anyhow::Result<DemoNet> {
    let mut net = DemoNet::build(1, mode)?;
    for ns in [&net.bridge, &net.client, &net.lb, &net.backends[0]] {
        ns.set_mtu_all(mtu)?;
    }
    net.start_backends()?;
    net.start_agent(&[])?;
    for vip in [
        format!("{VIP}:80/tcp"),
        format!("{VIP}:80/udp"),
        format!("[{VIP6}]:80/tcp"),
        format!("[{VIP6}]:80/udp"),
    ] {
        net.add_vip(&vip, &[0], &[])?;
    }
    let vip = VIP.parse()?;
    wait_until(
        Duration::from_secs(10),
        "the VIP answers HTTP",
        || Ok(net.http_get(vip, 80).is_ok()),
        String::new,
    )?;
    Ok(net)
}

/// Frames of every kind and size from the demo's client to its VIPs.
fn demo_frames(net: &DemoNet, sizes: &[usize]) -> anyhow::Result<Vec<Vec<u8>>> {
    let eth = Frames::new(net.client.mac("eth0")?, net.lb.mac("eth0")?);
    let mut frames = Vec::new();
    for kind in Kind::ALL {
        let (client, vip) = if kind.v4() {
            (CLIENT_IP, VIP)
        } else {
            (CLIENT_IP6, VIP6)
        };
        for size in sizes {
            let sport = 41000 + frames.len() as u16;
            frames.push(frame(eth.eth(), kind, (client, sport), (vip, 80), *size));
        }
    }
    Ok(frames)
}

/// Sends `frames` from the demo's client and checks each reaches the backend byte for byte,
/// with only its MACs changed (the backend's as destination, the load balancer's as source).
fn l2_frames_arrive_whole(net: &DemoNet, what: &str, frames: &[Vec<u8>]) -> anyhow::Result<()> {
    let (lb_mac, be_mac) = (net.lb.mac("eth0")?, net.backends[0].mac("eth0")?);
    let wants: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| {
            let mut w = f.clone();
            w[0..6].copy_from_slice(&be_mac);
            w[6..12].copy_from_slice(&lb_mac);
            w
        })
        .collect();
    let cap = capture(&net.backends[0], "eth0")?;
    send(&net.client, "eth0", frames)?;
    let got = collect(&cap, |g| wants.iter().all(|w| g.contains(w)));
    let missing: Vec<String> = wants
        .iter()
        .zip(frames)
        .filter(|(w, _)| !got.contains(w))
        .map(|(_, f)| format!("{} bytes (IP version {})", f.len(), f[14] >> 4))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{what}: these frames did not reach the backend whole: {missing:?}"
    );
    Ok(())
}

fn l2_at_jumbo_mtu(mode: &str) -> anyhow::Result<()> {
    let net = demo(mode, MTU)?;
    let frames = demo_frames(&net, &SIZES)?;
    l2_frames_arrive_whole(&net, mode, &frames)?;
    // Not for a VIP: the load balancer's own UDP socket gets every size whole.
    let sock = net.lb.run(|| UdpSocket::bind((LB_IP, 9999)))??;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let eth = Frames::new(net.client.mac("eth0")?, net.lb.mac("eth0")?);
    let others: Vec<Vec<u8>> = SIZES
        .iter()
        .map(|size| {
            frame(
                eth.eth(),
                Kind::Udp4,
                (CLIENT_IP, 9000),
                (LB_IP, 9999),
                *size,
            )
        })
        .collect();
    send(&net.client, "eth0", &others)?;
    let mut buf = vec![0u8; 16 * 1024];
    for size in SIZES {
        let n = sock
            .recv(&mut buf)
            .with_context(|| format!("{mode}: the {size}-byte non-VIP datagram"))?;
        assert_eq!(n, size - Kind::Udp4.headers(), "{mode}: datagram length");
        assert_eq!(
            &buf[..n],
            &pattern(n, 9000u16 as u8)[..],
            "{mode}: datagram bytes"
        );
    }
    let stats = net.lb(&["stats"])?;
    assert_eq!(stat(&stats, "dropped_malformed"), 0, "{mode}: {stats}");
    assert_eq!(stat(&stats, "passed_split_headers"), 0, "{mode}: {stats}");
    Ok(())
}

#[test]
fn l2_jumbo_frames_reach_the_backend_whole_generic() -> anyhow::Result<()> {
    l2_at_jumbo_mtu("generic")
}

#[test]
fn l2_jumbo_frames_reach_the_backend_whole_native() -> anyhow::Result<()> {
    l2_at_jumbo_mtu("native")
}

/// The MTU raised from 1500 to 9000 and lowered back under a running agent attached
/// natively, with traffic: the program is multi-buffer aware, so the kernel takes either
/// change and forwarding goes on without a re-attach.
#[test]
fn the_mtu_changes_under_a_running_agent() -> anyhow::Result<()> {
    let net = demo("native", 1500)?;
    let vip = VIP.parse()?;
    let small = demo_frames(&net, &[1514])?;
    l2_frames_arrive_whole(&net, "at 1500", &small)?;
    for ns in [&net.bridge, &net.client, &net.lb, &net.backends[0]] {
        ns.set_mtu_all(MTU)?;
    }
    let frames = demo_frames(&net, &SIZES)?;
    l2_frames_arrive_whole(&net, "raised to 9000", &frames)?;
    net.http_get(vip, 80)
        .context("HTTP after raising the MTU")?;
    for ns in [&net.lb, &net.client, &net.backends[0], &net.bridge] {
        ns.set_mtu_all(1500)?;
    }
    l2_frames_arrive_whole(&net, "lowered to 1500", &small)?;
    net.http_get(vip, 80)
        .context("HTTP after lowering the MTU")?;
    // The same attachment throughout: still native (`xdp`, not `xdpgeneric`), nothing
    // counted as malformed.
    let link = net
        .lb
        .command("ip")
        .args(["-d", "link", "show", "eth0"])
        .output()?;
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        link.contains("prog/xdp ") && !link.contains("xdpgeneric"),
        "{link}"
    );
    let stats = net.lb(&["stats"])?;
    assert_eq!(stat(&stats, "dropped_malformed"), 0, "{stats}");
    Ok(())
}

/// The routed network at jumbo MTUs: 9000 on the client's side, [`TUNNEL_MTU`] from the load
/// balancer to the backends.
fn routed(tag: &str, mode: &str) -> anyhow::Result<Routed> {
    let mut net = Routed::new(tag)?;
    for ns in [&net.client, &net.lb] {
        ns.set_mtu_all(MTU)?;
    }
    for ns in &net.backends {
        ns.set_mtu_all(TUNNEL_MTU)?;
    }
    // The router: the client's and the load balancer's receiving links at 9000, the rest
    // (toward eth1 and the backends) at the tunnel MTU.
    net.router.set_mtu_all(TUNNEL_MTU)?;
    net.lb
        .ip(&["link", "set", "eth1", "mtu", &TUNNEL_MTU.to_string()])?;
    net.start_agent_in(mode, &[])?;
    Ok(net)
}

fn tunnels_at_jumbo_mtu(tag: &str, mode: &str) -> anyhow::Result<()> {
    let mut net = routed(tag, mode)?;
    net.decap(1, &[])?;
    net.start_sample(1)?;
    for (vip, fwd) in [("10.0.0.10:80/tcp", "ipip"), ("10.0.0.10:80/udp", "gue")] {
        net.lb(&["vip", "add", vip, "--forward", fwd])?;
        net.lb(&["backend", "add", vip, &backend4(1)])?;
    }
    let target = SocketAddr::new(VIP4.parse()?, 80);
    wait_until(
        Duration::from_secs(10),
        "the VIP answers through the tunnel",
        || net.client.run(move || one_request(target).is_ok()),
        String::new,
    )?;
    // Raw frames to the router; what reaches the backend's stack after `lb_decap` is the
    // packet as the router forwarded it (TTL one less, IPv4 checksum updated).
    let eth = Frames::new(net.client.mac("eth0")?, router_mac(&net)?);
    let mut frames = Vec::new();
    for kind in [Kind::Tcp4, Kind::Udp4] {
        for size in SIZES {
            let sport = 42000 + frames.len() as u16;
            frames.push(frame(eth.eth(), kind, (CLIENT4, sport), (VIP4, 80), size));
        }
    }
    let dev = backend_dev(1);
    let cap = capture(&net.backends[0], &dev)?;
    send(&net.client, "eth0", &frames)?;
    let wants: Vec<Vec<u8>> = frames.iter().map(|f| routed_once(&f[14..])).collect();
    let inner = |g: &Vec<u8>| g.get(14..).map(<[u8]>::to_vec);
    let got = collect(&cap, |g| {
        wants
            .iter()
            .all(|w| g.iter().any(|x| inner(x).as_ref() == Some(w)))
    });
    let missing: Vec<String> = wants
        .iter()
        .filter(|w| !got.iter().any(|x| inner(x).as_ref() == Some(*w)))
        .map(|w| format!("{} bytes, protocol {}", w.len() + 14, w[9]))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{mode}: these frames did not reach the backend's stack whole: {missing:?}"
    );
    let decap = net.decap(1, &["--stats", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&decap)?;
    let count = |name: &str| v[name]["packets"].as_u64().unwrap_or(0);
    assert!(
        count("decapsulated") >= frames.len() as u64,
        "{mode}: {decap}"
    );
    assert_eq!(count("passed_malformed"), 0, "{mode}: {decap}");
    let stats = net.lb(&["stats"])?;
    assert_eq!(stat(&stats, "dropped_malformed"), 0, "{mode}: {stats}");
    Ok(())
}

/// The router's MAC on the client's link.
fn router_mac(net: &Routed) -> anyhow::Result<[u8; 6]> {
    let links = net.router.links()?;
    for dev in links {
        let out = std::process::Command::new("ip")
            .args(["-n", net.router.name(), "-br", "addr", "show", &dev])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).contains("10.20.0.1/") {
            return net.router.mac(&dev);
        }
    }
    anyhow::bail!("no router link on the client's subnet")
}

/// An IPv4 packet as a router forwards it: TTL one less, header checksum updated.
fn routed_once(ip: &[u8]) -> Vec<u8> {
    let mut p = ip.to_vec();
    edit_ipv4_header(&mut p, |h| h.time_to_live -= 1);
    p
}

#[test]
fn tunnels_carry_jumbo_frames_whole_generic() -> anyhow::Result<()> {
    tunnels_at_jumbo_mtu("jtg", "generic")
}

#[test]
fn tunnels_carry_jumbo_frames_whole_native() -> anyhow::Result<()> {
    tunnels_at_jumbo_mtu("jtn", "native")
}

/// Bytes each way through the NAT connection.
const NAT_BYTES: usize = 1 << 20;
/// The client's segment size (TCP_MAXSEG): it also advertises it, so the backend's
/// segments are as large.
const SEGMENT: u32 = 8000;

/// A real TCP connection through full NAT with 8,000-byte segments: 1 MiB each way, every
/// byte checked, and the checksums of what each end received verified independently.
fn nat_at_jumbo_mtu(tag: &str, mode: &str) -> anyhow::Result<()> {
    let net = routed(tag, mode)?;
    let dev = backend_dev(1);
    // Complete checksums, no offloaded segmentation: each frame leaves as the stack made it
    // and crosses the XDP program as it is.
    net.client.exec(
        "ethtool",
        &["-K", "eth0", "tx", "off", "tso", "off", "gso", "off"],
    )?;
    net.backends[0].exec(
        "ethtool",
        &["-K", &dev, "tx", "off", "tso", "off", "gso", "off"],
    )?;
    let listener = net.backends[0].run(|| TcpListener::bind((backend4(1).as_str(), 8080)))??;
    let server = std::thread::spawn(move || -> anyhow::Result<usize> {
        let mut s = accept_within(&listener)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut got = vec![0u8; NAT_BYTES];
        s.read_exact(&mut got)?;
        anyhow::ensure!(
            got == pattern(NAT_BYTES, 1),
            "the backend received other bytes"
        );
        s.write_all(&pattern(NAT_BYTES, 2))?;
        Ok(got.len())
    });
    net.lb(&["vip", "add", "10.0.0.10:80/tcp", "--forward", "nat"])?;
    net.lb(&[
        "backend",
        "add",
        "10.0.0.10:80/tcp",
        &format!("{}:8080", backend4(1)),
    ])?;
    let client_cap = capture(&net.client, "eth0")?;
    let backend_cap = capture(&net.backends[0], &dev)?;
    let target = SocketAddr::new(VIP4.parse()?, 80);
    net.client.run(move || -> anyhow::Result<()> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_tcp_mss(SEGMENT)?;
        s.connect_timeout(&target.into(), Duration::from_secs(5))?;
        let mut s: TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(&pattern(NAT_BYTES, 1))?;
        let mut back = vec![0u8; NAT_BYTES];
        s.read_exact(&mut back)?;
        anyhow::ensure!(
            back == pattern(NAT_BYTES, 2),
            "the client received other bytes"
        );
        Ok(())
    })??;
    let served = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    assert_eq!(served, NAT_BYTES);
    for (end, cap) in [("client", &client_cap), ("backend", &backend_cap)] {
        let (checked, largest) = verify_tcp_checksums(&cap.drain(), &format!("{mode} {end}"));
        assert!(
            checked > 50,
            "{mode} {end}: only {checked} segments captured"
        );
        assert!(
            largest >= 4000,
            "{mode} {end}: the largest segment seen was {largest} bytes (jumbo frames expected)"
        );
    }
    let stats = net.lb(&["stats"])?;
    assert_eq!(stat(&stats, "dropped_malformed"), 0, "{mode}: {stats}");
    Ok(())
}

/// Checks the TCP checksum of every IPv4 TCP frame in `frames` (computed anew over the whole
/// segment); returns how many were checked and the largest frame's length.
fn verify_tcp_checksums(frames: &[Vec<u8>], what: &str) -> (usize, usize) {
    let (mut checked, mut largest) = (0, 0);
    for f in frames {
        let Ok(p) = PacketHeaders::from_ethernet_slice(f) else {
            continue;
        };
        if let (Some(NetHeaders::Ipv4(ip, _)), Some(TransportHeader::Tcp(tcp))) =
            (&p.net, &p.transport)
        {
            let payload = p.payload.slice();
            let want = tcp.calc_checksum_ipv4(ip, payload).expect("checksum");
            assert_eq!(
                tcp.checksum,
                want,
                "{what}: a {}-byte frame with a wrong TCP checksum",
                f.len()
            );
            assert_eq!(
                ip.header_checksum,
                ip.calc_header_checksum(),
                "{what}: IP checksum"
            );
            checked += 1;
            largest = largest.max(f.len());
        }
    }
    (checked, largest)
}

#[test]
fn nat_moves_a_megabyte_in_jumbo_segments_generic() -> anyhow::Result<()> {
    nat_at_jumbo_mtu("jng", "generic")
}

#[test]
fn nat_moves_a_megabyte_in_jumbo_segments_native() -> anyhow::Result<()> {
    nat_at_jumbo_mtu("jnn", "native")
}
