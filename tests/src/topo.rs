//! The demo network: a client, a load balancer and N backends on one L2 segment, a bridge in
//! its own namespace (the host's namespace is untouched). The VIP is held by the load
//! balancer for ARP/ND and by every backend on `lo` (with `arp_ignore`/`arp_announce` so only
//! the load balancer answers for it): L2 direct server return. Everything it starts or
//! creates is removed on drop, processes first.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{AgentDir, ChildGuard, Netns};

pub const CLIENT_IP: &str = "10.200.0.10";
pub const LB_IP: &str = "10.200.0.2";
pub const VIP: &str = "10.200.0.100";
pub const CLIENT_IP6: &str = "fd00:200::10";
pub const LB_IP6: &str = "fd00:200::2";
pub const VIP6: &str = "fd00:200::100";
/// Port the sample backends listen on (TCP and UDP).
pub const PORT: u16 = 80;

pub fn backend_ip(i: usize) -> String {
    format!("10.200.0.{}", 11 + i)
}

pub fn backend_ip6(i: usize) -> String {
    format!("fd00:200::{}", 11 + i)
}

pub struct DemoNet {
    /// Dropped first: agent, samples, XDP_PASS helper.
    pub procs: Vec<ChildGuard>,
    pub agent: Option<ChildGuard>,
    pub dir: AgentDir,
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    pub bridge: Netns,
    pub mode: String,
}

fn best_effort_sysctl(ns: &Netns, key: &str, value: &str) {
    let _ = ns.sysctl(key, value);
}

