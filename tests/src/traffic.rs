//! Traffic for end-to-end scenarios: HTTP requests on new and keep-alive connections, a
//! load of keep-alive connections plus a stream of new ones counting failures, and UDP flows
//! from fixed source ports (to check which backend each meets).
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{Netns, routed::VIP4};

/// 1,000 UDP flows (source ports 20000-20999) from the client to the VIP's port 80: the
/// backend answering each ("hello from backend N").
pub fn udp_picks(client: &Netns) -> anyhow::Result<BTreeMap<u16, String>> {
    let target = SocketAddr::new(VIP4.parse()?, 80);
    client.run(|| -> anyhow::Result<BTreeMap<u16, String>> {
        let mut out = BTreeMap::new();
        for port in 20000..21000u16 {
            let s = UdpSocket::bind(("10.20.0.2", port))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut buf = [0u8; 512];
            let mut answer = None;
            for _ in 0..3 {
                s.send_to(b"which", target)?;
                if let Ok(n) = s.recv(&mut buf) {
                    answer = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                    break;
                }
            }
            let a = answer.with_context(|| format!("no answer from source port {port}"))?;
            out.insert(port, a.split(" (").next().unwrap_or("").to_string());
        }
        Ok(out)
    })?
}

/// Flows (of `seen[0]`) that met another backend in a later round.
pub fn moved(seen: &[BTreeMap<u16, String>]) -> usize {
    seen[0]
        .iter()
        .filter(|(p, b)| seen[1..].iter().any(|s| s.get(p) != Some(*b)))
        .count()
}

/// `n` TCP connections to `target` from `client` (3 s connect and read timeouts).
pub fn connect_many(
    client: &Netns,
    target: SocketAddr,
    n: usize,
) -> anyhow::Result<Vec<TcpStream>> {
    client.run(|| -> anyhow::Result<Vec<TcpStream>> {
        (0..n)
            .map(|_| {
                let s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                Ok(s)
            })
            .collect()
    })?
}

/// One request on a new connection; the answering backend ("hello from backend N").
pub fn one_request(target: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    request(&mut s)
}

/// One HTTP/1.1 request on a keep-alive connection; the answering backend's greeting.
pub fn request(s: &mut TcpStream) -> std::io::Result<String> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                return Ok(body.split(" (").next().unwrap_or("").to_string());
            }
        }
    }
}

/// Keep-alive connections and a stream of new ones, counting failures.
pub struct Load {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    /// What each failure was (which connection, the error, when).
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Load {
    pub fn start(client: &Netns, conns: usize) -> anyhow::Result<Self> {
        let target = SocketAddr::new(VIP4.parse()?, 80);
        let streams = connect_many(client, target, conns)?;
        let l = Load {
            stop: Arc::new(AtomicBool::new(false)),
            requests: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(AtomicU64::new(0)),
            failures: Arc::default(),
            threads: Vec::new(),
        };
        let started = Instant::now();
        let mut threads = Vec::new();
        for mut s in streams {
            let (stop, req, failed) = (l.stop.clone(), l.requests.clone(), l.failed.clone());
            let failures = l.failures.clone();
            let port = s.local_addr().map_or(0, |a| a.port());
            threads.push(std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match request(&mut s) {
                        Ok(_) => req.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            note(
                                &failures,
                                started,
                                format!("keep-alive from port {port}: {e}"),
                            );
                            return Ok(());
                        }
                    };
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(())
            }));
        }
        // New connections, one request each, from the client's namespace.
        let (stop, req, failed) = (l.stop.clone(), l.requests.clone(), l.failed.clone());
        let failures = l.failures.clone();
        threads.push(client.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match one_request(target) {
                    Ok(_) => req.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        note(&failures, started, format!("new connection: {e}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        })?);
        Ok(Load { threads, ..l })
    }

    /// Stops the load: requests answered, requests failed, and what each failure was.
    pub fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let failures = self.failures.lock().map(|f| f.clone()).unwrap_or_default();
        (
            self.requests.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            failures,
        )
    }
}

fn note(failures: &std::sync::Mutex<Vec<String>>, started: Instant, what: String) {
    if let Ok(mut f) = failures.lock() {
        f.push(format!("{:.1} s: {what}", started.elapsed().as_secs_f64()));
    }
}

/// The next spoofed source of a flood: `rng` advanced one xorshift step (it stays usable for
/// the packet's other random fields), an address of 198.18.0.0/15 (the benchmarking range,
/// never a real host) and a port from 1024.
pub fn spoofed_source(rng: &mut u64) -> ([u8; 4], u16) {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let r = *rng;
    let src = [
        198,
        18 | ((r >> 8) as u8 & 1),
        (r >> 16) as u8,
        (r >> 24) as u8,
    ];
    (src, (r >> 32) as u16 | 1024)
}

/// A server in `ns` on `addr` that answers one request per connection with `Connection:
/// close` and closes first (the server side then holds the TIME_WAIT); stops with `stop`,
/// bounded at 60 s.
pub fn closing_server(
    ns: &Netns,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let listener = ns.run(|| std::net::TcpListener::bind(addr))??;
    listener.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    );
                    // Dropped here: the server closes first.
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }))
}

/// One request on a new connection with `Connection: close`; the server closes, then the
/// client. An answer not ending in `ok` is `InvalidData`.
pub fn server_closes(target: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    if all.ends_with(b"ok") {
        Ok(())
    } else {
        Err(std::io::ErrorKind::InvalidData.into())
    }
}
