//! NAT at connection rates: the same client threads open connections (`Connection: close`,
//! the server closing first) and send keep-alive requests, once straight to one backend and
//! once through a NAT VIP in front of the three backends, in the same run on the routed
//! network (`lb_tests::routed`). Each run is bounded in time; a failure is counted, never
//! retried. The load balancer's own CPU is its XDP program's run time (the kernel's
//! `BPF_ENABLE_STATS` figures for the program attached to its eth0, which include the
//! tail-called `lb_nat`): on veth the rest of its forwarding is charged to whichever
//! process sent the packet, so no other per-node figure separates it.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{
    routed::{Routed, VIP4},
    traffic::server_closes,
};

/// Seconds per measured run (four runs).
const RUN: Duration = Duration::from_secs(8);
/// Client threads: enough to keep both cores busy through the connection setup's waits.
const CLIENTS: usize = 8;
/// Server threads per backend, each serving one connection at a time (so keep-alive's
/// `CLIENTS` connections all find one even when every one lands on one backend).
const SERVER_THREADS: usize = CLIENTS;
/// The NAT pool: four addresses on the load balancer's eth0.
const POOL: [&str; 4] = ["10.30.0.21", "10.30.0.22", "10.30.0.23", "10.30.0.24"];
const PORT: u16 = 9000;
const KEEP_REQ: &[u8] = b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n";
/// The same three backends behind the kernel's own NAT on the load balancer's node (nft
/// DNAT by round robin, then masquerade): the same hops as the XDP NAT (client, router, load
/// balancer, router, backend), so the two compare the programs, not the topology.
const NFT_VIP: &str = "10.0.0.12";
const NFT_RULES: &str = "table ip lbbench {
  chain pre {
    type nat hook prerouting priority dstnat;
    ip daddr 10.0.0.12 tcp dport 80 dnat to numgen inc mod 3 map { 0 : 10.41.0.2, 1 : 10.42.0.2, 2 : 10.43.0.2 } : 9000
  }
  chain post {
    type nat hook postrouting priority srcnat;
    ct status dnat masquerade
  }
}
";

/// One measured run: answers, failures, wall time, this process's CPU (clients, servers and
/// the forwarding their sends ran in softirq), and the LB program's run time and runs.
#[derive(Default, Clone, Copy)]
struct Run {
    ok: u64,
    failed: u64,
    secs: f64,
    cpu_secs: f64,
    prog_ns: u64,
    prog_runs: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.secs
    }
}

fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// A server on `addr` in backend `i`'s namespace: `SERVER_THREADS` threads, each accepting and
/// answering requests on one connection until the client closes or asks to close (then the
/// server closes first). Accepts time out every 200 ms to see `stop`.
fn server(net: &Routed, i: usize, stop: &Arc<AtomicBool>) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let addr: SocketAddr = format!("10.4{i}.0.2:{PORT}").parse()?;
    let listener = net.backends[i - 1].run(|| TcpListener::bind(addr))??;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid socket and a timeval of the size given; SO_RCVTIMEO bounds accept().
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    anyhow::ensure!(rc == 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    let mut threads = Vec::new();
    for _ in 0..SERVER_THREADS {
        let (l, stop) = (listener.try_clone()?, stop.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok((s, _)) = l.accept() {
                    serve(s);
                }
            }
        }));
    }
    Ok(threads)
}

fn serve(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 1024];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            return;
        }
        // Requests are sent one at a time and fit one segment.
        let close = buf[..n].windows(17).any(|w| w == b"Connection: close");
        let answer: &[u8] = if close {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        };
        if s.write_all(answer).is_err() || close {
            return;
        }
    }
}

