//! An upgrade from the previous map ABI for real: the previous release's `lb`
//! (`lb_tests::prev`, built from git once) runs on the routed network with a DSR VIP (IPIP,
//! TCP and UDP), a GUE VIP and a NAT VIP under load (50 keep-alive connections with a request
//! every 100 ms, a stream of new connections, 20 UDP flows), stops with `--keep-on-exit`, and
//! this build starts on its pins: it migrates them, and no request fails, no keep-alive
//! connection or UDP flow changes backend, NAT connections keep their ports and no counter
//! goes backwards. `lb upgrade --check` answers on the pins of ABI N-1, N and N-2.
use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{
    AgentDir,
    prev::prev_lb,
    routed::{CLIENT4, Routed, VIP_MIXED, VIP4, VIP6, backend_dev, backend4, backend6},
    topo::{backend_index, keepalive_request},
    traffic::{connect_many, one_request},
};
use lb_userspace::api::protocol::StatsView;

const DSR: &str = "10.0.0.10:80/tcp";
const DSR_UDP: &str = "10.0.0.10:80/udp";
const GUE: &str = "[2001:db8::10]:80/tcp";
const NAT: &str = "10.0.0.11:80/tcp";
const KEEPALIVES: usize = 50;
const UDP_FLOWS: u16 = 20;

/// `lb ARGS` of build `lb` against the agent of `dir`; stdout, or the failure with stderr.
fn lb_of(lb: &Path, dir: &AgentDir, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(lb)
        .arg("--socket")
        .arg(dir.socket())
        .args(args)
        .output()
        .context("running lb")?;
    anyhow::ensure!(
        out.status.success(),
        "`lb {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// This build's `lb upgrade --check` on the network's pins: (exit code, stdout, stderr).
fn upgrade_check(net: &Routed) -> anyhow::Result<(i32, String, String)> {
    let bpffs = net.dir.bpffs.to_str().context("path")?;
    let out = Command::new(lb_tests::lb_binary()?)
        .args(["upgrade", "--check", "--iface", "eth0", "--bpffs", bpffs])
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Failures seen by the load, and what it did.
#[derive(Default)]
struct Seen {
    failures: Mutex<Vec<String>>,
    requests: AtomicU64,
    datagrams: AtomicU64,
}

impl Seen {
    fn fail(&self, started: Instant, what: String) {
        if let Ok(mut f) = self.failures.lock() {
            f.push(format!("{:.2} s: {what}", started.elapsed().as_secs_f64()));
        }
    }
}

/// The load of the issue, until `stop` (at most two minutes).
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
    threads: Vec<std::thread::JoinHandle<()>>,
    namespaced: Vec<std::thread::JoinHandle<anyhow::Result<anyhow::Result<()>>>>,
}

fn targets() -> [SocketAddr; 3] {
    [
        SocketAddr::new(VIP4.parse().expect("VIP"), 80),
        SocketAddr::new(VIP6.parse().expect("VIP"), 80),
        SocketAddr::new(VIP_MIXED.parse().expect("VIP"), 80),
    ]
}

impl Load {
    fn start(net: &Routed) -> anyhow::Result<Load> {
        let (stop, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(Seen::default()));
        let started = Instant::now();
        let deadline = started + Duration::from_secs(120);
        let mut threads = Vec::new();
        // Keep-alive connections spread over the three VIPs, each on the backend it met first.
        for (t, target) in targets().into_iter().enumerate() {
            let n = KEEPALIVES / 3 + usize::from(t < KEEPALIVES % 3);
            for (i, mut s) in connect_many(&net.client, target, n)?
                .into_iter()
                .enumerate()
            {
                let first = keepalive_request(&mut s)?;
                let (stop, seen) = (stop.clone(), seen.clone());
                threads.push(std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(100));
                        match keepalive_request(&mut s) {
                            Ok(b) if b == first => {
                                seen.requests.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(b) => {
                                return seen.fail(
                                    started,
                                    format!("{target} keep-alive {i}: backend {first} then {b}"),
                                );
                            }
                            Err(e) => {
                                return seen.fail(started, format!("{target} keep-alive {i}: {e}"));
                            }
                        }
                    }
                }));
            }
        }
        let mut namespaced = Vec::new();
        // New connections, one request each, to the three VIPs in turn.
        let (s2, n2) = (stop.clone(), seen.clone());
        namespaced.push(net.client.spawn(move || {
            let mut i = 0usize;
            while !s2.load(Ordering::Relaxed) && Instant::now() < deadline {
                let target = targets()[i % 3];
                match one_request(target) {
                    Ok(_) => {
                        n2.requests.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => n2.fail(started, format!("{target} new connection {i}: {e}")),
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok::<(), anyhow::Error>(())
        })?);
        // UDP flows from fixed ports, each on the backend it met first.
        let (s3, n3) = (stop.clone(), seen.clone());
        namespaced.push(
            net.client
                .spawn(move || udp_flows(&s3, &n3, started, deadline))?,
        );
        Ok(Load {
            stop,
            seen,
            threads,
            namespaced,
        })
    }

    /// Stops it; the failures.
    fn finish(self) -> anyhow::Result<(Vec<String>, u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        for t in self.namespaced {
            t.join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))???;
        }
        let failures = self
            .seen
            .failures
            .lock()
            .map(|f| f.clone())
            .unwrap_or_default();
        Ok((
            failures,
            self.seen.requests.load(Ordering::Relaxed),
            self.seen.datagrams.load(Ordering::Relaxed),
        ))
    }
}

