//! The agent under faults, injected for real: a backend host deleted outright, a backend's MAC
//! changed under traffic, a second agent started over a running one, pins made with other
//! options, and a state file on a full filesystem.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData};
use lb_common::VipKey;
use lb_tests::{
    AgentDir, TwoHosts, lb_binary,
    net::sh,
    topo::{DemoNet, PORT, VIP, backend_ip},
    wait_until,
};
use lb_userspace::{agent::reconcile::Serving, api::protocol::BackendView};

fn tcp_vip() -> String {
    format!("{VIP}:{PORT}/tcp")
}

fn vip_ip() -> IpAddr {
    VIP.parse().expect("literal")
}

/// Backend `addr` of the first VIP; fails when it is not listed.
fn backend(dir: &AgentDir, addr: &str) -> anyhow::Result<BackendView> {
    dir.backend(addr)?
        .with_context(|| format!("backend {addr} not listed"))
}

/// Runs `lb args` and returns how long it took; fails when it fails.
fn timed(dir: &AgentDir, args: &[&str]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    dir.cli_ok(args)?;
    Ok(start.elapsed())
}

/// The VIP keys bound in the kernel, read from the pinned `LB_VIPS` map itself.
fn kernel_vips(dir: &AgentDir, iface: &str) -> anyhow::Result<usize> {
    let path = dir.map_pin(iface, lb_common::VIPS_MAP);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map: HashMap<MapData, VipKey, u32> = HashMap::try_from(Map::HashMap(data))?;
    Ok(map.keys().count())
}

/// (a) One backend host deleted outright (its namespace, so ARP to it fails) while another
/// fails its health checks: the failing one leaves the data plane within interval x fall + 1 s,
/// other changes answer in under 1 s each, and a restarted agent starts and serves.
#[test]
fn a_dead_host_freezes_nothing() -> anyhow::Result<()> {
    let mut net = DemoNet::build(3, "generic")?;
    net.start_backends()?;
    net.start_agent(&[])?;
    net.add_vip(
        &tcp_vip(),
        &[0, 1, 2],
        &[
            "--health",
            "tcp",
            "--interval-ms",
            "200",
            "--timeout-ms",
            "150",
            "--fall",
            "2",
        ],
    )?;
    let vip = tcp_vip();
    // Backend 2's host goes away: its server, then its namespace (and veth) are deleted.
    let server2 = net.procs.remove(2);
    drop(server2);
    let host2 = net.backends.remove(2);
    drop(host2);
    // Backend 1's server dies: a health failure that must reach the data plane.
    let server1 = net.procs.remove(1);
    drop(server1);
    let start = Instant::now();
    let limit = Duration::from_millis(200 * 2 + 1000);
    for i in [1, 2] {
        let serving = || backend(&net.dir, &backend_ip(i)).map(|b| b.serving);
        wait_until(
            limit.saturating_sub(start.elapsed()),
            &format!("backend {i} out of the table"),
            || Ok(serving()? == Serving::Down),
            || format!("{:?}", serving()),
        )?;
        eprintln!("backend {i} out of the table after {:?}", start.elapsed());
    }
    // In the data plane: every new connection is answered by backend 0.
    for _ in 0..20 {
        assert_eq!(net.http_get(vip_ip(), PORT)?, 0);
    }
    // Other changes are quick although backend 2 is gone.
    let t1 = timed(&net.dir, &["backend", "remove", &vip, &backend_ip(1)])?;
    let t2 = timed(&net.dir, &["backend", "add", &vip, &backend_ip(1)])?;
    let t3 = timed(
        &net.dir,
        &["backend", "weight", &vip, &backend_ip(0), "200"],
    )?;
    eprintln!("remove {t1:?}, add {t2:?}, weight {t3:?}");
    for t in [t1, t2, t3] {
        assert!(t < Duration::from_secs(1), "a change took {t:?}");
    }
    // Restart (kill -9) with the dead host still configured: starts and serves.
    if let Some(a) = net.agent.as_mut() {
        a.kill();
    }
    net.agent = None;
    net.start_agent(&[])?;
    // Health is not persisted: it starts up and the probes take the dead ones out again.
    let start = Instant::now();
    for i in [1, 2] {
        let serving = || backend(&net.dir, &backend_ip(i)).map(|b| b.serving);
        wait_until(
            limit.saturating_sub(start.elapsed()),
            &format!("backend {i} out after the restart"),
            || Ok(serving()? == Serving::Down),
            || format!("{:?}", serving()),
        )?;
    }
    for _ in 0..10 {
        assert_eq!(net.http_get(vip_ip(), PORT)?, 0);
    }
    let t4 = timed(&net.dir, &["backend", "remove", &vip, &backend_ip(2)])?;
    assert!(
        t4 < Duration::from_secs(1),
        "removing the dead backend took {t4:?}"
    );
    let stats = net.dir.stats()?;
    assert_eq!(stats.agent.not_converged, None, "{stats:?}");
    Ok(())
}