impl DemoNet {
    /// Builds the network and starts the sample backends (not the agent).
    pub fn build(backends: usize, mode: &str) -> anyhow::Result<Self> {
        let bridge = Netns::new("dbr")?;
        let client = Netns::new("dcl")?;
        let lb = Netns::new("dlb")?;
        let mut bes = Vec::new();
        for i in 0..backends {
            bes.push(Netns::new(&format!("db{i}"))?);
        }
        let net = DemoNet {
            procs: Vec::new(),
            agent: None,
            dir: AgentDir::new("demo")?,
            client,
            lb,
            backends: bes,
            bridge,
            mode: mode.to_string(),
        };
        net.bridge.ip(&["link", "add", "br0", "type", "bridge"])?;
        net.bridge.ip(&["link", "set", "br0", "up"])?;
        for key in [
            "bridge-nf-call-iptables",
            "bridge-nf-call-ip6tables",
            "bridge-nf-call-arptables",
        ] {
            best_effort_sysctl(&net.bridge, &format!("net.bridge.{key}"), "0");
        }
        net.attach_host(&net.client, "cl", CLIENT_IP, CLIENT_IP6)?;
        net.attach_host(&net.lb, "lb", LB_IP, LB_IP6)?;
        for (i, ns) in net.backends.iter().enumerate() {
            net.attach_host(ns, &format!("b{i}"), &backend_ip(i), &backend_ip6(i))?;
        }
        // Rewritten frames keep a partial checksum if the sender offloads it (NETNS-NOTES).
        net.client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
        // The load balancer owns the VIP for ARP/ND; it forwards out of the port it received on.
        net.lb
            .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "eth0"])?;
        net.lb.ip(&[
            "addr",
            "add",
            &format!("{VIP6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        for dev in ["all", "eth0"] {
            net.lb
                .sysctl(&format!("net.ipv4.conf.{dev}.send_redirects"), "0")?;
            net.lb
                .sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
        }
        for ns in &net.backends {
            ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo"])?;
            for dev in ["all", "eth0"] {
                ns.sysctl(&format!("net.ipv4.conf.{dev}.arp_ignore"), "1")?;
                ns.sysctl(&format!("net.ipv4.conf.{dev}.arp_announce"), "2")?;
                ns.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
            }
        }
        Ok(net)
    }

    /// A veth from the bridge (port `p-<role>`) to `eth0` in `ns`, with both addresses.
    fn attach_host(&self, ns: &Netns, role: &str, ip4: &str, ip6: &str) -> anyhow::Result<()> {
        let port = format!("p-{role}");
        self.bridge.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.bridge
            .ip(&["link", "set", &port, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"])?;
        ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Starts a sample backend (HTTP + UDP echo on port 80, v4 and v6) in backend `i`.
    pub fn start_backend(&mut self, i: usize) -> anyhow::Result<()> {
        let child = crate::proc::sample_backend(&self.backends[i], PORT, i)?;
        self.procs.push(child);
        Ok(())
    }

    /// Starts the sample backends and, in native mode, XDP_PASS on the load balancer's veth
    /// peer (native XDP_TX on a veth is only delivered when the peer runs XDP).
    pub fn start_backends(&mut self) -> anyhow::Result<()> {
        for i in 0..self.backends.len() {
            self.start_backend(i)?;
        }
        if self.mode == "native" {
            let child = crate::proc::xdp_pass(&self.bridge, "p-lb")?;
            self.procs.push(child);
        }
        Ok(())
    }

    /// Starts the agent on the load balancer's `eth0`.
    pub fn start_agent(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["--mode", self.mode.as_str()];
        args.extend_from_slice(extra);
        let agent = self.dir.spawn_agent(&self.lb, "eth0", &args)?;
        self.agent = Some(agent);
        Ok(())
    }

    /// `lb ...` against this network's agent; fails with its stderr.
    pub fn lb(&self, args: &[&str]) -> anyhow::Result<String> {
        self.dir.cli_ok(args)
    }

    /// Adds VIP `vip` (e.g. `10.200.0.100:80/tcp`) with backends `indexes` (v4 or v6 by VIP).
    pub fn add_vip(&self, vip: &str, indexes: &[usize], extra: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["vip", "add", vip];
        args.extend_from_slice(extra);
        self.lb(&args)?;
        let v6 = vip.starts_with('[');
        for i in indexes {
            let addr = if v6 { backend_ip6(*i) } else { backend_ip(*i) };
            self.lb(&["backend", "add", vip, &addr])?;
        }
        Ok(())
    }

    /// One HTTP GET on a new connection from the client; returns the backend index answering.
    pub fn http_get(&self, vip: IpAddr, port: u16) -> anyhow::Result<usize> {
        backend_index(&http_request(
            &self.client,
            SocketAddr::new(vip, port),
            &get("/"),
        )?)
    }

    /// One UDP request/response from the client; returns the backend index answering.
    pub fn udp_get(&self, vip: IpAddr, port: u16) -> anyhow::Result<usize> {
        let body = self.client.run(move || -> anyhow::Result<String> {
            let bind: SocketAddr = if vip.is_ipv4() {
                "0.0.0.0:0".parse()?
            } else {
                "[::]:0".parse()?
            };
            let s = UdpSocket::bind(bind)?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut buf = [0u8; 512];
            for _ in 0..5 {
                s.send_to(b"hello", SocketAddr::new(vip, port))?;
                if let Ok(n) = s.recv(&mut buf) {
                    return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
            bail!("no UDP answer from {vip}:{port}")
        })??;
        backend_index(&body)
    }
}

/// A `GET path` request that closes the connection after the answer.
pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n").into_bytes()
}

/// Sends `request` on a new connection from namespace `ns` to `to` and returns the whole
/// answer (up to the server closing). Bounded: 3 s to connect, 10 s per read or write.
pub fn http_request(ns: &Netns, to: SocketAddr, request: &[u8]) -> anyhow::Result<String> {
    ns.run(|| -> anyhow::Result<String> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    })?
}

/// The `i` of "hello from backend i" in a response.
pub fn backend_index(body: &str) -> anyhow::Result<usize> {
    let rest = body
        .split("hello from backend ")
        .nth(1)
        .with_context(|| format!("not a sample backend's answer: {body:?}"))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .with_context(|| format!("no backend number in {body:?}"))
}

/// One HTTP/1.1 keep-alive request on an open connection; returns the answering backend.
pub fn keepalive_request(s: &mut TcpStream) -> anyhow::Result<usize> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            bail!("connection closed by peer");
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .context("no content-length")?
        .trim()
        .parse()?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    backend_index(&String::from_utf8_lossy(&body))
}

/// What background traffic saw.
#[derive(Debug, Default)]
pub struct TrafficReport {
    /// Rounds of one request on every long-lived connection.
    pub rounds: usize,
    /// Long-lived connection failures (resets, closes, a different backend answering).
    pub long_lived_errors: Vec<String>,
    pub new_ok: usize,
    pub new_failed: Vec<String>,
}

/// The new-connection thread: (successes, failures).
type NewConnThread = std::thread::JoinHandle<anyhow::Result<(usize, Vec<String>)>>;

/// Long-lived connections exchanging a request every 100 ms, and (optionally) a stream of
/// new connections, until stopped (at most two minutes).
pub struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// While set, the long-lived connections stay idle (open, nothing sent).
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    long: std::thread::JoinHandle<anyhow::Result<TrafficReport>>,
    new: Option<NewConnThread>,
    /// Rounds done so far (the report's count, readable while running).
    rounds: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl DemoNet {
    /// Opens `long_lived` connections to `vip:PORT` (learning each one's backend) and starts
    /// the traffic.
    pub fn start_traffic(
        &self,
        vip: IpAddr,
        long_lived: usize,
        new_conns: bool,
    ) -> anyhow::Result<Traffic> {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        };
        let stop = Arc::new(AtomicBool::new(false));
        let addr = SocketAddr::new(vip, PORT);
        let conns = self
            .client
            .run(move || -> anyhow::Result<Vec<(TcpStream, usize)>> {
                let mut out = Vec::new();
                for _ in 0..long_lived {
                    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
                    s.set_read_timeout(Some(Duration::from_secs(3)))?;
                    let b = keepalive_request(&mut s)?;
                    out.push((s, b));
                }
                Ok(out)
            })??;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let st = stop.clone();
        let paused = Arc::new(AtomicBool::new(false));
        let pa = paused.clone();
        let rounds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ro = rounds.clone();
        let long = std::thread::spawn(move || -> anyhow::Result<TrafficReport> {
            let mut conns = conns;
            let mut r = TrafficReport::default();
            while !st.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                if pa.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                for (i, (s, backend)) in conns.iter_mut().enumerate() {
                    match keepalive_request(s) {
                        Ok(b) if b == *backend => {}
                        Ok(b) => r.long_lived_errors.push(format!(
                            "connection {i} moved from backend {backend} to {b}"
                        )),
                        Err(e) => r.long_lived_errors.push(format!("connection {i}: {e}")),
                    }
                }
                r.rounds += 1;
                ro.store(r.rounds, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(r)
        });
        let new = if new_conns {
            let st = stop.clone();
            Some(self.client.spawn(move || {
                let (mut ok, mut failed) = (0usize, Vec::new());
                while !st.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                    let res = (|| -> anyhow::Result<usize> {
                        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
                        s.set_read_timeout(Some(Duration::from_secs(3)))?;
                        keepalive_request(&mut s)
                    })();
                    match res {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e.to_string()),
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                (ok, failed)
            })?)
        } else {
            None
        };
        Ok(Traffic {
            stop,
            paused,
            long,
            new,
            rounds,
        })
    }
}

impl Traffic {
    /// Leaves the long-lived connections idle (open, silent) until [`Traffic::resume`]; waits
    /// for the round in progress to finish.
    pub fn pause(&self) {
        self.paused.store(true, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(250));
    }

    pub fn resume(&self) {
        self.paused
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits until `more` rounds past the current count are done, at most `limit`; returns
    /// how many were (a loaded machine runs fewer than one per 100 ms).
    pub fn wait_rounds(&self, more: usize, limit: Duration) -> usize {
        use std::sync::atomic::Ordering;
        let start = self.rounds.load(Ordering::SeqCst);
        let deadline = std::time::Instant::now() + limit;
        while self.rounds.load(Ordering::SeqCst) < start + more
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.rounds.load(Ordering::SeqCst) - start
    }

    pub fn stop(self) -> anyhow::Result<TrafficReport> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut r = self
            .long
            .join()
            .map_err(|_| anyhow::anyhow!("traffic thread panicked"))??;
        if let Some(h) = self.new {
            let (ok, failed) = h
                .join()
                .map_err(|_| anyhow::anyhow!("traffic thread panicked"))??;
            r.new_ok = ok;
            r.new_failed = failed;
        }
        Ok(r)
    }
}