/// Every 100 ms a datagram on each of [`UDP_FLOWS`] flows; an answer within 3 x 300 ms from
/// the flow's first backend, or a failure.
fn udp_flows(
    stop: &AtomicBool,
    seen: &Seen,
    started: Instant,
    deadline: Instant,
) -> anyhow::Result<()> {
    let target = SocketAddr::new(VIP4.parse()?, 80);
    let mut flows = Vec::new();
    for i in 0..UDP_FLOWS {
        let s = UdpSocket::bind((CLIENT4, 22000 + i))?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        flows.push((s, None::<String>, false));
    }
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        for (i, (s, first, failed)) in flows.iter_mut().enumerate() {
            if *failed {
                continue;
            }
            let mut buf = [0u8; 512];
            let mut answer = None;
            for _ in 0..3 {
                s.send_to(b"which", target)?;
                if let Ok(n) = s.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    answer = Some(text.split(" (").next().unwrap_or("").to_string());
                    break;
                }
            }
            seen.datagrams.fetch_add(1, Ordering::Relaxed);
            match (answer, first.as_ref()) {
                (None, _) => {
                    *failed = true;
                    seen.fail(started, format!("UDP flow {i}: no answer in 3 tries"));
                }
                (Some(a), None) => *first = Some(a),
                (Some(a), Some(f)) if a != *f => {
                    *failed = true;
                    seen.fail(started, format!("UDP flow {i}: {f} then {a}"));
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Source ports of the load balancer's (NAT) connections established at the backends.
fn nat_ports(net: &Routed) -> anyhow::Result<BTreeSet<(usize, u16)>> {
    let mut out = BTreeSet::new();
    for (i, ns) in net.backends.iter().enumerate() {
        // The samples listen on `::`: IPv4 peers show as `[::ffff:10.30.0.2]:PORT`.
        let o = ns
            .command("ss")
            .args(["-Htn", "state", "established"])
            .output()?;
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let Some((host, port)) = line
                .split_whitespace()
                .last()
                .and_then(|p| p.rsplit_once(':'))
            else {
                continue;
            };
            if host.trim_end_matches(']').ends_with("10.30.0.2") {
                out.insert((i, port.parse()?));
            }
        }
    }
    Ok(out)
}

/// The kernel's id of the map pinned as `name`.
fn map_id(dir: &AgentDir, name: &str) -> anyhow::Result<u32> {
    Ok(aya::maps::MapInfo::from_pin(dir.map_pin("eth0", name))?.id())
}

/// Every counter of `before` is at least as high in `after`.
fn monotonic(before: &StatsView, after: &StatsView) -> Vec<String> {
    before
        .global
        .iter()
        .filter(|(k, c)| {
            let a = after
                .global
                .get(*k)
                .map_or((0, 0), |a| (a.packets, a.bytes));
            a.0 < c.packets || a.1 < c.bytes
        })
        .map(|(k, c)| format!("{k}: {} then {:?}", c.packets, after.global.get(k)))
        .collect()
}

/// The network with the previous release running and the VIPs configured.
fn previous_release_serving(prev: &Path) -> anyhow::Result<Routed> {
    let mut net = Routed::new("upg")?;
    for i in 1..=3 {
        net.start_sample(i)?;
        net.decap(i, &[])?;
        // NAT answers cross the XDP program, which updates checksums incrementally.
        net.backends[i - 1].exec("ethtool", &["-K", &backend_dev(i), "tx", "off"])?;
    }
    let agent = net.dir.spawn_binary(
        prev,
        &net.lb,
        "eth0",
        &["--mode", "native", "--keep-on-exit"],
        &[],
    )?;
    net.agent = Some(agent);
    let lb = |args: &[&str]| lb_of(prev, &net.dir, args);
    for (vip, mode) in [(DSR, "ipip"), (DSR_UDP, "ipip"), (GUE, "gue"), (NAT, "nat")] {
        lb(&["vip", "add", vip, "--forward", mode])?;
        for i in 1..=3 {
            let b = match mode {
                "gue" => backend6(i),
                "nat" => format!("{}:80", backend4(i)),
                _ => backend4(i),
            };
            lb(&["backend", "add", vip, &b])?;
        }
    }
    Ok(net)
}

/// `lb upgrade --check` on the previous release's pins: the plan, nothing changed.
fn check_previous_pins(net: &Routed) -> anyhow::Result<()> {
    let (code, out, err) = upgrade_check(net)?;
    assert_eq!(code, 0, "{out}{err}");
    eprintln!("lb upgrade --check on the previous release's pins:\n{out}");
    let from = lb_common::previous::VERSION;
    assert!(
        out.contains(&format!(
            "are map ABI {from}, this build's is {}",
            lb_common::ABI_VERSION
        )) && out.contains("a start of this build migrates them")
            && out
                .lines()
                .any(|l| l.starts_with("LB_FLOWS ") && l.contains("reused"))
            && out
                .lines()
                .any(|l| l.starts_with("LB_PROGS ") && l.contains("new programs"))
            && out.contains("entries to copy in about")
            && out.contains("KiB of kernel memory"),
        "{out}"
    );
    Ok(())
}

/// Pins made by the ABI before the previous one (the record's version set to it): `lb
/// upgrade --check` and `lb run` refuse them with one line (exit code 4), and the pinned
/// program keeps forwarding.
fn older_pins_are_refused(net: &Routed) -> anyhow::Result<()> {
    let from = lb_common::previous::VERSION;
    assert!(net.dir.map_pin("eth0", lb_common::ABI_MAP).exists());
    let record = lb_userspace::dataplane::rawmap::RawMap::open(
        &net.dir.map_pin("eth0", lb_common::ABI_MAP),
    )?;
    let mut bytes = record.lookup(&0u32.to_ne_bytes())?.context("record")?;
    bytes[8..12].copy_from_slice(&(from - 1).to_ne_bytes());
    record.update(&0u32.to_ne_bytes(), &bytes, 0)?;
    let (code, out, err) = upgrade_check(net)?;
    assert_eq!(code, 4, "{out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("made by map ABI {}", from - 1))
            && err.contains(&format!("migrates only from ABI {from}"))
            && err.contains("--fresh"),
        "{err}"
    );
    let bpffs = net.dir.bpffs.to_str().context("path")?.to_string();
    let state = net.dir.state_file();
    let refused = net
        .lb
        .lb()?
        .arg("--socket")
        .arg(net.dir.socket())
        .args([
            "run",
            "--iface",
            "eth0",
            "--bpffs",
            &bpffs,
            "--duration",
            "5",
        ])
        .arg("--state-file")
        .arg(&state)
        .output()?;
    let line = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(4), "{line}");
    assert!(
        line.contains(&format!("made by map ABI {}", from - 1)),
        "{line}"
    );
    // Nothing changed: the migrated program still forwards.
    let answer = net.client.run(|| one_request(targets()[0]))??;
    assert!(backend_index(&answer).is_ok(), "{answer}");
    Ok(())
}

#[test]
fn the_previous_release_is_upgraded_under_load_without_a_failed_request() -> anyhow::Result<()> {
    let prev = prev_lb()?;
    let version = Command::new(&prev).arg("--version").output()?;
    let version = String::from_utf8_lossy(&version.stdout);
    let want = format!("map ABI {})", lb_common::previous::VERSION);
    assert!(version.contains(&want), "{version}");
    let mut net = previous_release_serving(&prev)?;
    let load = Load::start(&net)?;
    std::thread::sleep(Duration::from_millis(1500));

    check_previous_pins(&net)?;
    let from = lb_common::previous::VERSION;
    let flows_id = map_id(&net.dir, lb_common::FLOWS_MAP)?;
    let progs_id = map_id(&net.dir, lb_common::PROGS_MAP)?;
    let before = serde_json::from_str::<StatsView>(&lb_of(&prev, &net.dir, &["stats", "--json"])?)?;
    let ports_before = nat_ports(&net)?;
    assert!(ports_before.len() >= KEEPALIVES / 3, "{ports_before:?}");

    // The previous release stops and leaves its program forwarding; this build starts.
    let old = net.agent.take().context("agent")?;
    let rest = old.terminate(Duration::from_secs(10))?;
    assert!(
        rest.iter().any(|l| l.contains("--keep-on-exit")),
        "{rest:?}"
    );
    let agent = net
        .dir
        .spawn_agent(&net.lb, "eth0", &["--mode", "native", "--keep-on-exit"])?;
    net.agent = Some(agent);
    std::thread::sleep(Duration::from_millis(2000));
    let ports_after = nat_ports(&net)?;
    let (failures, requests, datagrams) = load.finish()?;
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        requests > 500 && datagrams > 200,
        "{requests} requests, {datagrams} datagrams"
    );
    let kept = ports_before.intersection(&ports_after).count();
    assert!(
        kept >= KEEPALIVES / 3,
        "NAT ports kept: {kept}\n{ports_before:?}\n{ports_after:?}"
    );

    // The flow table was adopted as it was; the program array is new.
    assert_eq!(map_id(&net.dir, lb_common::FLOWS_MAP)?, flows_id);
    assert_ne!(map_id(&net.dir, lb_common::PROGS_MAP)?, progs_id);
    let after = net.dir.stats()?;
    let back = monotonic(&before, &after);
    assert!(back.is_empty(), "counters went backwards: {back:?}");
    let m = after.agent.migration.context("no migration in lb stats")?;
    eprintln!("{requests} requests and {datagrams} datagrams answered; migration: {m:?}");
    assert_eq!((m.from, m.to), (from, lb_common::ABI_VERSION));
    let text = net.lb(&["stats"])?;
    assert!(
        text.contains(&format!(
            "migrated from map ABI {from} to {}",
            lb_common::ABI_VERSION
        )),
        "{text}"
    );

    // N: nothing to migrate.
    let (code, out, err) = upgrade_check(&net)?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("a start adopts them as they are, nothing to migrate"),
        "{out}"
    );

    // N-2: refused with one line, and a start on them too, changing nothing.
    let agent = net.agent.take().context("agent")?;
    agent.terminate(Duration::from_secs(10))?;
    older_pins_are_refused(&net)
}