/// (b) A backend's MAC changes under traffic (NIC swap, VM move): once the kernel learns the
/// new address (here: the moved host resolves the load balancer, as a rebooted host does),
/// new connections reach it again within 5 s.
#[test]
fn a_changed_backend_mac_is_followed() -> anyhow::Result<()> {
    let mut net = DemoNet::build(2, "generic")?;
    net.start_backends()?;
    net.start_agent(&[])?;
    net.add_vip(&tcp_vip(), &[0, 1], &[])?;
    let old = backend(&net.dir, &backend_ip(0))?.mac;
    let new_mac = "02:42:00:00:be:ef";
    assert_ne!(old, new_mac);
    net.backends[0].ip(&["link", "set", "eth0", "address", new_mac])?;
    net.backends[0].ip(&["neigh", "flush", "dev", "eth0"])?;
    let start = Instant::now();
    net.backends[0].exec("ping", &["-c", "1", "-W", "1", "10.200.0.2"])?;
    let mac = || backend(&net.dir, &backend_ip(0)).map(|b| b.mac);
    wait_until(
        Duration::from_secs(5).saturating_sub(start.elapsed()),
        "the new MAC followed",
        || Ok(mac()? == new_mac),
        || format!("{:?}", mac()),
    )?;
    let mut seen = [0usize; 2];
    for _ in 0..30 {
        seen[net.http_get(vip_ip(), PORT)?] += 1;
    }
    eprintln!("MAC followed after {:?}; answers {seen:?}", start.elapsed());
    assert!(
        seen[0] > 0,
        "backend 0 unreachable after its MAC changed: {seen:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(5) + Duration::from_secs(10));
    Ok(())
}

/// (c) A second `lb run --fresh` (and an identical second `lb run`) while one runs: refused
/// with the running agent's pid and socket, nothing changed, forwarding unaffected.
#[test]
fn a_second_agent_is_refused_without_touching_anything() -> anyhow::Result<()> {
    let mut net = DemoNet::build(2, "native")?;
    net.start_backends()?;
    net.start_agent(&[])?;
    net.add_vip(&tcp_vip(), &[0, 1], &[])?;
    let before = net.dir.vips()?;
    let traffic = net.start_traffic(vip_ip(), 10, true)?;
    std::thread::sleep(Duration::from_millis(300));
    let other_socket = net.dir.dir.join("second.sock");
    for extra in [&["--fresh"][..], &[][..]] {
        let mut cmd = net.lb.command(lb_binary()?.to_str().context("path")?);
        cmd.arg("--socket").arg(&other_socket);
        cmd.args(["run", "--iface", "eth0", "--mode", "native", "--bpffs"]);
        cmd.arg(&net.dir.bpffs)
            .args(extra)
            .arg("--duration")
            .arg("5");
        cmd.arg("--state-file").arg(net.dir.dir.join("second.json"));
        let out = cmd.output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{extra:?}: {err}");
        assert!(err.contains("another agent already runs on eth0"), "{err}");
        assert!(err.contains("pid ") && err.contains("lb.sock"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!other_socket.exists(), "the refused agent left a socket");
    }
    std::thread::sleep(Duration::from_millis(300));
    let report = traffic.stop()?;
    assert!(report.new_ok > 20, "too little traffic: {}", report.new_ok);
    assert!(report.new_failed.is_empty(), "{:?}", report.new_failed);
    assert!(
        report.long_lived_errors.is_empty(),
        "{:?}",
        report.long_lived_errors
    );
    assert_eq!(net.dir.vips()?, before);
    // The first agent still owns the data plane: a change reaches it.
    net.lb(&["backend", "drain", &tcp_vip(), &backend_ip(1)])?;
    for _ in 0..10 {
        assert_eq!(net.http_get(vip_ip(), PORT)?, 0);
    }
    Ok(())
}

/// (d) Pins made with other `--flow-entries` / `--per-cpu-flows` / `--ring-size` /
/// `--nat-entries` are refused with the hint;
/// the same options adopt them; `--fresh` starts over from the state file.
#[test]
fn pins_from_other_options_are_refused() -> anyhow::Result<()> {
    // The backend namespace is bound, not dropped: dropping it would delete the veth.
    let TwoHosts {
        lb,
        veth,
        backend: _backend,
    } = TwoHosts::new("pn", 66)?;
    let dir = AgentDir::new("pn")?;
    let vip = "10.66.0.100:80/tcp";
    let opts = ["--flow-entries", "8192", "--ring-size", "16381"];
    let mut agent = dir.spawn_agent(&lb, &veth.a, &opts)?;
    dir.cli_ok(&["vip", "add", vip])?;
    dir.cli_ok(&["backend", "add", vip, "10.66.0.2"])?;
    let before = dir.vips()?;
    agent.kill();
    for (extra, what) in [
        (
            &["--flow-entries", "4096", "--ring-size", "16381"][..],
            "--flow-entries 8192, this agent 4096",
        ),
        (
            &[
                "--flow-entries",
                "8192",
                "--ring-size",
                "16381",
                "--per-cpu-flows",
            ][..],
            "--per-cpu-flows",
        ),
        (
            &["--flow-entries", "8192"][..],
            "--ring-size 16381, this agent 65537",
        ),
        (
            &[
                "--flow-entries",
                "8192",
                "--ring-size",
                "16381",
                "--nat-entries",
                "4096",
            ][..],
            "--nat-entries 65536, this agent 4096",
        ),
    ] {
        let mut cmd = lb.command(lb_binary()?.to_str().context("path")?);
        cmd.arg("--socket").arg(dir.socket());
        cmd.args(["run", "--iface", &veth.a, "--mode", "generic", "--bpffs"]);
        cmd.arg(&dir.bpffs)
            .arg("--state-file")
            .arg(dir.state_file())
            .args(extra);
        let out = cmd.output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{extra:?}: {err}");
        assert!(
            err.contains(what) && err.contains("--fresh"),
            "{extra:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // The program kept forwarding from the pins all along; the same options adopt them.
    let out = sh_out("ip", &["-n", lb.name(), "link", "show", &veth.a])?;
    assert!(
        out.contains("xdp"),
        "refused starts detached the program: {out}"
    );
    let agent = dir.spawn_agent(&lb, &veth.a, &[&opts[..], &["--mode", "generic"]].concat())?;
    assert_eq!(dir.vips()?, before);
    drop(agent);
    // --fresh: new maps, the desired state comes back from the state file.
    let _agent = dir.spawn_agent(&lb, &veth.a, &["--fresh", "--mode", "generic"])?;
    let after = dir.vips()?;
    assert_eq!(after[0].vip.to_string(), vip, "{after:?}");
    assert_eq!(kernel_vips(&dir, &veth.a)?, 1);
    Ok(())
}

fn sh_out(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(program).args(args).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A small tmpfs, unmounted on drop.
struct TinyFs(PathBuf);

impl TinyFs {
    fn new(at: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(at)?;
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "size=64k",
                "tmpfs",
                &at.to_string_lossy(),
            ],
        )?;
        Ok(TinyFs(at.to_path_buf()))
    }

    /// Fills it up; returns the filler's path.
    fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        let _ = std::fs::write(&filler, vec![0u8; 1 << 20]);
        filler
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = sh("umount", &["-l", &self.0.to_string_lossy()]);
    }
}

/// (e) The state file on a full filesystem: the change is refused (exit code 8) and kernel,
/// memory and file agree afterwards; once there is room, the same change works.
#[test]
fn a_full_disk_refuses_the_change_and_changes_nothing() -> anyhow::Result<()> {
    // The backend namespace is bound, not dropped: dropping it would delete the veth.
    let TwoHosts {
        lb,
        veth,
        backend: _backend,
    } = TwoHosts::new("fd", 67)?;
    let dir = AgentDir::new("fd")?;
    let fs = TinyFs::new(&dir.dir.join("state"))?;
    let state = fs.0.join("lb.json");
    let mut cmd = lb.command(lb_binary()?.to_str().context("path")?);
    cmd.arg("--socket").arg(dir.socket());
    cmd.args([
        "run",
        "--iface",
        &veth.a,
        "--mode",
        "generic",
        "--ring-size",
        "16381",
        "--bpffs",
    ]);
    cmd.arg(&dir.bpffs).arg("--state-file").arg(&state);
    let mut agent = lb_tests::ChildGuard::spawn(cmd, "lb run")?;
    agent.wait_for_line(Duration::from_secs(30), |l| {
        l.starts_with("serving the control API")
    })?;
    dir.cli_ok(&["vip", "add", "10.67.0.100:80/tcp"])?;
    dir.cli_ok(&["backend", "add", "10.67.0.100:80/tcp", "10.67.0.2"])?;
    let before = dir.vips()?;
    let file_before = std::fs::read_to_string(&state)?;
    let filler = fs.fill();
    let out = dir.cli(&["vip", "add", "10.67.0.101:80/tcp"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{err}");
    assert!(err.contains("No space left"), "{err}");
    assert_eq!(dir.vips()?, before, "memory changed");
    assert_eq!(
        std::fs::read_to_string(&state)?,
        file_before,
        "file changed"
    );
    assert_eq!(kernel_vips(&dir, &veth.a)?, 1, "kernel changed");
    assert!(
        !fs.0.join("lb.json.tmp").exists(),
        "temporary file left behind"
    );
    // Room again: the same change goes through, everywhere.
    std::fs::remove_file(filler)?;
    dir.cli_ok(&["vip", "add", "10.67.0.101:80/tcp"])?;
    assert_eq!(kernel_vips(&dir, &veth.a)?, 2);
    assert!(std::fs::read_to_string(&state)?.contains("10.67.0.101:80/tcp"));
    agent.kill();
    drop(fs);
    Ok(())
}
