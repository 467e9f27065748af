//! NAT ports and closes on real parts: who closed first decides how long a port is held
//! (clients first: reused after the short grace, with no PAWS refusal at the backend;
//! backends first: held while the backend is in TIME_WAIT), and spoofed RSTs with wrong
//! sequence numbers, from both sides, close no connection; a spoofed SYN and ACK flood is
//! counted and survived.
//!
//! Scaled down from the two-minute runs: a pool of 16 NAT ports makes each port
//! serve twice within seconds (the property a long run at a high rate shows by
//! exhaustion: a port is free again exactly when the backend no longer remembers it).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{
    proc::sample_backend,
    routed::{Routed, VIP4},
    traffic::{closing_server, connect_many, server_closes},
};

const VIP: &str = "10.0.0.10:80/tcp";

fn target() -> SocketAddr {
    SocketAddr::new(VIP4.parse().expect("VIP"), 80)
}

fn stat(net: &Routed, name: &str) -> u64 {
    let out = net.lb(&["stats"]).unwrap_or_default();
    out.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(name)).then(|| w.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

/// The agent with NAT ports `ports` and one NAT VIP whose backend is `backend`, reached
/// through backend host 1 (checksum offload off: its packets cross XDP).
fn scene(tag: &str, ports: &str, backend: &str, sample: bool) -> anyhow::Result<Routed> {
    let mut net = Routed::new(tag)?;
    net.backends[0].exec(
        "ethtool",
        &["-K", &lb_tests::routed::backend_dev(1), "tx", "off"],
    )?;
    if sample {
        let child = sample_backend(&net.backends[0], 8000, 1)?;
        net.procs.push(child);
    }
    net.start_agent(&["--nat-ports", ports])?;
    net.lb(&["vip", "add", VIP, "--forward", "nat"])?;
    net.lb(&["backend", "add", VIP, backend])?;
    Ok(net)
}

/// One request on a new connection the client closes first (it drops the socket once the
/// answer is in); the NAT port the backend saw (`you are 10.30.0.2:PORT`) and the time.
fn client_closes(target: SocketAddr) -> anyhow::Result<(u16, Duration)> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let port = loop {
        let n = s.read(&mut chunk)?;
        anyhow::ensure!(n > 0, "closed before the answer");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(rest) = text.split("you are ").nth(1)
            && let Some(line) = rest.split('\n').next().filter(|_| rest.contains('\n'))
        {
            let addr: SocketAddr = line.trim().parse()?;
            break addr.port();
        }
    };
    Ok((port, t.elapsed()))
}

fn backend_nstat(net: &Routed, counter: &str) -> anyhow::Result<u64> {
    let out = net.backends[0]
        .command("nstat")
        .args(["-az", counter])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(counter)).then(|| w.next()?.parse().ok())?
        })
        .unwrap_or(0))
}

