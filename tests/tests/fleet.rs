//! The fleet on real parts: a router spreading VIP traffic over three load balancer nodes by
//! ECMP, GUE to three routed backends running `lb decap`, and a real etcd (in the router's
//! namespace, own data dir) holding the configuration every node follows.
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
use lb_tests::{
    Netns,
    fleet::{Fleet, FleetNet, NODES},
    routed::VIP4,
};

/// 1,000 UDP flows (source ports 20000-20999) from the client to the VIP's port 80: the
/// backend answering each ("hello from backend N").
fn udp_picks(client: &Netns) -> anyhow::Result<BTreeMap<u16, String>> {
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
fn moved(seen: &[BTreeMap<u16, String>]) -> usize {
    seen[0]
        .iter()
        .filter(|(p, b)| seen[1..].iter().any(|s| s.get(p) != Some(*b)))
        .count()
}

/// One request on a new connection; the answering backend ("hello from backend N").
fn one_request(target: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    request(&mut s)
}

/// One HTTP/1.1 request on a keep-alive connection; the answering backend's greeting.
fn request(s: &mut TcpStream) -> std::io::Result<String> {
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

fn add_vip(f: &Fleet, k: usize, vip: &str, backends: &[&str]) -> anyhow::Result<()> {
    add_vip_with(f, k, vip, backends, &[])
}

fn add_vip_with(
    f: &Fleet,
    k: usize,
    vip: &str,
    backends: &[&str],
    extra: &[&str],
) -> anyhow::Result<()> {
    let mut args = vec!["vip", "add", vip, "--forward", "gue"];
    args.extend_from_slice(extra);
    f.lb(k, &args)?;
    for b in backends {
        f.lb(k, &["backend", "add", vip, b])?;
    }
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// (a) a change written to etcd is live on every node within a second, with equal digests;
/// (b) 1,000 UDP flows meet the same backend whichever node receives them; a malformed value
/// in etcd is rejected for its key only; `lb cluster status` agrees.
#[test]
fn every_node_applies_each_revision_and_picks_the_same_backend() -> anyhow::Result<()> {
    let f = Fleet::new("fla")?;
    let tcp = format!("{VIP4}:80/tcp");
    let udp = format!("{VIP4}:80/udp");
    add_vip(&f, 0, &tcp, &["10.41.0.2", "10.42.0.2"])?;
    let (mut digest, _) = f.converged(&tcp, None)?;

    // A backend added in etcd itself (etcdctl, as a config pipeline would).
    let key = format!("/xdp-lb/t/vips/{tcp}");
    let value = r#"{"forward":"gue","backends":{"10.41.0.2":{},"10.42.0.2":{},"10.43.0.2":{}}}"#;
    let start = Instant::now();
    f.etcd.ctl(&["put", &key, value])?;
    let (d, _) = f.converged(&tcp, Some(&digest))?;
    let took = start.elapsed();
    println!("a backend added with etcdctl was live on all {NODES} nodes after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    digest = d;
    for k in 0..NODES {
        let v = f.vips(k)?;
        assert_eq!(v[0].backends.len(), 3, "node {k}: {v:?}");
    }

    // 20 changes through `lb` on alternating nodes: time to live everywhere.
    let mut times = Vec::new();
    for n in 0..20 {
        let w = (60 + n * 7).to_string();
        let start = Instant::now();
        f.lb(n % NODES, &["backend", "weight", &tcp, "10.43.0.2", &w])?;
        let (d, _) = f.converged(&tcp, Some(&digest))?;
        times.push(start.elapsed());
        digest = d;
    }
    let max = *times.iter().max().unwrap_or(&Duration::ZERO);
    println!(
        "20 changes: write to live on all nodes median {:?}, max {max:?}",
        median(times.clone())
    );
    assert!(max < Duration::from_secs(1), "{times:?}");

    // (b) the same backend whichever node: each node alone in the ECMP group in turn.
    // Second chance off for this VIP: the sample's UDP socket is unconnected, so with it on
    // a backend hands every datagram of a moved slot to the slot's previous backend, and the
    // answer would name that one instead of the load balancer's choice.
    add_vip_with(
        &f,
        1,
        &udp,
        &["10.41.0.2", "10.42.0.2", "10.43.0.2"],
        &["--second-chance", "0"],
    )?;
    f.converged(&udp, None)?;
    let mut seen: Vec<BTreeMap<u16, String>> = Vec::new();
    for k in 0..NODES {
        f.net.ecmp(&[k])?;
        seen.push(udp_picks(&f.net.client).with_context(|| format!("through node {k} alone"))?);
    }
    f.net.ecmp(&[0, 1, 2])?;
    let differ = moved(&seen);
    let mut spread: BTreeMap<&str, usize> = BTreeMap::new();
    for b in seen[0].values() {
        *spread.entry(b.as_str()).or_default() += 1;
    }
    println!(
        "1000 UDP flows through each node alone: {differ} met a different backend; spread {spread:?}"
    );
    assert_eq!(differ, 0);
    assert_eq!(spread.len(), 3, "{spread:?}");

    // A malformed value is rejected for its key only: the VIP keeps its last good value, the
    // other VIPs still change, and every node says so.
    f.etcd.ctl(&[
        "put",
        &key,
        r#"{"forward":"gue","backends":{"10.41.0.2":{"weight":70000}}}"#,
    ])?;
    f.lb(2, &["backend", "weight", &udp, "10.41.0.2", "55"])?;
    for k in 0..NODES {
        let s = f.stats(k)?;
        let store = s.store.context("store view")?;
        assert!(store.connected, "node {k}: {store:?}");
        assert_eq!(store.rejected.len(), 1, "node {k}: {store:?}");
        assert!(store.rejected[0].contains("70000"), "{store:?}");
        assert_eq!(store.rejected_total, 1, "node {k}: {store:?}");
        let v = f.vips(k)?;
        let t = v
            .iter()
            .find(|v| v.vip.to_string() == tcp)
            .context("tcp vip")?;
        assert_eq!(t.backends.len(), 3, "node {k} kept the last good value");
        let u = v
            .iter()
            .find(|v| v.vip.to_string() == udp)
            .context("udp vip")?;
        assert_eq!(u.backends[0].weight, 55, "node {k} applied the other key");
    }
    let text = f.lb(0, &["stats"])?;
    assert!(text.contains("WARNING: store key not applied"), "{text}");
    println!("{}", text.lines().take(3).collect::<Vec<_>>().join("\n"));

    // Every node publishes its status right after applying a revision.
    let start = Instant::now();
    let c = loop {
        let c = f.cluster(1)?;
        if c.nodes.len() == NODES && c.divergence.is_empty() {
            break c;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(3), "{c:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(c.nodes.iter().all(|n| n.revision == c.revision), "{c:?}");
    // The same in Prometheus terms, on every node.
    let tcp_digest = f.digests(&tcp)?[0].clone().context("digest")?;
    for k in 0..NODES {
        let m = f.metrics(k)?;
        for want in [
            "lb_store_connected 1".to_string(),
            "lb_store_rejected_values_total 1".to_string(),
            format!("lb_store_applied_revision {}", c.revision),
            format!("lb_vip_ring_digest{{vip=\"{tcp}\",digest=\"{tcp_digest}\"}} 1"),
        ] {
            assert!(m.contains(&want), "node {k} metrics lack `{want}`:\n{m}");
        }
    }
    println!("{}", f.lb(1, &["cluster", "status"])?);
    Ok(())
}

/// (e) Two operators at once: edits on different nodes both land (retried on a conflict);
/// two `apply` runs planned at the same revision: one applies, the other is refused with a
/// conflict, never a lost update.
#[test]
fn concurrent_changes_from_different_nodes_are_never_lost() -> anyhow::Result<()> {
    let f = Fleet::new("fle")?;
    let vip = format!("{VIP4}:81/tcp");
    add_vip(&f, 0, &vip, &[])?;
    // The agents' sockets: the threads run `lb` against them as separate operators.
    let sockets: Vec<std::path::PathBuf> = (0..NODES).map(|k| f.net.dir_at(k).socket()).collect();
    let mut workers = Vec::new();
    for (k, socket) in sockets.iter().enumerate().skip(1) {
        let (socket, vip) = (socket.clone(), vip.clone());
        workers.push(std::thread::spawn(move || -> anyhow::Result<()> {
            for n in 1..=10 {
                let a = format!("10.9{k}.0.{n}");
                let out = lb(&socket, &["backend", "add", &vip, &a])?;
                anyhow::ensure!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        }));
    }
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
    }
    for k in 0..NODES {
        let n = f.vips(k)?[0].backends.len();
        assert_eq!(n, 20, "node {k} has every backend both operators added");
    }

    // A value written with another tool (etcdctl: no `meta` bump) between a writer's read
    // and its commit: the commit is refused, the other tool's value stays.
    let keys = || lb_userspace::fleet::schema::Keys::new("t").map_err(anyhow::Error::msg);
    let endpoints = vec![format!("10.30.0.1:{}", lb_tests::etcd::PORT)];
    let store_call = |commit: Option<lb_userspace::fleet::store::Snapshot>| {
        let endpoints = endpoints.clone();
        f.net.router.run(
            move || -> anyhow::Result<(lb_userspace::fleet::store::Snapshot, Option<i64>)> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let store =
                        lb_userspace::fleet::store::Store::connect(&endpoints, keys()?).await?;
                    match commit {
                        None => Ok((store.snapshot(None).await?, None)),
                        Some(snap) => {
                            let w = lb_userspace::fleet::schema::Write::Put {
                                key: format!("/xdp-lb/t/vips/{VIP4}:82/tcp"),
                                value: b"{}".to_vec(),
                            };
                            let r = store.commit(&snap, &[w]).await?;
                            Ok((snap, r))
                        }
                    }
                })
            },
        )?
    };
    let (snap, _) = store_call(None)?;
    f.etcd.ctl(&[
        "put",
        &format!("/xdp-lb/t/vips/{vip}"),
        r#"{"forward":"gue"}"#,
    ])?;
    let (_, committed) = store_call(Some(snap))?;
    assert_eq!(
        committed, None,
        "a commit over another tool's newer write is refused"
    );
    let start = Instant::now();
    while !f.vips(0)?[0].backends.is_empty() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(3),
            "etcdctl's value not applied"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The control: the same commit from a fresh read goes through.
    let (fresh, _) = store_call(None)?;
    let (_, committed) = store_call(Some(fresh))?;
    assert!(
        committed.is_some(),
        "a commit from a fresh read is accepted"
    );
    f.lb(0, &["vip", "remove", &format!("{VIP4}:82/tcp")])?;
    println!("a commit over etcdctl's newer value: refused (the same from a fresh read: accepted)");

    let dir = tempdir()?;
    let a = dir.join("a.toml");
    let b = dir.join("b.toml");
    let config = |backend: &str| {
        format!(
            "[[vip]]\naddress = \"{vip}\"\nforward = \"gue\"\nbackend = [ {{ address = \"{backend}\" }} ]\n"
        )
    };
    std::fs::write(&a, config("10.41.0.2"))?;
    std::fs::write(&b, config("10.42.0.2"))?;
    let plan = f.lb(1, &["apply", "-f", path(&a)?, "--dry-run"])?;
    let rev = plan
        .split("--if-revision ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .with_context(|| format!("no revision in the dry run: {plan}"))?
        .to_string();
    let mut runs = Vec::new();
    for (k, file) in [(1, a.clone()), (2, b.clone())] {
        let (socket, rev) = (sockets[k].clone(), rev.clone());
        runs.push(std::thread::spawn(move || {
            lb(
                &socket,
                &[
                    "apply",
                    "-f",
                    file.to_str().unwrap_or(""),
                    "--if-revision",
                    &rev,
                ],
            )
        }));
    }
    let outs: Vec<std::process::Output> = runs
        .into_iter()
        .map(|r| r.join().map_err(|_| anyhow::anyhow!("apply panicked"))?)
        .collect::<anyhow::Result<_>>()?;
    let ok: Vec<bool> = outs.iter().map(|o| o.status.success()).collect();
    assert_eq!(
        ok.iter().filter(|x| **x).count(),
        1,
        "exactly one applies: {outs:?}"
    );
    let refused = outs
        .iter()
        .find(|o| !o.status.success())
        .context("refused")?;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(4), "conflict exit code: {err}");
    // Refused either before writing (the revision moved) or by etcd's compare (both read the
    // same revision and the other's transaction landed first).
    assert!(
        err.contains("as planned") || err.contains("changed while this apply was planned"),
        "{err}"
    );
    println!(
        "concurrent applies: one applied, the other refused: {}",
        err.trim()
    );
    let winner = if ok[0] { "10.41.0.2" } else { "10.42.0.2" };
    for k in 0..NODES {
        let v = f.vips(k)?;
        let addrs: Vec<String> = v[0]
            .backends
            .iter()
            .map(|b| b.address.to_string())
            .collect();
        assert_eq!(addrs, [winner], "node {k}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `lb --socket SOCKET ARGS`.
fn lb(socket: &std::path::Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(std::process::Command::new(lb_tests::lb_binary()?)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()?)
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(lb_tests::unique_name("fle"));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn path(p: &std::path::Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// Keep-alive connections and a stream of new ones, counting failures.
struct Load {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Load {
    fn start(client: &Netns, conns: usize) -> anyhow::Result<Self> {
        let target = SocketAddr::new(VIP4.parse()?, 80);
        let streams = client.run(|| -> anyhow::Result<Vec<TcpStream>> {
            (0..conns)
                .map(|_| {
                    let s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
                    s.set_read_timeout(Some(Duration::from_secs(3)))?;
                    Ok(s)
                })
                .collect()
        })??;
        let l = Load {
            stop: Arc::new(AtomicBool::new(false)),
            requests: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(AtomicU64::new(0)),
            threads: Vec::new(),
        };
        let mut threads = Vec::new();
        for mut s in streams {
            let (stop, req, failed) = (l.stop.clone(), l.requests.clone(), l.failed.clone());
            threads.push(std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match request(&mut s) {
                        Ok(_) => req.fetch_add(1, Ordering::Relaxed),
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
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
        threads.push(client.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match one_request(target) {
                    Ok(_) => req.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        })?);
        Ok(Load { threads, ..l })
    }

    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        (
            self.requests.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// (c) node loss under load: one node leaves the ECMP group, another is killed with kill -9
/// (and its flows moved away), then it restarts and catches up; (d) etcd down for 10 s:
/// forwarding unaffected, changes refused with a clear line, and they resume on its return.
#[test]
fn node_loss_and_an_etcd_outage_break_nothing() -> anyhow::Result<()> {
    let mut f = Fleet::new("flc")?;
    let vip = format!("{VIP4}:80/tcp");
    add_vip(&f, 0, &vip, &["10.41.0.2", "10.42.0.2", "10.43.0.2"])?;
    f.converged(&vip, None)?;
    let load = Load::start(&f.net.client, 50)?;
    std::thread::sleep(Duration::from_secs(2));
    // Node 2 leaves the group (maintenance): its flows move to nodes 0 and 1.
    f.net.ecmp(&[0, 1])?;
    std::thread::sleep(Duration::from_secs(2));
    // Node 1 dies: kill -9, and the router stops sending to it.
    let mut dead = f.net.take_agent_at(1).context("agent 1")?;
    dead.kill();
    f.net.ecmp(&[0])?;
    std::thread::sleep(Duration::from_secs(2));
    // Its status lease runs out: the cluster shows two nodes.
    let start = Instant::now();
    loop {
        let c = f.cluster(0)?;
        if c.nodes.len() == 2 {
            println!(
                "the killed node left `lb cluster status` after {:?}",
                start.elapsed()
            );
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "{c:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A change while node 1 is down; it restarts from its state file and catches up.
    f.lb(0, &["backend", "weight", &vip, "10.41.0.2", "150"])?;
    f.start(1)?;
    let (d, took) = f.converged(&vip, None)?;
    println!("the restarted node caught up in {took:?} (digest {d})");
    f.net.ecmp(&[0, 1, 2])?;
    std::thread::sleep(Duration::from_secs(2));

    // (d) etcd down for 10 s.
    f.etcd.stop();
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let refused = f
        .net
        .dir_at(2)
        .cli(&["backend", "weight", &vip, "10.42.0.2", "120"])?;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(6), "unavailable: {err}");
    assert!(
        err.contains("etcd is unreachable") && err.contains("keeps forwarding"),
        "{err}"
    );
    println!("a change while etcd is down: {}", err.trim());
    for k in 0..NODES {
        let s = f.stats(k)?.store.context("store")?;
        assert!(!s.connected, "node {k} says etcd is unreachable: {s:?}");
    }
    let text = f.lb(0, &["stats"])?;
    assert!(text.contains("unreachable"), "{text}");
    println!("{}", text.lines().next().unwrap_or(""));
    std::thread::sleep(Duration::from_secs(10).saturating_sub(down.elapsed()));
    f.etcd.resume()?;
    let back = Instant::now();
    loop {
        if (0..NODES).all(|k| {
            f.stats(k)
                .ok()
                .and_then(|s| s.store)
                .is_some_and(|s| s.connected)
        }) {
            break;
        }
        anyhow::ensure!(
            back.elapsed() < Duration::from_secs(15),
            "nodes did not reconnect"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "all nodes reconnected {:?} after etcd returned",
        back.elapsed()
    );
    let before = f.digests(&vip)?[0].clone();
    f.lb(2, &["backend", "weight", &vip, "10.42.0.2", "120"])?;
    f.converged(&vip, before.as_deref())?;
    std::thread::sleep(Duration::from_secs(1));
    let (requests, failed) = load.finish();
    println!("under node loss and an etcd outage: {requests} requests, {failed} failed");
    assert_eq!(failed, 0);
    assert!(requests > 1000, "{requests}");
    Ok(())
}

/// Blocks (or unblocks) node `k`'s health probes to `backend` only: a netfilter rule on the
/// node's own output matching the probe socket's mark (`HC_MARK_BASE | backend id`, the id
/// being this node's), which forwarded (XDP) traffic never meets.
fn block_probes(f: &Fleet, k: usize, vip: &str, backend: &str, on: bool) -> anyhow::Result<()> {
    let v = f.vips(k)?;
    let id = v
        .iter()
        .find(|v| v.vip.to_string() == vip)
        .and_then(|v| v.backends.iter().find(|b| b.address.to_string() == backend))
        .context("backend id")?
        .id;
    let mark = format!("{:#x}", lb_common::HC_MARK_BASE | id);
    f.net.node_ns(k).exec(
        "iptables",
        &[
            if on { "-A" } else { "-D" },
            "OUTPUT",
            "-p",
            "tcp",
            "-m",
            "mark",
            "--mark",
            &mark,
            "-j",
            "REJECT",
        ],
    )
}

/// The health column of `backend` on every node.
fn health_of(f: &Fleet, vip: &str, backend: &str) -> anyhow::Result<Vec<String>> {
    (0..NODES)
        .map(|k| {
            let v = f.vips(k)?;
            let v = v.iter().find(|v| v.vip.to_string() == vip).context("vip")?;
            let b = v
                .backends
                .iter()
                .find(|b| b.address.to_string() == backend)
                .context("backend")?;
            Ok(b.health.clone())
        })
        .collect()
}

/// Samples every node's digest for `period`; returns the longest run of samples (as time)
/// during which they differed.
fn longest_divergence(f: &Fleet, vip: &str, period: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut since: Option<Instant> = None;
    let mut longest = Duration::ZERO;
    while start.elapsed() < period {
        let d = f.digests(vip)?;
        let agree = d.windows(2).all(|w| w[0] == w[1]);
        match (agree, since) {
            (false, None) => since = Some(Instant::now()),
            (true, Some(t)) => {
                longest = longest.max(t.elapsed());
                since = None;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(t) = since {
        longest = longest.max(t.elapsed());
    }
    Ok(longest)
}

/// Health in a fleet: each node probes, the fleet's verdict is the majority of the nodes'
/// views. One node that cannot reach a backend does not take it out anywhere; two of three do
/// take it out everywhere, also on the node whose own probes pass. The nodes' tables never
/// differ for longer than a status round.
#[test]
fn health_is_decided_by_the_majority_of_nodes() -> anyhow::Result<()> {
    let f = Fleet::new("flh")?;
    let vip = format!("{VIP4}:80/tcp");
    let b3 = "10.43.0.2";
    f.lb(
        0,
        &[
            "vip",
            "add",
            &vip,
            "--forward",
            "gue",
            "--health",
            "tcp",
            "--interval-ms",
            "200",
            "--timeout-ms",
            "150",
            "--fall",
            "2",
            "--rise",
            "2",
        ],
    )?;
    for b in ["10.41.0.2", "10.42.0.2", b3] {
        f.lb(0, &["backend", "add", &vip, b])?;
    }
    let (all_up, _) = f.converged(&vip, None)?;
    std::thread::sleep(Duration::from_secs(1));

    // Node 2 alone cannot reach backend 3: the fleet keeps it, node 2 too.
    block_probes(&f, 2, &vip, b3, true)?;
    let longest = longest_divergence(&f, &vip, Duration::from_secs(3))?;
    let h = health_of(&f, &vip, b3)?;
    println!(
        "one node's probes fail: health per node {h:?}, tables differed for at most {longest:?}"
    );
    assert_eq!(h, ["up", "up", "up (fleet)"]);
    assert_eq!(f.digests(&vip)?, vec![Some(all_up.clone()); NODES]);
    let c = f.cluster(0)?;
    assert!(c.divergence.is_empty(), "{c:?}");
    println!("{}", f.lb(0, &["cluster", "status"])?);

    // Node 1 too: a majority, so backend 3 leaves every node's table, node 0's as well.
    block_probes(&f, 1, &vip, b3, true)?;
    let longest2 = longest_divergence(&f, &vip, Duration::from_secs(3))?;
    let h = health_of(&f, &vip, b3)?;
    println!(
        "two nodes' probes fail: health per node {h:?}, tables differed for at most {longest2:?}"
    );
    assert_eq!(h, ["down (fleet)", "down", "down"]);
    let d = f.digests(&vip)?;
    assert!(
        d.windows(2).all(|w| w[0] == w[1]) && d[0].as_deref() != Some(all_up.as_str()),
        "{d:?}"
    );
    for k in 0..NODES {
        let v = f.vips(k)?;
        let b = v[0]
            .backends
            .iter()
            .find(|b| b.address.to_string() == b3)
            .context("b3")?;
        assert_eq!(b.share_pct, 0.0, "node {k} took backend 3 out");
    }

    // Back: both rules gone, backend 3 returns everywhere.
    block_probes(&f, 1, &vip, b3, false)?;
    block_probes(&f, 2, &vip, b3, false)?;
    let start = Instant::now();
    while f.digests(&vip)? != vec![Some(all_up.clone()); NODES] {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(5),
            "backend 3 did not return"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every node takes the verdict as soon as another node's status changes (a watch), and a
    // backend the fleet has no verdict on yet counts as up: the tables move together.
    assert!(
        longest < Duration::from_millis(500) && longest2 < Duration::from_millis(500),
        "{longest:?} {longest2:?}"
    );
    Ok(())
}

/// The same fleet on one L2 segment (direct server return, one-armed nodes, a `type
/// resilient` nexthop group): every node picks the same backend for 1,000 UDP flows, and 50
/// keep-alive connections plus a stream of new ones see zero failures while one node leaves
/// the group and another is killed with kill -9.
#[test]
fn an_l2_fleet_agrees_and_survives_node_loss() -> anyhow::Result<()> {
    let mut f = Fleet::l2("fll")?;
    let backends: Vec<String> = (1..=3).map(lb_tests::l2fleet::backend_ip).collect();
    for vip in [format!("{VIP4}:80/udp"), format!("{VIP4}:80/tcp")] {
        f.lb(0, &["vip", "add", &vip])?;
        for b in &backends {
            f.lb(0, &["backend", "add", &vip, b])?;
        }
        let (d, took) = f.converged(&vip, None)?;
        println!("L2 fleet: {vip} live on all nodes after {took:?} (digest {d})");
    }
    // Each node's MACs of the backends come from its own neighbour table.
    let start = Instant::now();
    while (0..NODES).any(|k| {
        f.vips(k)
            .map(|v| {
                v.iter()
                    .any(|v| v.backends.iter().any(|b| b.mac == "no-mac"))
            })
            .unwrap_or(true)
    }) {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(5), "MACs not learned");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut seen = Vec::new();
    for k in 0..NODES {
        f.net.ecmp(&[k])?;
        seen.push(udp_picks(&f.net.client).with_context(|| format!("through node {k} alone"))?);
    }
    f.net.ecmp(&[0, 1, 2])?;
    let differ = moved(&seen);
    let backends_seen: std::collections::BTreeSet<&String> = seen[0].values().collect();
    println!(
        "L2 fleet: 1000 UDP flows through each node alone: {differ} met a different backend; {} backends answered",
        backends_seen.len()
    );
    assert_eq!(differ, 0);
    assert_eq!(backends_seen.len(), 3, "{backends_seen:?}");

    let load = Load::start(&f.net.client, 50)?;
    std::thread::sleep(Duration::from_secs(2));
    f.net.ecmp(&[0, 1])?;
    std::thread::sleep(Duration::from_secs(2));
    let mut dead = f.net.nodes[1].agent.take().context("agent 1")?;
    dead.kill();
    f.net.ecmp(&[0])?;
    std::thread::sleep(Duration::from_secs(2));
    let (requests, failed) = load.finish();
    println!("L2 fleet, a node leaving and one killed: {requests} requests, {failed} failed");
    assert_eq!(failed, 0);
    assert!(requests > 500, "{requests}");
    Ok(())
}