/// One request on a kept-alive connection; reads the whole 2-byte answer.
fn one_keep(s: &mut TcpStream) -> std::io::Result<()> {
    s.write_all(KEEP_REQ)?;
    let mut buf = [0u8; 256];
    let mut got = 0;
    while !buf[..got].ends_with(b"\r\n\r\nok") {
        let n = s.read(&mut buf[got..])?;
        if n == 0 || got + n == buf.len() {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        got += n;
    }
    Ok(())
}

/// `CLIENTS` threads in the client namespace for `RUN`: new connections (`keep` false) or
/// requests on one kept-alive connection each.
fn measure(net: &Routed, target: SocketAddr, keep: bool, prog: Option<u32>) -> anyhow::Result<Run> {
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let before = (cpu_secs(), prog_stats(prog)?);
    let start = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..CLIENTS {
        let (ok, failed) = (ok.clone(), failed.clone());
        threads.push(net.client.spawn(move || {
            let mut conn: Option<TcpStream> = None;
            while start.elapsed() < RUN {
                let r = if keep {
                    let s = match conn.as_mut() {
                        Some(s) => s,
                        None => {
                            let s = TcpStream::connect_timeout(&target, Duration::from_secs(3));
                            let s = s.and_then(|s| {
                                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                                s.set_nodelay(true)?;
                                Ok(s)
                            });
                            match s {
                                Ok(s) => conn.insert(s),
                                Err(_) => {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                            }
                        }
                    };
                    let r = one_keep(s);
                    if r.is_err() {
                        conn = None;
                    }
                    r
                } else {
                    server_closes(target)
                };
                match r {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })?);
    }
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("client thread"))??;
    }
    let secs = start.elapsed().as_secs_f64();
    let after = (cpu_secs(), prog_stats(prog)?);
    Ok(Run {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        secs,
        cpu_secs: after.0 - before.0,
        prog_ns: after.1.0 - before.1.0,
        prog_runs: after.1.1 - before.1.1,
    })
}

/// The program `id`'s accumulated run time (ns) and runs; zeros without an id.
fn prog_stats(id: Option<u32>) -> anyhow::Result<(u64, u64)> {
    let Some(id) = id else { return Ok((0, 0)) };
    for p in aya::programs::loaded_programs() {
        let p = p?;
        if p.id() == id {
            return Ok((p.run_time().as_nanos() as u64, p.run_count()));
        }
    }
    anyhow::bail!("program {id} is gone")
}

/// The id of the XDP program attached to `dev` in `ns` (`ip -j -d link`).
fn xdp_prog_id(net: &Routed, dev: &str) -> anyhow::Result<u32> {
    let out = net
        .lb
        .command("ip")
        .args(["-j", "-d", "link", "show", "dev", dev])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j link")?;
    let xdp = &v[0]["xdp"];
    let id = xdp["prog"]["id"]
        .as_u64()
        .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64())
        .with_context(|| format!("no XDP program on {dev}: {xdp}"))?;
    Ok(id as u32)
}

fn network() -> anyhow::Result<Routed> {
    let mut net = Routed::new("bnr")?;
    for a in POOL {
        net.lb
            .ip(&["addr", "add", &format!("{a}/32"), "dev", "eth0"])?;
    }
    let mut args = vec!["--nat-entries", "262144"];
    for a in POOL {
        args.extend(["--nat-source", a]);
    }
    net.start_agent(&args)?;
    let vip = format!("{VIP4}:80/tcp");
    net.lb(&["vip", "add", &vip, "--forward", "nat"])?;
    for i in 1..=3 {
        // Answers cross the XDP program, which updates checksums incrementally: they must
        // leave the backend complete (no TX offload on its veth).
        net.backends[i - 1].exec(
            "ethtool",
            &["-K", &lb_tests::routed::backend_dev(i), "tx", "off"],
        )?;
        net.lb(&["backend", "add", &vip, &format!("10.4{i}.0.2:{PORT}")])?;
    }
    let mut nft = net.lb.command("nft");
    nft.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = nft.spawn().context("nft")?;
    child
        .stdin
        .take()
        .context("nft's stdin")?
        .write_all(NFT_RULES.as_bytes())?;
    anyhow::ensure!(child.wait()?.success(), "nft -f refused the rules");
    Ok(net)
}

/// Prints the NAT rate table: each way, new connections and keep-alive requests per second
/// and CPU per request, and the NAT's ratio to direct against its target.
pub fn nat_rate_rows() -> anyhow::Result<()> {
    let net = network()?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut servers = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for i in 1..=3 {
            servers.extend(server(&net, i, &stop)?);
        }
        let vip: SocketAddr = format!("{VIP4}:80").parse()?;
        let direct: SocketAddr = format!("10.41.0.2:{PORT}").parse()?;
        let nft: SocketAddr = format!("{NFT_VIP}:80").parse()?;
        // The first packets to each backend wait for neighbour entries.
        net.client.run(|| -> std::io::Result<()> {
            for _ in 0..30 {
                server_closes(vip)?;
                server_closes(direct)?;
                server_closes(nft)?;
            }
            Ok(())
        })??;
        let prog = xdp_prog_id(&net, "eth0")?;
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("BPF_ENABLE_STATS (the LB program's run time)")?;
        let d_close = measure(&net, direct, false, None)?;
        let n_close = measure(&net, vip, false, Some(prog))?;
        let k_close = measure(&net, nft, false, None)?;
        let d_keep = measure(&net, direct, true, None)?;
        let n_keep = measure(&net, vip, true, Some(prog))?;
        let k_keep = measure(&net, nft, true, None)?;
        print_table(&[
            ("new connections, straight to backend 1", d_close, None),
            (
                "new connections, NAT VIP (3 backends, 4-address pool)",
                n_close,
                Some((d_close, Some(0.9))),
            ),
            (
                "new connections, nft DNAT + masquerade on the LB node (3 backends)",
                k_close,
                Some((d_close, None)),
            ),
            ("keep-alive requests, straight to backend 1", d_keep, None),
            (
                "keep-alive requests, NAT VIP",
                n_keep,
                Some((d_keep, Some(0.95))),
            ),
            (
                "keep-alive requests, nft on the LB node",
                k_keep,
                Some((d_keep, None)),
            ),
        ]);
        println!(
            "\nXDP NAT / nft on the same hops: new connections {:.2}x, keep-alive {:.2}x",
            n_close.rate() / k_close.rate(),
            n_keep.rate() / k_keep.rate()
        );
        let s = net.lb(&["stats"])?;
        let refused: Vec<&str> = s
            .lines()
            .filter(|l| l.trim_start().starts_with("dropped_nat") && !l.contains(" 0"))
            .collect();
        println!("\nNAT refusals during the runs (lb stats): {refused:?}");
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    for t in servers {
        let _ = t.join();
    }
    result
}

/// The direct run a row compares with and its target (none: a reference row).
type Versus = Option<(Run, Option<f64>)>;

/// Rows: name, run, and what it compares with.
fn print_table(rows: &[(&str, Run, Versus)]) {
    println!(
        "| case ({CLIENTS} client threads, {} s) | per second | failed | x direct | target | CPU µs/request (bench process) | LB program ns/request (per packet) |",
        RUN.as_secs()
    );
    println!("| --- | ---: | ---: | ---: | --- | ---: | ---: |");
    for (name, r, vs) in rows {
        let (ratio, target) = match vs {
            Some((d, t)) => {
                let ratio = r.rate() / d.rate();
                let target = t.map_or("-".into(), |t| {
                    let met = ratio >= t && r.failed == 0;
                    format!(">= {t}x {}", if met { "met" } else { "MISSED" })
                });
                (format!("{ratio:.2}"), target)
            }
            None => ("1.00".into(), "-".into()),
        };
        let prog = if r.prog_runs > 0 {
            format!(
                "{:.0} ({:.0})",
                r.prog_ns as f64 / r.ok.max(1) as f64,
                r.prog_ns as f64 / r.prog_runs as f64
            )
        } else {
            "-".into()
        };
        println!(
            "| {name} | {:.0} | {} | {ratio} | {target} | {:.1} | {prog} |",
            r.rate(),
            r.failed,
            r.cpu_secs * 1e6 / r.ok.max(1) as f64,
        );
    }
}