fn backend_time_waits(net: &Routed) -> anyhow::Result<usize> {
    let out = net.backends[0]
        .command("ss")
        .args(["-Htan", "state", "time-wait"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

#[test]
fn clients_closing_first_free_their_ports_after_the_grace() -> anyhow::Result<()> {
    let net = scene("ncc", "5000-5015", "10.41.0.2:8000", true)?;
    // The first packet to a backend waits for its neighbour entry.
    net.client.run(|| client_closes(target()))??;
    std::thread::sleep(Duration::from_secs(4));
    let rounds = net
        .client
        .run(|| -> anyhow::Result<Vec<Vec<(u16, Duration)>>> {
            let mut rounds = Vec::new();
            for _ in 0..2 {
                let round: Vec<_> = (0..16)
                    .map(|_| client_closes(target()))
                    .collect::<Result<_, _>>()?;
                rounds.push(round);
                // The grace (2 s) and the program's coarse second.
                std::thread::sleep(Duration::from_secs(4));
            }
            Ok(rounds)
        })??;
    for (i, round) in rounds.iter().enumerate() {
        let mut ports: Vec<u16> = round.iter().map(|(p, _)| *p).collect();
        ports.sort_unstable();
        ports.dedup();
        let slowest = round.iter().map(|(_, t)| *t).max().unwrap_or_default();
        println!(
            "round {i}: 16 connections on {} distinct ports of 16, slowest {slowest:?}",
            ports.len()
        );
        assert_eq!(ports.len(), 16, "every port of the pool, once: {ports:?}");
        assert!(ports.iter().all(|p| (5000..=5015).contains(p)));
        assert!(
            slowest < Duration::from_millis(900),
            "a SYN waited for a retransmission"
        );
    }
    assert_eq!(stat(&net, "dropped_nat_no_port"), 0);
    assert_eq!(backend_nstat(&net, "TcpExtPAWSTimewait")?, 0);
    assert_eq!(backend_time_waits(&net)?, 0, "clients closed first");
    Ok(())
}

#[test]
fn servers_closing_first_keep_their_ports_held() -> anyhow::Result<()> {
    let net = scene("ncs", "5100-5115", "10.41.0.2:9000", false)?;
    let stop = Arc::new(AtomicBool::new(false));
    let server = closing_server(&net.backends[0], "10.41.0.2:9000".parse()?, stop.clone())?;
    let result = (|| -> anyhow::Result<()> {
        let done = net
            .client
            .run(|| (0..16).map(|_| server_closes(target())).collect::<Vec<_>>())?;
        let failed: Vec<_> = done.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(failed.is_empty(), "{failed:?}");
        std::thread::sleep(Duration::from_secs(3));
        // Every port is held: the backend is in TIME_WAIT on each of them.
        let tw = backend_time_waits(&net)?;
        let more = net.client.run(|| server_closes(target()))?;
        println!(
            "16 connections closed by the backend: {tw} TIME_WAIT at the backend; a 17th: {more:?}"
        );
        assert_eq!(tw, 16, "the backend closed first");
        assert!(
            more.is_err(),
            "a port still in the backend's TIME_WAIT was reused"
        );
        assert!(stat(&net, "dropped_nat_no_port") >= 1);
        assert_eq!(backend_nstat(&net, "TcpExtPAWSTimewait")?, 0);
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    result
}

/// The next sequence numbers of an established socket: what it sends next and what it
/// expects to receive next (TCP_REPAIR's queue sequence numbers; root only).
fn next_seqs(s: &TcpStream) -> anyhow::Result<(u32, u32)> {
    const TCP_REPAIR: libc::c_int = 19;
    const TCP_REPAIR_QUEUE: libc::c_int = 20;
    const TCP_QUEUE_SEQ: libc::c_int = 21;
    const TCP_RECV_QUEUE: libc::c_int = 1;
    const TCP_SEND_QUEUE: libc::c_int = 2;
    let fd = s.as_raw_fd();
    let set = |opt, v: libc::c_int| -> anyhow::Result<()> {
        // SAFETY: a valid socket and an int option.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                opt,
                (&raw const v).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        anyhow::ensure!(
            rc == 0,
            "setsockopt {opt}: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    };
    let get = || -> anyhow::Result<u32> {
        let mut v: u32 = 0;
        let mut len = size_of::<u32>() as u32;
        // SAFETY: a valid socket; `v` and `len` outlive the call.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                TCP_QUEUE_SEQ,
                (&raw mut v).cast(),
                &mut len,
            )
        };
        anyhow::ensure!(
            rc == 0,
            "TCP_QUEUE_SEQ: {}",
            std::io::Error::last_os_error()
        );
        Ok(v)
    };
    set(TCP_REPAIR, 1)?;
    let r = (|| {
        set(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
        let snd = get()?;
        set(TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
        Ok((snd, get()?))
    })();
    set(TCP_REPAIR, 0)?;
    r
}

/// A bare TCP RST `src -> dst` with sequence number `seq`, sent by a raw IP socket of the
/// calling thread's namespace.
fn send_rst(src: SocketAddr, dst: SocketAddr, seq: u32) -> anyhow::Result<()> {
    // The sample backend listens on `::`: it names IPv4 peers as mapped addresses.
    let v4 = |a: SocketAddr| match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .map(|ip| std::net::SocketAddrV4::new(ip, a.port())),
    };
    let (Some(s), Some(d)) = (v4(src), v4(dst)) else {
        anyhow::bail!("IPv4 only: {src} -> {dst}");
    };
    let mut pkt = Vec::new();
    etherparse::PacketBuilder::ipv4(s.ip().octets(), d.ip().octets(), 64)
        .tcp(s.port(), d.port(), seq, 0)
        .rst()
        .write(&mut pkt, &[])?;
    // SAFETY: plain socket calls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        anyhow::ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(d.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let n = libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&raw const to).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        anyhow::ensure!(n == pkt.len() as isize, "sendto: {err}");
    }
    Ok(())
}

/// Spoofed RSTs with wrong sequence numbers, from the backend's side and from the client's,
/// for every live connection: dropped and counted, and no connection closes, even after the
/// grace and a sweep (an obeyed RST would have freed the pair: its next request would find
/// none). An in-window one, for one connection, is obeyed.
#[test]
fn spoofed_rsts_out_of_window_close_nothing() -> anyhow::Result<()> {
    let net = scene("ncr", "1024-32767", "10.41.0.2:8000", true)?;
    let mut conns = connect_many(&net.client, target(), 20)?;
    let mut pairs = Vec::new();
    for c in &mut conns {
        c.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")?;
        let mut buf = [0u8; 1024];
        let n = c.read(&mut buf)?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let nat: SocketAddr = text
            .split("you are ")
            .nth(1)
            .and_then(|r| r.lines().next())
            .ok_or_else(|| anyhow::anyhow!("no peer in {text:?}"))?
            .trim()
            .parse()?;
        let (snd, rcv) = next_seqs(c)?;
        pairs.push((c.local_addr()?, nat, snd, rcv));
    }
    let backend: SocketAddr = "10.41.0.2:8000".parse()?;
    let far = [1u32 << 31, 3 * lb_common::NAT_SEQ_SLACK];
    for (client, nat, snd, rcv) in &pairs {
        for off in far {
            net.backends[0].run(|| send_rst(backend, *nat, rcv.wrapping_add(off)))??;
            net.client
                .run(|| send_rst(*client, target(), snd.wrapping_sub(off)))??;
        }
    }
    let spoofed = 4 * pairs.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(&net, "dropped_nat_out_of_window") < spoofed && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(stat(&net, "dropped_nat_out_of_window"), spoofed);
    // Past the grace and a sweep (every 5 s): every connection still answers.
    std::thread::sleep(Duration::from_secs(8));
    let mut alive = 0;
    for c in &mut conns {
        if lb_tests::traffic::request(c).is_ok() {
            alive += 1;
        }
    }
    println!(
        "{spoofed} spoofed RSTs out of window for 20 connections: all dropped, {alive} of 20 answer"
    );
    assert_eq!(alive, 20);
    // In window (the backend's exact next sequence number): obeyed.
    let (client, nat, _, _) = pairs[0];
    let (_, rcv) = next_seqs(&conns[0])?;
    net.backends[0].run(|| send_rst(backend, nat, rcv))??;
    let mut buf = [0u8; 16];
    conns[0].set_read_timeout(Some(Duration::from_secs(2)))?;
    let closed = conns[0].read(&mut buf);
    assert!(
        matches!(&closed, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{client}: {closed:?}"
    );
    Ok(())
}

/// Sends raw IPv4 packets (headers included) from the calling thread's namespace.
struct RawIp(libc::c_int);

impl RawIp {
    fn new() -> anyhow::Result<Self> {
        // SAFETY: a plain socket call.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        anyhow::ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        Ok(RawIp(fd))
    }

    fn send(&self, pkt: &[u8], dst: [u8; 4]) {
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: a valid socket, buffer and address; a lost packet is only a lost packet.
        unsafe {
            libc::sendto(
                self.0,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            );
        }
    }
}

impl Drop for RawIp {
    fn drop(&mut self) {
        // SAFETY: the descriptor this value owns.
        unsafe { libc::close(self.0) };
    }
}

/// A spoofed flood (random sources in 198.18.0.0/15, never answered): SYNs and bare ACKs
/// alternately, paced to `pps` for `secs` seconds (bounded in count and time).
fn flood(pps: u64, secs: u64) -> anyhow::Result<(u64, u64)> {
    let sock = RawIp::new()?;
    let vip = [10, 0, 0, 10];
    let start = Instant::now();
    let (mut syns, mut acks) = (0u64, 0u64);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut pkt = Vec::with_capacity(64);
    while start.elapsed() < Duration::from_secs(secs) && syns + acks < pps * secs {
        for _ in 0..250 {
            let (src, sport) = lb_tests::traffic::spoofed_source(&mut rng);
            pkt.clear();
            let b = etherparse::PacketBuilder::ipv4(src, vip, 64).tcp(sport, 80, rng as u32, 64000);
            if (syns + acks) % 2 == 0 {
                b.syn().write(&mut pkt, &[])?;
                syns += 1;
            } else {
                b.ack((rng >> 40) as u32).write(&mut pkt, &[])?;
                acks += 1;
            }
            sock.send(&pkt, vip);
        }
        // Paced: never ahead of `pps`.
        let due = Duration::from_secs_f64((syns + acks) as f64 / pps as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    Ok((syns, acks))
}

/// One request on a new connection, with a connect timeout that lets the client's SYN be
/// sent three times (at 0, 1 and 3 s), as a client with the kernel's default timeout (about
/// two minutes) would: a SYN refused because every half-open slot it may use holds a handshake
/// younger than 100 ms is dropped, and the client's own retransmission is the designed retry
/// (`dropped_nat_half_open_full`). `one_request`'s 3 s allows only two.
fn patient_request(target: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(7))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    lb_tests::traffic::request(&mut s)
}

/// 8 s of spoofed SYNs and ACKs at 20,000 a second while 20 keep-alive connections and a
/// stream of new ones run: no failure; the ACKs are dropped as `dropped_nat_no_entry` (no
/// port, no entry); the SYNs' half-open pairs stay within the slots, and the established
/// connections keep their entries.
#[test]
fn spoofed_floods_are_counted_and_survived() -> anyhow::Result<()> {
    let net = scene("ncf", "1024-32767", "10.41.0.2:8000", true)?;
    let mut conns = connect_many(&net.client, target(), 20)?;
    for c in &mut conns {
        lb_tests::traffic::request(c)?;
    }
    let stop = AtomicBool::new(false);
    let (sent, (fresh, failed)) = std::thread::scope(|s| -> anyhow::Result<_> {
        let flooder = s.spawn(|| {
            let r = net.client.run(|| flood(20_000, 8));
            stop.store(true, Ordering::Relaxed);
            r
        });
        let fresh = net.client.run(|| {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) && ok < 20_000 {
                match patient_request(target()) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })?;
        let sent = flooder
            .join()
            .map_err(|_| anyhow::anyhow!("flooder panicked"))???;
        Ok((sent, fresh))
    })?;
    let mut alive = 0;
    for c in &mut conns {
        if lb_tests::traffic::request(c).is_ok() {
            alive += 1;
        }
    }
    let no_entry = stat(&net, "dropped_nat_no_entry");
    let full = stat(&net, "dropped_nat_half_open_full");
    let replaced = stat(&net, "nat_half_open_replaced");
    let stale = stat(&net, "dropped_nat_stale_port");
    println!(
        "flood: {} SYNs and {} ACKs spoofed; meanwhile {fresh} new connections, {} failed; \
         20 keep-alive: {alive} answer; dropped_nat_no_entry {no_entry}, \
         dropped_nat_half_open_full {full}, nat_half_open_replaced {replaced}, \
         dropped_nat_stale_port {stale}",
        sent.0,
        sent.1,
        failed.len()
    );
    assert!(failed.is_empty(), "{:?}", &failed[..failed.len().min(5)]);
    assert_eq!(alive, 20);
    assert!(fresh > 0);
    // Every spoofed SYN took a slot, replaced an old half-open pair, or was refused.
    assert!(
        replaced + full > 0,
        "the SYNs never met the half-open slots"
    );
    // Most spoofed ACKs reach the program (a loaded machine may lose some on the way).
    assert!(
        no_entry >= sent.1 / 2,
        "{no_entry} of {} ACKs counted",
        sent.1
    );
    Ok(())
}
